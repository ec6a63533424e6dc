"""Performance bench: every Steps model against its baseline at matched MACs, on the device at hand.

    python experiments/bench.py [--device auto|cpu|cuda] [--quick] [--out DIR] [--models NAMES] [--repeats N]
                                [--budget-s S] [--compile] [--cuda-graphs] ...          (`make bench`)

Every figure is a ratio against a reference measured in the same process: the two sides run interleaved, in
alternating order per round (A B, B A, ...), `--repeats` rounds, and a ratio is the median of the per-round
ratios (min and max beside it). On a shared CPU only such ratios mean anything; absolute images/s are reported
but move with the machine's load. On CPU the ratios of process CPU time are reported too: they are less
sensitive to other processes than wall time and show how much of a wall-time ratio is contention.

Default models: the micro pairs (28 px grey, batch 128, fp32) on CPU; the 224 px pairs (batch 128, bf16 autocast,
channels_last for ResNets, cudnn.benchmark) on CUDA. Attention is timm's default: DeiT runs the fused
F.scaled_dot_product_attention; timm's Swin keeps its unfused window attention (timm marks fused Swin attention
experimental; TIMM_FUSED_ATTN=2 in the environment switches it on for both Swin models).

Sections (each guarded: a failure or a missing optional package becomes a note, the rest still runs; the JSON and
Markdown are rewritten after every section, so a run stopped early still leaves its results):
    throughput   inference and training-step (fwd + bwd + AdamW) images/s, Steps vs baseline
    overhead     the split/merge cost: the Steps stacks vs the same blocks run one after another on pre-made
                 dense inputs of each step's width (no split, no concatenation, no HookPoints), and the wiring
                 alone (the stacks with their blocks taken out)
    paths        `models.sites.forward_paths` of every path (slow_path, fast_path, final, each step's y) in one
                 pass vs plain `model.forward`
    profile      torch.profiler of a training fwd+bwd and an inference forward per model (3 rounds on CPU, 2 on
                 CUDA, interleaved with the pair's other model, minimum per category): time in GEMM/conv/
                 attention, copies, norms and other (elementwise) ops, the GEMM rate, op counts, and each model's
                 block activation volume (elements per image written by its residual blocks); explains ratios
                 below target (Markdown)
    mfu          achieved training FLOP/s (count_macs x 2 x 3 x images/s) over the device's matmul peak, timed
                 in the same run (fp32 on CPU, bf16 on CUDA)
    probe        `probes.linear.fit_probe` at one C, scikit-learn vs torch, on synthetic features with a known
                 linear signal (`--probe-n` x `--probe-d`, default 50,000 x 768; `--quick` uses 10,000 x 256)
    attribution  integrated gradients (`--ig-steps`, 32) at the last merge point through
                 `probes.attribution.path_shares` (captum LayerIntegratedGradients; captum directly on the model
                 if that API does not fit), micro Steps model; images/s and the efficiency against
                 fwd+bwd images/s / steps (above 1 is possible: layer IG back-propagates only to the merge point)
    compile      (`--compile`) torch.compile of a pair, whole model, training step then inference forward:
                 compile time, frames, graphs, graph breaks, recompiles while timing (the Steps model must
                 compile to one graph, no recompiles per step), compiled throughput ratios
                 (`--compile-mode reduce-overhead` adds CUDA graphs)
    graphs       (`--cuda-graphs`, CUDA only) whole-model CUDA graphs (inference: torch.cuda.graph; training:
                 torch.cuda.make_graphed_callables with autocast caching off), graphed throughput ratios; shapes
                 are static here, and graphs take the kernel-launch cost (which grows with the number of blocks,
                 twice the baseline's for Steps-DeiT) off the CPU. Default pairs: the small ones (see --graphs-models).

Metric names (MLflow run of kind ``bench``; <model> is the Steps model unless said otherwise):
    ratio.<model>.infer | .train          Steps images/s / baseline images/s (eager)
    ratio.<model>.infer_best | .train_best         ratio of the two sides' fastest rounds
    ratio.<model>.infer_cputime | .train_cputime   the same from process CPU time (CPU runs only)
    ratio.<model>.paths                   forward_paths (all paths) images/s / forward images/s
    ratio.<model>.train_compiled | .infer_compiled   compiled Steps / compiled baseline (with --compile)
    ratio.<model>.infer_graphed | .train_graphed   with CUDA graphs (with --cuda-graphs)
    ips.<name>.infer | .train             images/s of every model, Steps and baseline
    overhead.<model>.infer | .train       Steps stacks time / same blocks on pre-made inputs - 1
    wiring.<model>.infer | .train         time of the Steps wiring alone (blocks taken out) / Steps stacks time
    mfu.<name>                            training MFU of every model, Steps and baseline
    peak.tflops                           measured matmul peak (TFLOP/s)
    probe.fit_s.<sklearn|torch>, probe.acc.<sklearn|torch>, probe.acc_gap
    attr.ig32.ips, attr.ig32.efficiency   (the number is --ig-steps)
    compile.<name>.<train|infer>.compile_s | .graphs | .frames | .graph_breaks; compile.<model>.<phase>.recompiles
Outputs: <out>/bench-<device>.json and .md (``bench-<device>-<tag>.*`` with `--tag`), device = ``cpu-<n>cores``
or the CUDA card name, lower-case with dashes (``nvidia-h100-80gb-hbm3``).

Optional packages are imported on use: mlflow (tracking; `--no-track` skips it), captum (attribution),
scikit-learn (probe). Without one, its part is skipped with a printed note, so the bench runs where only torch,
timm and numpy are installed. `--budget-s` caps the whole run (defaults: 420 s on CPU, 270 s on CUDA): a pair or
section that would not fit is skipped with a note.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import math
import os
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# As experiments/train.py: idle OpenMP threads sleep instead of spinning (a shared CPU). Before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import models  # noqa: E402  (registers the models in timm)
from models.counting import count_macs, count_params  # noqa: E402
from models.registry import BASELINE_OF, check_name, family_of, is_steps  # noqa: E402
from models.sites import forward_paths, site_modules, site_names  # noqa: E402
from models.steps import as_dense  # noqa: E402

from experiments.bench_report import CATEGORIES, markdown, rng, write  # noqa: E402
from experiments.train import autocast, resolve_device  # noqa: E402

MICRO = tuple(s for s in BASELINE_OF if s.endswith("_micro"))
# Full-size pairs, ordered so that a budget cut drops the least informative last (one per family first).
FULL = ("steps_deit_s", "steps_swin_t", "steps_resnet50", "steps_deit_b", "steps_deit_t", "steps_swin_s",
        "steps_resnet34", "steps_swin_b", "steps_resnet18")
# Default --cuda-graphs pairs: the small ones, where kernel launches weigh most (and graph memory is small).
GRAPHS_DEFAULT = ("steps_deit_t", "steps_deit_s", "steps_swin_t", "steps_resnet18", "steps_resnet50") + MICRO
SECTIONS = ("throughput", "overhead", "paths", "profile", "probe", "attribution", "compile", "graphs")
DEFAULT_SECTIONS = ("throughput", "overhead", "paths", "profile", "probe", "attribution")
COMPILE_NEED_S = {"cuda": 90.0, "cpu": 120.0}  # least budget left to start compiling a pair (partials are kept)
PATH_Y = re.compile(r"stages\.\d+\.steps\.\d+\.y")
_T0 = time.perf_counter()


# ------------------------------------------------------------------------------------------------- set-up

@dataclass
class Setup:
    device: torch.device
    slug: str          # cpu-2cores | nvidia-h100-80gb-hbm3
    card: str
    dtype: str
    batch: int
    repeats: int
    target_s: float    # seconds per timed block (iterations are calibrated to it)
    warmup: int
    deadline: float    # perf_counter() value the run must end by
    quick: bool

    @property
    def repeats_secondary(self) -> int:
        """Rounds for the paths section (its effect is small, its cost is not)."""
        return max(min(3, self.repeats), (self.repeats + 1) // 2)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def optional(module: str, what: str, notes: list[str]) -> Any:
    """Import `module`, or note that `what` is skipped and return None."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        note = f"{what}: skipped, {module} is not installed ({exc.__class__.__name__}: {exc})"
        notes.append(note)
        log(note)
        return None


