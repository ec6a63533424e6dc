"""`probe run` end to end on the generated hierarchy dataset, and its one-line errors (CliRunner, CPU)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

import models
from experiments import tracking
from experiments.cli import main
from experiments.options import MODEL_NAMES

LIMITS = ["--limit", "320", "--test-limit", "160"]


MICRO_KWARGS = {"num_classes": 16, "in_chans": 1, "img_size": 28}


def _register(model, name: str, info: dict) -> str:
    info = {"create_kwargs": MICRO_KWARGS, "in_chans": 1, "img_size": 28, **info}
    with tracking.tracked_run("train", {"model": info["model"]}):
        return tracking.register_frozen(model, name, model_info=info)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Steps-DeiT trained for five steps on hierarchy by experiments.train, frozen."""
    from experiments.train import TrainConfig, train

    cfg = TrainConfig(model="steps_deit_micro", dataset="hierarchy", epochs=1, batch_size=32, limit=160,
                      test_limit=80, seed=0, checkpoint_dir=str(tmp_path_factory.mktemp("ckpt")))
    return train(cfg)


@pytest.fixture(scope="module")
def baseline():
    """An untrained DeiT-micro baseline (the null needs no learning here, only the plumbing)."""
    torch.manual_seed(0)
    model = models.create_model("deit_micro", **MICRO_KWARGS)
    return _register(model, "deit_micro-hierarchy-test", {"model": "deit_micro", "dataset": "hierarchy"})


def _invoke(*args: str):
    return CliRunner().invoke(main, ["run", *args], catch_exceptions=False)


def _one_line_error(res, *needles: str) -> str:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in res.output, res.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.mark.slow
def test_probe_run_end_to_end(trained):
    res = _invoke("--model", "steps_deit_micro", "--layers", "0,11", *LIMITS)
    assert res.exit_code == 0, res.output
    assert f"using frozen model {tracking.newest_frozen('steps_deit_micro')}" in res.stdout
    assert "acc [95% CI]" in res.stdout and "division of labour acc:" in res.stdout
    for path in ("slow", "fast", "full"):
        assert any(line.startswith(f"{path} ") for line in res.stdout.splitlines())
    run = tracking.find_runs("probe", {"stepslab.source_run_id": trained.run_id}).iloc[0]
    got = MlflowClient().get_run(run.run_id)
    assert got.data.tags["stepslab.kind"] == "probe" and got.data.params["source_run_id"] == trained.run_id
    assert got.data.params["dataset"] == "hierarchy"  # the frozen model's training dataset
    m = got.data.metrics
    for name in ("acc.slow.coarse", "acc.fast.fine", "bal_acc.full.fine", "mdl.slow.coarse", "acc_pca.fast.fine",
                 "acc_rand.slow.coarse", "dol.acc", "dol.acc.ci_low", "dol.acc.ci_high", "dol.mdl", "dol.acc_pca"):
        assert name in m, name
    assert 0 <= m["acc.slow.coarse"] <= 1 and m["dol.acc.ci_low"] <= m["dol.acc"] <= m["dol.acc.ci_high"]
    def steps(metric):
        return sorted(h.step for h in MlflowClient().get_metric_history(run.run_id, metric))

    assert steps("depth.acc.full.coarse") == [0, 11]
    # Block 0 belongs to the first step (nothing to split); block 11 to the last (split at C_2 = 96).
    assert steps("depth.acc.slow.fine") == [11] and steps("depth.dol.acc") == [11]
    assert steps("curve.fast.coarse") == [1, 4, 16, 32]
    files = {Path(f.path).name for f in MlflowClient().list_artifacts(run.run_id)}
    assert {"results.csv", "results.json", "confusion.png", "depth.png", "probe_weights.npz"} <= files
    local = mlflow.artifacts.download_artifacts(run_id=run.run_id, artifact_path="results.json")
    assert json.loads(Path(local).read_text())["dol"]["acc"]["score"] == pytest.approx(m["dol.acc"])


@pytest.mark.slow
def test_baseline_matched_null(baseline):
    res = _invoke("--run", baseline, "--random-splits", "2", "--no-mdl", "--no-curves", *LIMITS)
    assert res.exit_code == 0, res.output
    assert "matched.contiguous.slow" in res.stdout and "matched.random1.fast" in res.stdout
    run = tracking.find_runs("probe", {"stepslab.model": "deit_micro"}).iloc[0]
    m = MlflowClient().get_run(run.run_id).data.metrics
    for name in ("acc.full.fine", "acc.matched.contiguous.slow.coarse", "dol.acc", "dol.acc.random0",
                 "dol.acc.random1", "dol.acc.random_mean"):
        assert name in m, name


@pytest.mark.slow
def test_bad_inputs_are_one_line_errors(baseline):
    _one_line_error(_invoke("--model", "steps_deit_micro", "--path", "sideways"), "'--path': 'sideways'",
                    "'slow', 'fast', 'full', 'matched', 'all'")
    _one_line_error(_invoke("--run", baseline, "--path", "slow"), "baseline without slow/fast paths",
                    "--path matched")
    _one_line_error(_invoke("--run", "0123456789abcdef0123456789abcdef"), "no run with this id")
    _one_line_error(_invoke("--model", "steps_resnet34", "--dataset", "cifar10"),
                    "probe train --model steps_resnet34 --dataset cifar10")
    _one_line_error(_invoke("--run", baseline, "--layers", "99"), "out of range")
    _one_line_error(_invoke("--model", "steps_deit_q"), "'--model': 'steps_deit_q' is not one of 'steps_deit_t'")
    _one_line_error(_invoke("--model", "steps_deit_b", "--path", "slow"),
                    "--model steps_deit_b --dataset imagefolder --data-dir DIR --data-option img_size=224")


@pytest.mark.slow
def test_nan_features_are_a_one_line_error():
    model = models.create_model("deit_micro", **MICRO_KWARGS)
    with torch.no_grad():
        model.blocks[3].mlp.fc1.weight[0, 0] = float("nan")
    uri = _register(model, "deit_micro-nan-test", {"model": "deit_micro", "dataset": "hierarchy"})
    res = _invoke("--run", uri, "--path", "full", "--limit", "160", "--test-limit", "16")
    _one_line_error(res, "site 'final'", "NaN/inf")


def test_a_mistyped_model_name_is_refused_before_torch_is_imported():
    # What makes the refusal fast: the names come from models/names.json, not from importing the models package.
    code = ("import sys; from click.testing import CliRunner; from experiments.cli import main; "
            "res = CliRunner().invoke(main, ['run', '--model', 'steps_deit_q']); "
            "print(res.exit_code, 'torch' in sys.modules, 'mlflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["2", "False", "False"]
    assert set(models.MODELS) == set(MODEL_NAMES)
