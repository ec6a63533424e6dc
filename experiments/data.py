"""Image datasets with a fine and a coarse label, held in memory as uint8 tensors.

Every dataset yields (image, fine, coarse), so an analysis can ask whether a site of the network carries the
abstract answer (coarse) or the detail (fine within coarse).

    fashion_mnist   10 fine / 4 coarse (tops, bottoms, footwear, bag), 1x28x28, offline from the Debian package
                    `dataset-fashion-mnist` (IDX files), else the Hugging Face hub.
    cifar10         10 fine / 2 coarse (vehicles, animals), 3x32x32, via `datasets` (disk folder or hub).
    cifar100        100 fine / 20 coarse (the dataset's superclasses), 3x32x32, via `datasets`.
    imagefolder     `data_dir/<split>/<class>/*.jpg`, resized to a square; coarse groups from `data_dir/coarse.json`.
    hierarchy       generated, with a known answer: coarse = silhouette shape (a global factor), fine = shape x
                    texture (a local factor, invisible once the image is blurred).
    imagenet        `data_dir/train/<wnid>/*` and `data_dir/val/<wnid>/*` (the "test" split), or the Hugging Face
                    `imagenet-1k` layout (save_to_disk, or `data/train-*.parquet` / `validation-*.parquet`);
                    class ids and order from timm's imagenet_synsets.txt, coarse groups from WordNet 3.0
                    (experiments.wordnet; data option `coarse`: depthN or entity13), 224 px.

`open_dataset` is what training reads: image folders, imagenet and saved Hugging Face datasets stream
(`experiments.streaming.StreamingImages`, decoded in DataLoader workers, memory flat in the number of images);
Fashion-MNIST, CIFAR and hierarchy stay in memory, which is faster at 28-32 px and gives the same numbers as
before. `load_dataset` always returns everything in memory (probes and attribution read it).

`load_dataset` returns a `LabeledImages` (`probes.runtime`, with `batches`, which iterates it fast from the
in-memory tensors); `augment_batch` does random translation and flip on a whole batch. Nothing here writes files.
"""
from __future__ import annotations

import gzip
import io
import json
import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from experiments.options import DATA_MODES, DATASETS
from probes.runtime import DataError, LabeledImages, batches  # the container and its batching, shared with probes/

__all__ = [
    "DATASETS", "SPLITS", "DataError", "LabeledImages", "load_dataset", "open_dataset", "materialize",
    "load_recorded", "check_input",
    "augment_batch", "batches", "FASHION_MNIST_DIR", "make_hierarchy",
]

SPLITS: tuple[str, ...] = ("train", "test")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist puts the files

FASHION_FINE = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                "Ankle boot"]
FASHION_COARSE = ["tops", "bottoms", "footwear", "bag"]
FASHION_FINE_TO_COARSE = [0, 1, 0, 1, 0, 2, 0, 2, 3, 2]

CIFAR10_FINE = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_COARSE = ["vehicles", "animals"]
CIFAR10_FINE_TO_COARSE = [0, 0, 1, 1, 1, 1, 1, 1, 0, 0]

CIFAR100_FINE = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger",
    "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
]
CIFAR100_COARSE = [
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "large_omnivores_and_herbivores",
    "medium_mammals", "non-insect_invertebrates", "people", "reptiles", "small_mammals", "trees",
    "vehicles_1", "vehicles_2",
]
CIFAR100_FINE_TO_COARSE = [
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
]

HIERARCHY_SHAPES = ["disk", "square", "triangle", "cross"]
HIERARCHY_TEXTURES = ["hstripes", "vstripes", "checker", "diagonal"]

# Fixed normalisation constants: the train-split statistics, used for every split so train and test are
# normalised alike. imagefolder uses ImageNet's (timm's IMAGENET_DEFAULT_MEAN/STD).
_STATS = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
_OPTIONS = {  # keyword options each dataset accepts; anything else is a typo worth reporting
    "fashion_mnist": (), "cifar10": (), "cifar100": (), "imagefolder": ("img_size", "channels"),
    "hierarchy": ("n", "img_size", "channels", "period"), "imagenet": ("img_size", "coarse"),
}
STREAMED = ("imagefolder", "imagenet")  # streamed by default (mode "auto"); the rest stays in memory


def _choices(values: Sequence[str]) -> str:
    return ", ".join(values)


# ---------------------------------------------------------------------------------------------------- loading

