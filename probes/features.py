"""Features, once: pooled activations of a frozen model over a dataset split, cached on disk.

`extract(model, ds, names)` is the one place feature extraction lives (probes, attribution and figures reuse
it). It runs ONE inference-mode, eval-mode, batched pass (`probes.runtime.forward_pass`, which the sharded
cache shares) per (model, dataset split) for the sites it does not find in the cache, and returns
``name -> float32 array``: ``[N, C]`` for pool ``cls``/``mean``, ``[N, T, C]`` for ``tokens``.

Feature names ("where to probe"). Every site of `models.sites` (``final``, ``blocks.{k}``, ``logits``,
``stages.{s}.steps.{i}.{y_prev,x,y}``) is a feature name, plus these channel selections of a site:

Steps models (n steps in the last stage S, C_i cumulative widths)
    slow_path / fast_path       ``final`` channels [0, C_{n-1}) / [C_{n-1}, C_n) (same as the models.sites sites)
    merge.slow_in               ``stages.S.steps.{n-1}.y_prev``: the last step's slow input y_{n-1}
    merge.fast_in               ``stages.S.steps.{n-1}.x``: the last step's fresh input x_n
    merge.slow_out / .fast_out  the last step's output y_n, channels [0, C_{n-1}) / [C_{n-1}, C_n)
                                (what the last step writes into each channel group, before the final norm)
    blocks.{k}.slow / .fast     block k of step i >= 1 (width C_i) split at C_{i-1}: channels that came from
                                earlier steps vs those that entered at step i. Blocks of a first step and
                                ResNet transition blocks have no split (only ``blocks.{k}``).
Baselines (no paths): the control is the same widths taken from their final representation; widths come
from the paired Steps model (``models.registry.BASELINE_OF``), scaled if the final widths differ.
    matched.contiguous.slow / .fast     ``final`` channels [0, C_{n-1}) / the rest
    matched.random{r}.slow / .fast      a seeded random C_{n-1}-channel subset / its complement (r = 0, 1, ...)
    blocks.{k}.matched.slow / .fast     block k split contiguously at the same fraction C_{n-1}/C_n
A baseline asked for ``slow_path``/``fast_path`` raises a one-line error pointing at the matched split.

Pooling: ``cls`` = the class token (DeiT; an error for models without one), ``mean`` = mean over patch tokens or
spatial positions (prefix tokens excluded), ``tokens`` = patch tokens / spatial positions kept, ``[N, T, C]``
(prefix tokens dropped, Swin/ResNet maps flattened row-major). Sites that are already vectors (``logits``) are
returned as they are.

Cache: one file per site under ``$STEPSLAB_CACHE`` (default ``<$STEPSLAB_HOME or cwd>/.cache/features``), keyed
by the sha256 of the model's state_dict bytes, the dataset fingerprint, the site, pool, dtype and compute precision
(bf16 autocast on CUDA, fp32 on CPU). Files are
written atomically (temp file + os.replace) with a header holding the key, shape, dtype, size and sha256 of the
payload; a file that fails any check is deleted and rebuilt, never used. Non-finite features raise a one-line
`FeatureError` naming the site (and are never cached).

`extract_sharded` is the same pass for data that does not fit in memory or runs under torchrun: each process
extracts its shards into ``<cache>/shards/<key>/`` (memory-mapped shard files, a JSON manifest with checksums,
resumable; see `probes.shards`) and every name comes back as a lazily selected `ShardedArray`.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from models.errors import UserError
from models.registry import BASELINE_OF, create_model
from models.sites import channel_dim, forward_paths, path_split, site_modules
from probes.choices import DTYPES, POOLS
from probes.runtime import LabeledImages, batches, forward_pass, resolve_device
from probes.shards import ShardedArray, extract_shards, shard_dir

__all__ = ["POOLS", "FeatureError", "FeatureSpec", "pool_site", "extract", "extract_sharded", "feature_bytes",
           "feature_specs", "feature_names", "block_features", "paired_steps_model", "model_hash", "cache_dir"]

_MAGIC = b"STEPSLAB-FEATURES-1\n"
_log = logging.getLogger(__name__)


class FeatureError(UserError):
    """A user-facing feature problem (unknown name, pool, non-finite activations); one line."""


@dataclass(frozen=True)
class FeatureSpec:
    """A channel selection of one site: `index` (explicit channels), else [start, stop) of the channel axis.

    Float bounds are fractions of the site's width (used where the width is only known after extraction).
    """
    site: str
    start: int | float = 0
    stop: int | float | None = None
    index: tuple[int, ...] | None = None

    def select(self, arr: np.ndarray) -> np.ndarray:
        """The selected channels of a pooled site array (channels last)."""
        if self.index is not None:
            return arr[..., list(self.index)]
        width = arr.shape[-1]
        lo = round(self.start * width) if isinstance(self.start, float) else self.start
        hi = width if self.stop is None else round(self.stop * width) if isinstance(self.stop, float) else self.stop
        return arr if (lo, hi) == (0, width) else arr[..., lo:hi]


# ------------------------------------------------------------------------------------------ feature names

def model_name_of(model: nn.Module) -> str:
    """The timm / StepsLab name a model was built under (its pretrained_cfg architecture)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


