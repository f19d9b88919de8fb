"""`trl_trm.row_blocks`: the row blocks cover the batch exactly (never a 1-row block in a batch of several rows), the
thread setting is scoped to the loop, and the loop's non-finite recomputation only touches the blocks that need it.
The bit-identity of the loop against its previous version is tests/test_masking_threads.py."""

from __future__ import annotations

import pytest
import torch

import trl_trm.row_blocks as row_blocks
from trl_trm.masks import compute_trust_region_mask


@pytest.mark.parametrize("batch", [0, 1, 2, 3, 7, 64, 65, 129, 130, 513])
@pytest.mark.parametrize("length", [0, 1, 1000, 4099, 70000])
def test_row_blocks_partition_the_batch(batch, length):
    blocks = row_blocks._row_blocks(batch, length, torch.device("cpu"))
    rows = [i for start, stop in blocks for i in range(start, stop)]
    assert rows == list(range(batch))
    if batch >= 2:
        assert all(stop - start >= 2 for start, stop in blocks)  # a 1-row reduction would change the summation order
    target = max(2, row_blocks._CPU_BLOCK_ELEMENTS // max(length, 1))
    assert all(stop - start <= target + 1 for start, stop in blocks)  # at most one merged trailing row


def test_one_block_on_accelerators():
    assert row_blocks._row_blocks(1000, 4096, torch.device("meta")) == [(0, 1000)]


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_one_block_thread_is_scoped(two_threads):
    with row_blocks.one_block_thread(torch.device("cpu"), batch=8):
        assert torch.get_num_threads() == row_blocks._CPU_BLOCK_THREADS == 1
    assert torch.get_num_threads() == 2
    with row_blocks.one_block_thread(torch.device("cpu"), batch=1):  # one row keeps the caller's threads
        assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError, match="inside"):
        with row_blocks.one_block_thread(torch.device("cpu"), batch=8):
            raise RuntimeError("inside")
    assert torch.get_num_threads() == 2


def test_only_blocks_with_a_nonfinite_row_are_recomputed(monkeypatch):
    calls = []
    original = row_blocks._fill_row_block

    def spy(*args):
        calls.append((args[4], args[5], args[-1]))  # start, stop, check_finite
        return original(*args)

    monkeypatch.setattr(row_blocks, "_fill_row_block", spy)
    theta = torch.zeros(64, 8192)
    theta[40, 3] = float("nan")
    compute_trust_region_mask(theta, torch.zeros(64, 8192), torch.ones(64, 8192))
    fast = [(a, b) for a, b, check in calls if not check]
    slow = [(a, b) for a, b, check in calls if check]
    assert fast == row_blocks._row_blocks(64, 8192, torch.device("cpu"))
    assert len(slow) == 1 and slow[0][0] <= 40 < slow[0][1]
