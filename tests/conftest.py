import pickle
import tarfile
from pathlib import Path

import math

import numpy as np
import pytest

SHARED_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write_cifar(root: Path, name: str = "cifar10", n_train: int = 60, n_test: int = 20, seed: int = 0,
                classes: int | None = None) -> Path:
    """A small fake dataset in the official python layout (protocol-2 pickles, like the originals)."""
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        k = classes or 10
        per = n_train // 5
        for i in range(5):
            d = {"data": rng.integers(0, 256, (per, 3072), dtype=np.uint8), "labels": list(rng.integers(0, k, per)),
                 "batch_label": f"batch {i + 1}", "filenames": [f"f{j}.png" for j in range(per)]}
            (folder / f"data_batch_{i + 1}").write_bytes(pickle.dumps(d, protocol=2))
        d = {"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8), "labels": list(rng.integers(0, k, n_test))}
        (folder / "test_batch").write_bytes(pickle.dumps(d, protocol=2))
        (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(k)]}, protocol=2))
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        for split, n in (("train", n_train), ("test", n_test)):
            d = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "fine_labels": list(rng.integers(0, 100, n)), "coarse_labels": list(rng.integers(0, 20, n))}
            (folder / split).write_bytes(pickle.dumps(d, protocol=2))
        meta = {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": [f"c{i}" for i in range(20)]}
        (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def make_archive(folder: Path, out: Path) -> Path:
    with tarfile.open(out, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return out


def lsuv_layer_by_layer(model, x, tol=0.1, max_iters=10, seed=0, skip=()):
    """LSUV as Mishkin & Matas describe it: orthonormal weights, then for each layer in forward order a
    fresh forward pass to its input, and divisions until its output variance is within tol of 1 (the
    O(L^2) reference of the one-pass code). ``skip`` layers are left exactly as they are."""
    import torch
    import torch.nn as nn

    from kmeansinit.init._model import batchnorm_train_mode, find_layers, forward_order

    skip = set(skip)
    layers = {n: m for n, m in find_layers(model, include_linear=True).items() if n not in skip}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in layers.values():
            q = torch.empty(m.weight.shape[0], m.weight[0].numel())
            nn.init.orthogonal_(q, generator=g)
            m.weight.copy_(q.reshape(m.weight.shape))
            if m.bias is not None:
                m.bias.zero_()
        with batchnorm_train_mode(model):
            for name in forward_order(model, layers, x):
                m, seen = layers[name], []
                h = m.register_forward_pre_hook(lambda mod, args: seen.append(args[0]) if not seen else None)
                model(x)
                h.remove()
                for _ in range(max_iters):
                    var = float(m(seen[0]).var())
                    if abs(var - 1.0) < tol:
                        break
                    m.weight.div_(math.sqrt(var))


@pytest.fixture
def fake_cifar10(tmp_path):
    write_cifar(tmp_path, "cifar10")
    return tmp_path


@pytest.fixture
def fake_cifar100(tmp_path):
    write_cifar(tmp_path, "cifar100")
    return tmp_path
