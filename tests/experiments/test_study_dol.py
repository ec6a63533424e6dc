"""probe study dol: the smoke run end to end through the CLI (its done criterion: both planted effects found, the
baseline null's interval contains zero, report artifacts, nested children), and the pieces a re-run, the verdict
and the report rest on."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

from experiments.cli import main
from experiments.studies import load_study, make_config, study_run
from experiments.studies.dol import (Config, _apply_smoke, _child, _finished_child, _key, aggregate,
                                     dol_report_figures, explained_fraction, report_html, verdict)
from experiments.tracking import find_runs


def test_explained_fraction_is_one_for_pure_labels_and_small_for_noise():
    labels = torch.arange(40) % 4
    pure = torch.nn.functional.one_hot(labels, 4).float() * 3.0
    assert explained_fraction(pure, labels).item() == pytest.approx(1.0)
    noise = torch.randn(400, 16, generator=torch.Generator().manual_seed(0))
    assert explained_fraction(noise, torch.arange(400) % 4).item() < 0.05
    # Beyond a parent grouping: features that only carry the parent explain nothing more.
    parent = labels // 2
    coarse_only = torch.nn.functional.one_hot(parent, 2).float()
    assert explained_fraction(coarse_only, labels, parent).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", ["steps_deit_micro", "steps_swin_micro", "steps_resnet_micro"])
def test_planted_training_runs_on_every_family(name):
    # Each family lays out its paths differently (tokens, NHWC windows, NCHW maps); the heads must see [B, C].
    from experiments.data import load_dataset
    from experiments.studies.dol import train_planted
    from models.registry import create_model

    ds = load_dataset("hierarchy", "train", seed=0, n=32)
    torch.manual_seed(0)
    losses = train_planted(create_model(name, num_classes=16), ds, epochs=1, batch_size=16, lr=1e-3, seed=0,
                           device=torch.device("cpu"))
    assert len(losses) == 1 and np.isfinite(losses[0])


def test_smoke_flag_fills_only_fields_left_at_their_default():
    module = load_study("dol")
    cfg = _apply_smoke(make_config(module, False, smoke=True, fits=5))
    assert cfg.fits == 5 and cfg.train_limit == module.SMOKE["train_limit"] and cfg.seeds == (0, 1, 2)
    assert _apply_smoke(Config()) == Config()


def test_keys_change_with_results_not_with_presentation():
    base = Config()
    assert _key(base, "probe", "steps", 0) == _key(dataclasses.replace(base, report_dir="x", threads=2),
                                                   "probe", "steps", 0)
    assert _key(base, "probe", "steps", 0) != _key(dataclasses.replace(base, n_probe=10), "probe", "steps", 0)
    assert _key(base, "probe", "steps", 0) != _key(base, "probe", "steps", 1)


def test_a_finished_child_is_found_by_its_key():
    cfg = Config()
    with study_run("dol", cfg):
        assert _finished_child("no-such-key") is None
        with _child("probe", "steps", 0, "k-test-123", {"a": 1}) as child:
            pass
        assert _finished_child("k-test-123") == child.info.run_id
        tags = MlflowClient().get_run(child.info.run_id).data.tags
        assert tags["stepslab.study"] == "dol" and tags["stepslab.dol.stage"] == "probe"


def test_bad_model_is_a_one_line_error():
    result = CliRunner().invoke(main, ["study", "dol", "--model", "deit_micro"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "steps_deit_micro" in lines[0], result.output


def fake_results(effect: float, null: float = 0.0) -> dict:
    """What `run` assembles, from synthetic per-image DoL terms (3 seeds, 2 fits, 300 images)."""
    rng = np.random.default_rng(0)
    cfg = Config(seeds=(0, 1, 2), fits=2, n_probe=100)
    per, info = {}, {}
    for role, mean in (("steps", effect), ("baseline", null), ("planted", 0.3)):
        per[role], info[role] = {}, {}
        for s in cfg.seeds:
            d = (mean + rng.normal(0, 0.5, (2, 300))).round()
            per[role][s] = {"d": {"": d.tolist()}, "d_detail": {}, "acc": {"slow.fine": 0.5, "fast.fine": 0.45},
                            "widths": {"slow": 96, "fast": 32},
                            "depth": [{"block": k, "acc": {"slow.coarse": 0.5 + k / 20}, "d": d[0].tolist()}
                                      for k in (0, 5)]}
            info[role][s] = {"fine_acc": 0.7, "coarse_acc": 0.9, "run_id": "x"}
    attrib = {r: {s: {"share.slow.coarse": 0.6, "share.slow.fine": 0.5, "selectivity.slow": 0.01,
                      "selectivity.fast": -0.01} for s in cfg.seeds} for r in ("steps", "baseline")}
    attrib["planted"] = {}
    res = aggregate(cfg, per, info, attrib)
    res["planted_features"] = {"theta": 0.2, "control": {"mean": 0.2, "ci_low": 0.15, "ci_high": 0.25,
                                                         "seed_means": [0.2, 0.21, 0.19]},
                               "curve": {"thetas": [0, 0.1], "effect": [0.0, 0.1], "power": [0.05, 1.0],
                                         "mde": 0.08, "target": 0.8}}
    res["metrics"].update({"mde.dol.acc": 0.08, "mde.dol.acc.analytic": 0.05})
    res.update(config=dataclasses.asdict(cfg), n_test=300, baseline="deit_micro", dataset="fashion_mnist",
               models=info, command="probe study dol --test")
    res["verdict"] = verdict(res)
    return res


def test_verdict_states_effect_interval_controls_and_mde():
    null = fake_results(0.0)
    assert "contains zero" in null["verdict"] and "0.080" in null["verdict"] and "Both are detected" in null["verdict"]
    lo, hi = null["metrics"]["steps.dol.acc.ci_low"], null["metrics"]["steps.dol.acc.ci_high"]
    assert lo < 0 < hi and f"[{lo:+.3f}, {hi:+.3f}]" in null["verdict"]
    found = fake_results(0.4)
    assert found["metrics"]["steps.dol.acc.ci_low"] > 0 and "as the paper claims" in found["verdict"]


def test_verdict_calls_a_null_at_the_accuracy_ceiling_uninformative():
    res = fake_results(0.0)
    res["probe_acc"] = {"steps": {"slow.coarse": 0.996, "slow.fine": 0.994, "fast.coarse": 0.996, "fast.fine": 0.993}}
    text = verdict(res)  # 2 x (1 - 0.993) = 0.014, below the MDE of 0.080: no effect could have shown
    assert "Ceiling" in text and "0.014" in text and "says little" in text
    res["probe_acc"]["steps"]["fast.fine"] = 0.80  # room 0.40: the ordinary null sentence
    assert "Ceiling" not in verdict(res) and "would most likely have been found" in verdict(res)


def test_an_mde_beyond_the_power_curve_is_logged_as_a_censored_lower_bound():
    from experiments.studies.dol import _censor_mde

    out = {"metrics": {"mde.dol.acc": float("nan")}, "curve": {"effect": [0.0, 0.14], "power": [0.0, 0.5]}}
    assert _censor_mde(out)["metrics"] == {"mde.dol.acc": 0.14, "mde.dol.acc.censored": 1.0}
    res = fake_results(0.0)
    res["metrics"].update({"mde.dol.acc": 0.14, "mde.dol.acc.censored": 1.0})
    text = verdict(res)
    assert "above 0.140 (power never reached 80%" in text and "no size is known to be found reliably" in text


def test_report_is_one_self_contained_page_with_every_figure():
    res = fake_results(0.0)
    res["summary"] = ["x"]
    figs = dol_report_figures(res)
    assert set(figs) == {"summary", "depth", "shares"}
    page = report_html(res, figs)
    assert page.count("data:image/png;base64,") == 3 and "Verdict" in page and "src='http" not in page


@pytest.mark.slow
def test_smoke_run_finds_both_planted_effects_and_a_null_baseline():
    result = CliRunner().invoke(main, ["study", "dol", "--smoke"])
    assert result.exit_code == 0, result.output
    runs = find_runs("study", {"stepslab.study": "dol"})
    run_id = runs[runs["tags.mlflow.parentRunId"].isna()].iloc[0]["run_id"]  # the parent, not its newest child
    client = MlflowClient()
    m = client.get_run(run_id).data.metrics
    for name in ("steps.dol.acc", "baseline.dol.acc", "planted.features.dol.acc", "planted.model.dol.acc"):
        assert {name, f"{name}.ci_low", f"{name}.ci_high"} <= set(m), name
    assert "mde.dol.acc" in m and m["mde.dol.acc"] > 0
    assert m["planted.features.dol.acc.ci_low"] > 0, result.output
    assert m["planted.model.dol.acc.ci_low"] > 0, result.output
    assert m["baseline.dol.acc.ci_low"] <= 0 <= m["baseline.dol.acc.ci_high"], result.output
    arts = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "report")}
    assert {"dol.json", "dol.png", "report/dol.html", "report/dol.pdf"} <= arts
    pdf = Path(client.download_artifacts(run_id, "report/dol.pdf")).read_bytes()
    assert pdf.startswith(b"%PDF")
    results = json.loads(Path(client.download_artifacts(run_id, "dol.json")).read_text())
    assert "minimum detectable effect" in results["verdict"].lower()
    children = client.search_runs([client.get_run(run_id).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{run_id}'")
    stages = {(r.data.tags["stepslab.dol.stage"], r.data.tags["stepslab.dol.model"]) for r in children}
    assert {("train", "steps"), ("train", "baseline"), ("train", "planted"), ("probe", "steps"),
            ("attribute", "baseline"), ("planted_features", "features")} <= stages
    assert "Both are detected" in results["verdict"], results["verdict"]