# ------------------------------------------------------------------------------------------------ timing

@dataclass
class Timing:
    """Seconds per call, one value per round, per function; `cpu` the same in process CPU time."""
    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]
    iters: dict[str, int]

    def ips(self, name: str, batch: int) -> float:
        return batch / statistics.median(self.wall[name])

    def ms(self, name: str) -> float:
        return 1e3 * statistics.median(self.wall[name])

    def ratio(self, fast: str, ref: str, cpu: bool = False) -> dict[str, float]:
        """Speed of `fast` relative to `ref` (ref time / fast time): median, min, max over rounds."""
        src = self.cpu if cpu else self.wall
        rs = [b / a for a, b in zip(src[fast], src[ref]) if a > 0]
        if not rs:
            return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "best": float("nan")}
        # best: ratio of each side's fastest round; noise from other processes only ever adds time.
        return {"median": statistics.median(rs), "min": min(rs), "max": max(rs),
                "best": min(src[ref]) / min(src[fast]) if min(src[fast]) > 0 else float("nan")}


def interleave(fns: dict[str, Callable[[], Any]], setup: Setup, *, repeats: int | None = None,
               target_s: float | None = None, warmup: int | None = None) -> Timing:
    """Time each function, rounds in alternating order (A B, B A, ...) so drift in the machine's load hits both.

    Each function first runs `warmup` times; one more call calibrates how many calls make one timed block of
    about `target_s` seconds.
    """
    repeats = setup.repeats if repeats is None else repeats
    target_s = setup.target_s if target_s is None else target_s
    warmup = setup.warmup if warmup is None else warmup
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    iters = {}
    for name, fn in fns.items():
        sync(setup.device)
        t0 = time.perf_counter()
        fn()
        sync(setup.device)
        iters[name] = max(1, min(500, int(round(target_s / max(time.perf_counter() - t0, 1e-6)))))
    names = list(fns)
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    for r in range(max(1, repeats)):
        for name in (names if r % 2 == 0 else names[::-1]):
            fn, n = fns[name], iters[name]
            sync(setup.device)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(n):
                fn()
            sync(setup.device)
            wall[name].append((time.perf_counter() - t0) / n)
            cpu[name].append((time.process_time() - c0) / n)
    return Timing(wall, cpu, iters)


