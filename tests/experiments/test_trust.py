"""Trust and crash safety, as a user meets them through `probe` (issue 12): a store that cannot run code, runs that
never stay RUNNING after their process died, checkpoints never silently replaced, one line for every mistake.

The MLflow store is the session's throwaway one (tests/conftest.py). Subprocess tests start the real CLI.
"""
from __future__ import annotations

import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from experiments import train as T  # first: it sets OMP_WAIT_POLICY before torch loads OpenMP

import mlflow  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

import models  # noqa: E402
from experiments import runs, tracking  # noqa: E402
from experiments.cli import main as cli  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MICRO = {"num_classes": 16, "in_chans": 1, "img_size": 28}
HIER = ["--dataset", "hierarchy", "--data-option", "n=96"]


def _one_line(res, *needles: str) -> str:
    """`res` exited 2 with exactly one stderr line, ``error: ...``, holding every needle; returns the line."""
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.output, res.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _cli(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _register(name: str, model_name: str = "deit_micro") -> tuple[str, str]:
    torch.manual_seed(0)
    model = models.create_model(model_name, **MICRO)
    info = {"model": model_name, "create_kwargs": MICRO, "dataset": "hierarchy", "in_chans": 1, "img_size": 28}
    tracking.configure()
    with tracking.tracked_run("train", {}) as run:
        uri = tracking.register_frozen(model, name, model_info=info)
    return uri, run.info.run_id


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# --------------------------------------------------------------------------------------------- the store


def test_pickle_in_the_store_is_refused_by_probe_run_and_never_runs(tmp_path):
    uri, run_id = _register("trust-victim")
    run = MlflowClient().get_run(run_id)
    weights = Path(run.info.artifact_uri.removeprefix("file://")) / "model" / "model.safetensors"
    marker = tmp_path / "pwned"
    weights.write_bytes(pickle.dumps(_Payload(marker)))
    for args, where in ((["run", "--run", uri], str(weights)), (["attribute", "--run", uri], str(weights)),
                        (["run", "--run", run_id], f"runs:/{run_id}/model/model.safetensors")):
        _one_line(_cli(*args), where, "sha256", f"probe freeze --run {run_id}")
    assert not marker.exists()


def test_freeze_refreezes_an_old_pickle_version_from_its_checkpoint(tmp_path):
    """The old format is refused with `probe freeze --run ID`; that command makes a loadable version."""
    cfg = T.TrainConfig(model="resnet_micro", dataset="hierarchy", data_options={"n": 64}, epochs=1, batch_size=16,
                        limit=32, test_limit=16, checkpoint_dir=str(tmp_path), register=False)
    res = T.train(cfg)
    # Make it look frozen the old way: an MLflow-flavour folder holding a pickle, registered.
    client = MlflowClient()
    marker = tmp_path / "pwned"
    with mlflow.start_run(run_id=res.run_id):
        mlflow.log_text(f"flavors:\n  pytorch: {{}}\nrun_id: {res.run_id}\n", "model/MLmodel")
        (tmp_path / "model.pth").write_bytes(pickle.dumps(_Payload(marker)))
        mlflow.log_artifact(str(tmp_path / "model.pth"), "model/data")
    client.create_registered_model("resnet_micro-trust-old")
    client.create_model_version("resnet_micro-trust-old", source=f"{client.get_run(res.run_id).info.artifact_uri}"
                                "/model", run_id=res.run_id)
    line = _one_line(_cli("run", "--run", "models:/resnet_micro-trust-old/1"), "old pickle format")
    command = re.search(r"probe freeze --run [0-9a-f]{32}", line).group(0)
    out = _cli(*command.split()[1:])
    assert out.exit_code == 0, out.output
    new_uri = re.search(r"models:/\S+/\d+", out.stdout).group(0)
    model, info = tracking.load_frozen(new_uri)
    want = res.model.state_dict()
    assert model.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    assert info["run_id"] == res.run_id and info["checkpoint"]["complete"] and info["input_size"] == [1, 28, 28]
    assert not marker.exists()
    _one_line(_cli("freeze", "--run", "0" * 32), "not found", "probe runs")
    _one_line(_cli("freeze"), "give --run RUN_ID")


# --------------------------------------------------------------------------------------- one line, exit 2


@pytest.mark.parametrize("uri, needle", [
    ("foo://bar", "unknown scheme 'foo://'"),
    ("not a uri", "not a URI"),
    ("sqlite:////no/such/dir/x.db", "folder /no/such/dir does not exist"),
])
@pytest.mark.parametrize("command", [["runs"], ["run", "--model", "steps_deit_micro"], ["figures"],
                                     ["freeze", "--run", "0" * 32]])
def test_bad_tracking_uris_are_one_line_everywhere(uri, needle, command):
    _one_line(_cli(*command, "--tracking-uri", uri), needle, "allowed" if "dir" not in needle else "nothing")
    assert not Path("/no/such/dir").exists()


def test_bad_tracking_uri_for_train_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "load_data", lambda cfg: pytest.fail("data loaded before the URI was checked"))
    db = tmp_path / "missing" / "x.db"
    _one_line(_cli("train", "--tracking-uri", f"sqlite:///{db}", "--checkpoint-dir", str(tmp_path)),
              f"folder {db.parent} does not exist")
    assert not db.parent.exists()


