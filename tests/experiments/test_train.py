"""experiments/train.py, experiments/gpu_check.py and `probe train` / `probe demo`, on CPU with tiny budgets.

The MLflow store is the session's throwaway one (tests/conftest.py); checkpoints go to tmp_path.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from experiments import train as T  # first: it sets OMP_WAIT_POLICY before torch loads OpenMP (if no one has yet)

import mlflow  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from torch import nn  # noqa: E402

from experiments import data, tracking  # noqa: E402
from experiments.cli import main as cli  # noqa: E402
from experiments.train import TrainConfig, evaluate, load_checkpoint, lr_at, make_optimizer, train  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
HAS_FM = (Path(data.FASHION_MNIST_DIR) / "train-images-idx3-ubyte.gz").is_file()
needs_fm = pytest.mark.skipif(not HAS_FM, reason="Debian package dataset-fashion-mnist not installed")
# The mechanism tests use Fashion-MNIST when installed, else the generated hierarchy dataset.
DATA = dict(dataset="fashion_mnist") if HAS_FM else dict(dataset="hierarchy", data_options={"n": 256})


def tiny(tmp: Path, **kw) -> TrainConfig:
    """Steps-DeiT-micro with drop-path (so the global RNG matters), 96 images, 6 steps per epoch, 2 epochs."""
    base = dict(model="steps_deit_micro", epochs=2, batch_size=16, limit=96, test_limit=48, warmup_epochs=0.5,
                drop_path=0.1, seed=3, register=False, log_every=4, checkpoint_dir=str(tmp), **DATA)
    return TrainConfig(**{**base, **kw})


def same_weights(a: nn.Module | dict, b: nn.Module | dict) -> bool:
    sa = a.state_dict() if isinstance(a, nn.Module) else a
    sb = b.state_dict() if isinstance(b, nn.Module) else b
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def run_of(run_id: str):
    return MlflowClient().get_run(run_id)


def fail_at(monkeypatch, step: int, exc: BaseException, seen: dict) -> None:
    """Make training raise `exc` when optimizer step `step` (0-based) is about to run; note the active run id."""
    real = T.lr_at

    def patched(s, cfg, spe):
        if s == step:
            seen["run_id"] = mlflow.active_run().info.run_id
            raise exc
        return real(s, cfg, spe)

    monkeypatch.setattr(T, "lr_at", patched)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The reference: `tiny` trained for 2 epochs without a stop."""
    return train(tiny(tmp_path_factory.mktemp("straight")))


# ---------------------------------------------------------------------------------------- pieces


def test_lr_schedule_warms_up_then_cosine_to_floor():
    cfg = TrainConfig(lr=1e-3, epochs=4, warmup_epochs=1.0)
    lrs = [lr_at(s, cfg, 10) for s in range(40)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert 1e-3 * T.MIN_LR_FRACTION < lrs[-1] < 2e-3 * T.MIN_LR_FRACTION  # one step short of the floor
    assert lr_at(0, TrainConfig(lr=1e-3, warmup_epochs=0), 10) == pytest.approx(1e-3)


def test_no_weight_decay_on_norms_biases_embeddings_tokens():
    model = T.models.create_model("steps_deit_micro", num_classes=10)
    opt = make_optimizer(model, 1e-3, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, plain = ({names[id(p)] for p in g["params"]} for g in opt.param_groups)
    assert opt.param_groups[0]["weight_decay"] == 0.05 and opt.param_groups[1]["weight_decay"] == 0.0
    assert {"pos_embed", "cls_token"} <= plain and "patch_embed.proj.weight" in decay
    assert all(model.get_parameter(n).ndim > 1 for n in decay)
    assert any(n.endswith("norm.weight") for n in plain) and any(n.endswith(".bias") for n in plain)


def test_evaluate_coarse_is_argmax_of_summed_fine_probabilities():
    # fine classes 0,1 -> coarse 0; fine 2 -> coarse 1. Logits favour fine 2 alone, but 0+1 together win.
    ds = data.LabeledImages(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 2]), torch.tensor([0, 1]),
                            fine_names=["a", "b", "c"], coarse_names=["x", "y"], fine_to_coarse=[0, 0, 1],
                            name="toy", split="test", mean=[0.0], std=[1.0])
    probs = torch.tensor([0.35, 0.30, 0.351])
    probs = (probs / probs.sum()).log()

    class Fixed(nn.Module):
        def forward(self, x):
            return probs.expand(len(x), 3)

    res = evaluate(Fixed(), ds, "cpu", batch_size=1)
    assert res["fine_acc"] == 0.5 and res["coarse_acc"] == 0.5  # fine says 2 for both; coarse says 0 for both
    assert res["loss"] == pytest.approx(-(probs[0] + probs[2]).item() / 2, rel=1e-4)


