"""One prepared GPU check: the CUDA paths work (every init, a short training run, fp32 and bf16),
then training throughput and init time on the GPU. Results are appended to RESULTS.md (or
$KMEANSINIT_RESULTS).

    python benchmarks/gpu_check.py
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import HERE, append_results

sys.path.insert(0, str(HERE.parent / "tests"))

from kmeansinit import METHODS, PaperNet, initialize_, joint_objective  # noqa: E402
from kmeansinit.train import TrainConfig, train  # noqa: E402


def main():
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device")
    dev = torch.device("cuda")
    lines = ["| check | result |", "|---|---|"]
    g = torch.Generator().manual_seed(0)
    images = torch.rand(128, 3, 32, 32, generator=g) * 2 - 1
    for method in METHODS:
        torch.manual_seed(0)
        model = PaperNet(gated=method == "kmeans").to(dev)
        opts = dict(progress=False, steps=3) if method.startswith("kmeans") else {}
        t = time.perf_counter()
        initialize_(model, method, images.to(dev), **opts)
        torch.cuda.synchronize()
        ok = all(torch.isfinite(p).all() for p in model.parameters())
        lines.append(f"| init {method} on cuda | {'finite' if ok else 'NON-FINITE'} ({time.perf_counter() - t:.2f}s) |")
    # The same layer-wise k-means on CPU and GPU reaches the same objective (within 1%).
    objs = {}
    for d in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = PaperNet().to(d)
        initialize_(model, "kmeans-layerwise", images.to(d), steps=5, progress=False)
        objs[d] = joint_objective(model, images.to(d), cosine_weight=0.0)
    lines.append(f"| layer-wise k-means objective cpu vs cuda | {objs['cpu']:.6g} vs {objs['cuda']:.6g} |")
    # The recommended preset, cached and streamed (cache_bytes=0: online passes, stats from a head),
    # on both devices; and the conv-backward cluster sums against an unfold reference on cuda.
    for opts in (dict(), dict(cache_bytes=0, stat_images=64)):
        objs = {}
        for d in ("cpu", "cuda"):
            torch.manual_seed(0)
            model = PaperNet().to(d)
            initialize_(model, "kmeans", images.to(d), progress=False, **opts)
            objs[d] = joint_objective(model, images.to(d), cosine_weight=0.0)
        lines.append(f"| kmeans preset {opts or 'cached'} objective cpu vs cuda | {objs['cpu']:.6g} vs {objs['cuda']:.6g} |")
    from kmeansinit.objectives import filter_responses, masked_patch_sums

    layer = torch.nn.Conv2d(16, 32, 5, stride=2, padding=2, bias=False).to(dev).double()
    x = torch.randn(8, 16, 16, 16, device=dev, dtype=torch.double)
    mask = torch.rand_like(filter_responses(x, layer))
    p = torch.nn.functional.unfold(x, 5, padding=2, stride=2)  # (N, D, L)
    ref = torch.einsum("nkl,ndl->kd", mask[:, 0], p).reshape(layer.weight.shape)
    err = float((masked_patch_sums(x, layer, mask) - ref).abs().max())
    lines.append(f"| masked_patch_sums (conv backward) vs unfold on cuda, float64 | max abs error {err:.2e} |")
    from conftest import write_cifar

    with tempfile.TemporaryDirectory() as tmp:
        write_cifar(Path(tmp), "cifar10", n_train=640, n_test=200)
        for prec in ("fp32", "bf16"):
            cfg = TrainConfig(data=tmp, out=f"{tmp}/run-{prec}", iterations=40, eval_every=20, log_every=10,
                              init="kmeans", init_images=128, init_options=dict(steps=3, refine_steps=5),
                              precision=prec, batch_size=64)
            last = train(cfg, progress=False)
            lines.append(f"| train 40 its on cuda, {prec}, fake data | loss {last['train_loss']:.3f}, test acc {last['test_acc']:.3f} |")
    append_results("GPU check: CUDA paths", dev, lines)
    for script, args in (("train_throughput.py", ["--device", "cuda", "--steps", "30"]),
                         ("train_throughput.py", ["--device", "cuda", "--steps", "30", "--batch-size", "512"]),
                         ("init_time.py", ["--device", "cuda", "--paper-steps", "300"])):
        subprocess.run([sys.executable, str(HERE / script), *args], check=False)


if __name__ == "__main__":
    main()
