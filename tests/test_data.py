"""Tests for core/data.py: features10, BatchLoader, cifar10 (fake on-disk copy), imagefolder,
the safetensors cache. Small and single-threaded; the real CIFAR-10 JPEG checks skip when
/work/shared/data is absent."""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from core.engine import data as D
from core.engine.data import cifar10, features10, imagefolder

torch.set_num_threads(1)

SHARED_ZIP = Path("/work/shared/data/cifar10-train-jpeg.zip")
UNPACKED = Path(__file__).resolve().parents[1] / ".data" / "cifar10-jpeg" / "train"


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Every test gets its own empty cache and data folders."""
    monkeypatch.setenv("POOLPROP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("POOLPROP_DATA", raising=False)


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg and msg.strip(), msg
    return msg


# ---------------------------------------------------------------------------------------
# features10
# ---------------------------------------------------------------------------------------

def test_features10_deterministic_per_seed():
    x0, y0 = D.generate_features10(120, seed=0)
    x1, y1 = D.generate_features10(120, seed=0)
    x2, y2 = D.generate_features10(120, seed=1)
    assert x0.dtype == torch.uint8 and x0.shape == (120, 3, 32, 32) and y0.dtype == torch.int64
    assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert not torch.equal(x0, x2)
    # more than one chunk of 2048: still deterministic, and each chunk draws its own noise
    labels = torch.arange(2100) % 10
    a, _ = D.generate_features10(labels=labels, seed=3)
    b, _ = D.generate_features10(labels=labels, seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a[:50], a[2048:2098])  # each chunk has its own noise


def test_features10_dataset_balance_split_and_options():
    d = D.load_dataset("features10:train=200,val=50")
    assert d.name == "features10:train=200,val=50"
    assert d.classes == [c["name"] for c in D.FEATURES10_CLASSES] and d.num_classes == 10
    assert d.train_x.shape == (200, 3, 32, 32) and d.val_x.shape == (50, 3, 32, 32) and d.image_size == 32
    assert d.train_x.is_contiguous() and d.train_x.dtype == torch.uint8
    assert torch.bincount(d.train_y, minlength=10).tolist() == [20] * 10
    assert torch.bincount(d.val_y, minlength=10).tolist() == [5] * 10
    # val comes from another random stream: no image is shared with train
    tr = {hashlib.md5(x.numpy().tobytes()).hexdigest() for x in d.train_x}
    assert not any(hashlib.md5(x.numpy().tobytes()).hexdigest() in tr for x in d.val_x)
    # the mean/std are those of the training images, in [0, 1] units
    t = d.train_x.double() / 255
    assert np.allclose(d.mean, t.mean((0, 2, 3)).tolist(), atol=1e-6)
    assert np.allclose(d.std, t.std((0, 2, 3), unbiased=False).tolist(), atol=1e-6)
    # split_seed changes the images, seed=S in the name overrides it
    d1 = D.load_dataset("features10:train=20,val=0", split_seed=1)
    d2 = D.load_dataset("features10:train=20,val=0,seed=1")
    d0 = D.load_dataset("features10:train=20,val=0")
    assert torch.equal(d1.train_x, d2.train_x) and not torch.equal(d0.train_x, d1.train_x)
    with pytest.raises(D.DatasetError, match="bad option"):
        D.load_dataset("features10:size=64")
    with pytest.raises(D.DatasetError, match="whole number"):
        D.load_dataset("features10:train=many")


def _fft_peak(img: torch.Tensor) -> tuple[float, float]:
    """(fy, fx) in cycles/pixel of the strongest non-DC Fourier component of a grey image."""
    g = img.double().mean(0)
    spec = torch.fft.fft2(g - g.mean()).abs()
    i = int(spec.argmax())
    n = g.shape[-1]
    fy, fx = divmod(i, n)
    wrap = lambda k: (k - n if k >= n // 2 else k) / n
    return wrap(fy), wrap(fx)


def test_features10_frequency_table_matches_images():
    x, _ = D.generate_features10(labels=torch.arange(10), clean=True)
    bin_ = 1 / 32
    for k, c in enumerate(D.FEATURES10_CLASSES[:7]):
        fy, fx = _fft_peak(x[k])
        if c["orientation"] is not None:  # a grating: |peak| = f, across the stripes
            assert abs(np.hypot(fy, fx) - c["frequency"]) <= bin_ * 0.75, (c["name"], fy, fx)
            # stripes at orientation o vary along (-sin o, cos o): angle of the wave vector
            ang = np.degrees(np.arctan2(abs(fy), abs(fx)))
            assert abs(ang - (90 - c["orientation"] if c["orientation"] != 45 else 45)) < 10, (c["name"], ang)
        else:  # a checker: peaks at (+-f, +-f)
            assert abs(abs(fy) - c["frequency"]) < 1e-9 and abs(abs(fx) - c["frequency"]) < 1e-9, (c["name"], fy, fx)
    # the pairs that differ only in frequency
    f = {c["name"]: c["frequency"] for c in D.FEATURES10_CLASSES}
    assert f["high_horizontal"] / f["low_horizontal"] == 6 and f["fine_checker"] / f["coarse_checker"] == 3
    assert all(c["frequency"] is None or 0 < c["frequency"] < 0.5 for c in D.FEATURES10_CLASSES)
    # colour classes: red blob is red, blue blob is blue (centre pixel)
    r, b = x[7, :, 16, 16].tolist(), x[8, :, 16, 16].tolist()
    assert r[0] > 200 and r[2] < 60 and b[2] > 200 and b[0] < 60


def test_features10_noise_has_no_structure():
    n = features10._uniform_noise((400, 3, 32, 32), torch.full((400,), 0.05), seed=5)
    assert abs(float(n.std()) - 0.05) < 1e-3
    # no periodic bias in any pixel position (a 63-bit source once made every 8th column darker)
    assert float(n.mean((0, 1, 2)).abs().max()) < 0.004
    assert float(n.mean((0, 1, 3)).abs().max()) < 0.004


def test_features10_grid_png(tmp_path):
    p = D.features10_grid_png(tmp_path / "img" / "f10.png", per_class=2, scale=2)
    im = Image.open(p)
    assert im.format == "PNG" and im.mode == "RGB" and im.size[1] >= 10 * 64


# ---------------------------------------------------------------------------------------
# normalize and BatchLoader
# ---------------------------------------------------------------------------------------

def test_normalize_known_pixel():
    x = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    x[1, 2, 3, 1] = 200
    out = D.normalize(x, (0.1, 0.2, 0.3), (0.5, 0.25, 0.2))
    assert out.dtype == torch.float32 and out.shape == x.shape and out.device == x.device
    assert out[1, 2, 3, 1].item() == pytest.approx((200 / 255 - 0.3) / 0.2, abs=1e-6)
    assert out[0, 0, 0, 0].item() == pytest.approx(-0.1 / 0.5, abs=1e-6)


def _tiny(n=10, h=8, w=8):
    x = torch.arange(n * 3 * h * w, dtype=torch.int64).remainder(251).add(1).to(torch.uint8).view(n, 3, h, w)
    return x, torch.arange(n) % 3


def test_batchloader_eval_order_shapes_and_values():
    x, y = _tiny(10)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    bl = D.BatchLoader(x, y, mean, std, 4, train=False)
    assert len(bl) == 3 and not bl.drop_last
    batches = list(bl)
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    xs = torch.cat([b[0] for b in batches])
    assert xs.dtype == torch.float32 and xs.shape == (10, 3, 8, 8)
    assert torch.equal(torch.cat([b[1] for b in batches]), y)
    assert batches[0][1].dtype == torch.int64
    # a known pixel: eval does not augment
    assert xs[7, 1, 2, 5].item() == pytest.approx((x[7, 1, 2, 5].item() / 255 - 0.4) / 0.25, abs=1e-5)
    assert torch.allclose(xs, D.normalize(x, mean, std), atol=1e-5)
    cl = D.BatchLoader(x, y, mean, std, 4, train=False, channels_last=True)
    xb = next(iter(cl))[0]
    assert xb.is_contiguous(memory_format=torch.channels_last) and torch.allclose(xb, xs[:4], atol=1e-5)


def test_batchloader_deterministic_per_seed_and_epoch():
    x, y = _tiny(20)
    mk = lambda seed=0: D.BatchLoader(x, y, (0.5,) * 3, (0.25,) * 3, 6, train=True, seed=seed)
    a, b = mk(), mk()
    assert len(a) == 3 and a.drop_last  # 20 // 6, the last partial batch dropped
    a.set_epoch(3)
    b.set_epoch(3)
    ea, eb = list(a), list(b)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(ea, eb))
    # after an iteration the loader moves on to the next epoch; set_epoch(4) gives the same
    e4_auto = list(a)
    b.set_epoch(4)
    e4 = list(b)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(e4_auto, e4))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(ea, e4))
    c = mk(seed=1)
    c.set_epoch(3)
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(ea, list(c)))
    # one epoch visits distinct images; shuffled labels follow their images
    a.set_epoch(0)
    plan = a.epoch_plan(0)
    ys = torch.cat([yb for _, yb in a])
    assert torch.equal(ys, y[plan["order"][:18]]) and len(set(plan["order"].tolist())) == 20


def _reference_crop_flip(x, dy, dx, flip, p):
    """Independent expectation: pad with F.pad, slice each window, torch.flip."""
    xp = F.pad(x, (p, p, p, p))
    out = []
    for i in range(len(x)):
        win = xp[i, :, dy[i]:dy[i] + x.shape[2], dx[i]:dx[i] + x.shape[3]]
        out.append(torch.flip(win, dims=[2]) if flip[i] else win)
    return torch.stack(out)


def test_crop_flip_matches_reference_and_really_moves_content():
    x, _ = _tiny(6, 5, 7)
    dy = torch.tensor([0, 4, 8, 2, 4, 7])
    dx = torch.tensor([8, 4, 0, 5, 4, 1])
    flip = torch.tensor([False, False, True, True, True, False])
    out = D.crop_flip(x, dy, dx, flip, 4)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(out, _reference_crop_flip(x, dy, dx, flip, 4))
    # image 1: offset (4, 4), no flip -> unchanged; image 4: (4, 4) + flip -> mirrored
    assert torch.equal(out[1], x[1]) and torch.equal(out[4], x[4].flip(2))
    # image 0: (dy, dx) = (0, 8) moves content down 4 and left 4; what comes in is zero padding
    assert torch.equal(out[0][:, 4:, :3], x[0][:, :1, 4:])
    assert out[0][:, :4].eq(0).all() and out[0][:, :, 3:].eq(0).all()
    # image 2: dy = 8, dx = 0 moves content up 4 and right 4
    assert torch.equal(out[2].flip(2)[:, :1, 4:], x[2][:, 4:, :3])


def test_batchloader_train_augments_as_planned():
    x, y = _tiny(12, 8, 8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    bl = D.BatchLoader(x, y, mean, std, 5, train=True, seed=7)
    bl.set_epoch(2)
    got = torch.cat([b[0] for b in bl])  # 2 batches of 5 (drop_last)
    plan = bl.epoch_plan(2)
    o = plan["order"][:10]
    want = _reference_crop_flip(x[o], plan["dy"][:10], plan["dx"][:10], plan["flip"][:10], 4)
    assert torch.allclose(got, D.normalize(want, mean, std), atol=1e-5)
    assert plan["flip"].any() and (~plan["flip"]).any() and (plan["dy"] != 4).any()
    # augment=False: shuffled but untouched
    bl2 = D.BatchLoader(x, y, mean, std, 5, train=True, seed=7, augment=False)
    bl2.set_epoch(2)
    assert torch.allclose(torch.cat([b[0] for b in bl2]), D.normalize(x[o], mean, std), atol=1e-5)
    assert len(D.BatchLoader(x, y, mean, std, 5, train=True, drop_last=False)) == 3


# ---------------------------------------------------------------------------------------
# cifar10 on a small fake copy in the real on-disk format
# ---------------------------------------------------------------------------------------

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _write_fake_cifar(root: Path, per_batch=6, monkeypatch=None) -> dict:
    """cifar-10-batches-py with 5 train batches + test batch of `per_batch` images each, pickled
    as in the real files (dicts with b"data" (N, 3072) uint8 and b"labels"); registers their
    md5s as the published ones (in this test only). Pickle is the format of these files;
    PoolProp's own files never use it."""
    folder = root / cifar10.CIFAR10_FOLDER
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [(i + k) % 10 for k in range(per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * per_batch}, f, protocol=2)
        batches[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CIFAR_CLASSES], b"num_vis": 3072}, f, protocol=2)
    _register_md5s(folder, monkeypatch)
    return batches


