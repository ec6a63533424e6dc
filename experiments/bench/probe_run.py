"""probe_run: the everyday loop, timed whole: `probe run --model steps_deit_micro --path all` on the newest
frozen demo model (`make demo` makes it), once cold (an empty feature cache: extraction + probes) and once with
the features cached (probes only). Wall seconds of each, and the run's division-of-labour score for reference.

It needs a frozen `steps_deit_micro` in the store: without one it is skipped with a note (it never trains).
Also timed: how long `probe run --model <a mistyped name>` takes to refuse, as a user sees it (a fresh process).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from experiments.bench.harness import Setup, log

MODEL = "steps_deit_micro"


def run(setup: Setup, notes: list[str], tracking_uri: str | None = None) -> dict | None:
    """{"cold_s", "cached_s", "refusal_s", "n_train", "n_test", "dol_acc", "metrics"}; None (noted) without a
    frozen demo model."""
    from experiments import tracking
    from experiments.options import ProbeConfig
    from experiments.probe_run import run_probe

    tracking.configure(tracking_uri)
    if tracking.newest_frozen(MODEL) is None:
        notes.append(f"probe_run: no frozen {MODEL} in {tracking.resolve_tracking_uri(tracking_uri)}; run "
                     "`make demo` first (skipped)")
        return None
    res: dict = {"model": MODEL, "command": f"probe run --model {MODEL} --path all"}
    old = os.environ.get("STEPSLAB_CACHE")
    with tempfile.TemporaryDirectory(prefix="stepslab-bench-cache-") as cache:
        os.environ["STEPSLAB_CACHE"] = cache  # cold: nothing cached from earlier runs
        try:
            for key in ("cold_s", "cached_s"):
                log(f"probe_run: {res['command']} ({key[:-2]})")
                t0 = time.perf_counter()
                report = run_probe(ProbeConfig(model=MODEL, path="all", tracking_uri=tracking_uri),
                                   echo=lambda msg: None)
                res[key] = time.perf_counter() - t0
                log(f"probe_run: {key[:-2]} {res[key]:.0f} s")
        finally:
            if old is None:
                os.environ.pop("STEPSLAB_CACHE", None)
            else:
                os.environ["STEPSLAB_CACHE"] = old
    res["n_train"] = int(next(r["n_train"] for r in report.rows if "n_train" in r))
    res["n_test"] = int(next(r["n_test"] for r in report.rows if "n_test" in r))
    res["dol_acc"] = report.dol["acc"][0] if "acc" in report.dol else None
    res["metrics"] = report.metrics  # every number of the cached run: versions compare by their JSON files
    res["device"] = setup.slug
    res["refusal_s"] = refusal_seconds()
    return res


def refusal_seconds() -> float:
    """Wall seconds of `probe run --model steps_deit_q` (a typo) in a fresh interpreter, until its one-line error."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "experiments.cli", "run", "--model", "steps_deit_q"],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 2:
        raise RuntimeError(f"a mistyped model name exited {done.returncode}, not 2: {done.stderr[-500:]}")
    log(f"probe_run: a mistyped model name refused in {seconds:.2f} s")
    return seconds
