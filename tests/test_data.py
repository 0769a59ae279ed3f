"""Data: IDX reader, Fashion-MNIST loading, image folders, the distributed-style loader."""

import gzip
import os
import struct

import numpy as np
import pytest
import torch
from conftest import write_texts
from PIL import Image
from torch.utils.data import Subset, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from cbp.zoo.data import (
    FASHION_MNIST_DIR,
    DataError,
    _SkipBatches,
    _spread_over_classes,
    check_same_classes,
    class_names,
    epoch_batches,
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


def test_read_idx_header_edges(tmp_path):
    # sizes are four big-endian bytes each, also above 2**24; an empty array is all header
    path = tmp_path / "empty.idx"
    write_idx(path, np.zeros((2**24 + 1, 2**24 + 2, 0), np.uint8), 0x08)
    assert read_idx(str(path)).shape == (2**24 + 1, 2**24 + 2, 0)
    write_idx(path, np.zeros(0, np.uint8), 0x08)
    assert read_idx(str(path)).shape == (0,)
    path.write_bytes(b"\x00\x00\x08\x00")   # a scalar without its one byte of data
    with pytest.raises(DataError, match="has 4 bytes, expected 5"):
        read_idx(str(path))
    path.write_bytes(b"\x00\x01\x08\x01\x00\x00\x00\x01\x07")   # second magic byte not 0
    with pytest.raises(DataError, match="bad magic number"):
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


def test_fashion_mnist_refuses_a_lone_file_and_images_of_another_kind(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((4, 28, 28), np.uint8), 0x08)
    with pytest.raises(DataError, match="IDX files not found"):   # the labels are missing
        load_fashion_mnist(str(tmp_path), train=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8), 0x08)
    for images, type_byte in ((np.zeros((4, 28, 28), np.int16), 0x0B),
                              (np.zeros((4, 28, 27), np.uint8), 0x08)):
        write_idx(tmp_path / "t10k-images-idx3-ubyte", images, type_byte)
        with pytest.raises(DataError, match="expected N×28×28 uint8 images"):
            load_fashion_mnist(str(tmp_path), train=False)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((4, 28, 28), np.uint8), 0x08)
    test, _, _ = load_dataset("fashion-mnist", str(tmp_path), train=False)
    assert test.tensors[1].tolist() == [0] * 4   # the test split, all of one class


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
    assert [subset[i][1] for i in range(len(subset))] == [0, 1, 0]  # classes taken in turn
    torch.manual_seed(0)   # training crops and flips at random, at the size asked for
    assert subset[0][0].shape == (3, 32, 32) and not torch.equal(subset[0][0], subset[0][0])
    whole, _, _ = load_dataset("imagefolder", str(tmp_path), train=True, image_size=32)
    assert [whole[i][1] for i in range(len(whole))] == [0, 0, 0, 1, 1, 1]   # no limit: in order


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        image_folder(str(tmp_path / "nope"), train=True)
    with pytest.raises(DataError, match="not an image folder"):
        image_folder(str(tmp_path), train=False)
    with pytest.raises(DataError, match="data directory"):
        load_dataset("imagefolder", None, train=True)


def test_a_small_image_folder_subset_takes_the_classes_in_turn():
    # the k-th sample of each class comes before any class's (k+1)-th; ties by class number
    targets = [2, 0, 0, 1, 0, 1]
    assert _spread_over_classes(targets, 6) == [1, 3, 0, 2, 5, 4]
    assert _spread_over_classes(targets, 2) == [1, 3]


def test_class_names_through_subsets():
    class Folder(TensorDataset):
        classes = ("cat", "dog")

    folder = Folder(torch.zeros(3))
    assert class_names(Subset(Subset(folder, [2, 1]), [0])) == ["cat", "dog"]
    assert class_names(folder) == ["cat", "dog"] and class_names(TensorDataset(torch.zeros(3))) is None


