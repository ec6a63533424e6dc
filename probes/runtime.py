"""What instruments and jobs share: the labelled-image container, batching over it, device and precision, the
one batched extraction pass (`forward_pass`) and the CPU's thread policy for jobs side by side (`side_by_side`).

Instruments (`probes.*`) take a model and a `LabeledImages` (uint8 images with fine and coarse labels, in
memory) or tensors; jobs (`experiments.*`) build them from datasets and call the instruments. Both need the
same batching, device choice and autocast, and rooms import only downwards (experiments -> probes -> models),
so these live here, in the lower of the two rooms. Nothing here loads a dataset, logs or prints.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

from models.errors import UserError
from models.sites import forward_paths

__all__ = ["DataError", "LabeledImages", "batches", "resolve_device", "autocast", "bar_disabled", "side_by_side",
           "blas_controller", "MAX_SIDE_BY_SIDE", "forward_pass"]


class DataError(UserError):
    """User-facing data problem; message is one line naming the bad value and what is allowed."""


class LabeledImages(torch.utils.data.Dataset):
    """Images (uint8 [N, C, H, W]) with fine and coarse labels (int64 [N]) and their class names.

    `__getitem__` returns (float image [C, H, W] normalised with `mean`/`std`, fine, coarse).
    """

    def __init__(self, images: torch.Tensor, fine: torch.Tensor, coarse: torch.Tensor, *,
                 fine_names: Sequence[str], coarse_names: Sequence[str], fine_to_coarse: Sequence[int],
                 name: str, split: str, mean: Sequence[float], std: Sequence[float]):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise TypeError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        n, c = images.shape[:2]
        fine, coarse = torch.as_tensor(fine, dtype=torch.int64), torch.as_tensor(coarse, dtype=torch.int64)
        if fine.shape != (n,) or coarse.shape != (n,):
            raise TypeError(f"fine and coarse must be [{n}], got {tuple(fine.shape)} and {tuple(coarse.shape)}")
        if len(fine_to_coarse) != len(fine_names) or len(mean) != c or len(std) != c:
            raise TypeError("fine_to_coarse must have one entry per fine class, mean and std one per channel")
        f2c = torch.as_tensor(list(fine_to_coarse), dtype=torch.int64)
        if n and (fine.min() < 0 or fine.max() >= len(fine_names)):
            raise DataError(f"{name}/{split}: fine label out of range 0..{len(fine_names) - 1}")
        # A coarse label that disagrees with the fine one means the two columns use different class orders.
        if n and not torch.equal(f2c[fine], coarse):
            bad = int((f2c[fine] != coarse).nonzero()[0])
            raise DataError(f"{name}/{split}: example {bad} has fine {int(fine[bad])} but coarse {int(coarse[bad])},"
                            f" expected coarse {int(f2c[fine[bad]])}")
        self.images, self.fine, self.coarse = images, fine, coarse
        self.fine_names, self.coarse_names = list(fine_names), list(coarse_names)
        self.fine_to_coarse = [int(k) for k in fine_to_coarse]
        self.name, self.split = name, split
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._norm_key, self._norm = None, None

    @property
    def num_fine(self) -> int:
        return len(self.fine_names)

    @property
    def num_coarse(self) -> int:
        return len(self.coarse_names)

    @property
    def in_chans(self) -> int:
        return self.images.shape[1]

    @property
    def img_size(self) -> int:
        return self.images.shape[2]

    @property
    def fingerprint(self) -> str:
        """sha256 hex[:16] of name, split, sizes and the bytes of images and labels: same data, same value."""
        h = hashlib.sha256(f"{self.name}|{self.split}|{tuple(self.images.shape)}".encode())
        for t in (self.images, self.fine, self.coarse):
            h.update(np.ascontiguousarray(t.detach().cpu().numpy()).data)  # no copy when already contiguous
        return h.hexdigest()[:16]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return self.normalise(self.images[i]), int(self.fine[i]), int(self.coarse[i])

    def __repr__(self) -> str:
        return (f"LabeledImages({self.name}/{self.split}: {len(self)} x {tuple(self.images.shape[1:])}, "
                f"{self.num_fine} fine / {self.num_coarse} coarse)")

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> LabeledImages:
        """The examples at `indices` (ints or a bool mask), with the same metadata and normalisation."""
        idx = torch.as_tensor(np.asarray(indices) if not torch.is_tensor(indices) else indices)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        idx = idx.long().flatten()
        return LabeledImages(self.images[idx], self.fine[idx], self.coarse[idx], fine_names=self.fine_names,
                             coarse_names=self.coarse_names, fine_to_coarse=self.fine_to_coarse, name=self.name,
                             split=self.split, mean=self.mean, std=self.std)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [..., C, H, W] (one image or a batch, any device) -> float32, scaled to [0, 1] and normalised."""
        if images.dtype != torch.uint8:
            raise TypeError(f"normalise expects uint8 images, got {images.dtype}")
        key = (images.device, self.mean, self.std)
        if self._norm_key != key:  # keep the constants on the device: no host-to-device copy per batch
            self._norm = (torch.tensor(self.mean, device=images.device).view(-1, 1, 1),
                          torch.tensor(self.std, device=images.device).view(-1, 1, 1))
            self._norm_key = key
        mean, std = self._norm
        return (images.float() / 255.0 - mean) / std


