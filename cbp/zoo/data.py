"""Datasets and loaders: Fashion-MNIST from IDX files, ImageNet-style image folders.

Every loader goes through a ``DistributedSampler`` (also for one process) so that single-process
and multi-process runs share one code path and see the same global batches.
"""

from __future__ import annotations

import gzip
import itertools
import math
import os
import zlib
from collections import Counter

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from .datadir import DOWNLOAD_DIR, DataError
from .text import load_text, shakespeare_dir

# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "the IDX file format")
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str) -> torch.Tensor:
    """Read an IDX file (plain or gzip, detected from its first bytes) into a native tensor."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == _GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except OSError as e:  # includes gzip.BadGzipFile
        raise DataError(f"cannot read IDX file {path}: {e}") from e
    except (EOFError, zlib.error) as e:
        raise DataError(f"corrupt gzip in IDX file {path}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {path} is truncated (incomplete header)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"IDX file {path} has {len(raw)} bytes, expected {expected} for "
                        f"shape {shape}")
    array = np.frombuffer(raw, dtype=dtype, offset=header).astype(dtype.newbyteorder("="))
    return torch.from_numpy(array.reshape(shape))


# Debian's dataset-fashion-mnist; CBP_FASHION_MNIST_DIR points elsewhere (e.g. a machine without
# the package, given a copy of the four .gz files).
FASHION_MNIST_DIR = os.environ.get("CBP_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
FASHION_MNIST_CLASSES = 10


def _find_idx(directory: str, name: str) -> str | None:
    for candidate in (name, name + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    return None


def _fashion_paths(directory: str, train: bool) -> tuple[str, str] | None:
    stem = "train" if train else "t10k"
    images = _find_idx(directory, f"{stem}-images-idx3-ubyte")
    labels = _find_idx(directory, f"{stem}-labels-idx1-ubyte")
    return (images, labels) if images and labels else None


def _download_fashion_mnist(root: str, train: bool) -> str:
    """Fetch with torchvision (official mirrors) and return the folder with its raw IDX files."""
    import torchvision

    try:
        torchvision.datasets.FashionMNIST(root=root, train=train, download=True)
    except Exception as e:  # network errors come in many types
        raise DataError(f"downloading Fashion-MNIST into {root} failed: {e}") from e
    return os.path.join(root, "FashionMNIST", "raw")


def load_fashion_mnist(data_dir: str | None = None, train: bool = True, limit: int | None = None,
                       download: bool = False) -> TensorDataset:
    """Fashion-MNIST as a TensorDataset: float32 N×1×28×28 (normalised) images, int64 labels.

    Reads Debian's ``dataset-fashion-mnist`` IDX files by default; ``limit`` keeps the first
    ``limit`` images (quick runs and tests).
    """
    directory = data_dir or FASHION_MNIST_DIR
    paths = _fashion_paths(directory, train)
    if paths is None and download:
        directory = _download_fashion_mnist(data_dir or DOWNLOAD_DIR, train)
        paths = _fashion_paths(directory, train)
    if paths is None:
        raise DataError(f"Fashion-MNIST IDX files not found in {directory}: install them with "
                        "`sudo apt-get install dataset-fashion-mnist`, or pass --download to "
                        "fetch them from the official source (needs internet)")
    images, labels = (read_idx(p) for p in paths)
    if images.dtype != torch.uint8 or images.shape[1:] != (28, 28):
        raise DataError(f"{paths[0]} holds {tuple(images.shape)} {images.dtype}, "
                        "expected N×28×28 uint8 images")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{paths[1]} holds {tuple(labels.shape)} labels for {len(images)} images")
    labels = labels.long()
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < FASHION_MNIST_CLASSES:
        raise DataError(f"{paths[1]} has labels outside 0..{FASHION_MNIST_CLASSES - 1}")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = (images.float().div_(255).sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)).unsqueeze(1)
    return TensorDataset(x, labels)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def image_folder(root: str, train: bool, image_size: int = 224):
    """A torchvision ImageFolder with the transforms of the authors' reference code.

    Training: a random crop of 8-100% of the area and aspect ratio 3/4-4/3, resized to
    ``image_size`` (``RandomResizedCrop``), a horizontal flip with probability 1/2, then ImageNet
    mean/std normalisation. Evaluation: the shorter side resized to ``image_size * 256/224`` (256
    for 224), the centre ``image_size`` square cropped, the same normalisation.

    No colour jitter, although paper Sec. 4 names it: the reference's DALI pipeline draws random
    brightness, contrast, saturation and hue and computes a ``ColorTwist`` image, but normalises
    the un-jittered image (``output = self.cmnp(images, ...)`` overwrites the twisted one), so
    its runs - whose accuracies the paper reports - trained without it; we reproduce those runs.
    Likewise the paper says validation images are "resized to 256x256"; the reference resizes the
    shorter side to 256, as here. (The reference resamples with DALI's triangular filter,
    torchvision with antialiased bilinear: a small resampling difference, not a different recipe.)
    """
    from torchvision import datasets, transforms

    if not os.path.isdir(root):
        raise DataError(f"image folder {root} does not exist")
    if train:
        geometry = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    else:
        geometry = [transforms.Resize(round(image_size * 256 / 224)),
                    transforms.CenterCrop(image_size)]
    transform = transforms.Compose(
        [*geometry, transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    try:
        return datasets.ImageFolder(root, transform=transform)
    except FileNotFoundError as e:  # no class folders, or class folders without images
        raise DataError(f"{root} is not an image folder (one subfolder of images per class): "
                        f"{e}") from e


def _spread_over_classes(targets: list[int], limit: int) -> list[int]:
    """Indices of ``limit`` samples taking classes in turn, so a small subset has every class."""
    seen: Counter[int] = Counter()
    turn = []
    for target in targets:
        turn.append(seen[target])
        seen[target] += 1
    order = sorted(range(len(targets)), key=lambda i: (turn[i], targets[i]))
    return order[:limit]


def class_names(dataset: Dataset) -> list[str] | None:
    """The class names of an image folder (through any ``Subset``), None for other datasets."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    classes = getattr(dataset, "classes", None)
    return list(classes) if classes is not None else None