def test_check_same_classes_names_what_is_missing_and_extra():
    letters = list("abcdefgh")
    for expected, found in ((None, letters), (letters, None), (letters, list(letters))):
        check_same_classes(expected, found, "val")   # nothing to compare, or the same classes
    tail = "; every split needs the same class folders"
    for expected, found, message in (
            (letters, ["a", "x"], "(2) as the training data (8): it lacks b, c, d, e, f and 2 more; "
                                  "has x besides"),
            (letters[:6], ["a"], "(1) as the training data (6): it lacks b, c, d, e, f"),
            (["a"], ["a", "b"], "(2) as the training data (1): it has b besides"),
            (["a", "b"], ["b", "a"], "(2) as the training data (2): it ")):   # another order
        with pytest.raises(DataError) as info:
            check_same_classes(expected, found, "data/val")
        assert str(info.value) == f"data/val does not hold the same classes {message}{tail}"


class _FakeFashionMNIST:
    """torchvision.datasets.FashionMNIST as it downloads: all four raw IDX files of both splits
    into ``root/FashionMNIST/raw`` (10 + 4 images, labels 0..), or "Dataset not found" without
    download."""

    calls: list = []

    def __init__(self, root, train=True, download=False):
        self.calls.append(root)
        raw = os.path.join(root, "FashionMNIST", "raw")
        if download:
            os.makedirs(raw, exist_ok=True)
            for stem, count in (("train", 10), ("t10k", 4)):
                write_idx(os.path.join(raw, f"{stem}-images-idx3-ubyte"),
                          np.full((count, 28, 28), 255, np.uint8), 0x08)
                write_idx(os.path.join(raw, f"{stem}-labels-idx1-ubyte"),
                          np.arange(count, dtype=np.uint8) % 10, 0x08)
        if not os.path.isfile(os.path.join(raw, "t10k-labels-idx1-ubyte")):
            raise RuntimeError("Dataset not found. You can use download=True to download it")


def test_fashion_mnist_download_when_asked_and_missing(tmp_path, monkeypatch):
    import torchvision

    import cbp.zoo.data as data

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", _FakeFashionMNIST)
    monkeypatch.setattr(_FakeFashionMNIST, "calls", [])
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", str(tmp_path / "none"))
    monkeypatch.setattr(data, "DOWNLOAD_DIR", str(tmp_path / "cache"))
    with pytest.raises(DataError, match="not found in"):
        load_fashion_mnist(train=False)              # no download unless asked
    with pytest.raises(DataError, match="not found in"):
        load_dataset("fashion-mnist", None, train=False)
    test = load_fashion_mnist(train=False, download=True)   # into the download folder
    images, labels = test.tensors
    assert labels.tolist() == [0, 1, 2, 3] and images.shape == (4, 1, 28, 28)
    assert images.min().item() == pytest.approx((1 - 0.2860) / 0.3530)
    train = load_fashion_mnist(str(tmp_path / "mine"), limit=6, download=True)   # train split
    assert train.tensors[1].tolist() == [0, 1, 2, 3, 4, 5]
    dataset, num_classes, channels = load_dataset("fashion-mnist", str(tmp_path / "ds"), train=True,
                                                  limit=6, download=True)
    assert dataset.tensors[1].tolist() == [0, 1, 2, 3, 4, 5] and (num_classes, channels) == (10, 1)
    assert _FakeFashionMNIST.calls == [str(tmp_path / d) for d in ("cache", "mine", "ds")]

    def offline(root, train=True, download=False):
        raise OSError("network unreachable")
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(DataError) as info:
        load_fashion_mnist(str(tmp_path / "new"), download=True)
    assert str(info.value) == (f"downloading Fashion-MNIST into {tmp_path / 'new'} failed: "
                               "network unreachable")


