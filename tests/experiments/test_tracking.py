"""experiments.tracking against a throwaway SQLite store under tmp_path (no network, no repo mlruns/)."""
from __future__ import annotations

import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

import models
from experiments import runs, tracking
from experiments.tracking import TrackingError


@pytest.fixture(scope="module", autouse=True)
def _no_uri_left_in_the_environment():
    """mlflow.set_tracking_uri also sets $MLFLOW_TRACKING_URI; the `home` fixture's teardown (which restores
    MLflow's default, ``sqlite:///<cwd>/mlflow.db``) would otherwise send the next modules' runs into the cwd.
    Set up before `home`, so torn down after it."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


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


def test_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.invalid:5000")
    assert tracking.resolve_tracking_uri(f"sqlite:///{tmp_path}/y.db") == f"sqlite:///{tmp_path}/y.db"
    assert tracking.resolve_tracking_uri() == "http://example.invalid:5000"


@pytest.mark.parametrize("uri, needle", [
    ("foo://bar", "unknown scheme 'foo://'; allowed: sqlite:///"),
    ("not a uri", "'not a uri': not a URI; allowed: sqlite:///"),
    ("http://", "no host"),
    ("sqlite://x.db", "expected sqlite:///PATH"),
    ("sqlite:////no/such/dir/x.db", "folder /no/such/dir does not exist (nothing was created)"),
])
def test_bad_uris_are_one_line_and_create_nothing(uri, needle, monkeypatch):
    before = mlflow.get_tracking_uri()
    with pytest.raises(TrackingError, match=re.escape(needle)) as err:
        tracking.configure(uri)
    assert "\n" not in str(err.value)
    assert not Path("/no/such/dir").exists()
    assert mlflow.get_tracking_uri() == before
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the same check for the environment variable
    with pytest.raises(TrackingError, match="MLFLOW_TRACKING_URI"):
        tracking.resolve_tracking_uri()


def test_short_keeps_the_whole_first_line():
    long = "x " * 300 + "end of sentence."
    assert tracking._short(ValueError(long + "\nsecond line")) == long.strip()


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


def _micro(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return models.create_model("resnet_micro", num_classes=num_classes, in_chans=1)


def _info(num_classes: int = 3, **extra) -> dict:
    return {"model": "resnet_micro", "create_kwargs": {"num_classes": num_classes, "in_chans": 1},
            "dataset": "hierarchy", "in_chans": 1, "img_size": 28, "labels": (1, 2), **extra}


def test_register_and_load_frozen(store):
    model = _micro()
    with tracking.tracked_run("train", {}) as run:
        uri = tracking.register_frozen(model, "tiny", model_info=_info())
    assert uri == "models:/tiny/1"  # the version itself: the alias may move on to a later one
    assert model.training  # the caller's mode is left alone
    x = torch.randn(2, 1, 28, 28)
    expected = model.eval()(x)
    for ref in (run.info.run_id, "models:/tiny@frozen", "tiny", "models:/tiny/1"):
        loaded, got = tracking.load_frozen(ref)
        assert not loaded.training
        assert all(not p.requires_grad for p in loaded.parameters())
        assert torch.allclose(loaded(x), expected)
        assert got["model"] == "resnet_micro" and got["create_kwargs"] == {"num_classes": 3, "in_chans": 1}
        assert got["labels"] == [1, 2] and got["input_size"] == [1, 28, 28]
        assert got["run_id"] == run.info.run_id and got["uri"].startswith(("models:/", "runs:/"))
        assert got["format"] == tracking.FROZEN_FORMAT and len(got["weights"]["sha256"]) == 64
        assert got["git_commit"]
    arts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "model")}
    assert arts == {"model/model.safetensors", "model/card.json"}  # no pickle, no MLmodel
    assert tracking.newest_frozen("resnet_micro") == "models:/tiny/1"
    assert tracking.newest_frozen("other") is None

    with pytest.raises(TrackingError, match=r"nope.*registered: .*tiny"):
        tracking.load_frozen("nope")
    with pytest.raises(TrackingError, match="@frozen"):
        tracking.load_frozen("models:/tiny@missing")
    with pytest.raises(TrackingError, match="f" * 32):
        tracking.load_frozen("f" * 32)
    with tracking.tracked_run("probe", {}) as bare:
        pass
    with pytest.raises(TrackingError, match="no frozen model logged"):
        tracking.load_frozen(bare.info.run_id)


def test_register_refuses_what_could_not_be_loaded(store):
    with tracking.tracked_run("train", {}) as run:
        with pytest.raises(TypeError, match="create_kwargs"):
            tracking.register_frozen(_micro(), "bad", model_info={"model": "resnet_micro"})
        with pytest.raises(TrackingError, match="do not fit resnet_micro"):
            tracking.register_frozen(_micro(3), "bad", model_info=_info(5))
        with pytest.raises(TrackingError, match="'pretrained' is not allowed"):
            tracking.register_frozen(_micro(), "bad", model_info={**_info(), "create_kwargs": {
                "num_classes": 3, "in_chans": 1, "pretrained": True}})
        with pytest.raises(TrackingError, match="unknown model 'tiny_linear'"):
            tracking.register_frozen(nn.Linear(2, 2), "bad", model_info={"model": "tiny_linear", "create_kwargs": {}})
    assert not MlflowClient().list_artifacts(run.info.run_id, "model")  # nothing written


class _Payload:
    """Unpickling this creates the file `marker`: proof that a pickle ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _model_dir(run_id: str) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model")).resolve()