def _listed(names: list[str], at_most: int = 5) -> str:
    more = f" and {len(names) - at_most} more" if len(names) > at_most else ""
    return ", ".join(names[:at_most]) + more


def check_same_classes(expected: list[str] | None, found: list[str] | None, where: str) -> None:
    """Refuse labels that mean other classes: ``found`` (e.g. ``val/``) must list exactly the
    classes of ``expected`` (``train/``, or the checkpoint's), in the same order.

    An image folder numbers its classes by sorted folder name, so one missing or extra folder
    shifts every label after it: accuracy against unrelated classes, or an IndexError late on.
    """
    if expected is None or found is None or list(expected) == list(found):
        return
    missing = [c for c in expected if c not in found]
    extra = [c for c in found if c not in expected]
    details = "; ".join(part for part in (f"lacks {_listed(missing)}" if missing else "",
                                          f"has {_listed(extra)} besides" if extra else "") if part)
    raise DataError(f"{where} does not hold the same classes ({len(found)}) as the training "
                    f"data ({len(expected)}): it {details}; every split needs the same class "
                    "folders")


DATASET_NAMES = ("fashion-mnist", "imagefolder", "shakespeare")
TEXT_DATASETS = ("shakespeare",)  # character-level language modelling (cbp.zoo.text)
TEXT_CONTEXT = 128                # characters per training window


