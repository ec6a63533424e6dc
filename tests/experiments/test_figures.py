"""`probe figures` on fake runs (documented metric names and tags) in a store of its own: files, byte-identical
reruns, skips with their command, the figures run, pinning and its one-line errors. CPU, no training."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib.figure import Figure
from mlflow import MlflowClient

import models.counting
from experiments import tracking
from experiments.cli import main
from experiments.figures import FIGURES

MADE = ["shortcut", "degradation", "probe_accuracy", "probe_depth", "attribution_shares", "attribution_maps",
        "paper_table", "throughput"]


def _fake_runs() -> dict[str, str]:
    """One run per source kind the figures read (gradients left out on purpose), plus an older probe run."""
    ids = {}
    probe_tags = {"stepslab.model": "steps_deit_micro", "stepslab.dataset": "fashion_mnist"}
    for name, shift in (("probe_old", 0.0), ("probe", 0.05)):
        with tracking.tracked_run("probe", {"layers": "0,1,2"}, tags=probe_tags) as run:
            for path, coarse, fine in (("slow", 0.8, 0.5), ("fast", 0.6, 0.7), ("full", 0.85, 0.75)):
                for level, acc in (("coarse", coarse + shift), ("fine", fine + shift)):
                    mlflow.log_metrics({f"acc.{path}.{level}": acc, f"acc.{path}.{level}.ci_low": acc - 0.03,
                                        f"acc.{path}.{level}.ci_high": acc + 0.03})
            mlflow.log_metrics({"dol.acc": 0.3, "dol.acc.ci_low": 0.25, "dol.acc.ci_high": 0.35})
            for k in range(3):
                mlflow.log_metrics({f"depth.acc.{p}.{lv}": 0.4 + 0.1 * k + (0.05 if p == "slow" else 0)
                                    for p in ("slow", "fast") for lv in ("coarse", "fine")}, step=k)
        ids[name] = run.info.run_id
    with tracking.tracked_run("study", {}, tags={"stepslab.study": "shortcut"}) as run:
        for step, decay in ((0, 0.9), (2, 0.6)):
            mlflow.log_metrics({f"{m}.d3.{q}.z{l}.mean": decay ** l for m in ("deit", "steps")
                                for q, ls in (("gamma", range(4)), ("jac", range(1, 4))) for l in ls}, step=step)
        ids["shortcut"] = run.info.run_id
    with tracking.tracked_run("study", {}, tags={"stepslab.study": "degradation"}) as run:
        for i, family in enumerate(("plain", "residual", "highway", "steps")):
            for depth in (4, 8):
                mlflow.log_metrics({f"{family}.{split}_error.{s}": v for split in ("train", "test")
                                    for s, v in (("mean", 0.1 * i + depth / 100), ("std", 0.01))}, step=depth)
        ids["degradation"] = run.info.run_id
    with tracking.tracked_run("attribute", {}, tags=probe_tags) as run:
        mlflow.log_metrics({"share.slow.fine": 0.3, "share.fast.fine": 0.7, "share.slow.coarse": 0.6,
                            "share.fast.coarse": 0.4, "selectivity.slow.zero": -0.1, "selectivity.fast.zero": 0.2,
                            "selectivity.fast.zero.ci_low": 0.1, "selectivity.fast.zero.ci_high": 0.3,
                            "map.slow.low_freq_share": 0.8})
        grid = Figure(figsize=(2, 1))
        grid.subplots().imshow(np.arange(12.0).reshape(3, 4))
        tracking.log_figure(grid, "maps/grid.png")
        ids["attribute"] = run.info.run_id
    with tracking.tracked_run("bench", {}) as run:
        mlflow.log_metrics({"ratio.steps_deit_micro.train": 0.9, "ratio.steps_resnet_micro.train": 1.1})
        ids["bench"] = run.info.run_id
    return ids


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store of this module's own (other tests' real runs would change "newest"), with the fake runs."""
    before = tracking._state["uri"]
    uri = f"sqlite:///{tmp_path_factory.mktemp('figures_store') / 'mlflow.db'}"
    tracking.configure(uri)
    try:
        yield uri, _fake_runs()
    finally:
        tracking.configure(before)  # None: the session's default store


