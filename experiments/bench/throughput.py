"""throughput: eager inference and training-step (fwd + bwd + AdamW) images/s, Steps vs baseline, interleaved.
MFU (count_macs x 2 x 3 x training images/s over the measured matmul peak) is derived from it in the report."""
from __future__ import annotations

from typing import Any, Callable

import torch

from experiments.bench.harness import Pair, Setup, batch_for, inferer, interleave, log, trainer
from experiments.bench.report import rng


def phase(pair: Pair, x: torch.Tensor, y: torch.Tensor, setup: Setup, mode: str, repeats: int | None = None
          ) -> tuple[dict, dict[str, Callable[[], Any]]]:
    """Both models of `pair` in `mode` (``infer``: eager inference forward; ``train``: one training step) on the
    batch (x, y), interleaved: ({"ips", "ratio", "ratio_cputime", "iters"}, the two timed functions)."""
    steps, base = pair
    for b in pair:
        b.model.train(mode == "train")
    make = (lambda m: inferer(m, x, setup.device)) if mode == "infer" else (lambda m: trainer(m, x, y, setup.device))
    fns = {"steps": make(steps.model), "base": make(base.model)}
    t = interleave(fns, setup, repeats=repeats)
    return {"ips": {"steps": t.ips("steps", len(x)), "baseline": t.ips("base", len(x))},
            "ratio": t.ratio("steps", "base"), "ratio_cputime": t.ratio("steps", "base", cpu=True),
            "iters": t.iters}, fns


def run(pair: Pair, setup: Setup) -> dict:
    """Eager inference and training images/s of both models, interleaved, and their ratios."""
    steps, base = pair
    x, y = batch_for(steps, setup)
    out: dict[str, Any] = {"steps": steps.name, "baseline": base.name, "batch": int(x.shape[0]),
                           "macs": {"steps": steps.macs, "baseline": base.macs},
                           "params": {"steps": steps.params, "baseline": base.params},
                           "volume": {"steps": steps.volume, "baseline": base.volume}}
    for mode in ("infer", "train"):
        out[mode] = phase(pair, x, y, setup, mode)[0]
    log(f"throughput {steps.name}: infer {rng(out['infer']['ratio'])} "
        f"({out['infer']['ips']['steps']:.0f} vs {out['infer']['ips']['baseline']:.0f} img/s), "
        f"train {rng(out['train']['ratio'])} ({out['train']['ips']['steps']:.0f} vs "
        f"{out['train']['ips']['baseline']:.0f} img/s)")
    return out