def batches(ds: LabeledImages, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
            device: str | torch.device = "cpu", drop_last: bool = False
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (normalised float images [B, C, H, W], fine [B], coarse [B]) on `device`.

    The uint8 tensors move to `device` once per call and are normalised there per batch. With `shuffle`, the
    order comes from `generator` (torch's global RNG when None, as DataLoader does).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(ds)
    images, fine, coarse = (t.to(device, non_blocking=True) for t in (ds.images, ds.fine, ds.coarse))
    if shuffle:
        gdev = generator.device if generator is not None else "cpu"
        order = torch.randperm(n, generator=generator, device=gdev).to(images.device)
    else:
        order = None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            sl = slice(start, min(start + batch_size, n))
            yield ds.normalise(images[sl]), fine[sl], coarse[sl]
        else:
            idx = order[start:start + batch_size]
            yield ds.normalise(images[idx]), fine[idx], coarse[idx]


def resolve_device(spec: str | torch.device, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:<local_rank> when CUDA is present, else cpu; 'cpu', 'cuda', 'cuda:N' as given.

    Raises UserError (one line) for an unknown device or CUDA where there is none."""
    if str(spec) == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"unknown device {spec!r}; allowed: auto, cpu, cuda, cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unknown device {spec!r}; allowed: auto, cpu, cuda, cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {spec!r}: CUDA is not available here; use --device cpu or auto")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def autocast(device: torch.device, cache: bool = True):
    """bf16 autocast on CUDA, nothing on CPU (fp32). `cache=False` for CUDA-graph capture."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


def bar_disabled(progress: bool | None) -> bool | None:
    """tqdm's `disable`: None (the default) shows bars on a terminal only."""
    return None if progress is None else not progress


@functools.lru_cache(maxsize=1)
def blas_controller() -> ThreadpoolController:
    """The thread pools threadpoolctl finds: numpy's BLAS, OpenMP (found once: each lookup reads
    /proc/self/maps)."""
    return ThreadpoolController()


MAX_SIDE_BY_SIDE = 4  # jobs at once: the gain is on few cores; each job holds its own activations or copies


@contextlib.contextmanager
def side_by_side(n_jobs: int, device: torch.device | str = "cpu") -> Iterator[int]:
    """Independent jobs side by side on the CPU: yields how many to run at once (at most torch's threads,
    `n_jobs` and `MAX_SIDE_BY_SIDE`; run the jobs from that many Python threads), with torch's threads shared
    out among them (one each on up to 7 cores), and OpenMP's and BLAS's too.

    Torch ops release the GIL, so jobs side by side keep every core busy, and on few cores none pays for
    splitting small ops between threads: on 2 cores, two model forwards at once on one thread each ran 720
    images/s where one forward on two threads ran 585 (Steps-DeiT-micro, batch 256), and two probe fits at once
    took 0.79 s where one after the other on two threads took 1.42. Memory grows with the jobs at once (each
    holds its own activations or feature copies), hence the cap. One job, one thread or a GPU: yields 1 and
    changes nothing. Only the calling (main) thread changes the thread settings.
    """
    threads = torch.get_num_threads()
    workers = min(threads, n_jobs, MAX_SIDE_BY_SIDE)
    if workers <= 1 or torch.device(device).type != "cpu":
        yield 1
        return
    per_job = threads // workers
    torch.set_num_threads(per_job)
    try:
        # OpenMP and BLAS (what threadpoolctl finds) to the same share: on 2 cores, with both at one thread a
        # cached probe run took 26 s; with BLAS alone limited (here and in probes.linear.small_blas), 34 s.
        with blas_controller().limit(limits=per_job):
            yield workers
    finally:
        torch.set_num_threads(threads)


def forward_pass(model: torch.nn.Module, batches: Iterable[torch.Tensor], sites: Sequence[str],
                 pool_fn: Callable[[torch.Tensor], torch.Tensor], write: Callable[[str, int, torch.Tensor], None],
                 device: torch.device, on_batch: Callable[[int], None] = lambda n: None) -> None:
    """The one batched extraction pass: `model` (in eval mode, on `device`) over `batches` of normalised images,
    in order; each requested site pooled by `pool_fn` and handed to `write(site, first_row, pooled)`, where
    first_row counts images from the start of `batches`; `on_batch(n_images)` after each batch (progress).

    Inference mode, bf16 autocast on CUDA. On the CPU the batches run side by side, one per job of
    `side_by_side` (`forward_paths` is thread-safe), after the first, alone, so that `write` can allocate on it:
    the same numbers into the same rows. At most two batches a job are in flight (memory stays a few batches);
    on an error or Ctrl-C those in flight finish and no more start.
    """
    def run(start: int, images: torch.Tensor) -> int:
        # inference_mode, not no_grad: no version counters or view tracking on the activations (identical
        # numbers). Both are per thread, as is autocast, so each batch enters them itself.
        with torch.inference_mode(), autocast(device):
            out = forward_paths(model, images, sites)
            for s in sites:
                write(s, start, pool_fn(out[s]))
        return len(images)

    threads = torch.get_num_threads()
    with side_by_side(threads, device) as workers, ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        start = 0
        for images in batches:
            if start == 0 or workers == 1:
                on_batch(run(start, images))
            else:
                pending.append(pool.submit(run, start, images))
                if len(pending) >= 2 * workers:
                    on_batch(pending.popleft().result())
            start += len(images)
        while pending:
            on_batch(pending.popleft().result())
