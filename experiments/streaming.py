"""Image datasets decoded on the fly: memory does not grow with the number of images.

`StreamingImages` holds only the list of examples (file paths, or row numbers of a memory-mapped Hugging Face
dataset) and their labels; each image is read, decoded and transformed when a `DataLoader` worker asks for it.
Folders are read with timm's `create_dataset` (its `ImageDataset`), transforms are timm's `create_transform`
(eval: resize + centre crop; train: the recipe's augmentation, see experiments/train.py).

The interface shared with in-memory data and with the instruments (probes/features.py may take either): a
dataset has ``name, split, fingerprint, fine_names, coarse_names, fine_to_coarse, num_fine, num_coarse,
in_chans, img_size, mean, std, __len__`` and ``loader(batch_size, *, shuffle, seed, rank=0, world_size=1,
workers=0, epoch=0, start=0, drop_last=False)``, an iterable of (normalised float images [B, C, H, W], fine [B],
coarse [B]) on the CPU; without `shuffle` rank r gets examples r, r + world_size, ... in dataset order, unpadded,
so the shards of all ranks hold every example exactly once. `memory_loader` gives a `LabeledImages` the same
method (`loader_of(ds)` picks the right one).
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from probes.runtime import DataError, LabeledImages, batches

__all__ = ["StreamingImages", "folder_source", "hf_source", "memory_loader", "eval_transform", "loader_of"]


def eval_transform(img_size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """timm's eval transform without the crop margin: short side to `img_size`, centre crop, normalise (as
    the in-memory imagefolder loader does, so both give the same pixels up to resampling)."""
    from timm.data import create_transform

    return create_transform(img_size, is_training=False, crop_pct=1.0, interpolation="bilinear",
                            mean=tuple(mean), std=tuple(std))


class StreamingImages(torch.utils.data.Dataset):
    """Examples read and decoded on demand (see the module docstring for the shared interface).

    Args:
        read: index into `keys` -> PIL image (a file path opened, or a row of a memory-mapped dataset decoded).
        keys: one string per example naming it (a relative path or a row number): what `fingerprint` hashes.
        fine: fine label per example; coarse labels are `fine_to_coarse[fine]`.
        transform: PIL image -> float tensor [C, H, W] (default `eval_transform`); `with_transform` swaps it.
        in_chans: 1 (decoded as greyscale) or 3 (RGB).
    `__getitem__` returns (image tensor, fine, coarse). Picklable, so DataLoader workers get a copy.
    """

    def __init__(self, read: Callable[[int], Any], keys: Sequence[str], fine: Sequence[int], *, name: str,
                 split: str, fine_names: Sequence[str], coarse_names: Sequence[str],
                 fine_to_coarse: Sequence[int], img_size: int, in_chans: int, mean: Sequence[float],
                 std: Sequence[float], transform: Callable | None = None, info: dict | None = None):
        self.read, self.keys = read, list(keys)
        self.fine = np.asarray(fine, dtype=np.int64)
        self.fine_names, self.coarse_names = list(fine_names), list(coarse_names)
        self.fine_to_coarse = [int(k) for k in fine_to_coarse]
        self.coarse = np.asarray(self.fine_to_coarse, dtype=np.int64)[self.fine] if len(self.fine) else self.fine
        self.name, self.split, self.img_size, self.in_chans = name, split, int(img_size), int(in_chans)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.transform = transform or eval_transform(self.img_size, self.mean, self.std)
        self.info = dict(info or {})  # extra record for the run (e.g. the WordNet grouping)

    num_fine = property(lambda self: len(self.fine_names))
    num_coarse = property(lambda self: len(self.coarse_names))

    @property
    def fingerprint(self) -> str:
        """sha256 hex[:16] of name, split, image size, example keys and labels (not the image bytes: reading a
        million files to name a dataset would cost an epoch)."""
        h = hashlib.sha256(f"{self.name}|{self.split}|{self.in_chans}x{self.img_size}|{len(self)}".encode())
        h.update("\n".join(self.keys).encode())
        h.update(self.fine.tobytes())
        return h.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        img = self.read(i)
        img = img.convert("L" if self.in_chans == 1 else "RGB")
        return self.transform(img), int(self.fine[i]), int(self.coarse[i])

    def __repr__(self) -> str:
        return (f"StreamingImages({self.name}/{self.split}: {len(self)} x {self.in_chans}x{self.img_size}px, "
                f"{self.num_fine} fine / {self.num_coarse} coarse)")

    def subset(self, indices: Sequence[int] | np.ndarray) -> "StreamingImages":
        """The examples at `indices`, same metadata and transform."""
        idx = np.asarray(indices, dtype=np.int64)
        read = self.read
        return StreamingImages(_Sub(read, idx), [self.keys[i] for i in idx], self.fine[idx], name=self.name,
                               split=self.split, fine_names=self.fine_names, coarse_names=self.coarse_names,
                               fine_to_coarse=self.fine_to_coarse, img_size=self.img_size, in_chans=self.in_chans,
                               mean=self.mean, std=self.std, transform=self.transform, info=self.info)

    def with_transform(self, transform: Callable) -> "StreamingImages":
        """The same examples read through another transform (e.g. the training augmentation)."""
        out = self.subset(np.arange(len(self)))
        out.read, out.transform = self.read, transform
        return out

    def loader(self, batch_size: int, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1,
               workers: int = 0, epoch: int = 0, start: int = 0, drop_last: bool = False,
               sampler: Iterable[int] | None = None) -> torch.utils.data.DataLoader:
        """A DataLoader over this rank's shard, yielding (normalised float images, fine, coarse) on the CPU.

        With `shuffle`: torch's `DistributedSampler` (seeded by `seed`, reshuffled per `epoch`); without: the
        strided shard rank::world_size in dataset order, unpadded (each example on exactly one rank). Skips the
        first `start` batches (a resume mid-epoch); `workers` decoding processes seeded from (seed, epoch, rank).
        `sampler` replaces the sampler (e.g. timm's repeated augmentation)."""
        from torch.utils.data import DataLoader, DistributedSampler

        if sampler is None and not shuffle:
            # Extraction and evaluation: examples rank, rank + world_size, ... (DistributedSampler would pad the
            # last shard with repeats); the shards are disjoint and together hold every example once.
            sampler = range(rank, len(self), world_size)
        elif sampler is None:  # a given sampler is the caller's to set_epoch
            sampler = DistributedSampler(self, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                         drop_last=drop_last)
            sampler.set_epoch(epoch)
        order = list(sampler)
        if drop_last:
            order = order[:len(order) // batch_size * batch_size]
        order = order[start * batch_size:]
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0]))
        return DataLoader(self, batch_size=batch_size, sampler=order, num_workers=workers, generator=g,
                          pin_memory=torch.cuda.is_available(), persistent_workers=False,
                          prefetch_factor=4 if workers else None, drop_last=drop_last)