def _register_md5s(folder: Path, monkeypatch):
    """The fake files' md5s stand in for the published ones, in this test only."""
    md5 = lambda n: hashlib.md5((folder / n).read_bytes()).hexdigest()
    monkeypatch.setattr(cifar10, "CIFAR10_TRAIN_FILES",
                        [(f"data_batch_{j}", md5(f"data_batch_{j}")) for j in range(1, 6)])
    monkeypatch.setattr(cifar10, "CIFAR10_TEST_FILES", [("test_batch", md5("test_batch"))])
    monkeypatch.setattr(cifar10, "CIFAR10_META_FILE", ("batches.meta", md5("batches.meta")))


def test_cifar10_checksums_are_torchvisions():
    from torchvision.datasets import CIFAR10

    assert [list(e) for e in cifar10.CIFAR10_TRAIN_FILES] == CIFAR10.train_list
    assert [list(e) for e in cifar10.CIFAR10_TEST_FILES] == CIFAR10.test_list
    assert cifar10.CIFAR10_META_FILE == (CIFAR10.meta["filename"], CIFAR10.meta["md5"])
    assert CIFAR10.filename == cifar10.CIFAR10_ARCHIVE and CIFAR10.base_folder == cifar10.CIFAR10_FOLDER
    assert CIFAR10.url == cifar10.CIFAR10_URL and CIFAR10.tgz_md5 == cifar10.CIFAR10_ARCHIVE_MD5


