"""python -m experiments.bench: smoke runs at tiny sizes, one round. Structure only, never timings.

The MLflow store is the session's throwaway one (tests/conftest.py); results go to tmp_path.
"""
from __future__ import annotations

import json
import sys

import pytest

from experiments.bench import cli
from experiments.bench.harness import cpu_cores
from experiments.bench.report import write
from experiments.errors import UserError

TINY = ["--device", "cpu", "--quick", "--models", "steps_deit_micro", "--repeats", "1", "--batch", "2",
        "--probe-n", "300", "--probe-d", "8", "--attr-images", "1", "--budget-s", "900"]


def bench(args: list[str]) -> dict:
    """The command line, in process; returns the report."""
    return cli.command.main(args, standalone_mode=False)


def outputs(tmp_path):
    stem = tmp_path / f"bench-cpu-{cpu_cores()}cores"
    return json.loads(stem.with_suffix(".json").read_text()), stem.with_suffix(".md").read_text()


def test_bench_writes_json_markdown_and_an_mlflow_run(tmp_path):
    rep = bench(TINY + ["--out", str(tmp_path)])
    data, md = outputs(tmp_path)
    assert data["device"] == f"cpu-{cpu_cores()}cores" and data["settings"]["models"] == ["steps_deit_micro"]
    assert not data["errors"], data["errors"]
    pair = data["throughput"][0]
    assert (pair["steps"], pair["baseline"]) == ("steps_deit_micro", "deit_micro")
    for mode in ("infer", "train"):
        assert set(pair[mode]["ratio"]) == {"median", "min", "max", "best"}
        assert pair[mode]["ips"]["steps"] > 0 and pair[mode]["ips"]["baseline"] > 0
    assert data["overhead"][0]["model"] == "steps_deit_micro" and "overhead" in data["overhead"][0]["train"]
    paths = data["paths"][0]["paths"]
    assert paths[:3] == ["slow_path", "fast_path", "final"] and "stages.0.steps.2.y" in paths
    assert {p["model"] for p in data["profile"]} == {"steps_deit_micro", "deit_micro"}
    assert data["peak"]["tflops"] > 0 and "contention_start" in data
    assert set(data["probe"]) >= {"sklearn", "torch", "acc_gap", "oracle_acc"}
    assert data["attribution"]["ig_steps"] == 32 and data["attribution"]["ips"] > 0
    # The documented metric names.
    m = data["metrics"]
    for key in ("ratio.steps_deit_micro.train", "ratio.steps_deit_micro.infer", "ratio.steps_deit_micro.paths",
                "ips.steps_deit_micro.train", "ips.deit_micro.infer", "probe.fit_s.sklearn", "probe.fit_s.torch",
                "probe.acc.sklearn", "probe.acc.torch", "attr.ig32.ips", "mfu.steps_deit_micro", "mfu.deit_micro",
                "overhead.steps_deit_micro.train", "wiring.steps_deit_micro.train",
                "ratio.steps_deit_micro.train_best"):
        assert key in m, key
    assert {t["check"] for t in data["targets"]} >= {"ratio.steps_deit_micro.train", "probe.acc_gap"}
    for heading in ("# StepsLab bench: cpu-", "## Throughput", "## Split/merge overhead", "## Path extraction",
                    "## Where the time goes", "## Linear probe", "## Attribution", "## Targets"):
        assert heading in md, heading
    assert "| steps_deit_micro | deit_micro |" in md
    # One MLflow run of kind bench with the same metrics.
    from experiments import tracking

    runs = tracking.find_runs("bench")
    row = runs[runs["run_id"] == rep["mlflow_run_id"]].iloc[0]
    assert row["metrics.ratio.steps_deit_micro.train"] == pytest.approx(m["ratio.steps_deit_micro.train"])
    assert "metrics.attr.ig32.ips" in runs.columns


def test_bench_skips_parts_whose_packages_are_missing(tmp_path, monkeypatch):
    for mod in ("mlflow", "captum", "captum.attr", "sklearn", "sklearn.linear_model"):
        monkeypatch.setitem(sys.modules, mod, None)  # import raises ImportError, as on a machine without them
    rep = bench(TINY + ["--out", str(tmp_path), "--sections", "throughput,probe,attribution", "--profile", "off"])
    data, md = outputs(tmp_path)
    assert not data["errors"], data["errors"]
    assert data["throughput"] and not data.get("probe") and not data.get("attribution")
    assert "mlflow_run_id" not in rep
    notes = " ".join(data["notes"])
    assert "probe: skipped" in notes and "attribution: skipped" in notes and "MLflow tracking: skipped" in notes
    assert "## Notes" in md and "## Linear probe" not in md


def test_bench_rejects_unknown_names():
    with pytest.raises(UserError, match="unknown model 'steps_nope'"):
        bench(["--device", "cpu", "--models", "steps_nope", "--no-track"])
    with pytest.raises(UserError, match="unknown section"):
        bench(["--device", "cpu", "--sections", "throughput,warp", "--no-track"])
    with pytest.raises(UserError, match="unknown device 'tpu'"):
        bench(["--device", "tpu", "--no-track"])


