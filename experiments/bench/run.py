"""One bench run: the report dict, every pair through the per-pair sections, then the run-once sections, the
files rewritten after every section (a run stopped early still leaves its results) and the MLflow run.

Each section is guarded: a failure or a missing optional package becomes a note and the rest still runs.
"""
from __future__ import annotations

import importlib.util
import statistics
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from experiments.bench import (attribution, compiled, graphs, overhead, paths, probe, probe_run, profile, scale,
                               sweep, throughput)
from experiments.bench.harness import Pair, Setup, build, elapsed, free, log, optional, slug
from experiments.bench.machine import contention, matmul_peak
from experiments.bench.report import markdown, write
from models.registry import BASELINE_OF

# The sections run on each built pair, in this order: graphs last, as make_graphed_callables replaces forward.
PAIR_SECTIONS: dict[str, Callable[[Pair, Setup], dict]] = {
    "throughput": throughput.run, "overhead": overhead.run, "paths": paths.run, "profile": profile.run,
    "sweep": sweep.run, "graphs": graphs.run}
# The sections run once, after the pairs, each with its own options (see Plan): probe.run, attribution.run,
# compiled.run.
ONCE_SECTIONS = ("probe", "attribution", "compile", "probe_run", "scale")
SECTIONS = (*PAIR_SECTIONS, *ONCE_SECTIONS)
DEFAULT_SECTIONS = ("throughput", "overhead", "paths", "profile", "probe", "attribution")
COMPILE_NEED_S = {"cuda": 90.0, "cpu": 120.0}  # least budget left to start compiling a pair (partials are kept)


@dataclass
class Plan:
    """What a run measures and where it writes: the command line's choices, defaults resolved."""
    models: list[str]          # the Steps model of each pair
    sections: list[str]        # also the report's settings.sections: a section dropped during the run leaves it
    compile_models: list[str]
    graphs_models: list[str]
    compile_mode: str
    probe_n: int
    probe_d: int
    probe_classes: int
    attr_model: str
    attr_images: int
    ig_steps: int
    out: Path
    tag: str | None = None
    track: bool = True


def bench(setup: Setup, plan: Plan) -> dict:
    """Run `plan` on `setup`'s device; returns the report, also written to <out>/bench-<device>[-<tag>].json|md
    and logged as an MLflow run of kind ``bench`` (unless `plan.track` is off)."""
    import timm

    notes: list[str] = []
    if "graphs" in plan.sections and not setup.cuda:
        plan.sections.remove("graphs")
        notes.append("graphs: CUDA graphs need a CUDA device; skipped")
    rep: dict[str, Any] = {
        "device": setup.slug, "tag": slug(plan.tag) if plan.tag else None, "card": setup.card, "cuda": setup.cuda,
        "dtype": setup.dtype,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__, "timm": timm.__version__,
        "cuda_version": torch.version.cuda,
        "settings": {"models": plan.models, "batch": setup.batch, "repeats": setup.repeats,
                     "budget_s": setup.budget_s, "quick": setup.quick, "sections": plan.sections,
                     "target_s": setup.target_s, "channels_last_resnet": setup.cuda,
                     "compile_mode": plan.compile_mode if "compile" in plan.sections else None,
                     "probe_n": plan.probe_n, "probe_d": plan.probe_d, "ig_steps": plan.ig_steps,
                     "threads": torch.get_num_threads(), "fused_window_attn": setup.fused_window_attn},
        "throughput": [], "overhead": [], "paths": [], "profile": [], "sweep": [], "graphs": [], "mfu": {},
        "notes": notes, "errors": [],
    }
    log(f"bench on {setup.card} ({setup.slug}), {setup.dtype}, batch {setup.batch}, {setup.repeats} rounds, "
        f"models {', '.join(plan.models)}, sections {', '.join(plan.sections)}, budget {setup.budget_s:.0f} s")
    if not setup.cuda:
        rep["contention_start"] = _guarded(rep, setup, "contention", lambda: contention(setup))
        c = rep["contention_start"]
        if c:
            log(f"load average {c['load_avg_1m']:.1f} on {c['cores']} cores; a 1M-element add takes "
                f"{c['op_ms_threads']:.2f} ms on {c['threads']} threads vs {c['op_ms_1thread']:.2f} ms on one")
    rep["peak"] = _guarded(rep, setup, "peak", lambda: matmul_peak(setup))
    if rep["peak"]:
        log(f"matmul peak {rep['peak']['tflops']:.3f} TFLOP/s ({rep['peak']['dtype']} {rep['peak']['n']}^2)")
    _pairs(rep, setup, plan, _reserve(setup, plan))
    _once(rep, setup, plan)
    if not setup.cuda:
        rep["contention_end"] = _guarded(rep, setup, "contention", lambda: contention(setup))
        for key in ("contention_start", "contention_end"):
            c = rep.get(key)
            if c and c["slowdown"] > 2:
                notes.append(f"{key.replace('_', ' ')}: the CPU is contended (load average {c['load_avg_1m']:.1f} on "
                             f"{c['cores']} cores; a small parallel op takes {c['slowdown']:.1f}x its one-thread "
                             "time): every op pays for waiting on its threads, which penalises the model with more "
                             "(smaller) ops, the Steps model. Read the CPU-time ratios, or rerun with --threads 1 "
                             "or on a quiet machine.")
    rep["total_s"] = elapsed()
    stem = write(rep, plan.out)
    log(f"wrote {stem}.json and {stem}.md in {rep['total_s']:.0f} s")
    if plan.track:
        run_id = _guarded(rep, setup, "mlflow", lambda: track(rep, stem, notes))
        if run_id:
            rep["mlflow_run_id"] = run_id
            log(f"MLflow run {run_id} (kind bench)")
        write(rep, plan.out)
    print(markdown(rep), flush=True)
    return rep