def test_epoch_order_shards_are_disjoint_and_reseeded_per_epoch():
    cfg = TrainConfig(batch_size=4, seed=5)
    r0, r1 = (T.epoch_order(37, cfg, 0, T.Dist(rank=r, world_size=2)) for r in (0, 1))
    assert len(r0) == len(r1) == 16 and not set(r0.tolist()) & set(r1.tolist())
    assert torch.equal(T.epoch_order(37, cfg, 0), T.epoch_order(37, cfg, 0))
    assert not torch.equal(T.epoch_order(37, cfg, 0), T.epoch_order(37, cfg, 1))


@pytest.mark.parametrize("dataset, flips", [("hierarchy", False), ("fashion_mnist", True)])
def test_flip_only_where_the_dataset_allows_it(dataset, flips, monkeypatch):
    if dataset == "fashion_mnist" and not HAS_FM:
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    seen = []

    def spy(images, generator, **kw):
        seen.append(kw["flip"])
        return images

    monkeypatch.setattr(T, "augment_batch", spy)
    opts = {"n": 32} if dataset == "hierarchy" else {}
    cfg = TrainConfig(model="resnet_micro", dataset=dataset, limit=32, batch_size=16, max_steps=1, data_options=opts)
    train_ds, _ = T.load_data(cfg)
    state = T.prepare(cfg, train_ds, torch.device("cpu"))
    assert T.fit(cfg, state, train_ds, torch.device("cpu"), progress=False) == "max_steps 1"
    assert seen == [flips] and state.step == 1 and state.epoch_step == 1


def test_cli_defaults_match_train_config():
    params = {p.name: p.default for p in cli.commands["train"].params}
    cfg = TrainConfig()
    for name in ("model", "dataset", "epochs", "batch_size", "lr", "weight_decay", "warmup_epochs",
                 "label_smoothing", "clip_grad", "drop_path", "seed", "device", "checkpoint_dir", "log_every"):
        assert params[name] == getattr(cfg, name), name


# ------------------------------------------------------------------------------------------- runs


@needs_fm
@pytest.mark.slow
def test_short_run_beats_chance_on_both_levels_and_freezes(tmp_path):
    cfg = TrainConfig(model="steps_resnet_micro", epochs=2, batch_size=32, lr=2e-3, warmup_epochs=0.2, limit=600,
                      test_limit=300, checkpoint_dir=str(tmp_path), seed=0)
    res = train(cfg)
    # chance: fine 0.1 (10 balanced classes); coarse 0.4 by always answering "tops" (4 of 10 classes)
    assert res.metrics["fine_acc"] > 0.35, res.metrics
    assert res.metrics["coarse_acc"] > 0.6, res.metrics
    assert res.complete and re.fullmatch(r"models:/steps_resnet_micro-fashion_mnist/\d+", res.model_uri)

    run = run_of(res.run_id)
    assert run.info.status == "FINISHED"
    tags, params = run.data.tags, run.data.params
    assert tags["stepslab.kind"] == "train" and tags["stepslab.model"] == "steps_resnet_micro"
    assert tags["stepslab.family"] == "resnet" and tags["stepslab.dataset"] == "fashion_mnist"
    assert json.loads(tags["stepslab.steps"])[0][-1] > 0 and tags["stepslab.device"] == "cpu"
    assert len(tags["stepslab.dataset_fingerprint"]) == 16
    assert params["lr"] == "0.002" and params["limit"] == "600" and "resume" not in params
    client = MlflowClient()
    assert [m.step for m in client.get_metric_history(res.run_id, "epoch/test_fine_acc")] == [1, 2]
    assert client.get_metric_history(res.run_id, "train/loss")
    arts = {a.path for a in client.list_artifacts(res.run_id)}
    assert {"config.json", "learning_curve.png", "checkpoint", "model_info.json"} <= arts

    model, info = tracking.load_frozen(res.model_uri)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert info["model"] == "steps_resnet_micro" and info["fine_to_coarse"] == data.FASHION_FINE_TO_COARSE
    assert info["create_kwargs"] == {"num_classes": 10, "in_chans": 1} and info["num_coarse"] == 4
    assert info["input_size"] == [1, 28, 28] and info["run_id"] == res.run_id
    assert info["metrics"]["fine_acc"] == pytest.approx(res.metrics["fine_acc"])
    assert same_weights(model, res.model)


