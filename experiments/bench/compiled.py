"""compile (`--compile`): torch.compile of a pair, whole model, training step then inference forward: compile
time, frames, graphs, graph breaks, recompiles while timing (the Steps model must compile to one graph, no
recompiles per step), compiled throughput ratios (`--compile-mode reduce-overhead` adds CUDA graphs)."""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

from experiments.bench.harness import Setup, batch_for, build, inferer, interleave, log, sync, trainer
from experiments.bench.report import rng
from models.registry import BASELINE_OF


def counter_snapshot() -> dict[str, int]:
    """Dynamo's frame, unique-graph and graph-break counters so far."""
    from torch._dynamo.utils import counters

    return {"frames": int(counters["frames"]["total"]), "graphs": int(counters["stats"]["unique_graphs"]),
            "breaks": int(sum(counters["graph_break"].values()))}


def _step_marked(fn: Callable[[], Any]) -> Callable[[], Any]:
    """`fn` preceded by cudagraph_mark_step_begin: each call is a new step for reduce-overhead's CUDA graphs."""
    def run():
        torch.compiler.cudagraph_mark_step_begin()
        return fn()
    return run


def run(steps_name: str, setup: Setup, mode: str, on_partial: Callable[[dict], None] | None = None) -> dict:
    """torch.compile of a freshly built pair, whole model: the training step, then the inference forward.

    Per model and phase: compile time, frames, graphs and graph breaks (the Steps model must be one graph with
    no recompiles per step); per phase the compiled Steps / baseline ratio, interleaved. `on_partial(res)` is
    called after each model compiled, so a run stopped during the next compile keeps what was measured."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    pair = {"steps": build(steps_name, setup), "base": build(BASELINE_OF[steps_name], setup)}
    x, y = batch_for(pair["steps"], setup)
    res: dict[str, Any] = {"steps": steps_name, "baseline": BASELINE_OF[steps_name], "mode": mode,
                           "models": {b.name: {} for b in pair.values()}}
    for phase in ("train", "infer"):
        fns = {}
        for role, b in pair.items():
            before = counter_snapshot()
            b.model.train(phase == "train")
            compiled = torch.compile(b.model, mode=mode)
            fn = (trainer(compiled, x, y, setup.device, params=b.model) if phase == "train"
                  else inferer(compiled, x, setup.device))
            if "reduce-overhead" in mode:  # CUDA-graph trees reuse their output memory: mark each new step
                fn = _step_marked(fn)
            log(f"compile: {b.name} ({phase}, mode {mode})")
            sync(setup.device)
            t0 = time.perf_counter()
            fn()
            sync(setup.device)
            compile_s = time.perf_counter() - t0
            for _ in range(2):
                fn()
            after = counter_snapshot()
            res["models"][b.name][phase] = {"compile_s": compile_s, "frames": after["frames"] - before["frames"],
                                            "graphs": after["graphs"] - before["graphs"],
                                            "graph_breaks": after["breaks"] - before["breaks"]}
            log(f"compile: {b.name} {phase} {compile_s:.1f} s, {res['models'][b.name][phase]}")
            fns[role] = fn
            if on_partial:
                on_partial(res)
        before = counter_snapshot()
        t = interleave(fns, setup, warmup=1)
        after = counter_snapshot()
        s = res["models"][steps_name][phase]
        res[phase] = {"ips": {"steps": t.ips("steps", len(x)), "baseline": t.ips("base", len(x))},
                      "ratio": t.ratio("steps", "base"), "recompiles_while_timing": after["frames"] - before["frames"]}
        if not setup.cuda:
            res[phase]["ratio_cputime"] = t.ratio("steps", "base", cpu=True)
        res[phase]["compiles_once"] = bool(s["frames"] == 1 and s["graphs"] == 1 and s["graph_breaks"] == 0
                                           and res[phase]["recompiles_while_timing"] == 0)
        if on_partial:
            on_partial(res)
        del fns
        torch._dynamo.reset()
    res["graph_breaks"] = {k: int(v) for k, v in counters["graph_break"].items()}
    del pair
    log(f"compile {steps_name}: compiles once {res['train']['compiles_once']}/{res['infer']['compiles_once']}, "
        f"ratio train {rng(res['train']['ratio'])}, infer {rng(res['infer']['ratio'])}")
    return res