def load_dataset(name: str, data_dir: str | None, train: bool, limit: int | None = None,
                 image_size: int = 224, download: bool = False) -> tuple[Dataset, int, int]:
    """``(dataset, num_classes, in_channels)`` for a dataset name the CLI accepts.

    ``imagefolder`` reads ``data_dir/train`` or ``data_dir/val``; its ``limit`` picks samples
    from all classes in turn (deterministic). ``shakespeare`` gives windows of characters
    (:mod:`cbp.zoo.text`, ``limit`` windows at most) and the vocabulary size as the class count.
    """
    if name == "fashion-mnist":
        dataset = load_fashion_mnist(data_dir, train=train, limit=limit, download=download)
        return dataset, FASHION_MNIST_CLASSES, 1
    if name == "imagefolder":
        if data_dir is None:
            raise DataError("dataset imagefolder needs a data directory with train/ and val/")
        folder = image_folder(os.path.join(data_dir, "train" if train else "val"), train,
                              image_size)
        dataset = folder if limit is None else Subset(folder,
                                                      _spread_over_classes(folder.targets, limit))
        return dataset, len(folder.classes), 3
    if name == "shakespeare":
        dataset = load_text(shakespeare_dir(data_dir, download), train, TEXT_CONTEXT, limit)
        return dataset, len(dataset.vocab), 1
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")


def make_loader(dataset: Dataset, batch_size: int, train: bool, seed: int = 0,
                world_size: int = 1, rank: int = 0, num_workers: int = 0) -> DataLoader:
    """A loader over this rank's share of every global batch of ``batch_size`` samples.

    The sampler permutes the data with ``seed + epoch`` (call ``loader.sampler.set_epoch``)
    identically on every rank and deals the permutation out as ``perm[rank::world_size]``, so the
    k-th batches of all ranks together are exactly the k-th batch of a one-process run. Training
    drops the incomplete last batch (and the remainder that does not split evenly across ranks);
    evaluation keeps order and every sample, DistributedSampler padding ranks to equal length by
    repeating the first samples when ``len(dataset)`` is not a multiple of ``world_size``.
    """
    if batch_size <= 0 or batch_size % world_size:
        raise DataError(f"global batch size {batch_size} must be a positive multiple of the "
                        f"{world_size} processes")
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=train,
                                 seed=seed, drop_last=train)
    return DataLoader(dataset, batch_size=batch_size // world_size, sampler=sampler,
                      drop_last=train, num_workers=num_workers,
                      persistent_workers=num_workers > 0)


class _SkipBatches(Sampler):
    """A batch sampler without its first ``count`` batches: where a mid-epoch checkpoint resumes."""

    def __init__(self, batch_sampler: Sampler, count: int) -> None:
        self.batch_sampler, self.count = batch_sampler, count

    def __iter__(self):
        return itertools.islice(iter(self.batch_sampler), self.count, None)

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.count)


def _batches(loader: DataLoader, skip: int):
    """The epoch's batches after the first ``skip``, which are never loaded.

    The sampler's order depends only on seed and epoch, so these are the batches an uninterrupted
    run sees. Starting an iterator draws a seed from the global RNG; a mid-epoch resume puts the
    RNG back as the checkpoint had it, so random augmentation done in the main process
    (``workers=0``) continues exactly too; worker processes get fresh seeds.
    """
    if skip == 0:
        return iter(loader)
    rest = DataLoader(loader.dataset, batch_sampler=_SkipBatches(loader.batch_sampler, skip),
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn,
                      generator=loader.generator)
    rng = torch.get_rng_state()
    batches = iter(rest)
    torch.set_rng_state(rng)
    return batches


def epoch_batches(loader: DataLoader, epoch: int, steps: int, skip: int):
    """The batches of an epoch of ``steps`` steps after its first ``skip``.

    An epoch longer than one pass through the data (``epoch_iters`` > batches per pass, as in a
    long CBP epoch on a small data set) continues into fresh passes: pass ``p`` of epoch ``e``
    draws the sampler's permutation ``e * passes + p``, so an epoch of at most one pass keeps the
    order it always had (permutation ``e``) and no two passes of a run share a permutation.
    """
    passes = -(-steps // len(loader))
    first_pass, skip = divmod(skip, len(loader))
    for p in range(first_pass, passes):
        loader.sampler.set_epoch(epoch * passes + p)
        yield from _batches(loader, skip if p == first_pass else 0)
