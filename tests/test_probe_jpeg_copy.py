"""docs/results/probe/jpeg_copy.py: a CIFAR-10 copy with one more (block-shifted) JPEG loss."""
import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest

from kmeansinit.data import load_cifar

from conftest import write_cifar

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "results" / "probe" / "jpeg_copy.py"


def _module():
    spec = importlib.util.spec_from_file_location("jpeg_copy", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _smooth(n: int, seed: int = 0) -> np.ndarray:
    # Ramps with a random slope and offset per image and channel: JPEG keeps these almost exactly,
    # while a shift left in place (by 4 of 32 pixels) moves every pixel by far more than that.
    rng = np.random.default_rng(seed)
    r = np.arange(32, dtype=np.float64)
    slope = rng.uniform(2, 6, (n, 3, 1, 1))
    img = 16 + slope * (r[None, None, :, None] + r[None, None, None, :]) / 2 + rng.uniform(0, 30, (n, 3, 1, 1))
    return np.clip(img, 0, 255).astype(np.uint8).reshape(n, 3072)


def test_recompress_undoes_its_shift_and_loses_more_at_lower_quality():
    jc = _module()
    x = _smooth(8)
    err = {q: np.abs(jc.recompress(x, q, 4).astype(float) - x).mean() for q in (95, 20)}
    assert err[95] < 2.0, err  # a shift left in place would be tens of grey levels here
    assert err[20] > err[95]
    noise = np.random.default_rng(1).integers(0, 256, (4, 3072), dtype=np.uint8)
    out = jc.recompress(noise, 75, 4)
    assert out.shape == noise.shape and out.dtype == np.uint8
    assert np.abs(out.astype(float) - noise).mean() > 5  # noise is what JPEG drops


def test_copy_keeps_layout_and_labels(tmp_path):
    jc = _module()
    write_cifar(tmp_path / "src", "cifar10", n_train=20, n_test=8)
    assert jc.main(["--data", str(tmp_path / "src"), "--out", str(tmp_path / "dst")]) == 0
    a, b = load_cifar(tmp_path / "src"), load_cifar(tmp_path / "dst")
    for split in ("train", "test"):
        assert np.array_equal(getattr(a, f"{split}_y").numpy(), getattr(b, f"{split}_y").numpy())
        xa, xb = getattr(a, f"{split}_x").numpy(), getattr(b, f"{split}_x").numpy()
        assert xa.shape == xb.shape and not np.array_equal(xa, xb)
    src = pickle.loads((tmp_path / "src/cifar-10-batches-py/data_batch_1").read_bytes(), encoding="latin1")
    dst = pickle.loads((tmp_path / "dst/cifar-10-batches-py/data_batch_1").read_bytes(), encoding="latin1")
    assert dst["filenames"] == src["filenames"] and dst["data"].dtype == np.uint8


def test_missing_data_names_the_folder(tmp_path):
    jc = _module()
    with pytest.raises(SystemExit, match="--data .*cifar-10-batches-py"):
        jc.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "dst")])
