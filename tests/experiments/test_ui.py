"""experiments.ui / `probe ui`: a real `mlflow server` on a throwaway SQLite store, read back over REST and
rendered by headless Chromium (skipped only where no Chromium binary exists)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
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


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,900",
           "--virtual-time-budget=15000", *args]
    # HOME too: Chromium keeps an NSS database under ~/.pki.
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, env={**os.environ, "HOME": str(tmp_path)})


@pytest.mark.slow
def test_serve_ui_shows_the_runs(store, tmp_path):
    tag = uuid.uuid4().hex[:6]
    names = {f"ui-alpha-{tag}": 0.25, f"ui-beta-{tag}": 0.75}
    ids = {}
    for name, acc in names.items():
        with tracking.tracked_run("ui-test", {"lr": acc}, run_name=name) as run:
            tracking.log_metrics({"acc": acc, "loss": 1 - acc})
        ids[name] = run.info.run_id
    exp_id = run.info.experiment_id
    stray = ("mlartifacts", "mlruns", "mlflow.db")  # what an `mlflow server` started in the repo would write
    stray_before = {n for n in stray if (REPO / n).exists() or (Path.cwd() / n).exists()}

    with ui.serve_ui() as url:
        base, _, route = url.partition("/#")
        assert base.startswith("http://127.0.0.1:") and route == f"/experiments/{exp_id}/runs"
        port = int(base.rsplit(":", 1)[1])
        assert len(_server_pids(port)) == 2  # `mlflow server` and ONE uvicorn process (--workers 1)

        req = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", method="POST",
                                     data=json.dumps({"experiment_ids": [exp_id], "max_results": 100}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            runs = json.load(resp)["runs"]
        by_id = {r["info"]["run_id"]: r for r in runs}
        assert set(ids.values()) <= set(by_id)
        for name, run_id in ids.items():
            assert by_id[run_id]["info"]["run_name"] == name
            metrics = {m["key"]: m["value"] for m in by_id[run_id]["data"]["metrics"]}
            assert metrics["acc"] == pytest.approx(names[name])

        if CHROMIUM is None:
            pytest.skip("no chromium binary (apt-get install chromium): REST checked, screenshot skipped")
        png = tmp_path / "ui.png"
        # One browser run: screenshot and DOM after the React app has rendered the runs table from the REST API.
        shot = _chromium(tmp_path, f"--screenshot={png}", "--dump-dom", url)
        assert png.is_file(), f"chromium wrote no screenshot: {shot.stderr[-2000:]}"
        dom = shot.stdout
        for name in names:
            assert name in dom, f"run {name} not in the page's DOM ({len(dom)} chars)"

    assert _server_pids(port) == [], "server processes outlived serve_ui"
    stray_after = {n for n in stray if (REPO / n).exists() or (Path.cwd() / n).exists()}
    assert stray_after <= stray_before, f"the server wrote {stray_after - stray_before} into the repo/cwd"

    assert png.stat().st_size > 20_000
    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (900, 1400)
    assert pixels.std() > 10, "screenshot is (nearly) a single colour"
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
    # The UI's own link format, ?runs=["id",...]&experiments=["id"], URL-quoted so terminals keep it whole.
    prefix, _, query = server.compare_url.partition("?")
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
