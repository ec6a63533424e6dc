"""graphs (`--cuda-graphs`, CUDA only): whole-model CUDA graphs. Inference: torch.cuda.graph; training:
torch.cuda.make_graphed_callables with autocast caching off. Shapes are static here, and graphs take the
kernel-launch cost (which grows with the number of blocks, twice the baseline's for Steps-DeiT) off the CPU."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from experiments.bench.harness import Pair, Setup, batch_for, interleave, log, trainer
from experiments.bench.report import rng
from probes.runtime import autocast


def graphed_infer(model: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    """Capture the model's inference forward as one CUDA graph; returns its replay."""
    model.eval()
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad(), autocast(x.device, cache=False):
        for _ in range(3):
            model(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), autocast(x.device, cache=False):
        with torch.cuda.graph(graph):
            static_out = model(static_x)

    def replay():
        graph.replay()
        return static_out
    replay.keep = (graph, static_x, static_out)  # type: ignore[attr-defined]
    return replay


def run(pair: Pair, setup: Setup) -> dict:
    """Graphed inference, then graphed training, of a built pair. make_graphed_callables replaces the models'
    forward: run this section last on a pair."""
    roles = {"steps": pair.steps, "base": pair.base}
    x, y = batch_for(pair.steps, setup)
    res: dict[str, Any] = {"steps": pair.steps.name, "baseline": pair.base.name}
    t = interleave({role: graphed_infer(b.model, x) for role, b in roles.items()}, setup)
    res["infer"] = {"ips": {"steps": t.ips("steps", len(x)), "baseline": t.ips("base", len(x))},
                    "ratio": t.ratio("steps", "base")}
    fns = {}
    for role, b in roles.items():
        b.model.train()
        b.model.zero_grad(set_to_none=True)
        with autocast(setup.device, cache=False):
            graphed = torch.cuda.make_graphed_callables(b.model, (x,), allow_unused_input=True)
        fns[role] = trainer(graphed, x, y, setup.device, params=b.model, cache=False)
    t = interleave(fns, setup)
    res["train"] = {"ips": {"steps": t.ips("steps", len(x)), "baseline": t.ips("base", len(x))},
                    "ratio": t.ratio("steps", "base")}
    log(f"graphs {pair.steps.name}: infer {rng(res['infer']['ratio'])}, train {rng(res['train']['ratio'])}")
    return res