def _artifact_dir(run) -> Path:
    """The run's real artifact folder (download_artifacts of a local store would hand back a copy)."""
    return Path(run.info.artifact_uri.removeprefix("file://")) / "model"


def test_pickle_payload_in_place_of_the_weights_never_runs(store, tmp_path):
    marker = tmp_path / "pwned"
    with tracking.tracked_run("train", {}) as run:
        tracking.register_frozen(_micro(), "victim", model_info=_info())
    folder = _artifact_dir(run)
    weights, card_path = folder / "model.safetensors", folder / "card.json"
    good = weights.read_bytes()
    # 1. The weights replaced by a pickle: the hash no longer matches.
    weights.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(TrackingError, match=r"model.safetensors: sha256 .* differs .*probe freeze --run") as err:
        tracking.load_frozen("victim")
    assert str(weights) in str(err.value)
    # 2. The attacker also rewrites the card's hash: safetensors still reads no pickle.
    card = json.loads(card_path.read_text())
    card["weights"]["sha256"] = tracking._sha256(weights)
    card_path.write_text(json.dumps(card))
    with pytest.raises(TrackingError, match="not a readable safetensors file"):
        tracking.load_frozen("victim")
    # 3. torch.save'd pickle (a zip file) in place of the weights: the same.
    with open(weights, "wb") as f:
        torch.save({"x": _Payload(marker)}, f)
    card["weights"]["sha256"] = tracking._sha256(weights)
    card_path.write_text(json.dumps(card))
    with pytest.raises(TrackingError, match="not a readable safetensors file"):
        tracking.load_frozen("victim")
    assert not marker.exists()
    # 4. Truncated weights and a corrupt card name the file and the fix.
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(TrackingError, match=f"{re.escape(str(weights))}: sha256 .*probe freeze --run"):
        tracking.load_frozen("victim")
    card_path.write_text(card_path.read_text()[:40])
    with pytest.raises(TrackingError, match=f"{re.escape(str(card_path))} is not a JSON object .*probe freeze"):
        tracking.load_frozen("victim")
    # 5. A card asking timm to fetch weights elsewhere is refused.
    weights.write_bytes(good)
    card.update(weights={**card["weights"], "sha256": tracking._sha256(weights)},
                create_kwargs={**card["create_kwargs"], "pretrained_cfg_overlay": {"file": str(tmp_path / "x")}})
    card_path.write_text(json.dumps(card))
    with pytest.raises(TrackingError, match="'pretrained_cfg_overlay' is not allowed"):
        tracking.load_frozen("victim")
    assert not marker.exists()