def load_dataset(name: str, split: str = "train", *, data_dir: str | None = None, limit: int | None = None,
                 seed: int = 0, **options: Any) -> LabeledImages:
    """Load one split of a dataset into memory.

    Args:
        name: one of DATASETS.
        split: "train" or "test".
        data_dir: where the files are (see each dataset in the module docstring); None for the default.
        limit: keep a class-stratified (by fine label), seed-determined subset of this many examples.
        seed: picks the `limit` subset; for `hierarchy` also the generated images (train and test differ).
        options: per dataset: imagefolder `img_size` (64), `channels` (3, or 1 for greyscale); hierarchy `n`
            (train 4000, test 1000),
            `img_size` (28), `channels` (1), `period` (texture period in pixels, 4).

    Raises DataError for an unknown name, split or option, or data that is missing or does not parse.
    """
    _check_args(name, split, limit, seed, options)
    if name == "fashion_mnist":
        return _load_fashion_mnist(split, data_dir, limit, seed)
    if name in ("cifar10", "cifar100"):
        return _load_cifar(name, split, data_dir, limit, seed)
    if name == "imagefolder":
        return _load_imagefolder(split, data_dir, limit, seed, **options)
    if name == "imagenet":
        return materialize(open_dataset(name, split, data_dir=data_dir, limit=limit, seed=seed, **options))
    return _load_hierarchy(split, limit, seed, **options)


def data_location(name: str, data_dir: str | None) -> str | None:
    """Where a dataset's files come from, as recorded in MLflow's dataset inputs: the folder given, Debian's
    Fashion-MNIST folder, the Hugging Face hub id for CIFAR without a folder, None for generated data."""
    if name == "hierarchy":
        return None
    if data_dir:
        return str(Path(data_dir).resolve())
    return {"fashion_mnist": FASHION_MNIST_DIR, "cifar10": "https://huggingface.co/datasets/uoft-cs/cifar10",
            "cifar100": "https://huggingface.co/datasets/uoft-cs/cifar100"}.get(name)


def open_dataset(name: str, split: str = "train", *, data_dir: str | None = None, limit: int | None = None,
                 seed: int = 0, mode: str = "auto", **options: Any):
    """One split for training: a `StreamingImages` (decoded on the fly) or a `LabeledImages` (in memory).

    `mode` "auto" streams `STREAMED` datasets and keeps the others in memory (so Fashion-MNIST and hierarchy
    train exactly as they always did); "stream" also streams CIFAR and saved Hugging Face datasets; "memory"
    loads everything into memory (not imagenet). Same arguments and errors as `load_dataset`.
    """
    if mode not in DATA_MODES:
        raise DataError(f"unknown data mode {mode!r}; choose one of: {_choices(DATA_MODES)}")
    stream = mode == "stream" or (mode == "auto" and name in STREAMED)
    if not stream:
        if name == "imagenet":
            raise DataError("imagenet is only streamed; use --data-mode auto or stream")
        return load_dataset(name, split, data_dir=data_dir, limit=limit, seed=seed, **options)
    if name in ("fashion_mnist", "hierarchy") and not (name == "fashion_mnist" and data_dir):
        raise DataError(f"{name} is held in memory only (28 px: faster that way); use --data-mode auto or memory")
    _check_args(name, split, limit, seed, options)
    if name == "imagefolder":
        ds = _stream_imagefolder(split, data_dir, **options)
    elif name == "imagenet":
        ds = _stream_imagenet(split, data_dir, **options)
    else:
        ds = _stream_hf(name, split, data_dir)
    idx = _stratified(ds.fine, limit, seed)
    return ds if idx is None else ds.subset(idx)