def test_long_messages_are_whole():
    line = _one_line(_cli("run", "--model", "steps_deit_q"))
    assert len(line) > 200 and line.endswith("'resnet_micro'.")  # the whole list of allowed names


def test_unknown_model_option_is_one_line_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "load_data", lambda cfg: pytest.fail("data loaded before the options were checked"))
    _one_line(_cli("train", "--model", "steps_deit_micro", "--model-option", "bogus=1", "--checkpoint-dir",
                   str(tmp_path)), "--model-option bogus: steps_deit_micro has no such option; allowed:",
              "patch_size")
    _one_line(_cli("train", "--model", "resnet_micro", "--model-option", "pretrained=1"), "not allowed")
    assert not list(tmp_path.iterdir())


def test_corrupt_checkpoint_names_the_file_and_the_fix(tmp_path):
    path = T.checkpoint_path(T.TrainConfig(checkpoint_dir=str(tmp_path), dataset="hierarchy"))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 truncated")
    _one_line(_cli("train", *HIER, "--resume", "--checkpoint-dir", str(tmp_path)), str(path), "corrupt or truncated",
              "--fresh")


def test_too_little_data_for_a_probe():
    uri, run_id = _register("trust-small")
    _one_line(_cli("run", "--run", uri, "--limit", "5", "--test-limit", "5"), "too little data for a probe",
              "at least 2 per class", "--limit (now 5)")
    # 2 images per class (16 classes) pass the class check, but 32 images span 31 components < k_eq = 32
    _one_line(_cli("run", "--run", uri, "--limit", "32", "--test-limit", "16"), "k_eq=32", "at least 33")
    _one_line(_cli("attribute", "--run", uri, "--probe-limit", "8", "--limit", "4"), "too little data",
              "--probe-limit (now 8)")
    for kind in ("probe", "attribute"):  # refused before any run was opened
        assert tracking.find_runs(kind, {"stepslab.source_run_id": run_id}).empty


