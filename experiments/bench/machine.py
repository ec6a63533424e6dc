"""The machine's state, measured at the start (and, on CPU, the end) of a run: the matmul peak that MFU is
computed against, and how contended a shared CPU is."""
from __future__ import annotations

import os
import statistics
import time

import torch

from experiments.bench.harness import Setup, cpu_cores, interleave


def contention(setup: Setup) -> dict:
    """CPU only: the machine's load and how long a small parallel op waits for its threads.

    On a shared CPU a parallel op ends when its last thread gets scheduled: with more runnable processes than
    cores every op can cost a scheduler time slice (~10 ms) whatever its size, which favours models with fewer,
    larger ops (the baselines). `slowdown` = median time of the op at the torch thread count / at one thread.
    """
    x = torch.randn(1 << 20)
    threads = torch.get_num_threads()

    def med(n: int) -> float:
        torch.set_num_threads(n)
        ts = []
        for _ in range(41):
            t0 = time.perf_counter()
            torch.add(x, x)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    try:
        one, many = med(1), med(threads)
    finally:
        torch.set_num_threads(threads)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"load_avg_1m": load[0], "cores": cpu_cores(), "threads": threads, "op_ms_1thread": 1e3 * one,
            "op_ms_threads": 1e3 * many, "slowdown": many / one}


def matmul_peak(setup: Setup) -> dict:
    """Best of 3 timed blocks of square matmuls: bf16 8192^2 on CUDA, fp32 2048^2 on CPU (halved with --quick)."""
    n = (8192 if setup.cuda else 2048) // (2 if setup.quick else 1)
    dtype = torch.bfloat16 if setup.cuda else torch.float32
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(setup.device, dtype)
    b = torch.randn(n, n, generator=g).to(setup.device, dtype)
    t = interleave({"mm": lambda: torch.mm(a, b)}, setup, repeats=3,
                   target_s=0.2 if setup.quick else 0.5 if setup.cuda else 1.0, warmup=2)
    best = min(t.wall["mm"])
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "tflops": 2 * n ** 3 / best / 1e12}
