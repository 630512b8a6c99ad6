"""k-means init at scale: time against the number of images, peak RSS of the whole process, and the
whole CIFAR-10 training set (target: under 5 minutes, memory not growing with the image count beyond
the images themselves). Each size runs in a fresh subprocess so its peak RSS is its own.

Up to ``stat_images`` (4,096) images the layers' inputs are cached and clustered by batch Lloyd
iterations; past it every layer streams (online passes, nothing kept), so the sizes above 4,096
show whether the init's own memory (peak minus the RSS before it) stays flat.

    python benchmarks/init_scale.py [--sizes 256,1024,8192] [--full] [--data ../shared/data]
"""
from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import time

import torch

from _common import HERE, append_results


def child(n: int, data: str, method: str):
    sys.path.insert(0, str(HERE.parent / "src"))
    from kmeansinit import PaperNet, initialize_
    from kmeansinit.data import Normalizer, load_cifar

    try:
        ds = load_cifar(data)
        x = ds.train_x[:n]
        images = Normalizer.fit(ds.train_x)(x)
        del ds, x
        source = "CIFAR-10 train"
    except Exception:
        images = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
        source = "uniform noise"
    torch.manual_seed(0)
    model = PaperNet()
    # The process's high-water mark so far is the data loading's; reset it (Linux) so that the peak
    # read after the init is the init's own.
    load_peak = _status("VmHWM")  # before the reset: data loading's peak
    reset = _reset_peak()
    start = _status("VmRSS")
    t = time.perf_counter()
    rep = initialize_(model, method, images, progress=False)
    secs = time.perf_counter() - t
    during = _status("VmHWM") if reset else None
    # ru_maxrss is reset with the high-water mark, so the whole process's peak is the larger of the two.
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, load_peak or 0)
    print(json.dumps(dict(n=n, seconds=secs, peak_mib=peak, start_mib=start, during_mib=during,
                          images_mib=images.numel() * 4 / 2**20, source=source, joint=rep.joint_after)))


def _status(key: str) -> float | None:
    try:
        text = open("/proc/self/status").read()
    except OSError:
        return None
    m = re.search(rf"{key}:\s+(\d+) kB", text)
    return int(m.group(1)) / 1024 if m else None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="256,1024,8192")
    p.add_argument("--full", action="store_true", help="also the whole 50,000-image training set")
    p.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data"))
    p.add_argument("--method", default="kmeans")
    p.add_argument("--child", type=int, default=None)
    a = p.parse_args()
    if a.child is not None:
        return child(a.child, a.data, a.method)
    sizes = [int(s) for s in a.sizes.split(",")] + ([50_000] if a.full else [])
    rows = []
    for n in sizes:
        out = subprocess.run([sys.executable, __file__, "--child", str(n), "--data", a.data, "--method", a.method],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    lines = [f"init `{a.method}` of PaperNet on {rows[0]['source']}; the process peak is the whole process (Python, "
             "torch, data loading); the init's own memory is its peak RSS (high-water mark reset at its start) "
             "minus the RSS at its start", "",
             "| images | seconds | ms per image | process peak RSS MiB | RSS at init start MiB | init's own MiB | "
             "images MiB | eq. 3 objective, raw patches (sum per 64-image chunk, first min(N, 4,096) images) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        own = "n/a" if r["during_mib"] is None else f"{r['during_mib'] - r['start_mib']:.0f}"
        lines.append(f"| {r['n']} | {r['seconds']:.1f} | {1e3 * r['seconds'] / r['n']:.2f} | {r['peak_mib']:.0f} | "
                     f"{r['start_mib']:.0f} | {own} | {r['images_mib']:.0f} | {r['joint']:.4g} |")
    lines += ["", "Up to 4,096 images every layer's inputs are cached for its Lloyd iterations (10 for `kmeans`; 5 and "
              "then 50 joint Adam steps for `kmeans-joint`); past it one online pass per layer streams all images. The objective column is eq. 3 on raw patches (the report's "
              "`joint_after`); the `kmeans` preset clusters whitened patches, so it is a side measure, not "
              "the quantity that preset maximizes."]
    append_results(f"Init at scale ({a.method})", torch.device("cpu"), lines)


if __name__ == "__main__":
    main()