def test_cifar10_from_archive_offline(tmp_path, monkeypatch):
    """A cifar-10-python.tar.gz in the data folder is checked and extracted with no network."""
    import tarfile
    import urllib.request

    src = tmp_path / "src"
    batches = _write_fake_cifar(src, per_batch=2, monkeypatch=monkeypatch)
    data = tmp_path / "data"
    data.mkdir()
    with tarfile.open(data / cifar10.CIFAR10_ARCHIVE, "w:gz") as tar:
        tar.add(src / cifar10.CIFAR10_FOLDER, arcname=cifar10.CIFAR10_FOLDER)
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("network used"))
    with pytest.raises(D.DatasetError, match="corrupt or incomplete") as e:  # not the published archive
        D.load_dataset("cifar10", data_dir=str(data))
    one_line(e.value)
    archive_md5 = hashlib.md5((data / cifar10.CIFAR10_ARCHIVE).read_bytes()).hexdigest()
    monkeypatch.setattr(cifar10, "CIFAR10_ARCHIVE_MD5", archive_md5)
    d = D.load_dataset("cifar10", data_dir=str(data), download=False)
    assert d.val_y.tolist() == batches["test_batch"][1] and len(d.train_y) == 10


def test_cifar10_fake_on_disk_loads_with_layout_and_cache(tmp_path, monkeypatch):
    batches = _write_fake_cifar(tmp_path / "data", monkeypatch=monkeypatch)
    d = D.load_dataset("cifar10", data_dir=str(tmp_path / "data"), download=False)
    assert d.classes == CIFAR_CLASSES and d.train_x.shape == (30, 3, 32, 32) and d.val_x.shape == (6, 3, 32, 32)
    data2, labels2 = batches["data_batch_2"]
    # image 1 of batch 2 is training image 6 + 1: row-major 3072 = R plane, G plane, B plane
    img = d.train_x[7]
    assert d.train_y[7].item() == labels2[1]
    assert img[0, 0, 0].item() == data2[1, 0] and img[0, 0, 5].item() == data2[1, 5]
    assert img[0, 2, 3].item() == data2[1, 2 * 32 + 3]
    assert img[1, 0, 0].item() == data2[1, 1024] and img[2, 31, 31].item() == data2[1, 3071]
    test_data, test_labels = batches["test_batch"]
    assert d.val_y.tolist() == test_labels and torch.equal(d.val_x.reshape(6, -1), torch.from_numpy(test_data))
    # cached as safetensors; the second load reads it (and the batches are not parsed again)
    files = list((tmp_path / "cache").glob("cifar10-*.safetensors"))
    assert len(files) == 1 and _is_safetensors(files[0])
    monkeypatch.setattr(cifar10, "_read_cifar_pickle", lambda p: pytest.fail("cache not used"))
    d2 = D.load_dataset("cifar10", data_dir=str(tmp_path / "data"), download=False)
    assert torch.equal(d2.train_x, d.train_x) and d2.classes == d.classes and d2.mean == d.mean


