"""Tests for experiments/data.py: offline loaders, the hierarchy dataset's known answer, batching, augmentation."""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from experiments import data
from experiments.data import DATASETS, DataError, LabeledImages, augment_batch, batches, load_dataset, load_recorded

FM = Path(data.FASHION_MNIST_DIR)
needs_fm = pytest.mark.skipif(not (FM / "train-images-idx3-ubyte.gz").is_file(),
                              reason="Debian package dataset-fashion-mnist not installed")


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


@pytest.fixture(scope="module")
def fm_train() -> LabeledImages:
    return load_dataset("fashion_mnist", "train")


@pytest.fixture(scope="module")
def hier() -> LabeledImages:
    return load_dataset("hierarchy", "train", n=256, seed=1)


# Fashion-MNIST ----------------------------------------------------------------------------------------------

@needs_fm
def test_fashion_mnist_offline(fm_train):
    test = load_dataset("fashion_mnist", "test")
    assert fm_train.images.shape == (60000, 1, 28, 28) and fm_train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 1, 28, 28)
    assert (fm_train.num_fine, fm_train.num_coarse, fm_train.in_chans, fm_train.img_size) == (10, 4, 1, 28)
    assert torch.bincount(fm_train.fine).tolist() == [6000] * 10
    assert torch.bincount(test.fine).tolist() == [1000] * 10
    names = fm_train.fine_names
    for fine_name, coarse_name in [("Sneaker", "footwear"), ("Sandal", "footwear"), ("Ankle boot", "footwear"),
                                   ("Trouser", "bottoms"), ("Dress", "bottoms"), ("Coat", "tops"),
                                   ("T-shirt/top", "tops"), ("Shirt", "tops"), ("Pullover", "tops"), ("Bag", "bag")]:
        rows = fm_train.fine == names.index(fine_name)
        assert (fm_train.coarse[rows] == fm_train.coarse_names.index(coarse_name)).all()
    x, fine, coarse = fm_train[0]
    assert x.dtype == torch.float32 and x.shape == (1, 28, 28)
    assert isinstance(fine, int) and coarse == fm_train.fine_to_coarse[fine]
    # Normalised with the dataset's fixed statistics: roughly zero mean, unit std over the train split.
    z = fm_train.normalise(fm_train.images[:5000])
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05


@needs_fm
def test_limit_is_stratified_and_deterministic(fm_train):
    a = load_dataset("fashion_mnist", "train", limit=1000, seed=5)
    b = load_dataset("fashion_mnist", "train", limit=1000, seed=5)
    c = load_dataset("fashion_mnist", "train", limit=1000, seed=6)
    assert len(a) == 1000 and torch.bincount(a.fine).tolist() == [100] * 10
    assert a.fingerprint == b.fingerprint and torch.equal(a.images, b.images)
    assert a.fingerprint != c.fingerprint
    # Uneven limit: per-class counts within one of the exact share, total exact.
    d = load_dataset("fashion_mnist", "train", limit=995)
    counts = torch.bincount(d.fine, minlength=10)
    assert counts.sum() == 995 and counts.min() >= 99 and counts.max() <= 100
    # The subset is made of real examples with their labels, in the original order.
    idx = torch.from_numpy(data._stratified(fm_train.fine.numpy(), 1000, seed=5))
    assert torch.equal(a.images, fm_train.images[idx]) and torch.equal(a.fine, fm_train.fine[idx])


def test_limit_on_small_uneven_labels():
    fine = np.array([0] * 7 + [1] * 2 + [2] * 1)
    idx = data._stratified(fine, 5, seed=0)
    assert len(idx) == 5 and np.bincount(fine[idx], minlength=3).tolist() == [4, 1, 0]
    assert np.array_equal(idx, data._stratified(fine, 5, seed=0))
    assert data._stratified(fine, 10, seed=0) is None