@pytest.mark.parametrize("args, message", [
    (["--compile-models", "steps_nope"], "error: --compile-models: unknown model 'steps_nope'; allowed: micro, full,"),
    (["--profile", "maybe"], "error: Invalid value for '--profile': 'maybe' is not one of 'auto', 'on', 'off'."),
])
def test_a_user_mistake_is_one_line_and_exit_status_2(capsys, args, message):
    """As `python -m experiments.bench` runs (cli.main): bench checks and click's own checks alike."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--device", "cpu", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_report_renders_a_compile_section_stopped_after_the_steps_model(tmp_path):
    """A run killed during the baseline's compile keeps the Steps model's counters (partial results)."""
    rep = {"device": "cpu-2cores", "tag": "compile", "card": "CPU", "cuda": False, "dtype": "fp32", "date": "now",
           "torch": "x", "timm": "y", "settings": {"batch": 8, "repeats": 1, "budget_s": 60, "quick": True},
           "notes": [], "errors": [],
           "compile": [{"steps": "steps_deit_micro", "baseline": "deit_micro", "mode": "default",
                        "models": {"steps_deit_micro": {"train": {"compile_s": 12.0, "frames": 1, "graphs": 1,
                                                                  "graph_breaks": 0}},
                                   "deit_micro": {}}}]}
    stem = write(rep, tmp_path)
    assert stem.name == "bench-cpu-2cores-compile"
    md = stem.with_suffix(".md").read_text()
    assert "| steps_deit_micro | train | default | 12 / - | 1 | 1 | 0 | - | - | - | - | - |" in md
    assert rep["metrics"]["compile.steps_deit_micro.train.graphs"] == 1.0 and rep["targets"] == []


def test_batch_sweep_section_reports_every_size_and_memory_on_cuda_only(tmp_path, monkeypatch):
    from experiments.bench import sweep

    monkeypatch.setitem(sweep.SIZES, "cpu", (2, 4))
    bench(["--device", "cpu", "--quick", "--models", "steps_resnet_micro", "--repeats", "1", "--sections", "sweep",
           "--no-track", "--out", str(tmp_path)])
    data, md = outputs(tmp_path)
    assert not data["errors"], data["errors"]
    (sw,) = data["sweep"]
    assert (sw["steps"], sw["baseline"]) == ("steps_resnet_micro", "resnet_micro")
    assert [r["batch"] for r in sw["rows"]] == [2, 4]
    for r in sw["rows"]:
        for mode in ("infer", "train"):
            assert r[mode]["ips"]["steps"] > 0 and set(r[mode]["ratio"]) == {"median", "min", "max", "best"}
            assert r[mode]["peak_mib"] == {"steps": None, "baseline": None} and r[mode]["peak_ratio"] is None
    assert data["metrics"]["sweep.steps_resnet_micro.b4.train"] == r["train"]["ratio"]["median"]
    assert "sweep.steps_resnet_micro.b4.train_peak_ratio" not in data["metrics"]  # no memory measured on the CPU
    assert "## Batch sizes (eager)" in md and "| steps_resnet_micro | 4 |" in md


def test_report_renders_a_sweep_stopped_by_running_out_of_memory():
    from experiments.bench.report import markdown, metrics_of

    ratio = {"median": 0.9, "min": 0.8, "max": 1.0, "best": 0.9}
    phase = {"ips": {"steps": 90.0, "baseline": 100.0}, "ratio": ratio,
             "peak_mib": {"steps": 120.0, "baseline": 100.0}, "peak_ratio": 1.2}
    rep = {"device": "nvidia-x", "card": "X", "cuda": True, "dtype": "bf16", "date": "today", "torch": "2",
           "timm": "1", "settings": {"batch": 64, "repeats": 3, "budget_s": 270, "quick": False},
           "sweep": [{"steps": "steps_deit_s", "baseline": "deit_s",
                      "rows": [{"batch": 64, "infer": phase, "train": phase}, {"batch": 128, "oom": True}]}]}
    md = markdown(rep)
    assert "| steps_deit_s | 64 | 90 | 100 | 0.900 (0.80-1.00) |" in md and "| 120 / 100 | 1.20 |" in md
    assert "| steps_deit_s | 128 | out of memory |" in md
    m = metrics_of(rep)
    assert m["sweep.steps_deit_s.b64.train_peak_ratio"] == 1.2 and not any("b128" in k for k in m)


def test_fused_window_attention_switches_both_swin_models_and_keeps_their_outputs():
    import torch

    import models
    from experiments.bench.harness import fuse_window_attention

    x = torch.randn(2, 1, 28, 28)
    for name in ("steps_swin_micro", "swin_micro"):
        torch.manual_seed(0)
        model = models.create_model(name, num_classes=10).eval()
        with torch.no_grad():
            ref = model(x)
            assert fuse_window_attention(model) > 0
            torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
    assert fuse_window_attention(models.create_model("steps_deit_micro", num_classes=10)) == 0
