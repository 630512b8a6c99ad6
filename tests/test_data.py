import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from conftest import SHARED_CIFAR, make_archive, write_cifar
from kmeansinit.data import BatchLoader, DataError, Normalizer, crop_batch, download, flip_batch, load_cifar, load_image_folder


def test_cifar10_folder_layout_and_values(fake_cifar10):
    ds = load_cifar(fake_cifar10, "cifar10")
    assert ds.train_x.shape == (60, 3, 32, 32) and ds.train_x.dtype == torch.uint8
    assert ds.test_x.shape == (20, 3, 32, 32) and ds.num_classes == 10
    raw = pickle.loads((fake_cifar10 / "cifar-10-batches-py" / "data_batch_1").read_bytes(), encoding="latin1")
    # CHW order: the first 1024 bytes of a row are the red plane.
    assert torch.equal(ds.train_x[0, 0].flatten(), torch.from_numpy(raw["data"][0, :1024]))
    assert ds.train_y[:12].tolist() == [int(v) for v in raw["labels"]]
    # The batches folder itself works as the root too.
    assert torch.equal(load_cifar(fake_cifar10 / "cifar-10-batches-py").train_x, ds.train_x)


def test_cifar100_fine_and_coarse(fake_cifar100):
    fine = load_cifar(fake_cifar100, "cifar100", label="fine")
    coarse = load_cifar(fake_cifar100, "cifar100", label="coarse")
    assert fine.num_classes == 100 and coarse.num_classes == 20
    raw = pickle.loads((fake_cifar100 / "cifar-100-python" / "train").read_bytes(), encoding="latin1")
    assert fine.train_y.tolist() == [int(v) for v in raw["fine_labels"]]
    assert coarse.train_y.tolist() == [int(v) for v in raw["coarse_labels"]]


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_archive_equals_folder(tmp_path, name):
    folder = write_cifar(tmp_path / "src", name)
    arc = make_archive(folder, tmp_path / ("cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz"))
    a, b = load_cifar(arc, name), load_cifar(folder.parent, name)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert torch.equal(load_cifar(tmp_path, name).train_x, a.train_x)  # archive found in a folder


def test_download_checks_md5(tmp_path):
    folder = write_cifar(tmp_path / "src", "cifar10")
    arc = make_archive(folder, tmp_path / "cifar-10-python.tar.gz")
    url = arc.as_uri()
    good = hashlib.md5(arc.read_bytes()).hexdigest()
    got = download("cifar10", tmp_path / "cache", url=url, md5=good)
    assert got.read_bytes() == arc.read_bytes()
    with pytest.raises(DataError, match="md5 .* does not match"):
        download("cifar10", tmp_path / "cache2", url=url, md5="0" * 32)


def test_missing_folder_says_how_to_get_data(tmp_path):
    with pytest.raises(DataError, match=r"--download"):
        load_cifar(tmp_path / "nowhere")


def test_truncated_and_corrupt_files(fake_cifar10):
    f = fake_cifar10 / "cifar-10-batches-py" / "data_batch_3"
    f.write_bytes(f.read_bytes()[:500])
    with pytest.raises(DataError, match="data_batch_3: corrupt or truncated"):
        load_cifar(fake_cifar10)


def test_truncated_archive(tmp_path):
    folder = write_cifar(tmp_path / "src", "cifar10")
    arc = make_archive(folder, tmp_path / "cifar-10-python.tar.gz")
    arc.write_bytes(arc.read_bytes()[:2000])
    with pytest.raises(DataError, match="cifar-10-python.tar.gz"):
        load_cifar(arc)