# ------------------------------------------------------------------------------------------------ models

@dataclass
class Built:
    name: str
    model: nn.Module
    input_size: tuple[int, ...]
    macs: int            # per image, forward (count_macs)
    params: int
    volume: int          # elements per image written by the residual blocks (sum over blocks of tokens x width)
    channels_last: bool


def macs_and_volume(model: nn.Module, input_size: tuple[int, ...]) -> tuple[int, int]:
    """count_macs (batch 1) and, from the same forward pass, the block volume: the sum over the residual blocks
    of their output's elements for one image (memory-bound work grows with it)."""
    blocks = [m for n, m in site_modules(model).items() if n.startswith("blocks.")]
    total = [0]

    def hook(module, args, out):
        total[0] += out.numel()

    handles = [b.register_forward_hook(hook) for b in blocks]
    try:
        macs = count_macs(model, input_size)
    finally:
        for h in handles:
            h.remove()
    return macs, total[0]


def build(name: str, setup: Setup) -> Built:
    """The model on CPU (MACs, params, block volume counted there), then on the device."""
    torch.manual_seed(0)
    kwargs = {"num_classes": 10} if name.endswith("_micro") else {}
    model = models.create_model(name, **kwargs)
    size = tuple(int(v) for v in model.pretrained_cfg["input_size"])
    (macs, volume), params = macs_and_volume(model, size), count_params(model)
    channels_last = setup.cuda and family_of(name) == "resnet"
    model = model.to(setup.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Built(name, model, size, macs, params, volume, channels_last)


def batch_for(built: Built, setup: Setup, batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    n = batch or setup.batch
    x = torch.randn(n, *built.input_size, generator=g).to(setup.device)
    if built.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, int(built.model.num_classes), (n,), generator=g).to(setup.device)
    return x, y


def inferer(model: nn.Module, x: torch.Tensor, device: torch.device) -> Callable[[], Any]:
    def run():
        with torch.inference_mode(), autocast(device):
            return model(x)
    return run


def trainer(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
            params: nn.Module | None = None, cache: bool = True) -> Callable[[], Any]:
    """One training step: zero grads, fwd under autocast, cross-entropy, backward, AdamW (fused on CUDA)."""
    opt = torch.optim.AdamW((params or model).parameters(), lr=1e-5,
                            **({"fused": True} if device.type == "cuda" else {}))

    def run():
        opt.zero_grad(set_to_none=True)
        with autocast(device, cache):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return run


# -------------------------------------------------------------------------------------------- measurements

def measure_pair(steps: Built, base: Built, setup: Setup) -> dict:
    """Eager inference and training images/s, interleaved, and their ratios."""
    x, y = batch_for(steps, setup)
    out: dict[str, Any] = {"steps": steps.name, "baseline": base.name, "batch": int(x.shape[0]),
                           "macs": {"steps": steps.macs, "baseline": base.macs},
                           "params": {"steps": steps.params, "baseline": base.params},
                           "volume": {"steps": steps.volume, "baseline": base.volume}}
    for b in (steps, base):
        b.model.eval()
    t = interleave({"steps": inferer(steps.model, x, setup.device), "base": inferer(base.model, x, setup.device)},
                   setup)
    out["infer"] = {"ips": {"steps": t.ips("steps", len(x)), "baseline": t.ips("base", len(x))},
                    "ratio": t.ratio("steps", "base"), "ratio_cputime": t.ratio("steps", "base", cpu=True),
                    "iters": t.iters}
    for b in (steps, base):
        b.model.train()
    t = interleave({"steps": trainer(steps.model, x, y, setup.device),
                    "base": trainer(base.model, x, y, setup.device)}, setup)
    out["train"] = {"ips": {"steps": t.ips("steps", len(x)), "baseline": t.ips("base", len(x))},
                    "ratio": t.ratio("steps", "base"), "ratio_cputime": t.ratio("steps", "base", cpu=True),
                    "iters": t.iters}
    return out


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


def measure_overhead(steps: Built, setup: Setup) -> dict:
    """The Steps stacks on their real inputs vs the same blocks on pre-made dense inputs of each step's width,
    and the wiring alone (the stacks with their blocks taken out)."""
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
    return res


def path_names(model: nn.Module) -> list[str]:
    return ["slow_path", "fast_path", "final"] + [n for n in site_names(model) if PATH_Y.fullmatch(n)]


def measure_paths(steps: Built, setup: Setup) -> dict:
    model, device = steps.model.eval(), setup.device
    x, _ = batch_for(steps, setup)
    names = path_names(model)

    def paths():
        with torch.inference_mode(), autocast(device):
            return forward_paths(model, x, names)

    t = interleave({"forward": inferer(model, x, device), "paths": paths}, setup, repeats=setup.repeats_secondary)
    return {"model": steps.name, "paths": names, "forward_ips": t.ips("forward", len(x)),
            "paths_ips": t.ips("paths", len(x)), "ratio": t.ratio("paths", "forward")}


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


def measure_profiles(pair: list[Built], setup: Setup, rounds: int = 3) -> list[dict]:
    """Per model: profiled training fwd+bwd (no optimizer) and inference forward, `rounds` times, interleaved
    with the other model; each category's time is its minimum over the rounds (noise only adds time)."""
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
    return list(res.values())


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


def synthetic_features(n: int, d: int, k: int, seed: int = 0):
    """Gaussian features with per-feature scales, labels = argmax(X W + Gumbel noise): a known linear signal."""
    rng = np.random.default_rng(seed)
    n_test = max(k * 10, n // 5)
    x = rng.standard_normal((n + n_test, d), dtype=np.float32)
    x *= rng.uniform(0.5, 2.0, size=d).astype(np.float32)
    w = (rng.standard_normal((d, k)) * 6.0 / math.sqrt(d)).astype(np.float32)
    clean = x @ w
    y = (clean + rng.gumbel(size=clean.shape).astype(np.float32)).argmax(1)
    oracle = float((clean[n:].argmax(1) == y[n:]).mean())
    return x[:n], y[:n], x[n:], y[n:], oracle


def measure_probe(n: int, d: int, k: int, setup: Setup, notes: list[str]) -> dict | None:
    if optional("sklearn.linear_model", "probe", notes) is None:
        return None
    from probes.linear import fit_probe

    xtr, ytr, xte, yte, oracle = synthetic_features(n, d, k)
    res: dict[str, Any] = {"n": n, "d": d, "classes": k, "test": len(yte), "oracle_acc": oracle, "C": 1.0,
                           "note": "one fit at C=1 each (fit_probe's C selection would fit 5 times)"}
    for backend in ("sklearn", "torch"):
        log(f"probe: {backend} on {n} x {d}")
        sync(setup.device)
        t0 = time.perf_counter()
        fit = fit_probe(xtr, ytr, xte, yte, probe=backend, C=1.0, seed=0)
        sync(setup.device)
        res[backend] = {"fit_s": time.perf_counter() - t0, "acc": fit.acc}
        log(f"probe: {backend} {res[backend]['fit_s']:.1f} s, acc {fit.acc:.4f}")
    res["acc_gap"] = abs(res["sklearn"]["acc"] - res["torch"]["acc"])
    res["faster"] = min(("sklearn", "torch"), key=lambda b: res[b]["fit_s"])
    return res


def synthetic_images(n: int, input_size: tuple[int, ...], classes: int = 10):
    from experiments.data import LabeledImages

    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (n, *input_size), generator=g, dtype=torch.uint8)
    fine = torch.arange(n) % classes
    f2c = [c * 2 // classes for c in range(classes)]
    c = input_size[0]
    return LabeledImages(images, fine, torch.tensor(f2c)[fine], fine_names=[f"f{i}" for i in range(classes)],
                         coarse_names=["c0", "c1"], fine_to_coarse=f2c, name="bench", split="test",
                         mean=(0.5,) * c, std=(0.5,) * c)


def measure_attribution(name: str, n_images: int, n_steps: int, setup: Setup, notes: list[str]) -> dict | None:
    if optional("captum.attr", "attribution", notes) is None:
        return None
    from experiments.data import batches

    built = build(name, setup)
    model, device = built.model.eval(), setup.device
    ds = synthetic_images(n_images, built.input_size, int(model.num_classes))
    batch_size, internal = 16, 256
    via = "probes.attribution.path_shares"
    delta_rel = None
    try:
        from probes.attribution import path_shares
        from probes.causal import merge_cut

        cut = merge_cut(model, ds.normalise(ds.images[:1]).to(device))

        def run(d):
            return path_shares(model, d, cut, level="fine", n_steps=n_steps, batch_size=batch_size,
                               internal_batch_size=internal, device=device, progress=False)
        run(ds.subset(range(min(2, n_images))))  # warm-up; also checks that the API fits
    except (ImportError, AttributeError, TypeError, ValueError, KeyError) as exc:
        via = f"captum LayerIntegratedGradients on the model ({type(exc).__name__} from probes.attribution: {exc})"
        notes.append(f"attribution: {via}")
        from captum.attr import LayerIntegratedGradients

        step = model.steps_stacks()[-1].steps[-1]
        lig = LayerIntegratedGradients(model, [step.y_prev, step.x] if step.y_prev is not None else [step.x])

        def run(d):
            for images, fine, _ in batches(d, batch_size, shuffle=False, device=device):
                lig.attribute(images, baselines=torch.zeros_like(images), target=fine, n_steps=n_steps,
                              internal_batch_size=max(internal, len(images)), return_convergence_delta=True)
        run(ds.subset(range(min(2, n_images))))
    sync(device)
    t0 = time.perf_counter()
    shares = run(ds)
    sync(device)
    dt = time.perf_counter() - t0
    if hasattr(shares, "summary"):
        delta_rel = shares.summary().get("delta.rel")
    # Reference: plain fwd+bwd (gradient to the input), batch 64: IG costs n_steps of these per image.
    xb, yb = batch_for(built, setup, batch=16 if setup.quick else 64)
    xb.requires_grad_()

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        xb.grad = None
        with autocast(device):
            out = model(xb)
        out.gather(1, yb[:, None]).sum().backward()

    t = interleave({"fb": fwd_bwd}, setup, repeats=1 if setup.quick else 3, warmup=1)
    fb_ips = t.ips("fb", len(xb))
    ips = n_images / dt
    return {"model": name, "images": n_images, "ig_steps": n_steps, "batch_size": batch_size,
            "internal_batch_size": internal, "via": via, "seconds": dt, "ips": ips, "fwd_bwd_ips": fb_ips,
            "efficiency": ips * n_steps / fb_ips, "fwd_bwd_batch": len(xb), "delta_rel": delta_rel}


def counter_snapshot() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {"frames": int(counters["frames"]["total"]), "graphs": int(counters["stats"]["unique_graphs"]),
            "breaks": int(sum(counters["graph_break"].values()))}


def measure_compile(steps_name: str, setup: Setup, mode: str,
                    on_partial: Callable[[dict], None] | None = None) -> dict:
    """torch.compile of a pair, whole model: the training step, then the inference forward.

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
    return res


def _step_marked(fn: Callable[[], Any]) -> Callable[[], Any]:
    """`fn` preceded by cudagraph_mark_step_begin: each call is a new step for reduce-overhead's CUDA graphs."""
    def run():
        torch.compiler.cudagraph_mark_step_begin()
        return fn()
    return run


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


def measure_graphs(steps: Built, base: Built, setup: Setup) -> dict:
    """Whole-model CUDA graphs of a built pair: inference (torch.cuda.graph), then training
    (torch.cuda.make_graphed_callables, which replaces the models' forward: run it last on a pair)."""
    pair = {"steps": steps, "base": base}
    x, y = batch_for(steps, setup)
    res: dict[str, Any] = {"steps": steps.name, "baseline": base.name}
    t = interleave({role: graphed_infer(b.model, x) for role, b in pair.items()}, setup)
    res["infer"] = {"ips": {"steps": t.ips("steps", len(x)), "baseline": t.ips("base", len(x))},
                    "ratio": t.ratio("steps", "base")}
    fns = {}
    for role, b in pair.items():
        b.model.train()
        b.model.zero_grad(set_to_none=True)
        with autocast(setup.device, cache=False):
            graphed = torch.cuda.make_graphed_callables(b.model, (x,), allow_unused_input=True)
        fns[role] = trainer(graphed, x, y, setup.device, params=b.model, cache=False)
    t = interleave(fns, setup)
    res["train"] = {"ips": {"steps": t.ips("steps", len(x)), "baseline": t.ips("base", len(x))},
                    "ratio": t.ratio("steps", "base")}
    return res


# ----------------------------------------------------------------------------------------- tracking

def track(rep: dict, stem: Path, notes: list[str]) -> str | None:
    """One MLflow run of kind "bench": settings as params, the metrics, the JSON and Markdown as artifacts."""
    if optional("mlflow", "MLflow tracking", notes) is None:
        return None
    import mlflow

    from experiments import tracking

    params = {**rep["settings"], "device": rep["device"], "card": rep["card"], "dtype": rep["dtype"]}
    with tracking.tracked_run("bench", params, tags={"stepslab.bench_device": rep["device"]}) as run:
        tracking.log_metrics(rep["metrics"])
        tracking.log_dict_artifact(rep, f"bench-{rep['device']}.json")
        mlflow.log_text(stem.with_suffix(".md").read_text(), f"bench-{rep['device']}.md")
        return run.info.run_id


# -------------------------------------------------------------------------------------------------- main

def resolve_models(spec: str | None, setup: Setup) -> list[str]:
    if not spec:
        names = list(MICRO if not setup.cuda else FULL)
        return names[:3] if setup.quick and setup.cuda else names
    if spec in ("micro", "full"):
        return list(MICRO if spec == "micro" else FULL)
    inverse = {b: s for s, b in BASELINE_OF.items()}
    names = []
    for n in (s.strip() for s in spec.split(",") if s.strip()):
        check_name(n)
        s = n if is_steps(n) else inverse[n]
        if s not in names:
            names.append(s)
    return names


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python experiments/bench.py", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--quick", action="store_true", help="small batch, fewer rounds, small probe (a smoke run)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                   help="folder for bench-<device>.json/.md (default experiments/results)")
    p.add_argument("--models", default=None, help="comma-separated Steps (or baseline) names, or micro | full; "
                                                  "default: micro pairs on CPU, 224 px pairs on CUDA")
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved rounds for throughput (default 7 CPU, 3 CUDA; overhead and paths use about half)")
    p.add_argument("--budget-s", type=float, default=None, help="cap for the whole run (default 420 CPU, 270 CUDA)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 128; --quick 32)")
    p.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                   help=f"comma-separated subset of {', '.join(SECTIONS)}")
    p.add_argument("--profile", choices=("auto", "on", "off"), default="auto",
                   help="the profile section (auto: on; off drops it)")
    p.add_argument("--compile", action="store_true", help="add the torch.compile section")
    p.add_argument("--compile-models", default=None, help="Steps models for --compile (default: the first pair)")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune-no-cudagraphs")
    p.add_argument("--cuda-graphs", action="store_true", help="add the CUDA graphs section (CUDA only)")
    p.add_argument("--graphs-models", default=None,
                   help="Steps models for --cuda-graphs, of those measured (default: the micro ones and "
                        f"{', '.join(n for n in GRAPHS_DEFAULT if 'micro' not in n)})")
    p.add_argument("--probe-n", type=int, default=None, help="probe training rows (default 50000; --quick 10000)")
    p.add_argument("--probe-d", type=int, default=None, help="probe feature dim (default 768; --quick 256)")
    p.add_argument("--probe-classes", type=int, default=10)
    p.add_argument("--attr-images", type=int, default=None, help="images attributed (default 32; --quick 8)")
    p.add_argument("--ig-steps", type=int, default=32)
    p.add_argument("--attr-model", default=None, help="micro Steps model for attribution (default: first micro)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one per core)")
    p.add_argument("--tag", default=None, help="output name suffix: bench-<device>-<tag>.json/.md")
    p.add_argument("--no-track", action="store_true", help="do not log an MLflow run")
    return p.parse_args(argv)


def make_setup(args: argparse.Namespace) -> Setup:
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
        card = torch.cuda.get_device_name(device)
        name = slug(card)
    else:
        card = f"CPU, {cpu_cores()} cores, {torch.get_num_threads()} torch threads"
        name = f"cpu-{cpu_cores()}cores"
    budget = args.budget_s or (270.0 if cuda else 420.0)
    return Setup(device=device, slug=name, card=card, dtype="bf16 autocast" if cuda else "fp32",
                 batch=args.batch or (32 if args.quick and not cuda else 128),
                 repeats=args.repeats or ((2 if cuda else 3) if args.quick else (3 if cuda else 7)),
                 target_s=0.15 if cuda else 0.3, warmup=2 if cuda else 1, deadline=_T0 + budget, quick=args.quick)


def main(argv=None) -> dict:
    global _T0
    _T0 = time.perf_counter()
    args = parse_args(argv)
    setup = make_setup(args)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise SystemExit(f"unknown section(s) {', '.join(bad)}; allowed: {', '.join(SECTIONS)}")
    if args.profile == "off" and "profile" in sections:
        sections.remove("profile")
    if args.profile == "on" and "profile" not in sections:
        sections.append("profile")
    if args.compile and "compile" not in sections:
        sections.append("compile")
    if args.cuda_graphs and "graphs" not in sections:
        sections.append("graphs")
    names = resolve_models(args.models, setup)
    compile_names = resolve_models(args.compile_models, setup) if args.compile_models else names[:1]
    graph_names = resolve_models(args.graphs_models, setup) if args.graphs_models else \
        [n for n in names if n in GRAPHS_DEFAULT]
    notes: list[str] = []
    if "graphs" in sections and not setup.cuda:
        sections.remove("graphs")
        notes.append("graphs: CUDA graphs need a CUDA device; skipped")
    probe_n = args.probe_n or (10000 if args.quick else 50000)
    probe_d = args.probe_d or (256 if args.quick else 768)
    budget = setup.deadline - _T0
    import timm

    rep: dict[str, Any] = {
        "device": setup.slug, "tag": slug(args.tag) if args.tag else None, "card": setup.card, "cuda": setup.cuda,
        "dtype": setup.dtype,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__, "timm": timm.__version__,
        "cuda_version": torch.version.cuda,
        "settings": {"models": names, "batch": setup.batch, "repeats": setup.repeats, "budget_s": budget,
                     "quick": setup.quick, "sections": sections, "target_s": setup.target_s,
                     "channels_last_resnet": setup.cuda,
                     "compile_mode": args.compile_mode if "compile" in sections else None,
                     "probe_n": probe_n, "probe_d": probe_d, "ig_steps": args.ig_steps,
                     "threads": torch.get_num_threads()},
        "throughput": [], "overhead": [], "paths": [], "profile": [], "graphs": [], "mfu": {}, "notes": notes,
        "errors": [],
    }
    out = Path(args.out)
    log(f"bench on {setup.card} ({setup.slug}), {setup.dtype}, batch {setup.batch}, {setup.repeats} rounds, "
        f"models {', '.join(names)}, sections {', '.join(sections)}, budget {budget:.0f} s")

    def guarded(section: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # one failing part must not cost the rest of the run
            msg = f"{section}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            rep["errors"].append(msg)
            notes.append(f"error in {msg}")
            log(f"ERROR {msg}")
            traceback.print_exc()
            free(setup.device)
            return None

    # Reserve time for the sections after the pairs; each pair skipped if its estimate does not fit.
    reserve = 0.0
    if "probe" in sections and importlib.util.find_spec("sklearn") is not None:
        reserve += (25.0 if setup.cuda else 40.0) * probe_n * probe_d / (50000 * 768) + 5
    if "attribution" in sections and importlib.util.find_spec("captum") is not None:
        reserve += 15.0 if setup.cuda else 10.0 + 0.8 * (args.attr_images or (8 if args.quick else 32))
    if "compile" in sections:
        reserve += COMPILE_NEED_S["cuda" if setup.cuda else "cpu"] * len(compile_names)

    if not setup.cuda:
        rep["contention_start"] = guarded("contention", lambda: contention(setup))
        c = rep["contention_start"]
        if c:
            log(f"load average {c['load_avg_1m']:.1f} on {c['cores']} cores; a 1M-element add takes "
                f"{c['op_ms_threads']:.2f} ms on {c['threads']} threads vs {c['op_ms_1thread']:.2f} ms on one")
    rep["peak"] = guarded("peak", lambda: matmul_peak(setup))
    if rep["peak"]:
        log(f"matmul peak {rep['peak']['tflops']:.3f} TFLOP/s ({rep['peak']['dtype']} {rep['peak']['n']}^2)")
    pair_s: list[float] = []
    per_pair = {"throughput", "overhead", "paths", "profile", "graphs"} & set(sections)
    for steps_name in names if per_pair else []:
        est = statistics.mean(pair_s) if pair_s else 0.0
        if pair_s and setup.left() - reserve < est:
            note = (f"{steps_name}: skipped, {setup.left():.0f} s left of the budget, {reserve:.0f} s of it kept for "
                    f"the sections after the pairs (a pair took {est:.0f} s on average); raise --budget-s")
            notes.append(note)
            log(note)
            continue
        t_pair = time.perf_counter()
        base_name = BASELINE_OF[steps_name]
        log(f"pair {steps_name} vs {base_name}: building")
        pair = guarded(f"build {steps_name}", lambda: (build(steps_name, setup), build(base_name, setup)))
        if pair is None:
            continue
        s_built, b_built = pair
        if "throughput" in sections:
            r = guarded(f"throughput {steps_name}", lambda: measure_pair(s_built, b_built, setup))
            if r:
                rep["throughput"].append(r)
                peak = (rep.get("peak") or {}).get("tflops")
                if peak:
                    for role, b in (("steps", s_built), ("baseline", b_built)):
                        rep["mfu"][b.name] = 6.0 * b.macs * r["train"]["ips"][role] / (peak * 1e12)
                log(f"throughput {steps_name}: infer {rng(r['infer']['ratio'])} "
                    f"({r['infer']['ips']['steps']:.0f} vs {r['infer']['ips']['baseline']:.0f} img/s), "
                    f"train {rng(r['train']['ratio'])} ({r['train']['ips']['steps']:.0f} vs "
                    f"{r['train']['ips']['baseline']:.0f} img/s)")
        if "overhead" in sections:
            r = guarded(f"overhead {steps_name}", lambda: measure_overhead(s_built, setup))
            if r:
                rep["overhead"].append(r)
                log(f"overhead {steps_name}: infer {100 * r['infer']['overhead']:+.1f}%, "
                    f"train {100 * r['train']['overhead']:+.1f}% (stack vs same blocks on pre-made inputs); wiring "
                    f"alone {100 * r['infer']['wiring_share']:.1f}% / {100 * r['train']['wiring_share']:.1f}% of the "
                    "stack time")
        if "paths" in sections:
            r = guarded(f"paths {steps_name}", lambda: measure_paths(s_built, setup))
            if r:
                rep["paths"].append(r)
                log(f"paths {steps_name}: {rng(r['ratio'])} ({len(r['paths'])} paths)")
        if "profile" in sections:
            rounds = 1 if setup.quick else 2 if setup.cuda else 3
            for r in guarded(f"profile {steps_name}",
                             lambda: measure_profiles([s_built, b_built], setup, rounds)) or []:
                rep["profile"].append(r)
                q = r["train"]
                log(f"profile {r['model']}: fwd+bwd {q['total_ms']:.1f} ms = gemm {q['gemm_ms']:.1f} + attn "
                    f"{q['attn_ms']:.1f} + copy "
                    f"{q['copy_ms']:.1f} + norm {q['norm_ms']:.1f} + other {q['other_ms']:.1f}; inference "
                    f"{r['infer']['total_ms']:.1f} ms")
        if "graphs" in sections and steps_name in graph_names:  # last: make_graphed_callables replaces forward
            r = guarded(f"graphs {steps_name}", lambda: measure_graphs(s_built, b_built, setup))
            if r:
                rep["graphs"].append(r)
                log(f"graphs {steps_name}: infer {rng(r['infer']['ratio'])}, train {rng(r['train']['ratio'])}")
            else:
                sections.remove("graphs")
                notes.append("graphs: stopped after the first failure (a failed capture can leave the device in a "
                             "bad state for the pairs after it)")
        del pair, s_built, b_built
        free(setup.device)
        pair_s.append(time.perf_counter() - t_pair)
        write(rep, out)

    if "probe" in sections:
        if setup.left() > 10:
            rep["probe"] = guarded("probe", lambda: measure_probe(probe_n, probe_d, args.probe_classes, setup, notes))
        else:
            notes.append("probe: skipped, out of budget")
        write(rep, out)
    if "attribution" in sections:
        attr_model = args.attr_model or next((n for n in names if n.endswith("_micro")), MICRO[0])
        if setup.left() > 5:
            n_img = args.attr_images or (8 if args.quick else 32)
            rep["attribution"] = guarded("attribution", lambda: measure_attribution(attr_model, n_img, args.ig_steps,
                                                                                    setup, notes))
            if rep["attribution"]:
                log(f"attribution: IG{args.ig_steps} {rep['attribution']['ips']:.2f} img/s "
                    f"(efficiency {rep['attribution']['efficiency']:.2f})")
        else:
            notes.append("attribution: skipped, out of budget")
        write(rep, out)
    free(setup.device)
    if "compile" in sections:
        rep["compile"] = []
        for steps_name in compile_names:
            need = COMPILE_NEED_S["cuda" if setup.cuda else "cpu"]
            if setup.left() < need:
                notes.append(f"compile {steps_name}: skipped, {setup.left():.0f} s left (needs ~{need:.0f} s)")
                continue
            def partial(res: dict) -> None:
                if not any(c is res for c in rep["compile"]):
                    rep["compile"].append(res)
                write(rep, out)

            r = guarded(f"compile {steps_name}",
                        lambda: measure_compile(steps_name, setup, args.compile_mode, partial))
            if r:
                partial(r)
                log(f"compile {steps_name}: compiles once {r['train']['compiles_once']}/{r['infer']['compiles_once']}, "
                    f"ratio train {rng(r['train']['ratio'])}, infer {rng(r['infer']['ratio'])}")
            free(setup.device)
            write(rep, out)
    if not setup.cuda:
        rep["contention_end"] = guarded("contention", lambda: contention(setup))
        for key in ("contention_start", "contention_end"):
            c = rep.get(key)
            if c and c["slowdown"] > 2:
                notes.append(f"{key.replace('_', ' ')}: the CPU is contended (load average {c['load_avg_1m']:.1f} on "
                             f"{c['cores']} cores; a small parallel op takes {c['slowdown']:.1f}x its one-thread "
                             "time): every op pays for waiting on its threads, which penalises the model with more "
                             "(smaller) ops, the Steps model. Read the CPU-time ratios, or rerun with --threads 1 "
                             "or on a quiet machine.")
    rep["total_s"] = time.perf_counter() - _T0
    stem = write(rep, out)
    log(f"wrote {stem}.json and {stem}.md in {rep['total_s']:.0f} s")
    if not args.no_track:
        run_id = guarded("mlflow", lambda: track(rep, stem, notes))
        if run_id:
            rep["mlflow_run_id"] = run_id
            log(f"MLflow run {run_id} (kind bench)")
        write(rep, out)
    print(markdown(rep), flush=True)
    return rep


if __name__ == "__main__":
    main()
