"""`probe freeze --model M --pretrained [--weights FILE]`: published weights frozen as a baseline, offline."""
from __future__ import annotations

import hashlib

import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient
from safetensors.torch import save_file

import models
from experiments import tracking
from experiments.cli import main as cli


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_weights_saved_from_timm_load_back_as_a_frozen_baseline(store, tmp_path):
    torch.manual_seed(0)
    src = models.create_model("resnet_micro", num_classes=10)
    file = tmp_path / "resnet_micro.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(file))
    res = CliRunner().invoke(cli, ["freeze", "--model", "resnet_micro", "--pretrained", "--weights", str(file),
                                   "--model-option", "num_classes=10", "--dataset", "fashion_mnist"])
    assert res.exit_code == 0, res.output
    uri = res.output.strip().rsplit(": ", 1)[1]
    model, info = tracking.load_frozen(uri)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in src.state_dict().items())
    assert not any(p.requires_grad for p in model.parameters())
    assert info["pretrained"]["sha256"] == sha256(file) and info["pretrained"]["file"] == str(file)
    assert info["input_size"] == [1, 28, 28] and info["num_fine"] == 10
    run = MlflowClient().get_run(info["frozen_in_run"])
    assert run.data.params["weights_sha256"] == sha256(file)
    assert run.data.tags["stepslab.pretrained"] == "true" and run.data.tags["stepslab.kind"] == "freeze"
    # A .pth state_dict is read weights-only; the same weights give the same checksum of what was frozen.
    pth = tmp_path / "w.pth"
    torch.save({"state_dict": src.state_dict()}, pth)
    res = CliRunner().invoke(cli, ["freeze", "--model", "resnet_micro", "--pretrained", "--weights", str(pth),
                                   "--model-option", "num_classes=10"])
    assert res.exit_code == 0, res.output
    again, _ = tracking.load_frozen(res.output.strip().rsplit(": ", 1)[1])
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in src.state_dict().items())


@pytest.mark.parametrize("args, needle", [
    (["--model", "deit_t"], "no pretrained weights for deit_t: looked for model.safetensors and pytorch_model.bin "
                            "of timm/deit_tiny_patch16_224"),
    (["--model", "steps_deit_micro"], "steps_deit_micro has no published weights"),
    (["--model", "resnet_micro", "--weights", "/nowhere.safetensors"], "--weights /nowhere.safetensors: no such"),
    (["--model", "resnet_micro", "--weights", "BAD"], "the weights do not fit resnet_micro: fc."),
    ([], "--pretrained needs --model"),
])
def test_absent_or_wrong_weights_are_one_line(args, needle, store, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    bad = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in models.create_model("resnet_micro", num_classes=10).state_dict().items()},
              str(bad))
    args = [str(bad) if a == "BAD" else a for a in args]
    res = CliRunner().invoke(cli, ["freeze", "--pretrained", *args])
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert "\n" not in line and needle in line, line
    if args[:2] == ["--model", "deit_t"]:
        assert str(tmp_path / "hf" / "models--timm--deit_tiny_patch16_224.fb_in1k") in line