@needs_fm
def test_corrupt_idx_is_a_one_line_data_error(tmp_path):
    images = FM / "t10k-images-idx3-ubyte.gz"
    labels = gzip.decompress((FM / "t10k-labels-idx1-ubyte.gz").read_bytes())

    def folder(name: str, label_bytes: bytes, compress: bool = True) -> str:
        d = tmp_path / name
        d.mkdir()
        (d / images.name).symlink_to(images)
        (d / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(label_bytes) if compress else label_bytes)
        return str(d)

    packed = gzip.compress(labels)
    cases = {
        "truncated_gz": folder("truncated_gz", packed[: len(packed) // 2], compress=False),
        "short_payload": folder("short_payload", labels[:-100]),
        "bad_magic": folder("bad_magic", b"\x00\x00\x08\x03" + labels[4:]),
        "not_gzip": folder("not_gzip", b"hello, not gzip", compress=False),
    }
    for case, path in cases.items():
        with pytest.raises(DataError) as err:
            load_dataset("fashion_mnist", "test", data_dir=path)
        msg = one_line(err)
        assert "t10k-labels-idx1-ubyte.gz" in msg and ("corrupt" in msg or "IDX" in msg), case
    assert not any(p.name.endswith(".tmp") for p in tmp_path.rglob("*"))


def test_fashion_mnist_missing_folder_and_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(DataError) as err:
        load_dataset("fashion_mnist", data_dir=str(tmp_path / "nope"))
    assert "nope" in one_line(err)

    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'zalando-datasets/fashion_mnist' on the Hub (LocalEntryNotFoundError)\n"
                              "second line")

    monkeypatch.setattr(data, "FASHION_MNIST_DIR", str(tmp_path / "absent"))
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as err:
        load_dataset("fashion_mnist")
    assert "dataset-fashion-mnist" in one_line(err) and "--data-dir" in str(err.value)


# Names, splits, options ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, bad, allowed", [
    (dict(name="mnist"), "'mnist'", list(DATASETS)),
    (dict(name="hierarchy", split="val"), "'val'", ["train", "test"]),
    (dict(name="hierarchy", sizee=3), "'sizee'", ["n", "img_size", "channels", "period"]),
    (dict(name="cifar10", img_size=3), "'img_size'", ["none"]),
])
def test_unknown_values_are_named(kwargs, bad, allowed):
    with pytest.raises(DataError) as err:
        load_dataset(**kwargs)
    msg = one_line(err)
    assert bad in msg and all(a in msg for a in allowed)


def test_bad_limit_and_options():
    for kwargs in (dict(limit=0), dict(limit=-3), dict(n=0), dict(period=3), dict(seed=-1)):
        with pytest.raises(DataError) as err:
            load_dataset("hierarchy", **kwargs)
        one_line(err)


# Hierarchy: deterministic, and the known answer -----------------------------------------------------------