class _Sub:
    """`read` restricted to `idx` (a picklable closure)."""

    def __init__(self, read: Callable[[int], Any], idx: np.ndarray):
        self.base, self.idx = read, idx

    def __call__(self, i: int) -> Any:
        return self.base(int(self.idx[i]))


class _FolderRead:
    """Open the i-th file (a path relative to `root`) with PIL. One list of relative paths is all a worker holds
    per image (it is also the dataset's `keys`)."""

    def __init__(self, root: str, keys: list[str]):
        self.root, self.keys = root, keys

    def __call__(self, i: int):
        from PIL import Image

        path = f"{self.root}/{self.keys[i]}"
        try:
            with Image.open(path) as im:
                im.load()
                return im
        except Exception as e:  # noqa: BLE001 - named, one line
            raise DataError(f"{path} does not decode ({type(e).__name__}: {e})") from None


def folder_source(folder: str, classes: Sequence[str]) -> tuple[_FolderRead, list[str], np.ndarray]:
    """Files under `folder/<class>/` for `classes` (in that label order), listed by timm's `create_dataset`
    (image extensions, natural sort): (read, keys relative to `folder`, fine labels)."""
    from timm.data import create_dataset

    ds = create_dataset("", root=folder, split="", search_split=False,
                        class_map={c: k for k, c in enumerate(classes)})
    samples = ds.reader.samples
    keys = [str(p)[len(str(folder)):].lstrip("/") for p, _ in samples]
    return _FolderRead(str(folder).rstrip("/"), keys), keys, np.asarray([t for _, t in samples], dtype=np.int64)


class _HFRead:
    """Decode row i's image of a memory-mapped Hugging Face dataset (arrow files stay on disk)."""

    def __init__(self, ds, col: str, what: str):
        self.ds, self.col, self.what = ds.with_format("arrow"), col, what

    def __call__(self, i: int):
        import io

        from PIL import Image

        item = self.ds[int(i)].column(self.col)[0].as_py()
        if isinstance(item, dict):
            item = item.get("bytes") or item.get("path")
        try:
            return Image.open(io.BytesIO(item) if isinstance(item, (bytes, bytearray)) else item)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{self.what}: image {i} does not decode ({type(e).__name__}: {e})") from None


def hf_source(ds, img_col: str, label_col: str, what: str) -> tuple[_HFRead, list[str], np.ndarray]:
    """A Hugging Face dataset's image column read row by row: (read, keys (row numbers), labels)."""
    for col in (img_col, label_col):
        if col not in ds.column_names:
            raise DataError(f"{what}: missing column {col!r}; columns present: {', '.join(ds.column_names)}")
    labels = ds.with_format("arrow")[label_col] if hasattr(ds, "with_format") else ds[label_col]
    labels = np.asarray(labels.to_numpy() if hasattr(labels, "to_numpy") else labels, dtype=np.int64)
    return _HFRead(ds, img_col, what), [str(i) for i in range(len(labels))], labels


class _MemoryLoader:
    """`loader` for an in-memory LabeledImages: `batches` over a DistributedSampler-like strided shard."""

    def __init__(self, ds: LabeledImages):
        self.ds = ds

    def __call__(self, batch_size: int, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1,
                 workers: int = 0, epoch: int = 0, start: int = 0, drop_last: bool = False, sampler=None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        idx = torch.arange(len(self.ds))
        if shuffle:
            idx = torch.randperm(len(self.ds), generator=torch.Generator().manual_seed(seed + epoch))
        idx = idx[rank::world_size]
        if drop_last:
            idx = idx[:len(idx) // batch_size * batch_size]
        return batches(self.ds.subset(idx[start * batch_size:]), batch_size, shuffle=False)


def memory_loader(ds: LabeledImages) -> Callable:
    """The `loader` method of the shared interface, for an in-memory dataset."""
    return _MemoryLoader(ds)


def loader_of(ds: Any) -> Callable:
    """`ds.loader` for a streaming dataset, `memory_loader(ds)` for a LabeledImages."""
    return ds.loader if isinstance(ds, StreamingImages) else memory_loader(ds)
