import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from kmeansinit.cli import main
from kmeansinit.data import Dataset, DataError, load_dataset
from kmeansinit.packed import PackError, load_packed, pack_dataset


@pytest.fixture(autouse=True)
def pack_cache(tmp_path, monkeypatch):
    """Each test's decoded-pack cache in its own folder."""
    monkeypatch.setenv("KMEANSINIT_PACK_CACHE", str(tmp_path / "pack-cache"))
    return tmp_path / "pack-cache"


def smooth_images(n: int, seed: int = 0) -> torch.Tensor:
    """Photograph-like (low-frequency) uint8 images: JPEG keeps these close, as it does CIFAR."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(32, 32), mode="bicubic", align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def dataset(n_train=40, n_test=12, name="cifar10") -> Dataset:
    return Dataset(smooth_images(n_train, 0), torch.arange(n_train) % 10, smooth_images(n_test, 1),
                   torch.arange(n_test) % 10, classes=[f"c{i}" for i in range(10)], name=name)


def jpeg(im: np.ndarray, quality: int = 75) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(im).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def test_a_pack_is_each_images_own_jpeg_with_one_shared_header(tmp_path):
    ds = dataset()
    info = pack_dataset(ds, tmp_path / "p.npz", quality=75)
    with np.load(tmp_path / "p.npz") as z:
        header, scans, offsets = z["header"].tobytes(), z["train_scans"].tobytes(), z["train_offsets"]
    full = []
    for i, im in enumerate(ds.train_x.permute(0, 2, 3, 1).numpy()):
        full.append(jpeg(im))
        # Independent of the packer: Pillow's own JPEG of the image is the header plus its scan.
        assert header + scans[offsets[i]:offsets[i + 1]] == full[-1]
    # The header is stored once: the pack is the images' own JPEG files less all but one header, plus
    # the .npz's own few kilobytes.
    files = sum(len(b) for b in full) + sum(len(jpeg(im)) for im in ds.test_x.permute(0, 2, 3, 1).numpy())
    n = len(ds.train_x) + len(ds.test_x)
    assert info["bytes"] < files - (n - 1) * len(header) + 4096
    back = load_dataset("cifar10", tmp_path / "p.npz")
    decoded = torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(b)))).permute(2, 0, 1) for b in full])
    assert torch.equal(back.train_x, decoded)
    assert torch.equal(back.train_y, ds.train_y) and torch.equal(back.test_y, ds.test_y)
    assert back.classes == ds.classes and back.name == "cifar10" and back.train_x.dtype == torch.uint8
    # The error the pack reports is the round trip's, measured here again from the loaded pack.
    err = (back.test_x.int() - ds.test_x.int()).abs()
    assert info["test_mean_abs_error"] == pytest.approx(float(err.float().mean()))
    assert info["test_max_abs_error"] == int(err.max())
    assert float(err.float().mean()) < 8.0  # smooth images survive quality 75 within a few grey levels (noise: ~60)
    assert torch.equal(load_packed(tmp_path / "p.npz")["train_x"], back.train_x)  # decoding is deterministic


def test_higher_quality_is_closer_and_larger(tmp_path):
    ds = dataset()
    lo, hi = (pack_dataset(ds, tmp_path / f"q{q}.npz", quality=q) for q in (50, 95))
    assert hi["train_mean_abs_error"] < lo["train_mean_abs_error"] and hi["bytes"] > lo["bytes"]


def test_data_option_reads_a_pack_and_cli_packs_a_cifar_folder(fake_cifar10, tmp_path, capsys):
    out = tmp_path / "packs" / "c10.npz"
    assert main(["pack", "--data", str(fake_cifar10), "--out", str(out)]) == 0
    assert "60 + 20 images" in capsys.readouterr().out
    src, packed = load_dataset("cifar10", fake_cifar10), load_dataset("cifar10", out)
    assert packed.train_x.shape == src.train_x.shape and torch.equal(packed.train_y, src.train_y)
    assert packed.classes == src.classes
    run = tmp_path / "run"
    assert main(["train", "--data", str(out), "--width", "0.25", "--batch-size", "8", "--iterations", "2",
                 "--eval-every", "2", "--out", str(run), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 2


def test_bad_packs_and_arguments_are_named(tmp_path, capsys):
    with pytest.raises(ValueError, match="quality"):
        pack_dataset(dataset(), tmp_path / "p.npz", quality=0)
    with pytest.raises(ValueError, match=r"\.npz"):
        pack_dataset(dataset(), tmp_path / "p.bin")
    grey = Dataset(torch.zeros(2, 1, 32, 32, dtype=torch.uint8), torch.zeros(2, dtype=torch.long),
                   torch.zeros(1, 1, 32, 32, dtype=torch.uint8), torch.zeros(1, dtype=torch.long), classes=["a"])
    with pytest.raises(PackError, match=r"train images: expected uint8 \(N, 3, H, W\)"):
        pack_dataset(grey, tmp_path / "g.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(PackError, match="garbage.npz: unreadable pack"):
        load_packed(garbage)
    with pytest.raises(DataError, match="garbage.npz: unreadable pack"):
        load_dataset("cifar10", garbage)
    np.savez(tmp_path / "other.npz", meta=np.frombuffer(b'{"format": "x"}', dtype=np.uint8))
    with pytest.raises(PackError, match="not a kmeansinit pack"):
        load_packed(tmp_path / "other.npz")
    pack_dataset(dataset(name="cifar100"), tmp_path / "c100.npz", label="coarse")
    with pytest.raises(DataError, match="holds cifar100, not cifar10"):
        load_dataset("cifar10", tmp_path / "c100.npz")
    with pytest.raises(DataError, match="holds the coarse labels, not fine"):
        load_dataset("cifar100", tmp_path / "c100.npz", label="fine")
    assert load_dataset("cifar100", tmp_path / "c100.npz", label="coarse").name == "cifar100"
    assert main(["train", "--data", str(garbage), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "garbage.npz" in err


class _Planted:
    """Unpickling this creates a file: what a malicious pack could try."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pack_holding_a_pickle_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    good = tmp_path / "good.npz"
    pack_dataset(dataset(), good)
    with np.load(good) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["meta"] = np.array([_Planted(marker)], dtype=object)
    np.savez(tmp_path / "evil.npz", **arrays)
    with pytest.raises(DataError, match="evil.npz: unreadable pack"):
        load_dataset("cifar10", tmp_path / "evil.npz")
    assert not marker.exists()


