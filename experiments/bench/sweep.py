"""sweep (`--sections sweep`): the Steps / baseline ratio across batch sizes, eager, and each model's peak memory.

For every batch size of `SIZES` (smallest first), inference and one training step of both models, interleaved
(the throughput section's timing at that batch), then one more call of each alone for its peak memory: on CUDA
the allocator's peak during that call above what was allocated before it (activations and workspace; weights,
gradients and optimizer state sit below it), MiB; on the CPU memory is not measured (None). A batch that runs
out of device memory ends the sweep for that pair, recorded as ``oom``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from experiments.bench.harness import Pair, Setup, batch_for, free, log, sync
from experiments.bench.report import rng
from experiments.bench.throughput import phase

SIZES = {"cuda": (64, 128, 256, 512), "cpu": (16, 32, 64, 128)}
MIN_LEFT_S = 20.0  # least budget left to start another batch size


def peak_mib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak memory allocated during one call of `fn` above what was allocated before it, MiB (CUDA); None on
    the CPU."""
    if device.type != "cuda":
        return None
    sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def run(pair: Pair, setup: Setup) -> dict:
    """{"steps", "baseline", "rows": [{"batch", "infer"/"train": {"ips", "ratio", "peak_mib", "peak_ratio"}} or
    {"batch", "oom": True}]}; each phase also has `throughput.phase`'s CPU-time ratio and iterations."""
    steps, base = pair
    out: dict[str, Any] = {"steps": steps.name, "baseline": base.name, "rows": []}
    for batch in SIZES["cuda" if setup.cuda else "cpu"]:
        if setup.left() < MIN_LEFT_S:
            out["stopped"] = f"out of budget before batch {batch}"
            break
        x, y = batch_for(steps, setup, batch)
        row: dict[str, Any] = {"batch": batch}
        try:
            for mode in ("infer", "train"):
                row[mode], fns = phase(pair, x, y, setup, mode, repeats=setup.repeats_secondary)
                peak = {name: peak_mib(fn, setup.device) for name, fn in fns.items()}
                row[mode].update(peak_mib={"steps": peak["steps"], "baseline": peak["base"]},
                                 peak_ratio=None if peak["base"] is None else peak["steps"] / peak["base"])
        except torch.cuda.OutOfMemoryError:
            out["rows"].append({"batch": batch, "oom": True})
            log(f"sweep {steps.name}: batch {batch} ran out of device memory; the sweep stops here")
            free(setup.device)
            break
        finally:
            del x, y
        out["rows"].append(row)
        mem = "" if row["train"]["peak_ratio"] is None else f", train peak memory x{row['train']['peak_ratio']:.2f}"
        log(f"sweep {steps.name} batch {batch}: infer {rng(row['infer']['ratio'])}, train "
            f"{rng(row['train']['ratio'])}{mem}")
    return out