@pytest.mark.slow
def test_same_seed_same_numbers(straight, tmp_path):
    again = train(tiny(tmp_path))
    for key in ("fine_acc", "coarse_acc", "test_loss", "train_loss", "steps"):
        assert again.metrics[key] == straight.metrics[key], key
    assert same_weights(again.model, straight.model)
    assert again.run_id != straight.run_id


@pytest.mark.slow
def test_resume_mid_epoch_is_bitwise_equal_in_the_same_run(straight, tmp_path):
    stopped = train(tiny(tmp_path, max_steps=8))  # epoch 2, step 2 of 6
    assert not stopped.complete and stopped.model_uri is None
    ckpt = load_checkpoint(stopped.checkpoint)
    assert (ckpt["epoch"], ckpt["step"], ckpt["epoch_step"]) == (1, 8, 2)
    assert ckpt["run_id"] == stopped.run_id and ckpt["config"]["max_steps"] == 8
    assert not same_weights(ckpt["model"], straight.model)
    resumed = train(tiny(tmp_path, resume=True))
    assert resumed.complete and resumed.run_id == stopped.run_id
    assert same_weights(resumed.model, straight.model)
    assert resumed.metrics["fine_acc"] == straight.metrics["fine_acc"]
    assert run_of(resumed.run_id).info.status == "FINISHED"
    assert [m.step for m in MlflowClient().get_metric_history(resumed.run_id, "epoch/test_fine_acc")] == [1, 2]


@pytest.mark.slow
def test_interrupt_marks_killed_keeps_last_epoch_and_resumes(straight, tmp_path, monkeypatch):
    seen: dict = {}
    fail_at(monkeypatch, 8, KeyboardInterrupt(), seen)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path))
    assert run_of(seen["run_id"]).info.status == "KILLED"
    path = T.checkpoint_path(tiny(tmp_path))
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"], ckpt["epoch_step"]) == (1, 6, 0)
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp file left behind
    monkeypatch.undo()
    resumed = train(tiny(tmp_path, resume=True))
    assert resumed.run_id == seen["run_id"] and same_weights(resumed.model, straight.model)
    assert run_of(resumed.run_id).info.status == "FINISHED"
    # Step 8 was logged before the interrupt and trained again after the resume: logged once.
    client = MlflowClient()
    for key in ("train/loss", "train/lr", "epoch/test_fine_acc", "resumed_at_step"):
        steps = [m.step for m in client.get_metric_history(resumed.run_id, key)]
        assert steps == sorted(set(steps)), (key, steps)
    assert sorted(m.step for m in client.get_metric_history(resumed.run_id, "train/loss")) == [4, 6, 8, 12]


@pytest.mark.slow
def test_crash_marks_failed(tmp_path, monkeypatch):
    seen: dict = {}
    fail_at(monkeypatch, 3, RuntimeError("boom"), seen)
    with pytest.raises(RuntimeError, match="boom"):
        train(tiny(tmp_path, epochs=1))
    assert run_of(seen["run_id"]).info.status == "FAILED"
    assert not T.checkpoint_path(tiny(tmp_path)).exists()  # no epoch finished, nothing to resume


def test_resume_refuses_a_different_setup(tmp_path):
    train(tiny(tmp_path, epochs=1, max_steps=2))
    with pytest.raises(ValueError, match="batch_size=16, not 8"):
        train(tiny(tmp_path, epochs=1, batch_size=8, resume=True))