def test_a_decoded_pack_is_cached_outside_the_pack_and_rebuilt_when_bad(tmp_path, pack_cache, monkeypatch):
    import os

    import kmeansinit.packed as packed

    path = tmp_path / "p.npz"
    pack_dataset(dataset(), path)
    first = load_packed(path)
    files = list(pack_cache.glob("*.pt"))
    assert len(files) == 1 and not list(tmp_path.glob("*.pt"))  # beside the cache root, not the pack
    monkeypatch.setattr(packed, "_decode", lambda *a: (_ for _ in ()).throw(AssertionError("decoded again")))
    again = load_packed(path)  # from the cache: no decoding
    assert all(torch.equal(first[k], again[k]) for k in ("train_x", "train_y", "test_x", "test_y"))
    assert again["classes"] == first["classes"]
    monkeypatch.undo()
    monkeypatch.setenv("KMEANSINIT_PACK_CACHE", str(pack_cache))
    files[0].write_bytes(b"torn")  # a bad cache file is decoded again and rewritten
    assert torch.equal(load_packed(path)["train_x"], first["train_x"])
    assert files[0].stat().st_size > 1000
    os.utime(path, ns=(1, 1))  # a changed pack is another cache entry
    load_packed(path)
    assert len(list(pack_cache.glob("*.pt"))) == 2