@functools.lru_cache(maxsize=None)
def _steps_widths(steps_name: str) -> tuple[int, int]:
    m = create_model(steps_name, num_classes=1)  # one CPU build; cached, the widths never change
    return int(m.slow_width), int(m.step_widths[-1][-1])


def paired_steps_model(baseline_name: str) -> str | None:
    """The Steps model whose widths a baseline's matched split copies (None when it has no pair)."""
    return next((s for s, b in BASELINE_OF.items() if b == baseline_name), None)


def _matched_widths(model: nn.Module, model_name: str) -> tuple[int, int]:
    """(slow, total) channels of a baseline's final representation, copied from its paired Steps model."""
    steps = paired_steps_model(model_name)
    if steps is None:
        raise FeatureError(f"{model_name}: no paired Steps model to copy slow/fast widths from; allowed baselines: "
                           f"{', '.join(BASELINE_OF.values())}")
    slow, total = _steps_widths(steps)
    width = int(getattr(model, "num_features", total))
    return (slow if width == total else round(slow * width / total)), width


def feature_specs(model: nn.Module, *, model_name: str | None = None, random_splits: int = 3,
                  split_seed: int = 0) -> dict[str, FeatureSpec]:
    """Every feature name of `model` (see the module docstring) mapped to its site and channels."""
    name = model_name or model_name_of(model)
    specs = {site: FeatureSpec(site) for site in site_modules(model)}
    split = path_split(model)
    if split is not None:
        specs["slow_path"] = FeatureSpec("final", 0, split)
        specs["fast_path"] = FeatureSpec("final", split, None)
        stacks = model.steps_stacks()
        s, last = len(stacks) - 1, len(stacks[-1].steps) - 1
        prefix = f"stages.{s}.steps.{last}"
        if last >= 1:
            specs["merge.slow_in"] = FeatureSpec(f"{prefix}.y_prev")
            specs["merge.fast_in"] = FeatureSpec(f"{prefix}.x")
            specs["merge.slow_out"] = FeatureSpec(f"{prefix}.y", 0, split)
            specs["merge.fast_out"] = FeatureSpec(f"{prefix}.y", split, None)
        # Which step each block belongs to: blocks of step i >= 1 split at C_{i-1}.
        step_of = {id(b): (stack.widths, i) for stack in stacks for i, step in enumerate(stack.steps)
                   for b in step.blocks}
        for k, block in enumerate(model.block_modules()):
            widths, i = step_of.get(id(block), (None, 0))
            if i >= 1:
                specs[f"blocks.{k}.slow"] = FeatureSpec(f"blocks.{k}", 0, widths[i - 1])
                specs[f"blocks.{k}.fast"] = FeatureSpec(f"blocks.{k}", widths[i - 1], None)
    elif paired_steps_model(name) is not None:
        slow, width = _matched_widths(model, name)
        specs["matched.contiguous.slow"] = FeatureSpec("final", 0, slow)
        specs["matched.contiguous.fast"] = FeatureSpec("final", slow, None)
        for r in range(random_splits):
            perm = np.random.default_rng([split_seed, r]).permutation(width)
            specs[f"matched.random{r}.slow"] = FeatureSpec("final", index=tuple(sorted(perm[:slow].tolist())))
            specs[f"matched.random{r}.fast"] = FeatureSpec("final", index=tuple(sorted(perm[slow:].tolist())))
        frac = slow / width
        for site in specs.copy():
            if site.startswith("blocks."):
                specs[f"{site}.matched.slow"] = FeatureSpec(site, 0, frac)
                specs[f"{site}.matched.fast"] = FeatureSpec(site, frac, None)
    return specs


def feature_names(model: nn.Module, **kwargs) -> list[str]:
    """Every feature name `extract` accepts for `model` (kwargs as `feature_specs`)."""
    return list(feature_specs(model, **kwargs))


