"""Every path end to end on tiny data: train -> freeze -> `probe run` -> `probe attribute` -> `probe figures`,
through the CLI, for every model family (micro Steps model and its baseline: DeiT, Swin, ResNet) and every dataset
kind (fashion_mnist, imagefolder RGB and greyscale, hierarchy, a Hugging Face dataset saved to disk).

Twelve cases, not the full 6 x 5 product: each model on two dataset kinds, so each family covers four of the five
kinds and each kind is met two or three times (see CASES); four cases freeze with `probe freeze` after a
`--max-steps` stop instead of at the end of training. Every case is 1 epoch (or 1 step) on ~100 images, probes
without MDL and curves, attribution on 8 images with 4 IG steps: the plumbing, not the numbers (those are tested
elsewhere). About 5-15 s a case, 2 minutes in all, on 2 CPU cores.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from experiments import train as T  # first: it sets OMP_WAIT_POLICY before torch loads OpenMP

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from experiments import data, tracking  # noqa: E402
from experiments.cli import main as cli  # noqa: E402

HAS_FM = (Path(data.FASHION_MNIST_DIR) / "train-images-idx3-ubyte.gz").is_file()

# (model, dataset kind, freeze with `probe freeze` after a --max-steps stop). Each model on two kinds, each
# family (Steps model + baseline) on four of the five, each kind two or three times.
CASES = [
    ("steps_deit_micro", "imagefolder_rgb", False),   # the RGB image folder case of issue 12
    ("steps_deit_micro", "hierarchy", True),
    ("deit_micro", "fashion_mnist", False),
    ("deit_micro", "hf_disk", False),
    ("steps_swin_micro", "imagefolder_grey", True),
    ("steps_swin_micro", "hf_disk", False),
    ("swin_micro", "hierarchy", False),
    ("swin_micro", "imagefolder_rgb", False),
    ("steps_resnet_micro", "hf_disk", False),
    ("steps_resnet_micro", "fashion_mnist", True),
    ("resnet_micro", "hierarchy", True),
    ("resnet_micro", "imagefolder_grey", False),
]


def _pattern_images(rng: np.random.Generator, k: int, n: int, size: int, channels: int) -> np.ndarray:
    """n images of class k: stripes of a class-specific period plus noise (uint8 [n, size, size, channels])."""
    yy, xx = np.mgrid[0:size, 0:size]
    base = ((xx + yy * (k % 2)) // (2 + k) % 2) * 160 + 40
    img = base[None, :, :, None] + rng.normal(0, 20, (n, size, size, channels))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """The on-disk datasets: image folders (RGB and greyscale, 4 classes in 2 coarse groups) and a CIFAR-10
    style `datasets` DatasetDict saved with save_to_disk (10 classes, 32 px RGB)."""
    import datasets
    from PIL import Image

    root = tmp_path_factory.mktemp("matrix_data")
    rng = np.random.default_rng(0)
    out = {}
    for kind, mode in (("imagefolder_rgb", "RGB"), ("imagefolder_grey", "L")):
        for split, n in (("train", 26), ("test", 8)):
            for k, c in enumerate(("cat", "dog", "car", "bus")):
                d = root / kind / split / c
                d.mkdir(parents=True)
                for i, arr in enumerate(_pattern_images(rng, k, n, 32, 3 if mode == "RGB" else 1)):
                    Image.fromarray(arr if mode == "RGB" else arr[..., 0], mode).save(d / f"{i}.png")
        (root / kind / "coarse.json").write_text(json.dumps({"cat": "animal", "dog": "animal", "car": "vehicle",
                                                             "bus": "vehicle"}))
        out[kind] = root / kind
    feats = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    splits = {}
    for split, n in (("train", 10), ("test", 4)):
        imgs = [Image.fromarray(a) for k in range(10) for a in _pattern_images(rng, k, n, 32, 3)]
        splits[split] = datasets.Dataset.from_dict({"img": imgs, "label": [k for k in range(10) for _ in range(n)]},
                                                   features=feats)
    datasets.DatasetDict(splits).save_to_disk(root / "hf_disk")
    out["hf_disk"] = root / "hf_disk"
    return out


def _data_args(kind: str, folders: dict[str, Path]) -> tuple[list[str], list[str]]:
    """(train options, the --data-dir given to probe run / attribute) for a dataset kind."""
    if kind.startswith("imagefolder"):
        channels = ["--data-option", "channels=1"] if kind.endswith("grey") else []
        d = str(folders[kind])
        return ["--dataset", "imagefolder", "--data-dir", d, "--data-option", "img_size=28", *channels], ["--data-dir",
                                                                                                         d]
    if kind == "hf_disk":
        d = str(folders[kind])
        return ["--dataset", "cifar10", "--data-dir", d], ["--data-dir", d]
    if kind == "fashion_mnist" and not HAS_FM:
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    return (["--dataset", kind, "--data-option", "n=128"] if kind == "hierarchy" else ["--dataset", kind]), []


def _ok(res) -> str:
    assert res.exit_code == 0, res.output[-3000:]
    return res.stdout


@pytest.mark.slow
@pytest.mark.parametrize("model, kind, refreeze", CASES, ids=[f"{m}-{k}" for m, k, _ in CASES])
def test_train_freeze_probe_attribute_figures(model, kind, refreeze, folders, tmp_path):
    runner = CliRunner()

    def cli_(*args: str) -> str:
        return _ok(runner.invoke(cli, list(args), catch_exceptions=False))

    train_args, data_dir = _data_args(kind, folders)
    base = ["train", "--model", model, *train_args, "--epochs", "1", "--batch-size", "32", "--limit", "100",
            "--test-limit", "32", "--checkpoint-dir", str(tmp_path)]
    if refreeze:
        out = cli_(*base, "--max-steps", "1")
        assert "not registered: stopped early" in out
        run_id = re.search(r"run ([0-9a-f]{32})", out).group(1)
        out = cli_("freeze", "--run", run_id)
        assert "stopped early" in out
    else:
        out = cli_(*base)
        run_id = re.search(r"run ([0-9a-f]{32})", out).group(1)
    uri = re.search(r"models:/\S+/\d+", out).group(0).rstrip(",")
    _, info = tracking.load_frozen(uri)
    assert info["run_id"] == run_id and info["model"] == model
    channels, size = (3 if kind in ("imagefolder_rgb", "hf_disk") else 1), (32 if kind == "hf_disk" else 28)
    assert info["input_size"] == [channels, size, size]  # the model as trained, which probe run compares with

    probe = ["run", "--run", uri, "--limit", "100", "--test-limit", "32", "--no-mdl", "--no-curves",
             "--random-splits", "1", *data_dir]
    out = cli_(*probe)
    assert "division of labour acc:" in out
    probe_id = re.search(r"probe run ([0-9a-f]{32})", out).group(1)
    m = MlflowClient().get_run(probe_id).data.metrics
    assert ("acc.slow.coarse" in m) == model.startswith("steps_") and "acc.full.fine" in m

    out = cli_("attribute", "--run", uri, "--limit", "8", "--probe-limit", "100", "--steps", "4", "--draws", "1",
               "--ablation", "zero", "--batch-size", "8", "--max-delta", "10", *data_dir)
    attr_id = re.search(r"^run ([0-9a-f]{32})$", out, re.M).group(1)
    assert "share.slow.fine" in MlflowClient().get_run(attr_id).data.metrics

    out = cli_("figures", "--runs", f"{probe_id},{attr_id}", "--only",
               "probe_accuracy,attribution_shares,attribution_maps", "--out", str(tmp_path / "fig"))
    for name in ("probe_accuracy", "attribution_shares", "attribution_maps"):
        assert f"made {name}" in out and (tmp_path / "fig" / f"{name}.png").is_file(), out
