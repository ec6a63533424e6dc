"""experiments.ui / `probe ui`: a real `mlflow server` on a small real store (a Steps model and its baseline,
trained, frozen and probed), rendered by headless Chromium: what a person sees in the runs view and the
comparison (skipped only where no Chromium binary exists)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from PIL import Image

from experiments import tracking, ui
from experiments.cli import main
from experiments.tracking import TrackingError

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _server_pids(port: int) -> list[int]:
    """Processes whose command line names `port` (the mlflow CLI and its uvicorn), zombies excluded."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            args = (d / "cmdline").read_bytes().split(b"\0")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and b"--port" in args and str(port).encode() in args and any(b"mlflow" in a for a in args):
            pids.append(int(d.name))
    return pids


def _chromium(tmp_path: Path, *args: str, size: str = "1400,900") -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--window-size={size}",
           "--virtual-time-budget=15000", *args]
    # HOME too: Chromium keeps an NSS database under ~/.pki.
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, env={**os.environ, "HOME": str(tmp_path)})


def _train_and_probe_a_pair(tmp_path: Path) -> dict[str, str]:
    """A small real store: Steps-DeiT-micro and DeiT-micro trained on hierarchy (10 steps each), frozen, and one
    `probe run --path all` of each, the Steps model's second (so it finds its partner). Returns kind -> run id."""
    runner, ids = CliRunner(), {}
    mlflow.set_system_metrics_sampling_interval(0.5)  # training here takes seconds; MLflow samples every 10 s
    mlflow.set_system_metrics_samples_before_logging(1)
    try:
        for model in ("steps_deit_micro", "deit_micro"):
            res = runner.invoke(main, ["train", "--model", model, "--dataset", "hierarchy", "--epochs", "1",
                                       "--limit", "320", "--test-limit", "160", "--batch-size", "32",
                                       "--checkpoint-dir", str(tmp_path / "ckpt")], catch_exceptions=False)
            assert res.exit_code == 0, res.output
            ids[f"train {model}"] = tracking.find_runs("train", {"stepslab.model": model}).iloc[0]["run_id"]
    finally:
        mlflow.set_system_metrics_sampling_interval(None)
        mlflow.set_system_metrics_samples_before_logging(None)
    for model in ("deit_micro", "steps_deit_micro"):
        res = runner.invoke(main, ["run", "--model", model, "--path", "all", "--limit", "320", "--test-limit", "160",
                                   "--no-curves"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        ids[f"probe {model}"] = tracking.find_runs("probe", {"stepslab.model": model}).iloc[0]["run_id"]
    assert f"deit_micro was probed on hierarchy in run {ids['probe deit_micro']}: probe ui" in res.output
    return ids


@pytest.mark.slow
def test_ui_shows_readable_runs_their_datasets_and_steps_beside_its_baseline(store, tmp_path):
    ids = _train_and_probe_a_pair(tmp_path)
    client = MlflowClient()
    runs = {k: client.get_run(v) for k, v in ids.items()}
    # What the runs list shows: names that say kind, model, dataset, seed (and path), tags to group by.
    assert runs["train steps_deit_micro"].info.run_name == "train steps_deit_micro hierarchy s0"
    assert runs["probe steps_deit_micro"].info.run_name == "probe steps_deit_micro hierarchy s0 slow|fast|full"
    for run in runs.values():
        assert run.data.tags["stepslab.pair"] == "steps_deit_micro vs deit_micro"
        assert run.data.tags["stepslab.family"] == "deit" and run.data.tags["stepslab.dataset"] == "hierarchy"
    # Datasets as inputs, with the data's fingerprint (the feature cache's key) as digest.
    from experiments.data import load_dataset

    train_ds = load_dataset("hierarchy", "train", limit=320, seed=0)
    inputs = {(d.dataset.name, d.dataset.digest) for d in runs["probe steps_deit_micro"].inputs.dataset_inputs}
    assert ("hierarchy/train", train_ds.fingerprint) in inputs and len(inputs) == 2
    # System metrics on training; the note with the result table and the comparison on the probe run.
    assert any(k.startswith("system/cpu_utilization") for k in runs["train steps_deit_micro"].data.metrics)
    note = runs["probe steps_deit_micro"].data.tags["mlflow.note.content"]
    assert note.startswith("steps_deit_micro (Steps model) probed on hierarchy, seed 0: dol.acc ")
    assert "| dol.acc |" in note and "deit_micro (null)" in note
    arts = {a.path for a in client.list_artifacts(ids["probe steps_deit_micro"])}
    assert {"compare_dol.png", "compare_dol.json"} <= arts

    stray = ("mlartifacts", "mlruns", "mlflow.db")  # what an `mlflow server` started in the repo would write
    stray_before = {n for n in stray if (REPO / n).exists() or (Path.cwd() / n).exists()}
    with ui.UIServer() as server:
        port = int(server.base_url.rsplit(":", 1)[1])
        assert len(_server_pids(port)) == 2  # `mlflow server` and ONE uvicorn process (--workers 1)
        assert server.pair_ids == [ids["probe steps_deit_micro"], ids["probe deit_micro"]]
        assert "viewStateShareKey=" in server.compare_url and "viewStateShareKey=" in server.probes_url
        if CHROMIUM is None:
            pytest.skip("no chromium binary (apt-get install chromium): the store checked, the browser skipped")
        # What a person sees, after the React app has rendered the tables from the REST API.
        png = tmp_path / "runs.png"
        shot = _chromium(tmp_path, f"--screenshot={png}", "--dump-dom", server.url)
        assert png.is_file(), f"chromium wrote no screenshot: {shot.stderr[-2000:]}"
        for text in ("train steps_deit_micro hierarchy s0", "train deit_micro hierarchy s0",
                     "probe steps_deit_micro hierarchy s0 slow|fast|full", "hierarchy/train"):
            assert text in shot.stdout, f"{text!r} not in the runs view ({len(shot.stdout)} chars)"
        pair_png = tmp_path / "pair.png"
        pair = _chromium(tmp_path, f"--screenshot={pair_png}", "--dump-dom", server.compare_url, size="2400,900")
        dom = pair.stdout
        assert "probe deit_micro hierarchy s0" in dom
        assert "probe steps_deit_micro hierarchy s0" in dom and "train steps_deit_micro" not in dom
        for column in (">dol.acc<", ">dol.acc.ci_low<", ">dol.acc.ci_high<", "hierarchy/train",
                       "steps_deit_micro (Steps model) probed on"):
            assert column in dom, f"{column!r} not in the comparison view"
    assert _server_pids(port) == [], "server processes outlived the UI"
    stray_after = {n for n in stray if (REPO / n).exists() or (Path.cwd() / n).exists()}
    assert stray_after <= stray_before, f"the server wrote {stray_after - stray_before} into the repo/cwd"
    for path, shape in ((png, (900, 1400)), (pair_png, (900, 2400))):
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
        assert pixels.shape[:2] == shape and pixels.std() > 10, "screenshot is (nearly) a single colour"
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50


def test_lookup_finds_the_experiment_and_newest_runs(store):
    run_ids = []
    for i in range(3):
        with tracking.tracked_run("ui-test", {"i": i}) as run:
            pass
        run_ids.append(run.info.run_id)
    server = ui.UIServer()
    server._lookup()  # what start() does before spawning the server
    server._set_urls("http://127.0.0.1:5000")
    exp_id = run.info.experiment_id
    assert server.experiment_id == exp_id
    assert sorted(server.run_ids[:3]) == sorted(run_ids) and len(server.run_ids) <= ui.COMPARE_MAX_RUNS
    assert server.url == f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs"
    if server.pair_ids:  # the module's store may hold the probe pair of the test above: then the pair's view
        assert server.compare_url.endswith("viewStateShareKey=" + server.views["pair"])
    # Without a pair, the UI's own compare link: ?runs=["id",...]&experiments=["id"], URL-quoted so terminals
    # keep it whole.
    prefix, _, query = ui.compare_url("http://127.0.0.1:5000", server.run_ids, exp_id).partition("?")
    assert prefix == "http://127.0.0.1:5000/#/compare-runs" and '"' not in query and " " not in query
    parsed = urllib.parse.parse_qs(query)
    assert json.loads(parsed["runs"][0]) == server.run_ids and json.loads(parsed["experiments"][0]) == [exp_id]


def test_team_server_is_only_pointed_at():
    # No runs and no server start needed to check the plumbing: a team server (http) is only pointed at.
    with ui.serve_ui("http://127.0.0.1:9") as url:  # discard port: nothing answers, the lookup fails softly
        assert url == "http://127.0.0.1:9/"


def test_server_that_dies_reports_its_output(store, monkeypatch):
    script = "import sys; print('starting'); print('boom: no such store', file=sys.stderr); sys.exit(3)"
    monkeypatch.setattr(ui.UIServer, "_command", lambda self, port, art: [sys.executable, "-c", script])
    with pytest.raises(TrackingError, match=r"exited with status 3; its last output:\n  \| starting\n  \| boom"):
        with ui.serve_ui(port=1):
            pass


def test_cli_points_at_a_team_server():
    res = CliRunner().invoke(main, ["ui", "--tracking-uri", "http://127.0.0.1:9", "--no-browser-hint"])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == "http://127.0.0.1:9/"


def test_cli_rejects_a_bad_port():
    res = CliRunner().invoke(main, ["ui", "--port", "70000"])
    assert res.exit_code == 2 and "port 70000" in res.stderr
