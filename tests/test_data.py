"""Data: IDX reader, Fashion-MNIST loading, image folders, the distributed-style loader."""

import gzip
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from cbp.zoo.data import (
    FASHION_MNIST_DIR,
    DataError,
    image_folder,
    load_dataset,
    load_fashion_mnist,
    make_loader,
    read_idx,
)

HAVE_FASHION = os.path.isdir(FASHION_MNIST_DIR)
needs_fashion = pytest.mark.skipif(not HAVE_FASHION, reason="dataset-fashion-mnist not installed")


def write_idx(path, array: np.ndarray, type_byte: int, compress: bool = False) -> None:
    payload = bytes([0, 0, type_byte, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.astype(array.dtype.newbyteorder(">")).tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(payload)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_ubyte(tmp_path, compress):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x.idx"
    write_idx(path, array, 0x08, compress)
    out = read_idx(str(path))
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 4)
    assert torch.equal(out, torch.from_numpy(array))


@pytest.mark.parametrize(("type_byte", "dtype"), [(0x0B, np.int16), (0x0D, np.float32)])
def test_read_idx_big_endian_types(tmp_path, type_byte, dtype):
    array = np.array([[-2, 300], [7, -40000 // 3]], dtype=dtype)
    path = tmp_path / "x.idx.gz"
    write_idx(path, array, type_byte, compress=True)
    assert torch.equal(read_idx(str(path)), torch.from_numpy(array))


def test_read_idx_rejects_bad_files(tmp_path):
    good = tmp_path / "good"
    write_idx(good, np.zeros((3, 5), dtype=np.uint8), 0x08)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(good.read_bytes()[:-1])
    bad_magic = tmp_path / "bad_magic"
    bad_magic.write_bytes(b"\x01" + good.read_bytes()[1:])
    short_header = tmp_path / "short_header"
    short_header.write_bytes(b"\x00\x00\x08\x03\x00\x00")
    bad_gzip = tmp_path / "bad.gz"
    bad_gzip.write_bytes(gzip.compress(good.read_bytes())[:-10])
    for path in (truncated, bad_magic, short_header, bad_gzip, tmp_path / "missing"):
        with pytest.raises(DataError, match=path.name):
            read_idx(str(path))


@needs_fashion
def test_fashion_mnist_limit():
    dataset = load_fashion_mnist(train=False, limit=100)
    images, labels = dataset.tensors
    assert images.shape == (100, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (100,) and labels.dtype == torch.int64
    assert 0 <= labels.min() and labels.max() <= 9
    # normalised with (0.2860, 0.3530): pixel 0 maps to -0.2860/0.3530
    assert images.min().item() == pytest.approx(-0.2860 / 0.3530, abs=1e-6)
    assert abs(images.mean().item()) < 0.3 and 0.7 < images.std().item() < 1.3


@needs_fashion
def test_fashion_mnist_full_sets():
    train, num_classes, channels = load_dataset("fashion-mnist", None, train=True)
    assert (len(train), num_classes, channels) == (60000, 10, 1)
    test = load_fashion_mnist(train=False)
    assert len(test) == 10000
    assert torch.bincount(test.tensors[1]).tolist() == [1000] * 10


def test_fashion_mnist_missing_dir(tmp_path):
    with pytest.raises(DataError, match="dataset-fashion-mnist") as info:
        load_fashion_mnist(str(tmp_path))
    assert "--download" in str(info.value) and "\n" not in str(info.value)


def test_fashion_mnist_count_mismatch_and_label_range(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((4, 28, 28), np.uint8), 0x08)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(3, np.uint8), 0x08, True)
    with pytest.raises(DataError, match="labels for 4 images"):
        load_fashion_mnist(str(tmp_path), train=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2, 10], np.uint8), 0x08, True)
    with pytest.raises(DataError, match="outside"):
        load_fashion_mnist(str(tmp_path), train=False)


def test_unknown_dataset():
    with pytest.raises(DataError, match="fashion-mnist, imagefolder"):
        load_dataset("cifar10", None, train=True)


def _index_loader(n, batch_size, train, **kwargs):
    """A loader over TensorDataset(arange(n)) so batches show which indices they hold."""
    return make_loader(TensorDataset(torch.arange(n)), batch_size, train, **kwargs)


def _epoch(loader, epoch=0):
    loader.sampler.set_epoch(epoch)
    return [batch.tolist() for (batch,) in loader]


def test_train_loader_covers_data_once_per_epoch():
    batches = _epoch(_index_loader(103, 10, train=True))
    assert all(len(b) == 10 for b in batches) and len(batches) == 10  # last 3 samples dropped
    flat = sum(batches, [])
    assert len(set(flat)) == 100 and set(flat) <= set(range(103))


def test_eval_loader_keeps_order_and_every_sample():
    batches = _epoch(_index_loader(103, 10, train=False))
    assert sum(batches, []) == list(range(103)) and len(batches[-1]) == 3


def test_set_epoch_reshuffles_deterministically():
    loader = _index_loader(50, 10, train=True, seed=3)
    first, second, again = _epoch(loader, 0), _epoch(loader, 1), _epoch(loader, 0)
    assert first == again and first != second
    assert sorted(sum(first, [])) == sorted(sum(second, [])) == list(range(50))
    assert _epoch(_index_loader(50, 10, train=True, seed=4), 0) != first


def test_two_ranks_partition_each_global_batch():
    single = _epoch(_index_loader(101, 8, train=True, seed=7), 2)
    ranks = [_epoch(_index_loader(101, 8, train=True, seed=7, world_size=2, rank=r), 2)
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 12
    for k, batch in enumerate(single):
        assert all(len(r[k]) == 4 for r in ranks)
        assert ranks[0][k] == batch[0::2] and ranks[1][k] == batch[1::2]


def test_batch_size_must_split_across_ranks():
    with pytest.raises(DataError, match="multiple"):
        _index_loader(10, 5, train=True, world_size=2)


def _write_image_folder(root, classes=("cat", "dog"), per_class=3):
    rng = np.random.default_rng(0)
    for name in classes:
        os.makedirs(root / name)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_image_folder(tmp_path):
    _write_image_folder(tmp_path / "train")
    _write_image_folder(tmp_path / "val", per_class=1)
    train = image_folder(str(tmp_path / "train"), train=True, image_size=32)
    image, label = train[4]
    assert image.shape == (3, 32, 32) and label == 1 and train.classes == ["cat", "dog"]
    val, num_classes, channels = load_dataset("imagefolder", str(tmp_path), train=False,
                                              image_size=32)
    assert (len(val), num_classes, channels) == (2, 2, 3)
    assert torch.equal(val[0][0], val[0][0])  # deterministic eval transform
    subset, _, _ = load_dataset("imagefolder", str(tmp_path), train=True, limit=3, image_size=32)
    assert [subset[i][1] for i in range(3)] == [0, 1, 0]  # classes taken in turn


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        image_folder(str(tmp_path / "nope"), train=True)
    with pytest.raises(DataError, match="not an image folder"):
        image_folder(str(tmp_path), train=False)
    with pytest.raises(DataError, match="data directory"):
        load_dataset("imagefolder", None, train=True)