def block_features(model: nn.Module, k: int, *, model_name: str | None = None) -> dict[str, str]:
    """For block k: path label -> feature name (``full`` always; ``slow``/``fast`` or the matched pair)."""
    specs = feature_specs(model, model_name=model_name, random_splits=0)
    if f"blocks.{k}" not in specs:
        n = sum(1 for s in specs if s.count(".") == 1 and s.startswith("blocks."))
        raise FeatureError(f"block index {k} out of range; allowed: 0..{n - 1}")
    out = {"full": f"blocks.{k}"}
    for path, feat in (("slow", f"blocks.{k}.slow"), ("fast", f"blocks.{k}.fast"),
                       ("matched.contiguous.slow", f"blocks.{k}.matched.slow"),
                       ("matched.contiguous.fast", f"blocks.{k}.matched.fast")):
        if feat in specs:
            out[path] = feat
    return out


def _resolve(model: nn.Module, names: Sequence[str], model_name: str, random_splits: int,
             split_seed: int) -> dict[str, FeatureSpec]:
    needed = max([int(n.split(".")[1][6:]) + 1 for n in names if n.startswith("matched.random")
                  and n.split(".")[1][6:].isdigit()] + [random_splits])
    specs = feature_specs(model, model_name=model_name, random_splits=needed, split_seed=split_seed)
    out = {}
    for n in names:
        if n not in specs:
            if n in ("slow_path", "fast_path") or (n.endswith((".slow", ".fast")) and path_split(model) is None):
                raise FeatureError(f"feature {n!r}: {model_name} is a baseline without slow/fast paths; allowed: "
                                   "the matched split of its final channels (matched.contiguous.slow|fast, "
                                   "matched.random{r}.slow|fast)")
            shown = ", ".join(s for s in specs if not s.startswith(("blocks.", "stages.")))
            raise FeatureError(f"unknown feature {n!r} for {model_name}; allowed: {shown}, blocks.{{k}}, "
                               "stages.{s}.steps.{i}.* (see probes.features.feature_names)")
        out[n] = specs[n]
    return out


# ------------------------------------------------------------------------------------------------- cache

def cache_dir() -> Path:
    """$STEPSLAB_CACHE, else <$STEPSLAB_HOME or cwd>/.cache/features."""
    if os.environ.get("STEPSLAB_CACHE"):
        return Path(os.environ["STEPSLAB_CACHE"]).expanduser()
    return Path(os.environ.get("STEPSLAB_HOME") or os.getcwd()).expanduser() / ".cache" / "features"


def model_hash(model: nn.Module) -> str:
    """sha256 of the state_dict: names, dtypes, shapes and raw bytes (same weights, same hash)."""
    h = hashlib.sha256(type(model).__name__.encode())
    for key, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"|{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().data)  # raw bytes, any dtype (bf16 included)
    return h.hexdigest()


def _cache_key(mhash: str, fingerprint: str, site: str, pool: str, dtype: str, compute: str = "fp32") -> str:
    # `compute`: bf16 autocast (CUDA) and fp32 (CPU) give different numbers, so they never share an entry.
    text = json.dumps({"v": 1, "model": mhash, "data": fingerprint, "site": site, "pool": pool, "dtype": dtype,
                       "compute": compute}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _cache_path(key: str) -> Path:
    return cache_dir() / f"{key[:40]}.feat"


def _write_cache(key: str, arr: np.ndarray, meta: dict) -> None:
    payload = np.ascontiguousarray(arr).tobytes()
    header = {"key": key, "shape": list(arr.shape), "dtype": str(arr.dtype), "nbytes": len(payload),
              "sha256": hashlib.sha256(payload).hexdigest(), **meta}
    path = _cache_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".feat")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC + json.dumps(header).encode() + b"\n")
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # readers see the old file or the whole new one, never half of it
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_cache(key: str) -> np.ndarray | None:
    """The cached array, or None on a miss; a file failing any check is deleted (and so rebuilt)."""
    path = _cache_path(key)
    try:
        raw = bytearray(path.read_bytes())
    except FileNotFoundError:
        return None
    try:
        if not raw.startswith(_MAGIC):
            raise ValueError("bad magic")
        end = raw.index(b"\n", len(_MAGIC))
        header = json.loads(raw[len(_MAGIC):end])
        payload = memoryview(raw)[end + 1:]
        if header["key"] != key or len(payload) != header["nbytes"]:
            raise ValueError(f"size {len(payload)} != {header['nbytes']} or key mismatch")
        if hashlib.sha256(payload).hexdigest() != header["sha256"]:
            raise ValueError("checksum mismatch")
        return np.frombuffer(payload, dtype=header["dtype"]).reshape(header["shape"])
    except (ValueError, KeyError, TypeError) as exc:
        _log.warning("feature cache %s is corrupt (%s); rebuilding it", path, exc)
        path.unlink(missing_ok=True)
        return None


