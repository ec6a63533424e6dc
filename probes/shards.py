"""Sharded feature caches: extraction split over processes (torchrun), memory-mapped shards, resumable.

`extract_shards(model, ds, sites, ...)` writes the pooled features of `sites` (raw sites of `models.sites`, as
`probes.features`) over `ds` into a directory of shards, one file per (shard, site). Shard i holds the examples
[i * shard_size, (i + 1) * shard_size): fixed contiguous index ranges that do not depend on the number of
processes, each run in the same batches from its own start, so 1 and N processes write byte-identical files.
Under torchrun (`torch.distributed` initialised) rank r extracts shards r, r + W, r + 2W, ...; after a barrier
rank 0 writes ``manifest.json`` (shapes, dtype, every file's sha256) and every rank opens the result.

Files use the single-array cache format of `probes.features` (magic line, JSON header with key, shape, dtype,
nbytes, sha256, then the raw payload), so a shard is read with `np.memmap` at the payload offset: nothing is
unpickled. A shard file that exists and passes its checksum is finished: an interrupted extraction resumes from
the finished shards and recomputes only the others. A file failing a check is deleted and rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from probes.choices import DTYPES
from probes.runtime import batches, forward_pass

__all__ = ["ShardedArray", "extract_shards", "open_shards", "shard_dir", "MANIFEST"]

MANIFEST = "manifest.json"
_MAGIC = b"STEPSLAB-FEATURES-1\n"  # the same format as probes.features' single-array cache
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardedArray:
    """One site's features over the whole dataset, as memory-mapped shards in index order (read-only).

    `chunks()` yields the shards one at a time (what an out-of-core solver streams); `load()` concatenates them
    into one in-memory array; `rows(lo, hi)` reads a contiguous range.
    """
    parts: tuple[np.ndarray, ...]
    shape: tuple[int, ...]
    dtype: np.dtype
    view: Callable[[np.ndarray], np.ndarray] | None = None  # a channel selection applied chunk by chunk

    def select(self, fn: Callable[[np.ndarray], np.ndarray]) -> "ShardedArray":
        """The same rows with `fn` (a channel selection, channels last) applied lazily to each chunk."""
        prev = self.view
        both = fn if prev is None else (lambda a: fn(prev(a)))
        probe = both(np.zeros((0, *self.shape[1:]), self.dtype) if self.view is None else
                     np.zeros((0, *self.parts[0].shape[1:]), self.parts[0].dtype))
        return ShardedArray(self.parts, (self.shape[0], *probe.shape[1:]), probe.dtype, both)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def chunks(self) -> Iterator[np.ndarray]:
        """The shards in index order (memory-mapped: only the pages touched are read)."""
        for p in self.parts:
            yield p if self.view is None else self.view(p)

    def load(self) -> np.ndarray:
        """The whole array in memory."""
        parts = list(self.chunks())
        return np.concatenate(parts) if parts else np.empty(self.shape, self.dtype)

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) (copied from the shards that hold them)."""
        out, start = [], 0
        for p in self.parts:
            a, b = max(lo - start, 0), min(hi - start, len(p))
            if a < b:
                out.append(p[a:b] if self.view is None else self.view(p[a:b]))
            start += len(p)
        return np.concatenate(out) if out else np.empty((0, *self.shape[1:]), self.dtype)


def shard_dir(root: Path, key: str) -> Path:
    """The directory of one sharded cache under `root`."""
    return Path(root) / "shards" / key[:40]


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _dist()[1] > 1:
        torch.distributed.barrier()


def _file(site: str, i: int) -> str:
    return f"{site}.{i:06d}.feat"


def _write(path: Path, arr: np.ndarray, header: dict) -> str:
    """Write one array atomically (temp file + os.replace); returns its payload's sha256."""
    payload = np.ascontiguousarray(arr).tobytes()
    digest = hashlib.sha256(payload).hexdigest()
    head = {**header, "shape": list(arr.shape), "dtype": str(arr.dtype), "nbytes": len(payload), "sha256": digest}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".feat")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC + json.dumps(head, sort_keys=True).encode() + b"\n")
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # a killed writer leaves a temp file, never a half shard under the real name
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest


def _open(path: Path, key: str, sha256: str | None = None, verify: bool = True) -> np.ndarray | None:
    """The shard's payload as a read-only memmap, or None when missing or failing a check (then deleted)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_MAGIC))
            line = f.readline(1 << 20)
    except FileNotFoundError:
        return None
    try:
        if head != _MAGIC or not line.endswith(b"\n"):
            raise ValueError("bad magic or header")
        header = json.loads(line)
        offset = len(_MAGIC) + len(line)
        if header["key"] != key or path.stat().st_size - offset != header["nbytes"]:
            raise ValueError("key or size mismatch")
        if sha256 is not None and header["sha256"] != sha256:
            raise ValueError("checksum differs from the manifest")
        shape = tuple(header["shape"])
        arr = np.memmap(path, dtype=np.dtype(header["dtype"]), mode="r", offset=offset, shape=shape) \
            if header["nbytes"] else np.empty(shape, np.dtype(header["dtype"]))
        if verify and hashlib.sha256(memoryview(arr).cast("B") if arr.size else b"").hexdigest() != header["sha256"]:
            raise ValueError("checksum mismatch")
        return arr
    except (ValueError, KeyError, TypeError) as exc:
        _log.warning("feature shard %s is corrupt (%s); rebuilding it", path, exc)
        path.unlink(missing_ok=True)
        return None


def _shard_batches(ds: Any, lo: int, hi: int, batch_size: int, device: torch.device, workers: int
                   ) -> Iterator[torch.Tensor]:
    """Normalised images of examples [lo, hi), in order: the streaming loader when `ds` has one, else `batches`."""
    if hasattr(ds, "loader"):  # a streaming dataset: its loader over exactly this index range, in order
        for images, _, _ in ds.loader(batch_size, shuffle=False, seed=0, workers=workers, sampler=range(lo, hi)):
            yield images.to(device, non_blocking=True)
    else:
        yield from (images for images, _, _ in batches(ds.subset(np.arange(lo, hi)), batch_size, shuffle=False,
                                                       device=device))


def open_shards(directory: Path, *, verify: bool = True) -> dict[str, ShardedArray] | None:
    """The sharded cache in `directory` as site -> ShardedArray, or None when its manifest is missing or any
    shard fails a check (size, key, sha256 against the manifest). `verify=False` skips hashing the payloads."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
    except (FileNotFoundError, ValueError):
        return None
    out = {}
    for site, info in manifest["sites"].items():
        parts = []
        for shard in manifest["shards"]:
            f = shard["files"][site]
            arr = _open(Path(directory) / f["file"], manifest["key"], f["sha256"], verify)
            if arr is None:
                (Path(directory) / MANIFEST).unlink(missing_ok=True)
                return None
            parts.append(arr)
        out[site] = ShardedArray(tuple(parts), tuple(info["shape"]), np.dtype(info["dtype"]))
    return out