@pytest.fixture(autouse=True)
def few_paper_models(monkeypatch):
    # Counting all 18 paper models takes minutes on a busy CPU; one model exercises the same code.
    monkeypatch.setattr(models.counting, "paper_models", lambda: ["resnet18"])


def _figures(uri: str, *args: str):
    return CliRunner().invoke(main, ["figures", "--tracking-uri", uri, *args])


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _one_line_error(res, *needles: str) -> str:
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error: ")]
    assert res.exit_code == 2 and len(errors) == 1 and "Traceback" not in res.output, res.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.mark.slow
def test_figures_from_runs_are_byte_identical_and_tracked(store, tmp_path):
    uri, ids = store
    first, second = tmp_path / "a", tmp_path / "b"
    res = _figures(uri, "--out", str(first))
    assert res.exit_code == 0, res.output
    again = _figures(uri, "--out", str(second))
    assert again.exit_code == 0, again.output
    made = {p.name for p in first.iterdir()}
    assert made == {f"{n}.{ext}" for n in MADE for ext in ("png", "pdf")}
    assert _hashes(first) == _hashes(second)
    # The figure without runs is skipped with the command that makes them.
    assert "skipped gradients:" in res.output and "probe study gradients" in res.output
    assert set(FIGURES) == set(MADE) | {"gradients"}
    # The map grid is the attribute run's PNG again, same pixels.
    import matplotlib.image
    grid = MlflowClient().download_artifacts(ids["attribute"], "maps/grid.png", str(tmp_path))
    assert np.array_equal(matplotlib.image.imread(grid), matplotlib.image.imread(first / "attribution_maps.png"))
    # One figures run, with every file as written and the sources.
    run = MlflowClient().get_run(tracking.find_runs("figures").iloc[0]["run_id"])
    assert run.info.run_id in again.output and run.info.status == "FINISHED"
    arts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert made | {"figures.json"} <= arts
    local = MlflowClient().download_artifacts(run.info.run_id, "probe_accuracy.pdf", str(tmp_path / "dl"))
    assert Path(local).read_bytes() == (first / "probe_accuracy.pdf").read_bytes()
    summary = json.loads(Path(MlflowClient().download_artifacts(run.info.run_id, "figures.json",
                                                                str(tmp_path / "dl"))).read_text())
    assert summary["sources"]["probe_accuracy"] == [ids["probe"]]  # the newest probe run
    assert "probe study gradients" in summary["skipped"]["gradients"]
    assert run.data.params["source.shortcut"] == ids["shortcut"]


@pytest.mark.slow
def test_pinned_run_is_used(store, tmp_path):
    uri, ids = store
    res = _figures(uri, "--out", str(tmp_path), "--only", "probe_accuracy", "--runs", ids["probe_old"])
    assert res.exit_code == 0, res.output
    run = MlflowClient().get_run(tracking.find_runs("figures").iloc[0]["run_id"])
    assert run.data.params["source.probe_accuracy"] == ids["probe_old"]
    assert {p.name for p in tmp_path.iterdir()} == {"probe_accuracy.png", "probe_accuracy.pdf"}


def test_bad_runs_and_names_are_one_line_errors(store, tmp_path):
    uri, ids = store
    n_before = len(tracking.find_runs("figures"))
    _one_line_error(_figures(uri, "--out", str(tmp_path), "--runs", "0" * 32), "--runs", "0" * 32)
    _one_line_error(_figures(uri, "--out", str(tmp_path), "--only", "probe_accuracy", "--runs", ids["bench"]),
                    ids["bench"], "feeds none")
    _one_line_error(_figures(uri, "--only", "nope"), "nope", "paper_table")
    assert len(tracking.find_runs("figures")) == n_before  # nothing recorded, nothing written
    assert not any(tmp_path.iterdir())


def test_paper_table_needs_no_runs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'empty' / 'mlflow.db'}"
    (tmp_path / "empty").mkdir()
    before = tracking._state["uri"]
    try:
        res = _figures(uri, "--out", str(tmp_path / "out"))
    finally:
        tracking.configure(before)
    assert res.exit_code == 0, res.output
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"paper_table.png", "paper_table.pdf"}
    for cmd in ("probe study shortcut", "probe study degradation", "probe study gradients", "probe run",
                "probe attribute", "make bench"):
        assert cmd in res.output
    assert res.output.count("skipped ") == len(FIGURES) - 1