# ------------------------------------------------------------------------------------------- extraction

def pool_site(t: torch.Tensor, model: nn.Module, pool: str) -> torch.Tensor:
    """A site tensor -> [B, C] (cls, mean) or [B, T, C] (tokens), channels last, prefix tokens dropped."""
    if t.ndim == 2:  # logits: already one vector per image
        return t
    tokens = t.ndim == 3  # ViT token stream [B, N, C]; 4-d maps are Swin NHWC or ResNet NCHW
    if t.ndim == 4 and channel_dim(model) == 1:
        t = t.movedim(1, -1)
    t = t.flatten(1, -2)
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0) if tokens else 0
    if pool == "cls":
        return t[:, 0]
    return t[:, prefix:].mean(1) if pool == "mean" else t[:, prefix:]


def _check_pool(model: nn.Module, pool: str, model_name: str) -> None:
    if pool not in POOLS:
        raise FeatureError(f"unknown pool {pool!r}; allowed: {', '.join(POOLS)}")
    if pool == "cls" and getattr(model, "cls_token", None) is None:
        raise FeatureError(f"pool 'cls': {model_name} has no class token; allowed: mean, tokens")


def _check_finite(site: str, arr: np.ndarray, model_name: str, pool: str) -> None:
    bad = ~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)
    if bad.any():
        raise FeatureError(f"features at site {site!r} of {model_name} (pool {pool}) are NaN/inf for "
                           f"{int(bad.sum())} of {len(arr)} images; the model produces non-finite activations")


def _forward(model: nn.Module, ds: LabeledImages, sites: list[str], pool: str, batch_size: int,
             device: torch.device, dtype: str, desc: str) -> dict[str, np.ndarray]:
    """`probes.runtime.forward_pass` over `ds` capturing `sites`, pooled, as `dtype` arrays on the CPU."""
    was_training, old_device = model.training, next(model.parameters(), torch.empty(0)).device
    model.eval().to(device)
    parts: dict[str, torch.Tensor] = {}
    target = getattr(torch, dtype)

    def write(site: str, start: int, pooled: torch.Tensor) -> None:
        # Each pooled batch is written once into its rows of one preallocated [N, ...] array (no parts, no final
        # concatenation: half the peak memory); `.float()` and `.to` are no-ops for fp32 on the CPU.
        pooled = pooled.float().to("cpu", target)
        if site not in parts:  # the first batch: forward_pass runs it alone
            parts[site] = torch.empty((len(ds), *pooled.shape[1:]), dtype=target)
        parts[site][start:start + len(pooled)] = pooled

    try:
        with tqdm(total=len(ds), desc=desc, unit="img", leave=False) as bar:
            forward_pass(model, (x for x, _, _ in batches(ds, batch_size, shuffle=False, device=device)), sites,
                         lambda t: pool_site(t, model, pool), write, device, bar.update)
    finally:
        model.to(old_device).train(was_training)
    return {s: p.numpy() for s, p in parts.items()}