def test_cifar10_corrupt_file_is_reported(tmp_path, monkeypatch):
    _write_fake_cifar(tmp_path, monkeypatch=monkeypatch)
    with open(tmp_path / cifar10.CIFAR10_FOLDER / "data_batch_3", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(D.DatasetError, match="data_batch_3 is corrupt") as e:
        D.load_dataset("cifar10", data_dir=str(tmp_path))
    one_line(e.value)
    (tmp_path / cifar10.CIFAR10_FOLDER / "data_batch_4").unlink()
    with pytest.raises(D.DatasetError, match="incomplete.*data_batch_4"):
        D.load_dataset("cifar10", data_dir=str(tmp_path))


def test_cifar10_malformed_batch_is_reported(tmp_path, monkeypatch):
    _write_fake_cifar(tmp_path, monkeypatch=monkeypatch)
    with open(tmp_path / cifar10.CIFAR10_FOLDER / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}, f, protocol=2)
    _register_md5s(tmp_path / cifar10.CIFAR10_FOLDER, monkeypatch)
    with pytest.raises(D.DatasetError, match="cannot read .*test_batch") as e:
        D.load_dataset("cifar10", data_dir=str(tmp_path))
    one_line(e.value)


def test_cifar10_pickle_cannot_run_code(tmp_path, monkeypatch):
    _write_fake_cifar(tmp_path, monkeypatch=monkeypatch)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    with open(tmp_path / cifar10.CIFAR10_FOLDER / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    _register_md5s(tmp_path / cifar10.CIFAR10_FOLDER, monkeypatch)
    with pytest.raises(D.DatasetError, match="not allowed"):
        D.load_dataset("cifar10", data_dir=str(tmp_path))
    assert not (tmp_path / "pwned").exists()


def test_cifar10_offline_gives_clear_error(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    def no_network(*a, **k):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(D.DatasetError) as e:
        D.load_dataset("cifar10", data_dir=str(tmp_path / "nowhere"))
    msg = one_line(e.value)
    assert "could not download" in msg and "cifar-10-batches-py" in msg and "cifar-10-python.tar.gz" in msg
    assert "imagefolder:PATH" in msg and str(tmp_path / "nowhere") in msg
    assert not (tmp_path / "nowhere" / cifar10.CIFAR10_ARCHIVE).exists()  # no partial download left behind
    with pytest.raises(D.DatasetError, match="download is off") as e:
        D.load_dataset("cifar10", data_dir=str(tmp_path / "nowhere"), download=False)
    one_line(e.value)


def test_unknown_names():
    for bad in ["", "mnist", "imagefolder:", "cifar10:x=1"]:
        with pytest.raises(D.DatasetError) as e:
            D.load_dataset(bad)
        one_line(e.value)
    with pytest.raises(ValueError, match="features10"):  # DatasetError is a ValueError and lists the names
        D.load_dataset("mnist")


# ---------------------------------------------------------------------------------------
# imagefolder
# ---------------------------------------------------------------------------------------

def _img(path: Path, colour, size=(8, 8), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


def _is_safetensors(path: Path) -> bool:
    from safetensors import safe_open

    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    if raw[8:9] != b"{" or n > len(raw):
        return False
    with safe_open(str(path), framework="pt") as f:
        return {"train_x", "train_y", "val_x", "val_y"} <= set(f.keys())


def test_imagefolder_train_val_layout_and_conversions(tmp_path):
    root = tmp_path / "ds"
    _img(root / "train" / "cat" / "a.png", (10, 20, 30))
    _img(root / "train" / "cat" / "b.png", 77, mode="L")  # grayscale
    _img(root / "train" / "dog" / "sub" / "c.png", (200, 100, 50, 0), mode="RGBA")  # alpha is dropped
    _img(root / "train" / "dog" / "d.jpg", (0, 0, 0))
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    _img(root / "val" / "dog" / "e.png", (1, 2, 3))
    d = D.load_dataset(f"imagefolder:{root}")
    assert d.classes == ["cat", "dog"] and d.image_size == 8
    assert d.train_y.tolist() == [0, 0, 1, 1] and d.val_y.tolist() == [1]
    assert d.train_x.shape == (4, 3, 8, 8) and d.val_x.shape == (1, 3, 8, 8)
    assert d.train_x[0, :, 0, 0].tolist() == [10, 20, 30]
    assert d.train_x[1, :, 3, 3].tolist() == [77, 77, 77]
    assert d.train_x[2, :, 0, 0].tolist() == [0, 0, 0]  # sorted by path: "d.jpg" < "sub/c.png"
    assert d.train_x[3, :, 0, 0].tolist() == [200, 100, 50]
    assert d.val_x[0, :, 0, 0].tolist() == [1, 2, 3]
    assert d.info["layout"] == "train/val"
    # test/ is used when there is no val/
    (root / "val").rename(root / "test")
    assert D.load_dataset(f"imagefolder:{root}").info["layout"] == "train/test"


def test_imagefolder_single_folder_ten_percent_rule_and_sizes(tmp_path):
    root = tmp_path / "flat"
    for i in range(20):
        _img(root / "b_class" / f"{i:04d}.png", (i, 0, 0))
    for i in range(3):
        _img(root / "a_class" / f"{i}.png", (0, i, 0), size=(16, 12))  # other size: all go to 32x32
    d = D.load_dataset(f"imagefolder:{root}")
    assert d.classes == ["a_class", "b_class"] and d.image_size == 32
    # a_class: 3 files -> the last 1 is val; b_class: 20 -> the last 2 (0018, 0019)
    assert d.train_y.tolist() == [0, 0] + [1] * 18 and d.val_y.tolist() == [0, 1, 1]
    assert d.val_x[1:, 0, 5, 5].tolist() == [18, 19] and d.train_x[2:, 0, 5, 5].tolist() == list(range(18))
    assert d.val_x[0, 1, 5, 5].item() == 2
    assert [D.imagefolder_split(n) for n in (0, 1, 2, 9, 10, 19, 20, 5000)] == [0, 0, 1, 1, 1, 1, 2, 500]
    # only train/ (no val/): split the same way
    root2 = tmp_path / "only_train"
    os.makedirs(root2)
    os.rename(root, root2 / "train")
    d2 = D.load_dataset(f"imagefolder:{root2}")
    assert d2.val_y.tolist() == [0, 1, 1] and d2.info["layout"].startswith("split")


def test_imagefolder_mixed_square_sizes_and_relative_path(tmp_path, monkeypatch):
    root = tmp_path / "data" / "mixed"
    _img(root / "a" / "0.png", (10, 20, 30), size=(8, 8))  # the first image: square, 8x8
    _img(root / "a" / "1.png", (40, 50, 60), size=(8, 8))
    _img(root / "b" / "0.png", (70, 80, 90), size=(64, 64))  # another size: everything goes to 32x32
    _img(root / "b" / "1.png", (1, 2, 3), size=(48, 30))
    monkeypatch.chdir(tmp_path)
    d = D.load_dataset("imagefolder:mixed", data_dir=str(tmp_path / "data"))  # found under data_dir
    assert d.image_size == 32 and d.train_x.shape == (2, 3, 32, 32) and d.val_x.shape == (2, 3, 32, 32)
    assert d.train_x[0, :, 16, 16].tolist() == [10, 20, 30] and d.train_x[1, :, 0, 31].tolist() == [70, 80, 90]
    assert d.val_x[0, :, 5, 5].tolist() == [40, 50, 60] and d.val_x[1, :, 31, 0].tolist() == [1, 2, 3]
    assert D.load_dataset("imagefolder:data/mixed").info["root"] == str(root.resolve())  # from the cwd


@pytest.mark.parametrize("mode", ["fork", "threads"])
def test_imagefolder_parallel_decoding(tmp_path, monkeypatch, mode):
    """The pool paths give the same result as decoding in this process (in order)."""
    root = tmp_path / "ds"
    for i in range(12):
        _img(root / f"c{i % 3}" / f"{i:02d}.png", (i * 20, 255 - i * 20, 7))
    want = D.load_dataset(f"imagefolder:{root}")
    monkeypatch.setenv("POOLPROP_CACHE", str(tmp_path / f"cache-{mode}"))
    monkeypatch.setattr(imagefolder, "PARALLEL_MIN_FILES", 0)
    monkeypatch.setattr(imagefolder.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    if mode == "threads":  # as inside Streamlit: a multi-threaded process must not fork
        monkeypatch.setattr(imagefolder.threading, "active_count", lambda: 2)
        monkeypatch.setattr(imagefolder.multiprocessing, "get_context", lambda *a: pytest.fail("forked"))
    elif not imagefolder.sys.platform.startswith("linux"):
        pytest.skip("fork is used on Linux only")
    got = D.load_dataset(f"imagefolder:{root}")
    assert torch.equal(got.train_x, want.train_x) and torch.equal(got.val_x, want.val_x)
    assert torch.equal(got.train_y, want.train_y)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(D.DatasetError, match="does not exist") as e:
        D.load_dataset(f"imagefolder:{tmp_path / 'missing'}")
    assert str(tmp_path / "missing") in one_line(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DatasetError, match="no class folders") as e:
        D.load_dataset(f"imagefolder:{tmp_path / 'empty'}")
    assert str(tmp_path / "empty") in one_line(e.value)
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "readme.txt").write_text("x")
    with pytest.raises(D.DatasetError, match="has no images") as e:
        D.load_dataset(f"imagefolder:{tmp_path / 'noimg'}")
    assert str(tmp_path / "noimg" / "cls") in one_line(e.value)
    (tmp_path / "bad" / "cls").mkdir(parents=True)
    (tmp_path / "bad" / "cls" / "x.png").write_bytes(b"not a png")
    with pytest.raises(D.DatasetError, match="cannot read image") as e:
        D.load_dataset(f"imagefolder:{tmp_path / 'bad'}")
    one_line(e.value)
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(D.DatasetError, match="not a folder"):
        D.load_dataset(f"imagefolder:{tmp_path / 'file.png'}")


def test_imagefolder_cache_is_safetensors_and_invalidated_by_changes(tmp_path, monkeypatch):
    root = tmp_path / "ds"
    for c in ("x", "y"):
        for i in range(3):
            _img(root / c / f"{i}.png", (i * 10, 5, 5))
    d = D.load_dataset(f"imagefolder:{root}")
    caches = list((tmp_path / "cache" / "imagefolder").glob("*.safetensors"))
    assert len(caches) == 1 and _is_safetensors(caches[0])
    # the second load decodes nothing
    real = imagefolder._decode_images
    monkeypatch.setattr(imagefolder, "_decode_images", lambda *a: pytest.fail("decoded again"))
    d2 = D.load_dataset(f"imagefolder:{root}")
    assert torch.equal(d.train_x, d2.train_x) and d2.classes == d.classes
    # a changed file (new content, new mtime) is decoded again, and the old cache is removed
    monkeypatch.setattr(imagefolder, "_decode_images", real)
    _img(root / "x" / "0.png", (99, 5, 5))
    st = os.stat(root / "x" / "0.png")
    os.utime(root / "x" / "0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    d3 = D.load_dataset(f"imagefolder:{root}")
    assert d3.train_x[0, 0, 0, 0].item() == 99
    assert len(list((tmp_path / "cache" / "imagefolder").glob("*.safetensors"))) == 1
    # an added file too: y now has 4 files (3 train + 1 val), x still 2 + 1
    _img(root / "y" / "3.png", (1, 1, 1))
    assert len(D.load_dataset(f"imagefolder:{root}").train_y) == 5


def test_sample_images_deterministic_and_balanced():
    x, y, classes = D.sample_images("features10:train=20,val=40", 10)
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.uint8 and sorted(y.tolist()) == list(range(10))
    x2, y2, _ = D.sample_images("features10:train=20,val=40", 10)
    assert torch.equal(x, x2) and torch.equal(y, y2) and classes[7] == "red_blob"
    x3, _, _ = D.sample_images("features10:train=20,val=40", 10, seed=1)
    assert not torch.equal(x, x3)
    assert len(D.sample_images("features10:train=20,val=40", 500)[1]) == 40


# ---------------------------------------------------------------------------------------
# the real CIFAR-10 JPEG copy (skipped where /work/shared/data is absent)
# ---------------------------------------------------------------------------------------

needs_zip = pytest.mark.skipif(not SHARED_ZIP.is_file(), reason="no /work/shared/data/cifar10-train-jpeg.zip")


@needs_zip
def test_real_cifar_jpeg_split_rule_counts():
    names = [n for n in zipfile.ZipFile(SHARED_ZIP).namelist() if n.endswith(".jpg")]
    listing: dict[str, list[str]] = {}
    for n in names:
        _, cls, fn = n.split("/")
        listing.setdefault(cls, []).append(fn)
    train, val = D.split_by_rule(listing)
    assert len(train) == 45_000 and len(val) == 5_000
    assert sorted(listing) == CIFAR_CLASSES
    assert all(int(fn[:4]) >= 4500 for _, fn, _ in val) and all(int(fn[:4]) < 4500 for _, fn, _ in train)
    assert ("cat", "4500.jpg", 3) in val and ("cat", "4499.jpg", 3) in train
    if UNPACKED.is_dir():  # the unpacked copy: the real scanner (no image decoded)
        scan = imagefolder._scan_imagefolder(UNPACKED)
        assert len(scan["train"]) == 45_000 and len(scan["val"]) == 5_000
        assert "airplane/4500.jpg" in {e[0] for e in scan["val"]}


@needs_zip
def test_real_cifar_jpeg_subset_decodes(tmp_path):
    zf = zipfile.ZipFile(SHARED_ZIP)
    for cls in ("airplane", "cat"):
        for i in (0, 1, 2, 4499, 4500, 4999)[: 6]:
            zf.extract(f"train/{cls}/{i:04d}.jpg", tmp_path)
    # 6 files a class -> the last one (4999) is val
    d = D.load_dataset(f"imagefolder:{tmp_path / 'train'}")
    assert d.image_size == 32 and d.train_x.shape == (10, 3, 32, 32) and d.val_y.tolist() == [0, 1]
    ref = np.asarray(Image.open(tmp_path / "train" / "cat" / "4999.jpg").convert("RGB"))
    assert np.array_equal(d.val_x[1].permute(1, 2, 0).numpy(), ref)
