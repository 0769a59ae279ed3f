"""The training loop's epochs: shorter or longer than one pass through the data."""

import itertools

import torch
from torch.utils.data import TensorDataset

from cbp.zoo.data import epoch_batches, make_loader


def _indices(loader, permutation: int) -> list[list[int]]:
    loader.sampler.set_epoch(permutation)
    return [x.tolist() for x, _ in loader]


def test_an_epoch_longer_than_a_pass_continues_into_fresh_passes_and_resumes_inside_them():
    data = TensorDataset(torch.arange(20), torch.zeros(20))
    loader = make_loader(data, batch_size=4, train=True, seed=3)   # 5 batches per pass
    steps = 12                                                        # 3 passes: 5 + 5 + 2

    def batches(epoch, skip=0):
        it = epoch_batches(loader, epoch, steps, skip)
        return [x.tolist() for x, _ in itertools.islice(it, steps - skip)]

    epoch1 = batches(1)
    expected = _indices(loader, 3) + _indices(loader, 4) + _indices(loader, 5)[:2]  # 1 * 3 + p
    assert epoch1 == expected and len(epoch1) == steps
    assert epoch1[:5] != epoch1[5:10]                   # each pass is a new permutation
    assert batches(1, skip=7) == epoch1[7:]            # resumed inside the second pass
    assert batches(1, skip=5) == epoch1[5:]            # resumed at a pass boundary


def test_an_epoch_of_at_most_one_pass_keeps_its_permutation():
    data = TensorDataset(torch.arange(20), torch.zeros(20))
    loader = make_loader(data, batch_size=4, train=True, seed=3)
    got = [x.tolist() for x, _ in itertools.islice(epoch_batches(loader, 2, 3, 0), 3)]
    assert got == _indices(loader, 2)[:3]
    got = [x.tolist() for x, _ in itertools.islice(epoch_batches(loader, 2, 5, 1), 4)]
    assert got == _indices(loader, 2)[1:]