def test_wrong_sizes_and_labels(tmp_path):
    folder = write_cifar(tmp_path, "cifar10")
    d = {"data": np.zeros((4, 3000), np.uint8), "labels": [0, 1, 2, 3]}
    (folder / "data_batch_2").write_bytes(pickle.dumps(d))
    with pytest.raises(DataError, match=r"data_batch_2: 'data' must be uint8 of shape \(N, 3072\)"):
        load_cifar(tmp_path)
    d = {"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 10]}
    (folder / "data_batch_2").write_bytes(pickle.dumps(d))
    with pytest.raises(DataError, match="data_batch_2: labels out of range"):
        load_cifar(tmp_path)
    d = {"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1]}
    (folder / "data_batch_2").write_bytes(pickle.dumps(d))
    with pytest.raises(DataError, match="2 labels for 4 images"):
        load_cifar(tmp_path)


def make_folder(root: Path, sizes=(8, 8)):
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        for c in ("cat", "dog"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (*sizes, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_image_folder_decodes_and_caches(tmp_path):
    root = make_folder(tmp_path / "imgs")
    ds = load_image_folder(root)
    assert ds.train_x.shape == (6, 3, 8, 8) and ds.classes == ["cat", "dog"]
    expect = np.asarray(Image.open(root / "train" / "dog" / "0.png").convert("RGB"))
    assert torch.equal(ds.train_x[3], torch.from_numpy(expect.copy()).permute(2, 0, 1))
    assert ds.train_y.tolist() == [0, 0, 0, 1, 1, 1]
    cache = root / ".kmeansinit-cache-native.pt"
    assert cache.exists()
    os.utime(root / "train" / "dog" / "0.png", (1, 1))  # older than the cache: reuse
    import PIL.Image

    def no_decoding(*a, **k):
        raise AssertionError("decoded an image although the cache is fresh")

    orig, PIL.Image.open = PIL.Image.open, no_decoding
    try:
        assert torch.equal(load_image_folder(root).train_x, ds.train_x)  # a cache hit: nothing decoded
    finally:
        PIL.Image.open = orig


def test_image_folder_errors(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / "train" / "bird").mkdir()
    with pytest.raises(DataError, match="bird: empty class folder"):
        load_image_folder(root, cache=False)
    (root / "train" / "bird" / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="x.png: cannot decode"):
        load_image_folder(root, cache=False)
    with pytest.raises(DataError, match="image folder not found"):
        load_image_folder(tmp_path / "missing")


def test_flip_batch_is_mirror_image():
    x = torch.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    out = flip_batch(x, torch.tensor([True, False]))
    assert torch.equal(out[0], x[0][..., torch.arange(4, -1, -1)])
    assert torch.equal(out[1], x[1])


def test_crop_batch_matches_slices():
    x = torch.randint(0, 255, (3, 2, 6, 6), dtype=torch.uint8)
    off = torch.tensor([[0, 0], [2, 1], [4, 4]])
    out = crop_batch(x, 2, off)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i, (r, c) in enumerate(off.tolist()):
        assert torch.equal(out[i], padded[i, :, r:r + 6, c:c + 6])


def test_normalizer_zero_mean_and_unit_range():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(200, 3, 8, 8, generator=g) * torch.tensor([255.0, 100.0, 30.0]).view(1, 3, 1, 1)).to(torch.uint8)
    norm = Normalizer.fit(x)
    y = norm(x)
    assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    assert_close(y.abs().amax(dim=(0, 2, 3)), torch.ones(3))


def test_loader_is_a_function_of_step_and_covers_each_epoch():
    x = torch.arange(10, dtype=torch.uint8).reshape(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    y = torch.arange(10)
    norm = Normalizer(torch.zeros(1), torch.ones(1) / 255)
    a = BatchLoader(x, y, 3, norm, seed=1)
    b = BatchLoader(x, y, 3, norm, seed=1)
    seen = torch.cat([a.batch(s)[1] for s in range(3)])
    assert len(set(seen.tolist())) == 9  # one epoch: 3 batches of 3, no repeats
    for s in (5, 0, 7):
        assert torch.equal(a.batch(s)[0], b.batch(s)[0])


@pytest.mark.skipif(not (SHARED_CIFAR / "cifar-10-batches-py").is_dir(), reason="real CIFAR-10 copy not present")
def test_real_cifar10_copy():
    ds = load_cifar(SHARED_CIFAR)
    assert ds.train_x.shape == (50000, 3, 32, 32) and ds.test_x.shape == (10000, 3, 32, 32)
    assert torch.bincount(ds.train_y).tolist() == [5000] * 10
    mean = ds.train_x.float().mean(dim=(0, 2, 3)) / 255
    assert_close(mean, torch.tensor([0.4913, 0.4821, 0.4465]), atol=2e-3, rtol=0)


def test_flips_and_crops_move_pixels_of_real_images():
    """Varied images (a constant one would hide a missing or wrong flip): each augmented image is
    its source mirrored or not, cropped by a valid offset, and both kinds occur."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.arange(64)
    norm = Normalizer(torch.zeros(3), torch.ones(3) / 255)  # identity on [0, 255]
    loader = BatchLoader(x, y, 16, norm, seed=3, flip=True, crop=2)
    flips = 0
    for step in range(4):
        xb, yb = loader.batch(step)
        for img, label in zip(xb, yb):
            src = torch.nn.functional.pad(x[label].float(), (2, 2, 2, 2))
            found = [(f, r, c) for f in (False, True) for r in range(5) for c in range(5)
                     if torch.allclose((src.flip(-1) if f else src)[:, r:r + 8, c:c + 8], img, atol=1e-3)]
            assert found, "an augmented image is no flip/crop of its source"
            flips += found[0][0]
    assert 0 < flips < 64