def test_hierarchy_is_deterministic_and_balanced(hier):
    again = load_dataset("hierarchy", "train", n=256, seed=1)
    assert again.fingerprint == hier.fingerprint and torch.equal(again.images, hier.images)
    assert load_dataset("hierarchy", "train", n=256, seed=2).fingerprint != hier.fingerprint
    test = load_dataset("hierarchy", "test", n=256, seed=1)
    assert not torch.equal(test.images, hier.images) and test.mean == hier.mean
    assert (hier.num_fine, hier.num_coarse, hier.in_chans, hier.img_size) == (16, 4, 1, 28)
    assert torch.bincount(hier.fine).tolist() == [16] * 16
    assert hier.fine_to_coarse == [k // 4 for k in range(16)]
    assert torch.equal(hier.coarse, hier.fine // 4)
    assert hier.fine_names[4 * 3 + 1] == "cross/vstripes" and hier.coarse_names[2] == "triangle"
    assert len(load_dataset("hierarchy", "test")) == 1000
    rgb = load_dataset("hierarchy", "test", n=32, img_size=32, channels=3)
    assert rgb.images.shape == (32, 3, 32, 32) and len(rgb.mean) == 3


def test_load_recorded_uses_the_frozen_models_data_options(tmp_path):
    info = {"dataset": "hierarchy", "data_options": {"n": 48, "img_size": 16}, "data_dir": str(tmp_path / "gone")}
    train = load_recorded(info, "train", seed=2)
    assert len(train) == 48 and train.img_size == 16
    assert train.fingerprint == load_dataset("hierarchy", "train", n=48, img_size=16, seed=2).fingerprint
    assert len(load_recorded(info, "test", limit=10)) == 10
    # another dataset named by the user gets its own defaults, not the recorded options
    other = load_recorded({"dataset": "fashion_mnist", "data_options": {}}, "test", dataset="hierarchy", limit=8)
    assert other.img_size == 28 and len(other) == 8
    with pytest.raises(DataError, match="records no training dataset"):
        load_recorded({}, "train")


def test_hierarchy_known_answer():
    """Shape survives a 4x blur (7x7 image), texture does not; the full image carries both.

    One feature map for every case: |FFT| magnitudes (translation invariant), then a standardised linear
    classifier. Texture is judged within shape: its label is fine % 4, whatever the shape.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train = load_dataset("hierarchy", "train", n=1200, seed=3)
    test = load_dataset("hierarchy", "test", n=600, seed=3)

    def features(ds: LabeledImages, blur: bool) -> np.ndarray:
        x = ds.images.float() / 255
        if blur:
            x = F.avg_pool2d(x, 4)  # 28x28 -> 7x7
        return torch.fft.rfft2(x).abs().flatten(1).numpy()

    def accuracy(blur: bool, target: str) -> float:
        label = {"coarse": lambda d: d.coarse, "texture": lambda d: d.fine % 4}[target]
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=300))
        clf.fit(features(train, blur), label(train).numpy())
        return clf.score(features(test, blur), label(test).numpy())

    assert accuracy(blur=True, target="coarse") > 0.95
    assert accuracy(blur=True, target="texture") < 0.35  # chance is 0.25
    assert accuracy(blur=False, target="texture") > 0.95


# CIFAR through `datasets`, offline from folders built here -----------------------------------------------

def _rgb(seed: int, size: int = 32):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _cifar100_dataset(n: int, drop: str | None = None):
    import datasets

    fine = [(7 * i) % 100 for i in range(n)]
    cols = {"img": [_rgb(i) for i in range(n)], "fine_label": fine,
            "coarse_label": [data.CIFAR100_FINE_TO_COARSE[f] for f in fine]}
    feats = {"img": datasets.Image(), "fine_label": datasets.Value("int64"), "coarse_label": datasets.Value("int64")}
    if drop:
        cols.pop(drop), feats.pop(drop)
    return datasets.Dataset.from_dict(cols, features=datasets.Features(feats))


def test_cifar100_from_save_to_disk(tmp_path):
    import datasets

    datasets.DatasetDict({"train": _cifar100_dataset(24), "test": _cifar100_dataset(8)}).save_to_disk(tmp_path / "c")
    ds = load_dataset("cifar100", "train", data_dir=str(tmp_path / "c"))
    assert ds.images.shape == (24, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert (ds.num_fine, ds.num_coarse) == (100, 20)
    assert torch.bincount(torch.tensor(data.CIFAR100_FINE_TO_COARSE), minlength=20).tolist() == [5] * 20
    assert ds.fine[3] == 21 and ds.coarse_names[ds.coarse[3]] == "large_omnivores_and_herbivores"  # chimpanzee
    assert torch.equal(ds.images[5], torch.from_numpy(np.array(_rgb(5))).permute(2, 0, 1))
    assert len(load_dataset("cifar100", "test", data_dir=str(tmp_path / "c"))) == 8
    assert len(load_dataset("cifar100", "train", data_dir=str(tmp_path / "c"), limit=6)) == 6


def test_cifar_missing_column_and_bad_image(tmp_path):
    import datasets

    datasets.DatasetDict({"train": _cifar100_dataset(4, drop="coarse_label")}).save_to_disk(tmp_path / "a")
    with pytest.raises(DataError) as err:
        load_dataset("cifar100", "train", data_dir=str(tmp_path / "a"))
    msg = one_line(err)
    assert "'coarse_label'" in msg and "img" in msg and "fine_label" in msg
    with pytest.raises(DataError) as err:
        load_dataset("cifar100", "test", data_dir=str(tmp_path / "a"))
    assert "'test'" in one_line(err)

    good = _cifar100_dataset(3)
    bad = datasets.Dataset.from_dict(
        {"img": [{"bytes": b"not an image", "path": None}], "fine_label": [0], "coarse_label": [4]},
        features=good.features)
    datasets.DatasetDict({"train": datasets.concatenate_datasets([good, bad])}).save_to_disk(tmp_path / "b")
    with pytest.raises(DataError) as err:
        load_dataset("cifar100", "train", data_dir=str(tmp_path / "b"))
    assert "image 3" in one_line(err)


def test_cifar10_from_parquet(tmp_path):
    import datasets

    labels = [0, 2, 8, 9, 3]
    ds = datasets.Dataset.from_dict({"img": [_rgb(i) for i in range(5)], "label": labels},
                                    features=datasets.Features({"img": datasets.Image(),
                                                                "label": datasets.ClassLabel(num_classes=10)}))
    (tmp_path / "plain_text").mkdir()
    ds.to_parquet(str(tmp_path / "plain_text" / "train-00000-of-00001.parquet"))
    out = load_dataset("cifar10", "train", data_dir=str(tmp_path))
    assert out.fine.tolist() == labels and [out.coarse_names[c] for c in out.coarse] == [
        "vehicles", "animals", "vehicles", "vehicles", "animals"]
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", "test", data_dir=str(tmp_path))
    assert "'test'" in one_line(err)


# ImageFolder --------------------------------------------------------------------------------------------------

def test_imagefolder(tmp_path):
    from PIL import Image

    for split, k in (("train", 3), ("test", 1)):
        for c, size in (("cat", (40, 30)), ("dog", (20, 50)), ("car", (64, 64))):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(k):
                Image.new("RGB", size, (10 * i, 100, 200)).save(d / f"{i}.png")
    ds = load_dataset("imagefolder", "train", data_dir=str(tmp_path), img_size=16)
    assert ds.images.shape == (9, 3, 16, 16) and ds.fine_names == ["car", "cat", "dog"]
    assert ds.coarse_names == ds.fine_names  # no coarse.json: each class its own group
    (tmp_path / "coarse.json").write_text(json.dumps({"cat": "animal", "dog": "animal", "car": "vehicle"}))
    ds = load_dataset("imagefolder", "test", data_dir=str(tmp_path), img_size=16)
    assert ds.coarse_names == ["animal", "vehicle"] and ds.fine_to_coarse == [1, 0, 0]
    assert (ds.images[:, 1] == 100).all()  # a flat colour survives resize and crop
    with pytest.raises(DataError) as err:
        load_dataset("imagefolder", "train", data_dir=str(tmp_path / "missing"))
    assert "missing" in one_line(err)
    shutil.rmtree(tmp_path / "test" / "cat")
    (tmp_path / "test" / "cat").mkdir()
    (tmp_path / "test" / "cat" / "0.png").write_bytes(b"broken")
    with pytest.raises(DataError) as err:
        load_dataset("imagefolder", "test", data_dir=str(tmp_path))
    assert "0.png" in one_line(err)


# LabeledImages -----------------------------------------------------------------------------------------------

def test_fingerprint_stable_and_sensitive(hier):
    fp = hier.fingerprint
    assert len(fp) == 16 and fp == hier.fingerprint == hier.subset(range(len(hier))).fingerprint
    pixel = hier.subset(range(len(hier)))
    pixel.images[7, 0, 3, 3] ^= 1
    assert pixel.fingerprint != fp
    label = hier.subset(range(len(hier)))
    label.fine[0] = label.coarse[0] * 4 + (label.fine[0] + 1) % 4  # another texture, same shape
    assert label.fingerprint != fp
    assert hier.subset(range(len(hier) - 1)).fingerprint != fp


def test_subset_and_consistency(hier):
    sub = hier.subset(hier.coarse == 2)
    assert len(sub) == 64 and (sub.coarse == 2).all()
    assert (sub.fine_names, sub.mean, sub.name, sub.split) == (hier.fine_names, hier.mean, "hierarchy", "train")
    assert torch.equal(sub.images[0], hier.images[int((hier.coarse == 2).nonzero()[0])])
    with pytest.raises(DataError):
        LabeledImages(hier.images[:2], hier.fine[:2], (hier.coarse[:2] + 1) % 4, fine_names=hier.fine_names,
                      coarse_names=hier.coarse_names, fine_to_coarse=hier.fine_to_coarse, name="x", split="train",
                      mean=hier.mean, std=hier.std)


# augment_batch and batches ----------------------------------------------------------------------------------

def test_augment_batch_deterministic_and_correct(hier):
    x = hier.normalise(hier.images[:32])
    out = augment_batch(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, augment_batch(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, augment_batch(x, torch.Generator().manual_seed(1)))
    assert torch.equal(augment_batch(x, torch.Generator(), pad=0, flip=False), x)
    # Same draws, one image at a time: the vectorised gather matches a plain crop and flip.
    for mode, fmode in (("reflect", "reflect"), ("zeros", "constant")):
        g = torch.Generator().manual_seed(4)
        out = augment_batch(x, torch.Generator().manual_seed(4), pad=3, padding_mode=mode)
        oy, ox = torch.randint(0, 7, (32,), generator=g), torch.randint(0, 7, (32,), generator=g)
        flips = torch.rand(32, generator=g) < 0.5
        padded = F.pad(x, (3, 3, 3, 3), mode=fmode)
        for i in range(32):
            ref = padded[i, :, oy[i]:oy[i] + 28, ox[i]:ox[i] + 28]
            assert torch.equal(out[i], ref.flip(-1) if flips[i] else ref)


def test_batches_order_determinism(hier):
    def run(seed: int) -> list[torch.Tensor]:
        return [f for _, f, _ in batches(hier, 50, shuffle=True, generator=torch.Generator().manual_seed(seed))]

    a, b, c = run(0), run(0), run(1)
    assert [t.tolist() for t in a] == [t.tolist() for t in b] and [t.tolist() for t in a] != [t.tolist() for t in c]
    assert [len(t) for t in a] == [50] * 5 + [6]
    assert sorted(torch.cat(a).tolist()) == sorted(hier.fine.tolist())
    assert len(list(batches(hier, 50, shuffle=True, drop_last=True))) == 5
    x, fine, coarse = next(batches(hier, 8, shuffle=False))
    assert x.dtype == torch.float32 and x.shape == (8, 1, 28, 28)
    assert torch.allclose(x[3], hier[3][0]) and fine[3] == hier[3][1] and coarse[3] == hier[3][2]


# Trust: greyscale folders, moved data, the frozen model's input, corrupt stored data, an offline hub -----------

def _folder(root: Path, mode: str, size=(30, 30)) -> Path:
    from PIL import Image

    for split in ("train", "test"):
        for k, c in enumerate(("a", "b")):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(3):
                Image.new(mode, size, 40 * k + 10 * i if mode == "L" else (40 * k, 10 * i, 99)).save(d / f"{i}.png")
    return root


def test_imagefolder_greyscale_option(tmp_path):
    root = _folder(tmp_path, "L")
    grey = load_dataset("imagefolder", "train", data_dir=str(root), img_size=12, channels=1)
    rgb = load_dataset("imagefolder", "train", data_dir=str(root), img_size=12)
    assert grey.images.shape == (6, 1, 12, 12) and rgb.images.shape == (6, 3, 12, 12)
    assert len(grey.mean) == 1 and grey.mean[0] == pytest.approx(np.mean(rgb.mean))
    assert torch.equal(grey.images[:, 0], rgb.images[:, 0])  # a grey file: every colour the same
    with pytest.raises(DataError) as err:
        load_dataset("imagefolder", "train", data_dir=str(root), channels=2)
    assert "channels must be 1 (greyscale) or 3 (RGB), got 2" in one_line(err)


def test_load_recorded_takes_a_moved_data_dir_and_checks_the_input(tmp_path):
    moved = _folder(tmp_path / "moved", "RGB")
    info = {"dataset": "imagefolder", "data_options": {"img_size": 28}, "data_dir": str(tmp_path / "gone"),
            "input_size": [3, 28, 28]}
    with pytest.raises(DataError) as err:
        load_recorded(info, "train")
    assert "--data-dir" in one_line(err) and "gone" in str(err.value)
    ds = load_recorded(info, "train", data_dir=str(moved))
    assert ds.images.shape == (6, 3, 28, 28)
    data.check_input(info, ds, "steps_deit_micro")  # the model as trained: 3 channels
    with pytest.raises(DataError) as err:
        data.check_input({**info, "input_size": [1, 28, 28]}, ds, "steps_deit_micro")
    assert "has 3x28x28 images; this frozen steps_deit_micro takes 1x28x28" in one_line(err)
    data.check_input({"in_chans": 3, "img_size": 28}, ds, "m")  # older cards: in_chans and img_size


def test_truncated_saved_dataset_names_the_folder(tmp_path):
    import datasets

    datasets.DatasetDict({"train": _cifar100_dataset(8)}).save_to_disk(tmp_path / "c")
    (arrow,) = (tmp_path / "c" / "train").glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[:200])
    with pytest.raises(DataError) as err:
        load_dataset("cifar100", "train", data_dir=str(tmp_path / "c"))
    assert str(tmp_path / "c") in one_line(err)


def test_unreachable_hub_fails_at_once(monkeypatch):
    import socket
    import time

    import datasets

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    for k in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the hub was tried anyway"))
    t = time.perf_counter()
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", "test")
    assert time.perf_counter() - t < 5
    msg = one_line(err)
    assert "hub is unreachable (127.0.0.1:" in msg and "--data-dir" in msg and "HF_HUB_OFFLINE=1" in msg