def extract(model: nn.Module, ds: LabeledImages, sites: Sequence[str], *, pool: str = "mean",
            batch_size: int = 256, device: str | torch.device = "auto", model_ref: str = "", cache: bool = True,
            dtype: str = "float32", model_name: str | None = None, random_splits: int = 3,
            split_seed: int = 0) -> dict[str, np.ndarray]:
    """Pooled features of `model` over `ds` for each requested feature name (module docstring lists them).

    Sites found in the cache are read from it; the others come from ONE batched inference-mode eval pass
    (bf16 autocast on CUDA) and are cached. `model_ref` is recorded in the cache header (provenance only:
    the key is the weights' hash). `random_splits`/`split_seed` fix the baseline's random matched splits.
    Returns name -> array ([N, C], or [N, T, C] for pool ``tokens``), read-only when it came from the cache.
    """
    name = model_name or model_name_of(model)
    _check_pool(model, pool, name)
    if dtype not in DTYPES:
        raise FeatureError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    if not sites:
        return {}
    specs = _resolve(model, list(sites), name, random_splits, split_seed)
    raw_sites = sorted({s.site for s in specs.values()})
    dev = resolve_device(device)
    compute = "bf16" if dev.type == "cuda" else "fp32"
    mhash = model_hash(model) if cache else ""
    keys = {s: _cache_key(mhash, ds.fingerprint, s, pool, dtype, compute) for s in raw_sites} if cache else {}
    raw = {s: a for s in raw_sites if cache and (a := _read_cache(keys[s])) is not None}
    missing = [s for s in raw_sites if s not in raw]
    if missing:
        fresh = _forward(model, ds, missing, pool, batch_size, dev, dtype,
                         f"features {name} {ds.name}/{ds.split}")
        for s, arr in fresh.items():
            _check_finite(s, arr, name, pool)
            if cache:
                _write_cache(keys[s], arr, {"site": s, "pool": pool, "model": name, "model_ref": model_ref,
                                            "dataset": f"{ds.name}/{ds.split}", "n": len(ds)})
        raw.update(fresh)
    return {n: spec.select(raw[spec.site]) for n, spec in specs.items()}


def extract_sharded(model: nn.Module, ds, sites: Sequence[str], *, pool: str = "mean", batch_size: int = 256,
                    device: str | torch.device = "auto", shard_size: int = 4096, dtype: str = "float32",
                    workers: int = 0, model_ref: str = "", model_name: str | None = None, random_splits: int = 3,
                    split_seed: int = 0, on_shard=None) -> dict[str, ShardedArray]:
    """`extract` into a sharded, memory-mapped cache (see `probes.shards`): under torchrun each process extracts
    its shards; an interrupted run resumes from the finished shards; 1 and N processes write identical files.

    `ds` is a `LabeledImages` or a streaming dataset (one with ``loader``); `shard_size` examples per shard
    (part of the cache key); `on_shard(i)` runs after shard i is written. Returns name -> ShardedArray (the
    channel selection of each name applied chunk by chunk).
    """
    name = model_name or model_name_of(model)
    _check_pool(model, pool, name)
    if dtype not in DTYPES:
        raise FeatureError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    if shard_size < 1:
        raise FeatureError(f"shard size {shard_size}: allowed: an integer >= 1")
    if not sites:
        return {}
    specs = _resolve(model, list(sites), name, random_splits, split_seed)
    raw_sites = sorted({s.site for s in specs.values()})
    dev = resolve_device(device, int(os.environ.get("LOCAL_RANK", 0)))
    compute = "bf16" if dev.type == "cuda" else "fp32"
    # One key for the set of sites: they come from one pass, so they are finished (or not) together.
    key = _cache_key(model_hash(model), ds.fingerprint, ",".join(raw_sites), pool, dtype, compute)
    key = hashlib.sha256(f"{key}|shards|{shard_size}".encode()).hexdigest()
    raw = extract_shards(model, ds, raw_sites, directory=shard_dir(cache_dir(), key), key=key,
                         pool_fn=lambda t: pool_site(t, model, pool), shard_size=shard_size, batch_size=batch_size,
                         device=dev, dtype=dtype, workers=workers, on_shard=on_shard,
                         check=lambda s, a: _check_finite(s, a, name, pool),
                         meta={"pool": pool, "model": name, "model_ref": model_ref,
                               "dataset": f"{ds.name}/{ds.split}", "n": len(ds), "compute": compute})
    return {n: raw[spec.site].select(spec.select) for n, spec in specs.items()}


def feature_bytes(model: nn.Module, ds, sites: Sequence[str], *, pool: str = "mean", dtype: str = "float32",
                  model_name: str | None = None, random_splits: int = 3, split_seed: int = 0) -> int:
    """Bytes the raw sites behind the feature names `sites` take for all of `ds` in memory (as `extract` holds
    them), from one forward pass on one image: what a job compares with its memory budget."""
    name = model_name or model_name_of(model)
    _check_pool(model, pool, name)
    specs = _resolve(model, list(sites), name, random_splits, split_seed)
    raw_sites = sorted({s.site for s in specs.values()})
    if not raw_sites or not len(ds):
        return 0
    was_training, dev = model.training, next(model.parameters(), torch.empty(0)).device
    try:
        with torch.no_grad():
            out = forward_paths(model.eval(), ds[0][0][None].to(dev), raw_sites)
    finally:
        model.train(was_training)
    per = sum(pool_site(out[s], model, pool).numel() for s in raw_sites)
    return per * np.dtype(dtype).itemsize * len(ds)