# --------------------------------------------------------------------------------------------- CLI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args, needle", [
    (["--model", "nosuchnet"], "'nosuchnet'"),
    (["--dataset", "mnist2"], "'mnist2'"),
    (["--epochs", "0"], "epochs must be >= 1, got 0"),
    (["--device", "tpu"], "'tpu'"),
    (["--data-option", "n"], "'n'"),
    (["--model-option", "bogus=1"], "--model-option bogus: steps_deit_micro has no such option"),
    (["--model-option", "head_dim=7"], "--model-option head_dim=7: steps_deit_micro cannot be built"),
    (["--tracking-uri", "foo://bar"], "unknown scheme 'foo://'"),
    (["--resume", "--checkpoint-dir", "{tmp}/none"], "{tmp}/none/steps_deit_micro-fashion_mnist-seed0/last.pt"),
    (["--tracking-uri", "http://127.0.0.1:9"], "http://127.0.0.1:9"),
])
def test_train_cli_bad_input_is_one_line(args, needle, tmp_path, monkeypatch):
    def no_data(cfg):
        raise AssertionError("data loaded before the inputs were checked")

    monkeypatch.setattr(T, "load_data", no_data)
    args = [a.format(tmp=tmp_path) for a in args]
    res = CliRunner().invoke(cli, ["train", "--checkpoint-dir", str(tmp_path), *args])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle.format(tmp=tmp_path) in lines[0], lines


@pytest.mark.slow
def test_train_cli_prints_summary(tmp_path):
    res = CliRunner().invoke(cli, ["train", "--model", "deit_micro", "--epochs", "1", "--batch-size", "16",
                                   "--limit", "32", "--test-limit", "16", "--no-register", "--checkpoint-dir",
                                   str(tmp_path), "--dataset", DATA["dataset"],
                                   *(["--data-option", "n=64"] if not HAS_FM else [])])
    assert res.exit_code == 0, res.output
    assert "fine acc" in res.stdout and "deit_micro" in res.stdout and "not registered" in res.stdout
    assert "tracking sqlite:///" in res.stdout


@needs_fm
@pytest.mark.slow
def test_demo_cli_trains_and_freezes_both(tmp_path):
    res = CliRunner().invoke(cli, ["demo", "--limit", "64", "--test-limit", "32", "--epochs", "1",
                                   "--checkpoint-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    out = res.stdout
    for name in ("steps_deit_micro", "deit_micro"):
        assert re.search(rf"frozen model models:/{name}-fashion_mnist/\d+,", out), out
    assert "probe ui" in out and "mlflow ui --backend-store-uri sqlite:///" in out
    assert "probe run --model steps_deit_micro --path slow" in out


# --------------------------------------------------------------------------------------------- DDP


DDP_SCRIPT = """
import os, sys, torch
from experiments.train import TrainConfig, train
cfg = TrainConfig(**{cfg})
res = train(cfg)
torch.save(res.model.state_dict(), os.path.join({out!r}, f"rank{{os.environ['RANK']}}.pt"))
if res.run_id:
    print("RUN", res.run_id, res.metrics["steps"])
"""


@pytest.mark.slow
def test_ddp_two_gloo_processes_end_with_identical_weights(tmp_path):
    cfg = dict(model="deit_micro", epochs=1, batch_size=16, limit=128, test_limit=32, register=False,
               checkpoint_dir=str(tmp_path / "ckpt"), device="cpu", **DATA)
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(cfg=repr(cfg), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={_free_port()}", "--master_addr=127.0.0.1", str(script)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_line = [line for line in proc.stdout.splitlines() if line.startswith("RUN")]
    assert len(run_line) == 1 and run_line[0].split()[2] == "4"  # 128 images / 2 ranks / 16 per batch
    w0, w1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert same_weights(w0, w1)
    assert run_of(run_line[0].split()[1]).data.tags["stepslab.world_size"] == "2"
    assert load_checkpoint(tmp_path / "ckpt" / f"deit_micro-{DATA['dataset']}-seed0" / "last.pt")["step"] == 4


# ----------------------------------------------------------------------------------------- GPU check


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_without_mlflow(tmp_path):
    """The GPU machine has only torch, timm, numpy, tqdm: block the rest and run the script for 1 step each."""
    blocked = ("mlflow", "captum", "datasets", "sklearn", "click", "experiments.tracking")
    code = ("import sys, runpy\n"
            f"for m in {blocked!r}: sys.modules[m] = None\n"
            f"sys.argv = ['gpu_check', '--device', 'cpu', '--max-steps', '1', '--batch-size', '8', '--limit', '64',"
            f" '--test-limit', '16', '--out', {str(tmp_path)!r}]\n"
            "runpy.run_path('experiments/gpu_check.py', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (js,) = tmp_path.glob("gpu-check-*.json")
    report = json.loads(js.read_text())
    assert [r["model"] for r in report["results"]] == ["steps_deit_t", "deit_t"]
    assert all(r["steps"] == 1 and 0 <= r["fine_acc"] <= 1 for r in report["results"])
    assert js.with_suffix(".md").read_text().startswith("# GPU check: cpu")
