"""profile: torch.profiler of a training fwd+bwd and an inference forward per model (3 rounds on CPU, 2 on CUDA,
1 with --quick; interleaved with the pair's other model, minimum per category): time in GEMM/conv/attention,
copies, norms and other (elementwise) ops, the GEMM rate, op counts, and each model's block activation volume.
The report uses it to explain ratios below target."""
from __future__ import annotations

import time
from typing import Any, Callable

import torch.nn.functional as F

from experiments.bench.harness import Pair, Setup, batch_for, inferer, log, sync
from experiments.bench.report import CATEGORIES
from probes.runtime import autocast


def op_category(key: str) -> str:
    """gemm: projections and convolutions; attn: attention products and softmax (fused or not; bmm is only used
    by attention in these models); copy: data movement; norm: layer/batch norm; other: elementwise and the rest."""
    op = key.split("::")[-1]
    if op in ("mm", "addmm", "addbmm", "matmul", "_scaled_mm") or "conv" in op:
        return "gemm"
    if (op in ("bmm", "baddbmm") or "softmax" in op or "scaled_dot_product" in op or "flash_attention" in op
            or "efficient_attention" in op or "cudnn_attention" in op):
        return "attn"
    if any(k in op for k in ("layer_norm", "batch_norm", "group_norm")):
        return "norm"
    if op in ("copy_", "cat", "clone", "contiguous", "roll", "constant_pad_nd", "index", "index_select", "gather",
              "_to_copy", "slice_backward", "narrow_copy", "split_with_sizes_copy", "stack", "index_put_",
              "_unsafe_index", "repeat"):
        return "copy"
    return "other"


def _profile_once(fn: Callable[[], Any], setup: Setup) -> dict:
    """Self time (ms) by op category of one call of `fn`, its wall time, op counts and top non-GEMM ops."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setup.cuda else [])
    sync(setup.device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        fn()
        sync(setup.device)
        wall = time.perf_counter() - t0
    cats = {k: 0.0 for k in CATEGORIES}
    counts: dict[str, int] = {}
    top: dict[str, float] = {}
    for e in prof.key_averages():
        if not e.key.startswith("aten::"):
            continue  # autograd nodes, profiler records, CUDA kernels (their time is in their aten op)
        if setup.cuda:
            us = getattr(e, "self_device_time_total", None)
            us = getattr(e, "self_cuda_time_total", 0.0) if us is None else us
        else:
            us = e.self_cpu_time_total
        cat = op_category(e.key)
        cats[cat] += us / 1e3
        counts[e.key] = counts.get(e.key, 0) + int(e.count)
        if cat not in ("gemm", "attn"):
            top[e.key] = top.get(e.key, 0.0) + us / 1e3
    return {"cats": cats, "wall_ms": 1e3 * wall, "counts": counts, "top": top}


def run(pair: Pair, setup: Setup) -> dict:
    """Per model (keyed by name): profiled training fwd+bwd (no optimizer) and inference forward, interleaved
    with the other model over the rounds; each category's time is its minimum over the rounds (noise only adds
    time)."""
    rounds = 1 if setup.quick else 2 if setup.cuda else 3
    res = {b.name: {"model": b.name, "clock": "device" if setup.cuda else "cpu", "volume": b.volume,
                    "macs": b.macs} for b in pair}
    for mode, passes in (("train", 3), ("infer", 1)):
        fns = {}
        for b in pair:
            x, y = batch_for(b, setup)
            b.model.train(mode == "train")
            if mode == "infer":
                fns[b.name] = inferer(b.model, x, setup.device)
                continue

            def fwd_bwd(model=b.model, x=x, y=y):
                model.zero_grad(set_to_none=True)
                with autocast(setup.device):
                    loss = F.cross_entropy(model(x), y)
                loss.backward()
            fns[b.name] = fwd_bwd
        for fn in fns.values():
            fn()
        runs: dict[str, list[dict]] = {name: [] for name in fns}
        names = list(fns)
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                runs[name].append(_profile_once(fns[name], setup))
        for b in pair:
            rs = runs[b.name]
            cats = {k: min(r["cats"][k] for r in rs) for k in rs[0]["cats"]}
            fastest = min(rs, key=lambda r: sum(r["cats"].values()))
            total = sum(cats.values())
            flops = 2.0 * passes * b.macs * setup.batch  # 2 FLOPs per MAC; fwd + bwd = 3 passes
            res[b.name][mode] = {
                "total_ms": total, **{f"{k}_ms": v for k, v in cats.items()}, "wall_ms": min(r["wall_ms"] for r in rs),
                "gemm_tflops": flops / (cats["gemm"] + cats["attn"]) / 1e9 if cats["gemm"] + cats["attn"] > 0 else None,
                "busy": sum(fastest["cats"].values()) / fastest["wall_ms"] if fastest["wall_ms"] else None,
                "ops": sum(fastest["counts"].values()), "cat_calls": fastest["counts"].get("aten::cat", 0),
                "top_other": sorted(((k, round(v, 2)) for k, v in fastest["top"].items()), key=lambda kv: -kv[1])[:6]}
        for b in pair:
            b.model.zero_grad(set_to_none=True)
    for r in res.values():
        q = r["train"]
        log(f"profile {r['model']}: fwd+bwd {q['total_ms']:.1f} ms = gemm {q['gemm_ms']:.1f} + attn "
            f"{q['attn_ms']:.1f} + copy {q['copy_ms']:.1f} + norm {q['norm_ms']:.1f} + other {q['other_ms']:.1f}; "
            f"inference {r['infer']['total_ms']:.1f} ms")
    return res