def _guarded(rep: dict, setup: Setup, what: str, fn: Callable[[], Any]) -> Any:
    """fn(), or None with the error noted in the report: one failing part must not cost the rest of the run."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - noted, printed with its traceback
        msg = f"{what}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        rep["errors"].append(msg)
        rep["notes"].append(f"error in {msg}")
        log(f"ERROR {msg}")
        traceback.print_exc()
        free(setup.device)
        return None


def _reserve(setup: Setup, plan: Plan) -> float:
    """Seconds of the budget kept for the run-once sections (estimates) while the pairs run."""
    reserve = 0.0
    if "probe" in plan.sections and importlib.util.find_spec("sklearn") is not None:
        reserve += (25.0 if setup.cuda else 40.0) * plan.probe_n * plan.probe_d / (50000 * 768) + 5
    if "attribution" in plan.sections and importlib.util.find_spec("captum") is not None:
        reserve += 15.0 if setup.cuda else 10.0 + 0.8 * plan.attr_images
    if "compile" in plan.sections:
        reserve += COMPILE_NEED_S["cuda" if setup.cuda else "cpu"] * len(plan.compile_models)
    return reserve


def _pairs(rep: dict, setup: Setup, plan: Plan, reserve: float) -> None:
    """Each pair through the per-pair sections; a pair whose estimated time does not fit is skipped."""
    if not set(PAIR_SECTIONS) & set(plan.sections):
        return
    pair_s: list[float] = []
    for steps_name in plan.models:
        est = statistics.mean(pair_s) if pair_s else 0.0
        if pair_s and setup.left() - reserve < est:
            note = (f"{steps_name}: skipped, {setup.left():.0f} s left of the budget, {reserve:.0f} s of it kept for "
                    f"the sections after the pairs (a pair took {est:.0f} s on average); raise --budget-s")
            rep["notes"].append(note)
            log(note)
            continue
        t_pair = time.perf_counter()
        _pair(rep, setup, plan, steps_name)
        free(setup.device)  # the pair's models are gone with _pair's frame
        pair_s.append(time.perf_counter() - t_pair)
        write(rep, plan.out)


def _pair(rep: dict, setup: Setup, plan: Plan, steps_name: str) -> None:
    """Build the pair of `steps_name` and run the plan's per-pair sections on it, results into the report."""
    base_name = BASELINE_OF[steps_name]
    log(f"pair {steps_name} vs {base_name}: building")
    pair = _guarded(rep, setup, f"build {steps_name}", lambda: Pair(build(steps_name, setup), build(base_name, setup)))
    if pair is None:
        return
    for name, run in PAIR_SECTIONS.items():
        if name not in plan.sections or (name == "graphs" and steps_name not in plan.graphs_models):
            continue
        r = _guarded(rep, setup, f"{name} {steps_name}", lambda: run(pair, setup))  # noqa: B023 - called at once
        if r and name == "profile":  # one entry per model
            rep["profile"].extend(r.values())
        elif r:
            rep[name].append(r)
        elif name == "graphs":
            plan.sections.remove("graphs")
            rep["notes"].append("graphs: stopped after the first failure (a failed capture can leave the device in "
                                "a bad state for the pairs after it)")