def extract_shards(model: nn.Module, ds: Any, sites: Sequence[str], *, directory: Path, key: str,
                   pool_fn: Callable[[torch.Tensor], torch.Tensor], shard_size: int = 4096, batch_size: int = 256,
                   device: torch.device = torch.device("cpu"), dtype: str = "float32", workers: int = 0,
                   meta: dict | None = None, on_shard: Callable[[int], None] | None = None,
                   check: Callable[[str, np.ndarray], None] | None = None) -> dict[str, ShardedArray]:
    """Extract `sites` over `ds` into the sharded cache `directory` (module docstring), this process's shards
    only under torchrun, resuming from finished shards; returns every site's ShardedArray.

    `key` identifies the cache (model weights, data, pool, dtype, precision: see `probes.features`);
    `pool_fn` turns a site tensor into [B, C] or [B, T, C]; `on_shard(i)` is called after shard i is written
    (progress, or a stop hook in tests); `check(site, arr)` may raise on a bad shard (non-finite features).
    `ds` is a `LabeledImages` or a streaming dataset with `loader(..., sampler=...)`.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    directory = Path(directory)
    found = open_shards(directory)
    if found is not None and set(sites) <= set(found):
        return {s: found[s] for s in sites}
    rank, world = _dist()
    directory.mkdir(parents=True, exist_ok=True)
    n, sites = len(ds), sorted(sites)
    bounds = [(lo, min(lo + shard_size, n)) for lo in range(0, n, shard_size)]
    header = {"key": key, **(meta or {})}
    mine = [i for i in range(len(bounds)) if i % world == rank]
    todo = [i for i in mine if any(_open(directory / _file(s, i), key) is None for s in sites)]
    was_training = model.training
    model.eval().to(device)
    target = getattr(torch, dtype)
    try:
        with tqdm(total=sum(bounds[i][1] - bounds[i][0] for i in todo), desc=f"features rank {rank}/{world}",
                  unit="img", leave=False) as bar:
            for i in todo:
                lo, hi = bounds[i]
                parts: dict[str, dict[int, torch.Tensor]] = {s: {} for s in sites}

                def write(site: str, start: int, pooled: torch.Tensor) -> None:  # noqa: B023 - used at once
                    parts[site][start] = pooled.float().cpu().to(target)

                forward_pass(model, _shard_batches(ds, lo, hi, batch_size, device, workers), sites, pool_fn, write,
                             device, bar.update)
                for s in sites:
                    arr = torch.cat([parts[s][k] for k in sorted(parts[s])]).numpy()
                    if len(arr) != hi - lo:
                        raise RuntimeError(f"shard {i}: the loader gave {len(arr)} examples, expected {hi - lo}")
                    if check is not None:
                        check(s, arr)
                    _write(directory / _file(s, i), arr, {**header, "site": s, "shard": i, "start": lo, "stop": hi})
                if on_shard is not None:
                    on_shard(i)
    finally:
        model.train(was_training)
    _barrier()  # every rank's shards are on disk before rank 0 lists them
    if rank == 0:
        _write_manifest(directory, key, n, shard_size, bounds, sites, header)
    _barrier()
    found = open_shards(directory)
    if found is None:
        raise RuntimeError(f"sharded feature cache {directory} failed its checks right after it was written")
    return {s: found[s] for s in sites}


def _write_manifest(directory: Path, key: str, n: int, shard_size: int, bounds: list[tuple[int, int]],
                    sites: list[str], header: dict) -> None:
    shards, shapes = [], {}
    for i, (lo, hi) in enumerate(bounds):
        files = {}
        for s in sites:
            path = directory / _file(s, i)
            with open(path, "rb") as f:
                f.read(len(_MAGIC))
                head = json.loads(f.readline(1 << 20))
            files[s] = {"file": path.name, "sha256": head["sha256"], "nbytes": head["nbytes"]}
            shapes[s] = (head["shape"][1:], head["dtype"])
        shards.append({"index": i, "start": lo, "stop": hi, "files": files})
    manifest = {"version": 1, **header, "n": n, "shard_size": shard_size,
                "sites": {s: {"shape": [n, *shapes[s][0]], "dtype": shapes[s][1]} for s in sites},
                "shards": shards}
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    os.replace(tmp, directory / MANIFEST)