def test_old_pickle_format_is_refused_with_the_refreeze_command(store, tmp_path):
    """A version frozen the old way (MLflow's pickle flavour): refused by name and by run id, never unpickled."""
    marker = tmp_path / "pwned"
    with tracking.tracked_run("train", {}) as run:
        mlflow.log_text(f"artifact_path: model\nflavors:\n  pytorch: {{}}\nrun_id: {run.info.run_id}\n",
                        "model/MLmodel")
        (tmp_path / "model.pth").write_bytes(pickle.dumps(_Payload(marker)))
        mlflow.log_artifact(str(tmp_path / "model.pth"), "model/data")
    client = MlflowClient()
    client.create_registered_model("oldstyle")
    client.create_model_version("oldstyle", source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias("oldstyle", "frozen", "1")
    for ref in ("oldstyle", "models:/oldstyle/1", run.info.run_id):
        with pytest.raises(TrackingError, match=f"old pickle format.*probe freeze --run {run.info.run_id}") as err:
            tracking.load_frozen(ref)
        assert "\n" not in str(err.value)
    assert not marker.exists()


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


# ------------------------------------------------------------------------------------- dead and stale runs


def _dead_pid() -> tuple[int, str]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    start = runs.proc_start(proc.pid)
    proc.kill()
    proc.wait()
    return proc.pid, start


def test_runs_record_their_process_and_a_heartbeat(store):
    with tracking.tracked_run("probe", {}) as run:
        tags = _run(run.info.run_id).data.tags
        assert tags["stepslab.pid"] == str(os.getpid()) and tags["stepslab.host_id"] == runs.host_id()
        assert tags["stepslab.proc_start"] == runs.proc_start(os.getpid())
        assert abs(float(tags["stepslab.heartbeat"]) - time.time()) < 60
    beats = []
    hb = runs.Heartbeat(lambda run_id, key, value: beats.append((run_id, key)), "r" * 32, every=0.02).start()
    time.sleep(0.3)
    hb.stop()
    assert len(beats) >= 3 and beats[0] == ("r" * 32, "stepslab.heartbeat")


def test_dead_runs_of_this_host_are_marked_failed_by_the_next_command(store):
    client = MlflowClient()
    pid, start = _dead_pid()
    with tracking.tracked_run("train", {}, tags={"stepslab.model": "m"}) as dead:
        pass
    with tracking.tracked_run("train", {}) as remote:
        pass
    with tracking.tracked_run("train", {}) as reused:  # same pid alive, but another process (started later)
        pass
    old_beat = f"{time.time() - 3600:.0f}"
    for run_id, tags in ((dead.info.run_id, {"stepslab.pid": str(pid), "stepslab.proc_start": start}),
                         (remote.info.run_id, {"stepslab.host_id": "elsewhere", "stepslab.pid": str(pid)}),
                         (reused.info.run_id, {"stepslab.pid": str(os.getpid()), "stepslab.proc_start": "1"})):
        client.update_run(run_id, "RUNNING")
        for k, v in {**tags, "stepslab.heartbeat": old_beat}.items():
            client.set_tag(run_id, k, v)
    with tracking.tracked_run("probe", {}) as alive:  # this process: alive, left alone
        tracking.configure()
        assert _run(alive.info.run_id).info.status == "RUNNING"
    for run_id in (dead.info.run_id, reused.info.run_id):
        got = _run(run_id)
        assert got.info.status == "FAILED"
        assert "died without ending the run" in got.data.tags["stepslab.end_reason"]
        assert abs(got.info.end_time / 1000 - float(old_beat)) < 2  # ended at its last heartbeat
    assert _run(remote.info.run_id).info.status == "RUNNING"  # another host: not ours to judge
    listed = {r.run_id: r for r in runs.list_runs(client, kind="train", stale=True)}
    assert remote.info.run_id in listed and listed[remote.info.run_id].status.startswith("RUNNING (stale:")
    assert dead.info.run_id not in listed
    table = runs.format_runs(runs.list_runs(client, kind="train", status="FAILED"))
    assert dead.info.run_id in table and "why: process" in table
    client.set_terminated(remote.info.run_id, "KILLED")


def test_failed_and_killed_runs_say_why(store):
    with pytest.raises(ValueError):
        with tracking.tracked_run("probe", {}) as failed:
            raise ValueError("bad thing " * 40)
    assert _run(failed.info.run_id).data.tags["stepslab.end_reason"].startswith("ValueError: bad thing")
    with pytest.raises(KeyboardInterrupt):
        with tracking.tracked_run("probe", {}) as killed:
            raise KeyboardInterrupt("SIGTERM")
    assert _run(killed.info.run_id).data.tags["stepslab.end_reason"] == "interrupted (SIGTERM)"


def test_logged_steps(store):
    with tracking.tracked_run("train", {}) as run:
        for step in (1, 5, 3):
            tracking.log_metrics({"a": 1.0}, step=step)
        tracking.log_metrics({"b": 2.0}, step=0)
    assert tracking.logged_steps(run.info.run_id) == {"a": 5, "b": 0}
