"""experiments.tracking against a throwaway SQLite store under tmp_path (no network, no repo mlruns/)."""
from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from experiments import tracking
from experiments.tracking import TrackingError


def _run(run_id: str):
    return MlflowClient().get_run(run_id)


def test_default_uri_is_sqlite_under_home(store):
    db = store / "mlruns" / "mlflow.db"
    assert tracking.configure() == f"sqlite:///{db}"
    assert db.is_file()
    with tracking.tracked_run("figures", {}) as run:
        tracking.log_dict_artifact({"a": torch.tensor(1.5)}, "out/a.json")
    art_root = (store / "mlruns" / "artifacts").resolve()
    assert run.info.artifact_uri.startswith(art_root.as_uri() + "/")
    (art,) = art_root.rglob(f"{run.info.run_id}/**/out/a.json")
    assert '"a": 1.5' in art.read_text()
    assert not (store / "mlartifacts").exists() and not (Path.cwd() / "mlartifacts").exists()


def test_uri_precedence(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.invalid:5000")
    assert tracking.resolve_tracking_uri("sqlite:////x/y.db") == "sqlite:////x/y.db"
    assert tracking.resolve_tracking_uri() == "http://example.invalid:5000"


def test_normal_run_finishes_with_params_and_tags(store):
    params = {"lr": 0.1, "model": {"name": "deit_tiny", "steps": {"n": 4}}, "long": "x" * 10_000}
    with tracking.tracked_run("train", params, tags={"study": "s1"}, run_name="r") as run:
        tracking.log_metrics({"loss": torch.tensor(0.5), "skip": None, "nan": float("nan")}, step=1)
    got = _run(run.info.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params["lr"] == "0.1"
    assert got.data.params["model.name"] == "deit_tiny"
    assert got.data.params["model.steps.n"] == "4"
    assert len(got.data.params["long"]) <= 6000 and got.data.params["long"].endswith("[truncated]")
    assert got.data.metrics == {"loss": 0.5}
    tags = got.data.tags
    assert tags["stepslab.kind"] == "train" and tags["study"] == "s1"
    assert tags["stepslab.git_commit"]  # a sha or "unknown"
    assert {"stepslab.git_dirty", "stepslab.host", "stepslab.torch", "stepslab.device"} <= tags.keys()
    runs = tracking.find_runs("train", {"study": "s1"})
    assert list(runs["run_id"]) == [run.info.run_id]
    assert tracking.find_runs("no-such-kind").empty


def test_exception_fails_and_reraises(store):
    with pytest.raises(ValueError, match="boom"):
        with tracking.tracked_run("probe", {}) as run:
            raise ValueError("boom")
    assert _run(run.info.run_id).info.status == "FAILED"
    assert mlflow.active_run() is None


def test_keyboard_interrupt_kills(store):
    with pytest.raises(KeyboardInterrupt):
        with tracking.tracked_run("probe", {}) as run:
            raise KeyboardInterrupt
    assert _run(run.info.run_id).info.status == "KILLED"


def test_sigterm_kills_and_restores_handler(store):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with tracking.tracked_run("bench", {}) as run:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between bytecodes of the main thread
                pass
    assert _run(run.info.run_id).info.status == "KILLED"
    assert signal.getsignal(signal.SIGTERM) is before


def test_resume_same_run(store):
    params = {"lr": 0.1, "opt": {"name": "adamw"}}
    with tracking.tracked_run("train", params) as run:
        tracking.log_metrics({"loss": 1.0}, step=0)
    with tracking.tracked_run("train", params, run_id=run.info.run_id) as again:
        assert again.info.run_id == run.info.run_id
        assert _run(run.info.run_id).info.status == "RUNNING"
        tracking.log_metrics({"loss": 0.5}, step=1)
    history = MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5)]
    assert _run(run.info.run_id).info.status == "FINISHED"
    with pytest.raises(TrackingError, match="0" * 32):
        with tracking.tracked_run("train", params, run_id="0" * 32):
            pass


def test_active_run_nests(store):
    with tracking.tracked_run("study", {}) as outer:
        with tracking.tracked_run("train", {}) as inner:
            pass
        assert mlflow.active_run().info.run_id == outer.info.run_id
    assert _run(inner.info.run_id).data.tags["mlflow.parentRunId"] == outer.info.run_id
    assert _run(outer.info.run_id).info.status == "FINISHED"


def test_unreachable_server(store):
    before = mlflow.get_tracking_uri()
    with socket.socket() as s:  # a port nothing listens on once the socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    with pytest.raises(TrackingError, match=f"tracking URI {uri}: unreachable"):
        tracking.configure(uri)
    assert os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES") != "0"  # the short-check settings are undone
    assert mlflow.get_tracking_uri() == before  # a failed configure leaves MLflow where it was


def test_register_and_load_frozen(store):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    info = {"model": "tiny_linear", "kwargs": {"num_classes": 3}, "labels": (1, 2)}
    with tracking.tracked_run("train", {}) as run:
        uri = tracking.register_frozen(model, "tiny", model_info=info)
    assert uri == "models:/tiny@frozen"
    assert model.training  # the caller's mode is left alone
    x = torch.randn(2, 4)
    expected = model(x)
    for ref in (run.info.run_id, "models:/tiny@frozen", "tiny", "models:/tiny/1"):
        loaded, got = tracking.load_frozen(ref)
        assert not loaded.training
        assert all(not p.requires_grad for p in loaded.parameters())
        assert torch.allclose(loaded(x), expected)
        assert got["model"] == "tiny_linear" and got["kwargs"] == {"num_classes": 3} and got["labels"] == [1, 2]
        assert got["run_id"] == run.info.run_id and got["uri"].startswith("models:/")
    assert tracking.newest_frozen("tiny_linear") == "models:/tiny/1"
    assert tracking.newest_frozen("other") is None

    with pytest.raises(TrackingError, match=r"nope.*registered: .*tiny"):
        tracking.load_frozen("nope")
    with pytest.raises(TrackingError, match="@frozen"):
        tracking.load_frozen("models:/tiny@missing")
    with pytest.raises(TrackingError, match="f" * 32):
        tracking.load_frozen("f" * 32)
    with tracking.tracked_run("probe", {}) as bare:
        pass
    with pytest.raises(TrackingError, match="no model logged"):
        tracking.load_frozen(bare.info.run_id)


def test_newest_frozen_prefers_latest(store):
    with tracking.tracked_run("train", {}):
        tracking.register_frozen(nn.Linear(2, 2), "a", model_info={"model": "m2"})
    with tracking.tracked_run("train", {}):
        tracking.register_frozen(nn.Linear(2, 2), "b", model_info={"model": "m2"})
    assert tracking.newest_frozen("m2") == "models:/b/1"


def test_artifact_helpers_need_a_run(store):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    with pytest.raises(TrackingError, match="active run"):
        tracking.log_figure(fig, "fig.png")
    tracking.log_metrics({"x": 1.0})  # no run: silently nothing
    with tracking.tracked_run("figures", {}) as run:
        tracking.log_figure(fig, "figs/line.png")
    plt.close(fig)
    assert [a.path for a in MlflowClient().list_artifacts(run.info.run_id, "figs")] == ["figs/line.png"]