def test_load_dataset_shakespeare_windows_and_download(tmp_path, monkeypatch):
    import cbp.zoo.text as text

    folder = write_texts(tmp_path / "plays")
    corpus = text.read_corpus(folder)
    train_text, val_text = text.split_text(corpus)
    train, vocab_size, channels = load_dataset("shakespeare", folder, train=True, limit=3)
    assert (len(train), vocab_size, channels) == (3, len(set(corpus)), 1)
    assert train.vocab.decode(train[1][0]) == train_text[128:256]   # windows of 128 characters
    val, _, _ = load_dataset("shakespeare", folder, train=False)
    assert len(val) == (len(val_text) - 1) // 128 and val.vocab.decode(val[0][1]) == val_text[1:129]
    fetched = []

    def fetch(root):
        fetched.append(root)
        write_texts(text._texts_dir(root))
    monkeypatch.setattr(text, "SHAKESPEARE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(text, "fetch_shakespeare", fetch)
    assert len(load_dataset("shakespeare", None, train=True, limit=2, download=True)[0]) == 2
    assert fetched == [str(tmp_path / "cache")]


def test_image_folder_default_size_is_224(tmp_path):
    _write_image_folder(tmp_path / "train", per_class=1)
    _write_image_folder(tmp_path / "val", per_class=1)
    for train in (True, False):
        dataset, num_classes, channels = load_dataset("imagefolder", str(tmp_path), train=train)
        assert dataset[1][0].shape == (3, 224, 224) and (num_classes, channels) == (2, 3)
    # evaluation: the shorter side resized to 256, the centre 224 square, ImageNet normalisation
    from torchvision.transforms import functional as TF

    image = Image.open(tmp_path / "val" / "cat" / "0.png").convert("RGB")
    expected = TF.normalize(TF.to_tensor(TF.center_crop(TF.resize(image, 256), 224)),
                            [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert torch.equal(image_folder(str(tmp_path / "val"), train=False)[0][0], expected)


def test_loader_batch_sizes_and_what_does_not_split_across_ranks():
    with pytest.raises(DataError, match="positive multiple"):
        _index_loader(8, 0, train=True)
    assert _epoch(_index_loader(3, 1, train=False)) == [[0], [1], [2]]
    # 7 samples, global batches of 4 over 2 ranks: 3 per rank, one batch; the 7th is dropped,
    # never padded into a second batch
    single = _epoch(_index_loader(7, 4, train=True))
    ranks = [_epoch(_index_loader(7, 4, train=True, world_size=2, rank=r)) for r in range(2)]
    assert len(single) == 1 and ranks == [[single[0][0::2]], [single[0][1::2]]]


class _WhereLoaded(torch.utils.data.Dataset):
    """Sample i is (i, 1 if a worker process loaded it else 0, the worker's mark)."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        info = torch.utils.data.get_worker_info()
        return i, int(info is not None), getattr(info.dataset, "mark", 0) if info else 0


def _mark(worker_id):
    torch.utils.data.get_worker_info().dataset.mark = 7


def test_loaders_load_in_this_process_unless_given_workers():
    assert [b[1].tolist() for b in make_loader(_WhereLoaded(), 6, train=False)] == [[0] * 6]
    loader = make_loader(_WhereLoaded(), 3, train=False, num_workers=1)
    assert [b[1].tolist() for b in loader] == [[1] * 3] * 2


def test_a_resumed_epoch_loads_as_the_loader_does():
    """Skipped batches are never loaded, the rest come as an uninterrupted epoch's would: through
    the loader's workers, worker_init_fn and collate_fn."""
    data = _WhereLoaded()
    loader = torch.utils.data.DataLoader(
        data, batch_size=2, sampler=DistributedSampler(data, 1, 0, seed=1), num_workers=1,
        worker_init_fn=_mark, collate_fn=lambda batch: [tuple(sample) for sample in batch])
    whole = list(epoch_batches(loader, 0, 3, 0))
    assert [sample[1:] for batch in whole for sample in batch] == [(1, 7)] * 6
    assert list(epoch_batches(loader, 0, 3, 1)) == whole[1:]
    skipping = _SkipBatches(loader.batch_sampler, 2)
    assert len(skipping) == 1 and list(skipping) == list(loader.batch_sampler)[2:]
    assert len(_SkipBatches(loader.batch_sampler, 5)) == 0