def _check_args(name: str, split: str, limit: int | None, seed: int, options: dict) -> None:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {_choices(DATASETS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of: {_choices(SPLITS)}")
    unknown = sorted(set(options) - set(_OPTIONS[name]))
    if unknown:
        allowed = _choices(_OPTIONS[name]) if _OPTIONS[name] else "none"
        raise DataError(f"unknown option {unknown[0]!r} for dataset {name!r}; allowed: {allowed}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise DataError(f"limit must be a positive integer or None, got {limit!r}")
    if not isinstance(seed, int) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")


def materialize(ds) -> LabeledImages:
    """A streamed dataset decoded into memory (uint8, resized and centre-cropped as `imagefolder` does)."""
    images = np.empty((len(ds), ds.in_chans, ds.img_size, ds.img_size), np.uint8)
    for i in range(len(ds)):
        im = _resize_crop(ds.read(i), ds.img_size).convert("L" if ds.in_chans == 1 else "RGB")
        arr = np.asarray(im, dtype=np.uint8)
        images[i] = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return _make(images, ds.fine, None, ds.name, ds.split, ds.fine_names, ds.coarse_names, ds.fine_to_coarse,
                 (ds.mean, ds.std))


def load_recorded(info: Mapping[str, Any], split: str, *, dataset: str | None = None, data_dir: str | None = None,
                  limit: int | None = None, seed: int = 0) -> LabeledImages:
    """One split of the data a frozen model was trained on, as its card (model_info) records it: dataset,
    options, and data_dir where that folder exists here. `data_dir` points elsewhere (the same data moved, or
    another machine). A different `dataset` loads that one with its defaults: the recorded options belong to the
    recorded dataset."""
    name = dataset or info.get("dataset")
    if not name:
        raise DataError("the frozen model records no training dataset; give --dataset")
    if name != info.get("dataset"):
        return load_dataset(name, split, data_dir=data_dir, limit=limit, seed=seed)
    if data_dir is None:
        recorded = info.get("data_dir")
        data_dir = recorded if recorded and Path(recorded).is_dir() else None
        if recorded and data_dir is None and name in ("imagefolder",):
            raise DataError(f"the model was trained on {name} in {recorded!r}, which does not exist here; pass "
                            "--data-dir with that data")
    return load_dataset(name, split, data_dir=data_dir, limit=limit, seed=seed, **(info.get("data_options") or {}))


def check_input(info: Mapping[str, Any], ds: LabeledImages, model_name: str) -> None:
    """Refuse data whose images do not fit the frozen model: compared with the input size its card records
    (the model as trained, e.g. 3 channels after an RGB image folder), not the registered default config."""
    want = info.get("input_size") or ([info["in_chans"], info["img_size"], info["img_size"]]
                                      if info.get("in_chans") and info.get("img_size") else None)
    have = list(ds.images.shape[1:])
    if want and [int(v) for v in want] != have:
        raise DataError(f"dataset {ds.name} has {'x'.join(map(str, have))} images; this frozen {model_name} takes "
                        f"{'x'.join(map(str, want))} (the data it was trained on)")


def _stratified(fine: np.ndarray, limit: int | None, seed: int) -> np.ndarray | None:
    """Indices (sorted) of a seed-determined subset of `limit` examples keeping the class proportions.

    Largest-remainder rounding, so the counts per class differ from the exact proportion by less than one.
    Returns None when no subset is needed.
    """
    if limit is None or limit >= len(fine):
        return None
    rng = np.random.default_rng([seed, 7])  # a stream of its own, so `limit` never shifts other draws
    classes, counts = np.unique(fine, return_counts=True)
    quota = counts * (limit / len(fine))
    take = np.floor(quota).astype(np.int64)
    rest = limit - int(take.sum())
    take[np.argsort(-(quota - take), kind="stable")[:rest]] += 1
    picked = [rng.permutation(np.flatnonzero(fine == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def _make(images: np.ndarray, fine: np.ndarray, coarse: np.ndarray | None, name: str, split: str,
          fine_names: list[str], coarse_names: list[str], fine_to_coarse: list[int],
          stats: tuple[Sequence[float], Sequence[float]]) -> LabeledImages:
    fine = np.asarray(fine, dtype=np.int64)
    if coarse is None:
        coarse = np.asarray(fine_to_coarse, dtype=np.int64)[fine]
    images = np.require(images, np.uint8, ["C", "W"])  # IDX arrays are read-only views of the file bytes
    return LabeledImages(torch.from_numpy(images), torch.from_numpy(fine),
                         torch.from_numpy(np.asarray(coarse, dtype=np.int64)), fine_names=fine_names,
                         coarse_names=coarse_names, fine_to_coarse=fine_to_coarse, name=name, split=split,
                         mean=stats[0], std=stats[1])


# Fashion-MNIST ---------------------------------------------------------------------------------------------

def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (gzip or plain), checking magic number and size."""
    try:
        raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DataError(f"{path} is corrupt or truncated ({type(e).__name__}: {e})") from None
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:4] != bytes([0, 0, 0x08, ndim]):
        raise DataError(f"{path} is not an IDX file of {ndim}-d unsigned bytes (magic {raw[:4].hex() or 'missing'},"
                        f" expected 000008{ndim:02x})")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    if len(raw) != header + int(np.prod(dims)):
        raise DataError(f"{path} is truncated or corrupt: header says {dims} = {header + int(np.prod(dims))} bytes,"
                        f" file has {len(raw)}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for p in (folder / f"{stem}.gz", folder / stem):
        if p.is_file():
            return p
    return None


def _load_fashion_mnist(split: str, data_dir: str | None, limit: int | None, seed: int) -> LabeledImages:
    meta = (FASHION_FINE, FASHION_COARSE, FASHION_FINE_TO_COARSE, _STATS["fashion_mnist"])
    folder = Path(data_dir or FASHION_MNIST_DIR)
    prefix = "train" if split == "train" else "t10k"
    img_path = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
    lab_path = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    if img_path and lab_path:
        images, fine = _read_idx(img_path, 3), _read_idx(lab_path, 1)
        if len(images) != len(fine):
            raise DataError(f"{img_path} has {len(images)} images but {lab_path} has {len(fine)} labels")
        if fine.max(initial=0) >= len(FASHION_FINE):
            raise DataError(f"{lab_path} has label {int(fine.max())}, allowed 0..{len(FASHION_FINE) - 1}")
        idx = _stratified(fine, limit, seed)
        if idx is not None:
            images, fine = images[idx], fine[idx]
        return _make(images[:, None], fine, None, "fashion_mnist", split, *meta)
    if data_dir is not None:
        # An explicit folder without IDX files may still be a `datasets` folder; a missing one is a typo,
        # never a reason to download.
        if not folder.is_dir():
            raise DataError(f"data_dir {str(folder)!r} does not exist")
        ds = _hf_from_disk(folder, split, "fashion_mnist")
    elif folder.is_dir():
        raise DataError(f"{folder} lacks {prefix}-images-idx3-ubyte.gz or {prefix}-labels-idx1-ubyte.gz;"
                        f" reinstall dataset-fashion-mnist (apt) or pass --data-dir")
    else:
        ds = _hf_from_hub("zalando-datasets/fashion_mnist", split, "fashion_mnist",
                          hint="install dataset-fashion-mnist (apt) or pass --data-dir with a copy")
    return _from_hf(ds, "fashion_mnist", split, "image", "label", None, 1, limit, seed, *meta)


# CIFAR through `datasets` ------------------------------------------------------------------------------------

def _hub_reachable(timeout: float = 3.0) -> str | None:
    """None when the Hugging Face hub answers a TCP connect within `timeout`, else why not. Skipped (None) with
    HF_HUB_OFFLINE set (datasets then reads its local cache) or behind a proxy (the proxy decides)."""
    import os
    import socket
    from urllib.parse import urlsplit

    if os.environ.get("HF_HUB_OFFLINE") or any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy",
                                                                             "ALL_PROXY", "all_proxy")):
        return None
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}: {e.strerror or type(e).__name__}"
    return None


def _hf_from_hub(repo: str, split: str, name: str, hint: str):
    import datasets

    # datasets retries an unreachable hub for half a minute; one quick connect says the same at once.
    down = _hub_reachable()
    if down is not None:
        raise DataError(f"cannot load {name!r}: the Hugging Face hub is unreachable ({down}); {hint}, or set "
                        "HF_HUB_OFFLINE=1 to use a copy in the local Hugging Face cache")
    try:
        return datasets.load_dataset(repo, split=split)
    except Exception as e:  # offline, hub down, no such repo: all the same to the user
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"cannot load {name!r} from the Hugging Face hub ({repo}: {msg}); {hint}") from None


def _hf_from_disk(folder: Path, split: str, name: str):
    """A `save_to_disk` DatasetDict at `folder`, a Dataset at `folder/<split>`, or parquet files of the split."""
    import datasets

    def from_disk(path: Path):
        try:
            return datasets.load_from_disk(str(path))
        except Exception as e:
            raise DataError(f"cannot read {name!r} from {str(path)!r}: {str(e).splitlines()[0]}") from None

    if (folder / "dataset_dict.json").is_file():
        dd = from_disk(folder)
        if split not in dd:
            raise DataError(f"{str(folder)!r} has no split {split!r}; it has: {_choices(list(dd))}")
        return dd[split]
    if (folder / split / "dataset_info.json").is_file() or (folder / split / "state.json").is_file():
        return from_disk(folder / split)
    # Parquet as laid out on the hub (`<split>-00000-of-00001.parquet`) or under `<split>/`. Read with pyarrow
    # rather than load_dataset("parquet"), which would write an arrow cache.
    files = sorted(p for p in folder.rglob("*.parquet") if p.name.startswith(split) or p.parent.name == split)
    if files:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pa.concat_tables([pq.read_table(p) for p in files])
        except Exception as e:
            raise DataError(f"cannot read parquet files of {name!r} in {str(folder)!r}: {e}") from None
        return datasets.Dataset(table)
    raise DataError(f"{str(folder)!r} holds no {name!r} data for split {split!r}: expected a save_to_disk folder"
                    f" (dataset_dict.json, or {split}/) or {split}*.parquet files")


def _load_cifar(name: str, split: str, data_dir: str | None, limit: int | None, seed: int) -> LabeledImages:
    if name == "cifar10":
        meta = (CIFAR10_FINE, CIFAR10_COARSE, CIFAR10_FINE_TO_COARSE, _STATS[name])
        repo, fine_col, coarse_col = "uoft-cs/cifar10", "label", None
    else:
        meta = (CIFAR100_FINE, CIFAR100_COARSE, CIFAR100_FINE_TO_COARSE, _STATS[name])
        repo, fine_col, coarse_col = "uoft-cs/cifar100", "fine_label", "coarse_label"
    if data_dir is not None:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise DataError(f"data_dir {str(folder)!r} does not exist")
        ds = _hf_from_disk(folder, split, name)
    else:
        ds = _hf_from_hub(repo, split, name, hint="pass --data-dir with a save_to_disk or parquet copy")
    return _from_hf(ds, name, split, "img", fine_col, coarse_col, 3, limit, seed, *meta)


def _from_hf(ds, name: str, split: str, img_col: str, fine_col: str, coarse_col: str | None, channels: int,
             limit: int | None, seed: int, fine_names: list[str], coarse_names: list[str],
             fine_to_coarse: list[int], stats) -> LabeledImages:
    """Labels, then the stratified subset, then decode only the images kept."""
    for col in (img_col, fine_col, coarse_col):
        if col is not None and col not in ds.column_names:
            raise DataError(f"{name}/{split}: missing column {col!r}; columns present: {_choices(ds.column_names)}")
    # Arrow format hands back the stored image structs {bytes, path} undecoded, so we decode one at a time
    # and can name the index of a bad one.
    table = ds.with_format("arrow")[:]
    labels = {}
    for col in (fine_col, coarse_col):
        if col is None:
            continue
        arr = table.column(col).to_numpy()
        if not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"{name}/{split}: column {col!r} holds {arr.dtype}, expected integer class indices")
        labels[col] = arr.astype(np.int64)
    fine = labels[fine_col]
    if len(fine) and (fine.min() < 0 or fine.max() >= len(fine_names)):
        raise DataError(f"{name}/{split}: column {fine_col!r} has values outside 0..{len(fine_names) - 1}")
    idx = _stratified(fine, limit, seed)
    keep = np.arange(len(fine)) if idx is None else idx
    column = table.column(img_col)
    images = None
    for start in range(0, len(keep), 2048):  # a chunk at a time: the whole column as Python objects is big
        chunk = keep[start:start + 2048]
        for j, (i, item) in enumerate(zip(chunk.tolist(), column.take(chunk).to_pylist()), start):
            arr = _decode(item, channels, f"{name}/{split}: image {i}")
            if images is None:
                images = np.empty((len(keep), *arr.shape), np.uint8)
            elif arr.shape != images.shape[1:]:
                raise DataError(f"{name}/{split}: image {i} is {arr.shape[1:]}, expected {images.shape[2:]} like"
                                f" image {int(keep[0])}")
            images[j] = arr
    if images is None:
        raise DataError(f"{name}/{split}: no examples")
    coarse = labels[coarse_col][keep] if coarse_col else None
    return _make(images, fine[keep], coarse, name, split, fine_names, coarse_names, fine_to_coarse, stats)


def _decode(item: Any, channels: int, what: str, size: int | None = None) -> np.ndarray:
    """A stored image (struct {bytes, path}, raw bytes or a path) -> uint8 [C, H, W]."""
    from PIL import Image

    try:
        if isinstance(item, dict):
            item = item.get("bytes") or item.get("path")
        src = io.BytesIO(item) if isinstance(item, (bytes, bytearray)) else item
        with Image.open(src) as im:
            if size is not None:
                im.draft("RGB", (size, size))  # JPEG decodes at a reduced scale: much faster for big photos
                im = _resize_crop(im, size)
            im = im.convert("L" if channels == 1 else "RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as e:
        raise DataError(f"{what} does not decode ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                        ) from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _resize_crop(im, size: int):
    """Resize the short side to `size` and centre-crop a square, keeping the aspect ratio (as timm eval does)."""
    from PIL import Image

    w, h = im.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    im = im.convert("RGB").resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


# ImageFolder -------------------------------------------------------------------------------------------------

_IMG_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _load_imagefolder(split: str, data_dir: str | None, limit: int | None, seed: int,
                      img_size: int = 64, channels: int = 3) -> LabeledImages:
    """`data_dir/<split>/<class>/*` loaded with PIL, RGB (or greyscale with `channels` 1), short side resized to
    `img_size` and centre-cropped.

    Classes are the sorted folder names of the train split (so train and test share indices). Coarse groups come
    from `data_dir/coarse.json`, {"class": "group", ...}; without that file each class is its own coarse group.
    """
    if data_dir is None:
        raise DataError("imagefolder needs data_dir (a folder with train/<class>/ and test/<class>/)")
    if not isinstance(img_size, int) or img_size < 1:
        raise DataError(f"img_size must be a positive integer, got {img_size!r}")
    if channels not in (1, 3):
        raise DataError(f"imagefolder option channels must be 1 (greyscale) or 3 (RGB), got {channels!r}")
    folder, classes, coarse_names, fine_to_coarse = _folder_classes(data_dir, split)
    files, fine = [], []
    for k, c in enumerate(classes):
        found = sorted(p for p in (folder / c).glob("*") if p.suffix.lower() in _IMG_EXT) if (folder / c).is_dir() else []
        files += found
        fine += [k] * len(found)
    if not files:
        raise DataError(f"imagefolder: no images ({', '.join(sorted(_IMG_EXT))}) under {str(folder)!r}")
    fine = np.asarray(fine, np.int64)
    idx = _stratified(fine, limit, seed)
    keep = np.arange(len(fine)) if idx is None else idx
    images = np.stack([_decode(str(files[i]), channels, f"imagefolder: {files[i]}", img_size)
                       for i in keep.tolist()])
    mean, std = _STATS["imagefolder"]
    if channels == 1:  # ImageNet's statistics averaged over the colours (as the luma of a grey image)
        mean, std = (float(np.mean(mean)),), (float(np.mean(std)),)
    return _make(images, fine[keep], None, "imagefolder", split, classes, coarse_names, fine_to_coarse,
                 (mean, std))


def _folder_classes(data_dir: str, split: str) -> tuple[Path, list[str], list[str], list[int]]:
    """`data_dir/<split>`, its classes (sorted folder names of the train split) and coarse groups from
    `data_dir/coarse.json` (each class its own group without it)."""
    root, folder = Path(data_dir), Path(data_dir) / split
    if not folder.is_dir():
        raise DataError(f"imagefolder: {str(folder)!r} does not exist")
    ref = root / "train" if (root / "train").is_dir() else folder
    classes = sorted(p.name for p in ref.iterdir() if p.is_dir())
    extra = sorted({p.name for p in folder.iterdir() if p.is_dir()} - set(classes))
    if not classes:
        raise DataError(f"imagefolder: {str(ref)!r} has no class folders")
    if extra:
        raise DataError(f"imagefolder: class {extra[0]!r} in {str(folder)!r} is not in {str(ref)!r}")
    groups_path = root / "coarse.json"
    if groups_path.is_file():
        try:
            groups = json.loads(groups_path.read_text())
            assert isinstance(groups, dict)
        except Exception:
            raise DataError(f"{str(groups_path)!r} is not a JSON object mapping class -> coarse group") from None
        missing = [c for c in classes if c not in groups]
        if missing:
            raise DataError(f"{str(groups_path)!r} has no coarse group for class {missing[0]!r}")
        coarse_names = sorted({str(groups[c]) for c in classes})
        fine_to_coarse = [coarse_names.index(str(groups[c])) for c in classes]
    else:
        coarse_names, fine_to_coarse = list(classes), list(range(len(classes)))
    return folder, classes, coarse_names, fine_to_coarse


def _check_size(img_size: Any, channels: Any = 3) -> None:
    if not isinstance(img_size, int) or img_size < 1:
        raise DataError(f"img_size must be a positive integer, got {img_size!r}")
    if channels not in (1, 3):
        raise DataError(f"imagefolder option channels must be 1 (greyscale) or 3 (RGB), got {channels!r}")


def _stream_imagefolder(split: str, data_dir: str | None, img_size: int = 64, channels: int = 3):
    """`imagefolder` streamed: the same classes, coarse groups and normalisation as `_load_imagefolder`."""
    from experiments.streaming import StreamingImages, folder_source

    if data_dir is None:
        raise DataError("imagefolder needs data_dir (a folder with train/<class>/ and test/<class>/)")
    _check_size(img_size, channels)
    folder, classes, coarse_names, fine_to_coarse = _folder_classes(data_dir, split)
    read, keys, fine = folder_source(str(folder), classes)
    if not keys:
        raise DataError(f"imagefolder: no images ({', '.join(sorted(_IMG_EXT))}) under {str(folder)!r}")
    mean, std = _STATS["imagefolder"]
    if channels == 1:
        mean, std = (float(np.mean(mean)),), (float(np.mean(std)),)
    return StreamingImages(read, keys, fine, name="imagefolder", split=split, fine_names=classes,
                           coarse_names=coarse_names, fine_to_coarse=fine_to_coarse, img_size=img_size,
                           in_chans=channels, mean=mean, std=std)


def _stream_imagenet(split: str, data_dir: str | None, img_size: int = 224, coarse: str = "depth5"):
    """ImageNet-1k streamed from `train/` + `val/` WordNet-id folders or the Hugging Face imagenet-1k layout;
    labels in timm's imagenet_synsets.txt order, coarse groups from WordNet (`coarse`, experiments.wordnet)."""
    from experiments import wordnet
    from experiments.streaming import StreamingImages, folder_source, hf_source

    if data_dir is None:
        raise DataError("imagenet needs --data-dir: a folder with train/ and val/ of WordNet-id folders (n01440764/"
                        " ...), or the Hugging Face imagenet-1k files")
    _check_size(img_size)
    wordnet.check_grouping(coarse)
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data_dir {str(root)!r} does not exist")
    synsets = wordnet.imagenet_synsets()
    folder = root / ("train" if split == "train" else "val")
    if (root / "train").is_dir() and any(p.is_dir() for p in (root / "train").iterdir()) and folder.is_dir():
        present = {p.name for p in folder.iterdir() if p.is_dir()}
        unknown = sorted(present - set(synsets))
        if unknown:
            raise DataError(f"imagenet: folder {unknown[0]!r} in {str(folder)!r} is not an ImageNet-1k class id; "
                            "allowed: the 1,000 WordNet ids of timm's imagenet_synsets.txt (n01440764 ...)")
        # Classes present in train/, in the standard label order (the full 1,000 on real ImageNet).
        train_classes = {p.name for p in (root / "train").iterdir() if p.is_dir()}
        classes = [c for c in synsets if c in train_classes]
        read, keys, fine = folder_source(str(folder), classes)
        where = str(folder)
    else:
        hf_split = "train" if split == "train" else "validation"
        classes = synsets
        read, keys, fine = hf_source(_hf_imagenet(root, hf_split), "image", "label", f"imagenet/{hf_split}")
        where = f"{root} ({hf_split})"
    if not keys:
        raise DataError(f"imagenet: no images under {where}")
    groups = wordnet.grouping(classes, coarse)
    mean, std = _STATS["imagenet"]
    return StreamingImages(read, keys, fine, name="imagenet", split=split, fine_names=groups["fine_names"],
                           coarse_names=groups["coarse_names"], fine_to_coarse=groups["fine_to_coarse"],
                           img_size=img_size, in_chans=3, mean=mean, std=std, info={"hierarchy": groups})


def _hf_imagenet(root: Path, split: str):
    """The Hugging Face imagenet-1k files of `split`: a save_to_disk copy, or the hub's parquet shards
    (`data/<split>-*.parquet`), which `datasets` converts once into its memory-mapped arrow cache
    (HF_DATASETS_CACHE; about the size of the parquet files) so that nothing is held in memory."""
    import datasets

    files = sorted(str(p) for p in root.rglob(f"{split}-*.parquet"))
    if not files:
        return _hf_from_disk(root, split, "imagenet")
    try:
        return datasets.load_dataset("parquet", data_files={split: files}, split=split)
    except Exception as e:  # noqa: BLE001 - unreadable shards: one line
        raise DataError(f"cannot read imagenet parquet files in {str(root)!r}: {str(e).splitlines()[0]}") from None


def _stream_hf(name: str, split: str, data_dir: str | None):
    """CIFAR or Fashion-MNIST from a saved Hugging Face dataset, read row by row (`--data-mode stream`)."""
    from experiments.streaming import StreamingImages, hf_source

    if data_dir is None:
        raise DataError(f"streaming {name} needs --data-dir with a save_to_disk copy")
    meta = {"cifar10": ("img", "label", CIFAR10_FINE, CIFAR10_COARSE, CIFAR10_FINE_TO_COARSE, 3, 32),
            "cifar100": ("img", "fine_label", CIFAR100_FINE, CIFAR100_COARSE, CIFAR100_FINE_TO_COARSE, 3, 32),
            "fashion_mnist": ("image", "label", FASHION_FINE, FASHION_COARSE, FASHION_FINE_TO_COARSE, 1, 28)}
    img_col, label_col, fine_names, coarse_names, f2c, chans, size = meta[name]
    read, keys, fine = hf_source(_hf_from_disk(Path(data_dir), split, name), img_col, label_col, f"{name}/{split}")
    mean, std = _STATS[name]
    return StreamingImages(read, keys, fine, name=name, split=split, fine_names=fine_names,
                           coarse_names=coarse_names, fine_to_coarse=f2c, img_size=size, in_chans=chans, mean=mean,
                           std=std)


# Hierarchy (generated, known answer) --------------------------------------------------------------------------

def make_hierarchy(n: int, rng: np.random.Generator, img_size: int = 28, channels: int = 1,
                   period: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Generate `n` images (uint8 [n, C, S, S]) and fine labels: fine = shape * 4 + texture.

    Shape (disk, square, triangle, cross) is the global factor: a large silhouette with jittered centre and
    size. Texture (horizontal, vertical, checker, diagonal stripes of `period` pixels, half on) is the local
    factor, drawn independently of shape, with a random phase. Every texture fills half of each period x period
    block, so averaging over such blocks (blur, downsampling) erases it while the silhouette stays. Brightness,
    contrast and pixel noise vary per image. Classes are balanced (n // 16 each, the rest spread).
    """
    s, p, h = img_size, period, period // 2
    fine = rng.permutation(np.arange(n) % 16)
    shape, texture = fine // 4, fine % 4
    f32 = np.float32
    yy, xx = np.mgrid[0:s, 0:s].astype(f32) + 0.5  # pixel centres
    cy, cx = (s / 2 + s * rng.uniform(-0.1, 0.1, (2, n, 1, 1))).astype(f32)
    r = (s * rng.uniform(0.30, 0.42, (n, 1, 1))).astype(f32)
    masks = np.empty((n, s, s), bool)
    for k in range(4):  # a loop over the 4 shapes, each vectorised over its images
        sel = shape == k
        u, v = (xx - cx[sel]) / r[sel], (yy - cy[sel]) / r[sel]  # shape-local coordinates, radius 1
        au, av = np.abs(u), np.abs(v)
        if k == 0:    # disk, area ~3.1 r^2
            m = u * u + v * v <= 1.0
        elif k == 1:  # square, ~2.9 r^2
            m = np.maximum(au, av) <= 0.85
        elif k == 2:  # triangle, apex up, ~2.0 r^2
            m = (v >= -0.95) & (v <= 0.85) & (au <= (v + 0.95) * (1.1 / 1.8))
        else:         # cross, ~2.5 r^2
            m = ((au <= 0.38) & (av <= 1.0)) | ((av <= 0.38) & (au <= 1.0))
        masks[sel] = m
    # Texture bank for every phase: [4 textures, p, p phases, s, s]; each image picks one slice.
    iy, ix = np.mgrid[0:s, 0:s]
    ph = np.arange(p)[:, None, None, None]
    ty, tx = iy + ph, ix + ph.transpose(1, 0, 2, 3)
    bank = np.stack([
        np.broadcast_to((ty % p) < h, (p, p, s, s)),
        np.broadcast_to((tx % p) < h, (p, p, s, s)),
        ((ty // h) + (tx // h)) % 2 == 0,
        ((ty + tx) % p) < h,
    ])
    py, px = rng.integers(0, p, (2, n))
    pattern = bank[texture, py, px].astype(f32)
    bg = rng.uniform(0.0, 0.25, (n, 1, 1)).astype(f32)
    level = rng.uniform(0.55, 0.85, (n, 1, 1)).astype(f32)
    contrast = rng.uniform(0.25, 0.5, (n, 1, 1)).astype(f32)
    img = np.where(masks, level + contrast * (pattern - 0.5), bg)[:, None]
    if channels > 1:
        img = img * rng.uniform(0.6, 1.0, (n, channels, 1, 1)).astype(f32)  # a random tint, not a label
    img = img + 0.04 * rng.standard_normal((n, channels, s, s), dtype=f32)
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8), fine.astype(np.int64)


def _load_hierarchy(split: str, limit: int | None, seed: int, n: int | None = None, img_size: int = 28,
                    channels: int = 1, period: int = 4) -> LabeledImages:
    n = (4000 if split == "train" else 1000) if n is None else n
    for key, val, low in (("n", n, 1), ("img_size", img_size, 8), ("channels", channels, 1), ("period", period, 2)):
        if not isinstance(val, int) or val < low:
            raise DataError(f"hierarchy option {key} must be an integer >= {low}, got {val!r}")
    if period % 2 or period > img_size:
        raise DataError(f"hierarchy option period must be even and <= img_size ({img_size}), got {period}")
    opts = dict(img_size=img_size, channels=channels, period=period)
    images, fine = make_hierarchy(n, np.random.default_rng([seed, SPLITS.index(split)]), **opts)
    # Normalisation from a fixed reference sample: the same for both splits and every seed.
    ref = make_hierarchy(1024, np.random.default_rng([0, 99]), **opts)[0].astype(np.float64) / 255
    stats = tuple(ref.mean(axis=(0, 2, 3))), tuple(ref.std(axis=(0, 2, 3)))
    idx = _stratified(fine, limit, seed)
    if idx is not None:
        images, fine = images[idx], fine[idx]
    fine_names = [f"{a}/{b}" for a in HIERARCHY_SHAPES for b in HIERARCHY_TEXTURES]
    return _make(images, fine, None, "hierarchy", split, fine_names, list(HIERARCHY_SHAPES),
                 [k // 4 for k in range(16)], stats)


# ----------------------------------------------------------------------------------------------- iteration

def augment_batch(images: torch.Tensor, generator: torch.Generator, *, pad: int = 2, flip: bool = True,
                  padding_mode: str = "reflect") -> torch.Tensor:
    """Random translation (pad, then a random crop back to H x W) and horizontal flip of a float batch.

    One gather for the whole batch, no loop over images. Draws, in order: row offsets, column offsets, flips
    (B each) from `generator`, on the generator's device, so the same generator state gives the same output.
    `padding_mode` is "reflect" or "zeros" (zero in normalised units, i.e. the mean colour).
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise TypeError(f"augment_batch expects a float batch [B, C, H, W], got {images.dtype} {tuple(images.shape)}")
    if padding_mode not in ("reflect", "zeros"):
        raise ValueError(f"padding_mode must be 'reflect' or 'zeros', got {padding_mode!r}")
    b, _, h, w = images.shape
    if not 0 <= pad < min(h, w):
        raise ValueError(f"pad must be in [0, {min(h, w)}) for {h}x{w} images, got {pad}")
    gdev = generator.device
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=gdev).to(images.device)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=gdev).to(images.device)
    flips = (torch.rand(b, generator=generator, device=gdev) < 0.5).to(images.device) if flip else None
    if pad:
        mode = "constant" if padding_mode == "zeros" else "reflect"
        images = F.pad(images, (pad, pad, pad, pad), mode=mode)
    ar_h = torch.arange(h, device=images.device)
    ar_w = torch.arange(w, device=images.device)
    rows = oy[:, None] + ar_h                                              # [B, H]
    cols = ox[:, None] + (torch.where(flips[:, None], w - 1 - ar_w, ar_w) if flip else ar_w)  # [B, W]
    bi = torch.arange(b, device=images.device)[:, None, None]
    # Advanced indices around a slice put their broadcast dims first: [B, H, W, C].
    return images[bi, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
