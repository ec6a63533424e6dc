"""What every bench section shares: the run's settings (`Setup`), interleaved timing, device helpers, and the
models of a pair built and fed the same way.

Every figure is a ratio against a reference timed in the same process: `interleave` runs the sides in
alternating order per round (A B, B A, ...) so drift in the machine's load hits both, and `Timing.ratio` is the
median of the per-round ratios (min, max and best beside it).
"""
from __future__ import annotations

import gc
import importlib
import os
import re
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import WindowAttention
from torch import nn

import models  # registers the models in timm
from models.counting import count_macs, count_params
from models.registry import family_of
from models.sites import site_modules
from probes.runtime import autocast

_T0 = time.perf_counter()


# ------------------------------------------------------------------------------------------------- set-up

@dataclass
class Setup:
    """The run's device and timing settings, shared by every section."""
    device: torch.device
    slug: str          # cpu-2cores | nvidia-h100-80gb-hbm3
    card: str
    dtype: str
    batch: int
    repeats: int
    target_s: float    # seconds per timed block (iterations are calibrated to it)
    warmup: int
    budget_s: float
    deadline: float    # perf_counter() value the run must end by
    quick: bool
    fused_window_attn: bool = False  # Swin: timm's fused (SDPA) window attention in both models of a pair

    @property
    def repeats_secondary(self) -> int:
        """Rounds for the paths section (its effect is small, its cost is not)."""
        return max(min(3, self.repeats), (self.repeats + 1) // 2)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        """Seconds left of the run's budget."""
        return self.deadline - time.perf_counter()


def restart_clock() -> float:
    """Start the run's clock (log timestamps count from here); returns its perf_counter() value."""
    global _T0
    _T0 = time.perf_counter()
    return _T0


def elapsed() -> float:
    """Seconds since the run's clock started."""
    return time.perf_counter() - _T0


def log(msg: str) -> None:
    """Print `msg` with the seconds since the run started."""
    print(f"[{elapsed():7.1f}s] {msg}", flush=True)


def slug(name: str) -> str:
    """`name` lower-case with dashes (results files are named with it): 'NVIDIA H100' -> 'nvidia-h100'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def cpu_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    """Collect garbage and return cached CUDA memory (between pairs and sections)."""
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
        """Images/s of `name` (median round)."""
        return batch / statistics.median(self.wall[name])

    def ms(self, name: str) -> float:
        """Milliseconds per call of `name` (median round)."""
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
    """A model on the bench's device, with what was counted on the CPU before it moved there."""
    name: str
    model: nn.Module
    input_size: tuple[int, ...]
    macs: int            # per image, forward (count_macs)
    params: int
    volume: int          # elements per image written by the residual blocks (sum over blocks of tokens x width)
    channels_last: bool


class Pair(NamedTuple):
    """A Steps model and its baseline, built once and shared by the per-pair sections."""
    steps: Built
    base: Built


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


def fuse_window_attention(model: nn.Module) -> int:
    """Switch every Swin window attention of `model` to timm's fused path (scaled_dot_product_attention with the
    relative-position bias and shift mask as its attention mask: the same function, one kernel where the GPU has
    one); returns how many modules it switched (0 for models without window attention)."""
    mods = [m for m in model.modules() if isinstance(m, WindowAttention)]
    for m in mods:
        m.fused_attn = True
    return len(mods)


def build(name: str, setup: Setup) -> Built:
    """The model on CPU (MACs, params, block volume counted there), then on the device."""
    torch.manual_seed(0)
    kwargs = {"num_classes": 10} if name.endswith("_micro") else {}
    model = models.create_model(name, **kwargs)
    size = tuple(int(v) for v in model.pretrained_cfg["input_size"])
    (macs, volume), params = macs_and_volume(model, size), count_params(model)
    channels_last = setup.cuda and family_of(name) == "resnet"
    if setup.fused_window_attn:
        fuse_window_attention(model)
    model = model.to(setup.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Built(name, model, size, macs, params, volume, channels_last)


def batch_for(built: Built, setup: Setup, batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random batch (images, labels) for `built`, on the device, in its memory format."""
    g = torch.Generator().manual_seed(1)
    n = batch or setup.batch
    x = torch.randn(n, *built.input_size, generator=g).to(setup.device)
    if built.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, int(built.model.num_classes), (n,), generator=g).to(setup.device)
    return x, y


def inferer(model: nn.Module, x: torch.Tensor, device: torch.device) -> Callable[[], Any]:
    """One inference forward of `x` under inference_mode and autocast."""
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