def test_offline_hub_fails_fast_and_points_at_data_dir(monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on once the socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    for k in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    uri, _ = _register("trust-offline")
    t = time.perf_counter()
    _one_line(_cli("run", "--run", uri, "--dataset", "cifar10"), "hub is unreachable", "--data-dir")
    assert time.perf_counter() - t < 15


def test_probe_run_and_attribute_take_data_dir():
    for command in ("run", "attribute"):
        assert "--data-dir" in [o for p in cli.commands[command].params for o in p.opts]


def test_version_uris_name_the_model_each_training_froze():
    """Two trainings of the same model and dataset (e.g. run at once): each result names its own version,
    not the @frozen alias that points at only one of them."""
    (uri_a, run_a), (uri_b, run_b) = _register("trust-twice"), _register("trust-twice")
    assert (uri_a, uri_b) == ("models:/trust-twice/1", "models:/trust-twice/2")
    assert tracking.load_frozen(uri_a)[1]["run_id"] == run_a and tracking.load_frozen(uri_b)[1]["run_id"] == run_b


# ------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.slow
def test_a_fresh_train_never_silently_replaces_a_checkpoint(tmp_path):
    base = ["train", "--model", "resnet_micro", *HIER, "--epochs", "2", "--batch-size", "16", "--limit", "32",
            "--test-limit", "16", "--no-register", "--checkpoint-dir", str(tmp_path)]
    res = _cli(*base, "--max-steps", "1")  # stopped early: resumable
    assert res.exit_code == 0, res.output
    path = next(tmp_path.rglob("last.pt"))
    first = T.load_checkpoint(path)["run_id"]
    before = path.read_bytes()
    _one_line(_cli(*base), str(path), f"run {first}", "--resume", "--fresh", f"last-{first}.pt")
    assert path.read_bytes() == before
    _one_line(_cli(*base, "--resume", "--fresh"), "exclude each other")
    res = _cli(*base, "--fresh")
    assert res.exit_code == 0, res.output
    assert f"kept the checkpoint of run {first}" in res.stderr
    assert (path.parent / f"last-{first}.pt").read_bytes() == before
    second = T.load_checkpoint(path)["run_id"]
    assert second != first
    # A finished run's checkpoint is not resumable: a new run goes ahead, and still keeps the old file.
    res = _cli(*base)
    assert res.exit_code == 0 and (path.parent / f"last-{second}.pt").is_file(), res.output


# ------------------------------------------------------------------------------ signals and dead processes


def _spawn(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "experiments.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_running(proc: subprocess.Popen, kind: str, timeout: float = 120) -> str:
    """The id of the RUNNING run of `kind` that process `proc` opened, once there is one."""
    client = MlflowClient()
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        found = runs._runs(client, f"attributes.status = 'RUNNING' AND tags.`stepslab.pid` = '{proc.pid}' AND "
                                   f"tags.`stepslab.kind` = '{kind}'")
        if found:
            time.sleep(1.0)  # into the work
            return found[0].info.run_id
        time.sleep(0.3)
    proc.kill()
    pytest.fail(f"no RUNNING {kind} run from pid {proc.pid} within {timeout} s")


def _long_train(tmp_path: Path) -> list[str]:
    return ["train", "--model", "resnet_micro", "--dataset", "hierarchy", "--data-option", "n=2000", "--epochs",
            "50", "--batch-size", "16", "--no-register", "--checkpoint-dir", str(tmp_path)]


@pytest.mark.slow
@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_exit_with_the_shells_status_and_kill_the_run(sig, status, tmp_path):
    tracking.configure()
    proc = _spawn(*_long_train(tmp_path))
    run_id = _wait_running(proc, "train")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err[-2000:]
    assert "Traceback" not in err and f"interrupted ({sig.name})" in err
    got = MlflowClient().get_run(run_id)
    assert got.info.status == "KILLED" and got.data.tags["stepslab.end_reason"] == f"interrupted ({sig.name})"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["train", "probe"])
def test_after_kill_9_the_next_command_leaves_no_run_of_this_host_running(kind, tmp_path):
    tracking.configure()
    if kind == "train":
        proc = _spawn(*_long_train(tmp_path))
    else:
        uri, _ = _register(f"trust-kill9-{kind}")
        proc = _spawn("run", "--run", uri, "--dataset", "hierarchy")
    run_id = _wait_running(proc, kind)
    proc.kill()
    proc.wait()
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"  # nothing could end it
    res = _cli("runs", "--kind", kind)
    assert res.exit_code == 0, res.output
    assert f"note: run {run_id}" in res.stderr and "marked FAILED" in res.stderr
    got = MlflowClient().get_run(run_id)
    assert got.info.status == "FAILED" and f"process {proc.pid}" in got.data.tags["stepslab.end_reason"]
    row = next(line for line in res.stdout.splitlines() if line.startswith(run_id))
    assert "FAILED" in row and kind in row
    mine = runs._runs(MlflowClient(), f"attributes.status = 'RUNNING' AND tags.`stepslab.host_id` = "
                                      f"'{runs.host_id()}'")
    assert all(runs.alive(int(r.data.tags["stepslab.pid"]), r.data.tags["stepslab.proc_start"]) for r in mine)


def test_runs_lists_with_filters_and_one_line_errors():
    _register("trust-list")
    res = _cli("runs", "--kind", "train", "--limit", "2")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["run", "kind", "model", "dataset", "status", "age", "metrics"]
    assert 1 <= len([ln for ln in lines[2:] if re.match(r"[0-9a-f]{32} ", ln)]) <= 2
    assert "no runs match" in _cli("runs", "--model", "swin_b").stdout
    _one_line(_cli("runs", "--model", "nosuchmodel"), "'nosuchmodel' is not one of", "'resnet_micro'")
    _one_line(_cli("runs", "--kind", "sideways"), "'sideways'", "'train'")
    _one_line(_cli("runs", "--limit", "0"), "--limit")
    _one_line(_cli("runs", "--model", "x' OR '1"), "'--model'", "is not one of")  # never reaches the filter
    with pytest.raises(models.errors.UserError, match="quotes are not allowed"):  # the filter's own guard, for API callers
        runs.list_runs(MlflowClient(), model="x' OR '1")
