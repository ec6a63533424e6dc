"""overhead: the split/merge cost. The Steps stacks vs the same blocks run one after another on pre-made dense
inputs of each step's width (no split, no concatenation, no HookPoints), and the wiring alone (the stacks with
their blocks taken out)."""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from experiments.bench.harness import Pair, Setup, batch_for, interleave, log
from models.steps import as_dense
from probes.runtime import autocast


@contextlib.contextmanager
def wiring_only(stacks: list[nn.Module]):
    """Within the block, every step of `stacks` runs no blocks: what is left is the StepsStack wiring itself
    (split, dense first group, HookPoints, one concatenation per step), the real code of models/steps.py."""
    saved = [(step, step.blocks) for s in stacks for step in s.steps]
    try:
        for step, _ in saved:
            step.blocks = nn.Sequential()
        yield
    finally:
        for step, blocks in saved:
            step.blocks = blocks


def run(pair: Pair, setup: Setup) -> dict:
    """Stack, plain-blocks and wiring-only times of the pair's Steps model, inference and training."""
    steps = pair.steps
    model, device = steps.model, setup.device
    stacks = model.steps_stacks()
    x, _ = batch_for(steps, setup)
    captured: dict[int, torch.Tensor] = {}
    handles = [s.register_forward_pre_hook(lambda mod, args, i=i: captured.__setitem__(i, args[0].detach()))
               for i, s in enumerate(stacks)]
    try:
        with torch.no_grad(), autocast(device):
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    # The first C_i channels of the stack input stand in for [y_{i-1}, x_i]: same shape, dtype and layout.
    pre = {i: [as_dense(captured[i].narrow(s.channel_dim, 0, w)) for w in s.widths] for i, s in enumerate(stacks)}

    def stack_infer():
        with torch.inference_mode(), autocast(device):
            for i, s in enumerate(stacks):
                s(captured[i])

    def plain_infer():
        with torch.inference_mode(), autocast(device):
            for i, s in enumerate(stacks):
                for step, h in zip(s.steps, pre[i]):
                    step.blocks(h)

    def wiring_infer():
        with wiring_only(stacks):
            stack_infer()

    leaves = {i: captured[i].clone().requires_grad_() for i in captured}
    pre_leaves = {i: [p.clone().requires_grad_() for p in ps] for i, ps in pre.items()}
    grads: dict[Any, torch.Tensor] = {}  # fixed output gradients: no loss computation in the timed work

    def backward(outs: list[tuple[Any, torch.Tensor]], inputs: list[torch.Tensor]) -> None:
        for key, o in outs:
            if key not in grads:
                grads[key] = torch.randn_like(o)
        torch.autograd.backward([o for _, o in outs], [grads[k] for k, _ in outs])
        model.zero_grad(set_to_none=True)
        for t in inputs:
            t.grad = None

    def stack_train(tag: str = "stack"):
        with autocast(device):
            outs = [((tag, i), s(leaves[i])) for i, s in enumerate(stacks)]
        backward(outs, list(leaves.values()))

    def plain_train():
        with autocast(device):
            outs = [(("plain", i, k), step.blocks(h)) for i, s in enumerate(stacks)
                    for k, (step, h) in enumerate(zip(s.steps, pre_leaves[i]))]
        backward(outs, [t for ts in pre_leaves.values() for t in ts])

    def wiring_train():
        with wiring_only(stacks):
            stack_train("wiring")

    model.eval()
    ti = interleave({"stack": stack_infer, "plain": plain_infer, "wiring": wiring_infer}, setup)
    model.train()
    tt = interleave({"stack": stack_train, "plain": plain_train, "wiring": wiring_train}, setup)
    model.zero_grad(set_to_none=True)
    res = {"model": steps.name}
    for mode, t in (("infer", ti), ("train", tt)):
        r = t.ratio("plain", "stack")  # plain speed / stack speed = stack time / plain time
        res[mode] = {"stack_ms": t.ms("stack"), "plain_ms": t.ms("plain"), "wiring_ms": t.ms("wiring"),
                     "overhead": r["median"] - 1, "overhead_min": r["min"] - 1, "overhead_max": r["max"] - 1,
                     "overhead_best": r["best"] - 1,
                     "wiring_share": min(t.wall["wiring"]) / min(t.wall["stack"])}
    log(f"overhead {steps.name}: infer {100 * res['infer']['overhead']:+.1f}%, "
        f"train {100 * res['train']['overhead']:+.1f}% (stack vs same blocks on pre-made inputs); wiring "
        f"alone {100 * res['infer']['wiring_share']:.1f}% / {100 * res['train']['wiring_share']:.1f}% of the "
        "stack time")
    return res