def _once(rep: dict, setup: Setup, plan: Plan) -> None:
    """The sections after the pairs: probe, attribution, compile (each while the budget lasts)."""
    notes = rep["notes"]
    if "probe" in plan.sections:
        if setup.left() > 10:
            rep["probe"] = _guarded(rep, setup, "probe", lambda: probe.run(plan.probe_n, plan.probe_d,
                                                                           plan.probe_classes, setup, notes))
        else:
            notes.append("probe: skipped, out of budget")
        write(rep, plan.out)
    if "probe_run" in plan.sections:  # not by budget: the point is the whole loop's time
        rep["probe_run"] = _guarded(rep, setup, "probe_run", lambda: probe_run.run(setup, notes))
    if "scale" in plan.sections:  # on request only: it starts torchrun jobs and trains on generated folders
        rep["scale"] = _guarded(rep, setup, "scale", lambda: scale.run(setup, notes))
        write(rep, plan.out)
    if "attribution" in plan.sections:
        if setup.left() > 5:
            rep["attribution"] = _guarded(rep, setup, "attribution", lambda: attribution.run(
                plan.attr_model, plan.attr_images, plan.ig_steps, setup, notes))
        else:
            notes.append("attribution: skipped, out of budget")
        write(rep, plan.out)
    free(setup.device)
    if "compile" not in plan.sections:
        return
    rep["compile"] = []

    def partial(res: dict) -> None:
        if not any(c is res for c in rep["compile"]):
            rep["compile"].append(res)
        write(rep, plan.out)

    for steps_name in plan.compile_models:
        need = COMPILE_NEED_S["cuda" if setup.cuda else "cpu"]
        if setup.left() < need:
            notes.append(f"compile {steps_name}: skipped, {setup.left():.0f} s left (needs ~{need:.0f} s)")
            continue
        r = _guarded(rep, setup, f"compile {steps_name}",
                     lambda: compiled.run(steps_name, setup, plan.compile_mode, partial))  # noqa: B023 - called at once
        if r:
            partial(r)
        free(setup.device)
        write(rep, plan.out)


def track(rep: dict, stem: Path, notes: list[str]) -> str | None:
    """One MLflow run of kind "bench": settings as params, the metrics, the JSON and Markdown as artifacts."""
    if optional("mlflow", "MLflow tracking", notes) is None:
        return None
    import mlflow

    from experiments import tracking

    params = {**rep["settings"], "device": rep["device"], "card": rep["card"], "dtype": rep["dtype"]}
    with tracking.tracked_run("bench", params, tags={"stepslab.bench_device": rep["device"]},
                              run_name=tracking.run_name("bench", rep["device"])) as run:
        tracking.log_metrics(rep["metrics"])
        tracking.log_dict_artifact(rep, f"bench-{rep['device']}.json")
        mlflow.log_text(stem.with_suffix(".md").read_text(), f"bench-{rep['device']}.md")
        return run.info.run_id
