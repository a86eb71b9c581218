"""Shared-memory blocks (distlearn.comm.shm): what one process writes the other reads, names do not leak."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from distlearn.comm.shm import SharedBlock, new_token

pytestmark = pytest.mark.skipif(not SharedBlock.name(1, "x").parent.is_dir(), reason="no /dev/shm here")


def _write_through(token: int, numel: int, value: float) -> None:
    block = SharedBlock.attach(token, "data", numel)
    assert block is not None
    block.tensor.add_(value)


def test_a_block_is_shared_with_another_process_and_its_name_goes_at_attach():
    token = new_token()
    assert token % 2 == 1 and token < 2**48  # non-zero, exact in a float64 header field
    block = SharedBlock.create(token, "data", 1000)
    assert block is not None and block.path.exists()
    block.tensor.copy_(torch.arange(1000, dtype=torch.float32))
    process = mp.get_context("spawn").Process(target=_write_through, args=(token, 1000, 0.5))
    process.start()
    process.join(60)
    assert process.exitcode == 0
    assert torch.equal(block.tensor, torch.arange(1000, dtype=torch.float32) + 0.5)  # the peer's writes
    assert not block.path.exists()  # the attaching process removed the name
    block.unlink()  # idempotent


def test_attach_refuses_what_is_not_there_or_has_another_size():
    token = new_token()
    assert SharedBlock.attach(token, "data", 10) is None  # another machine: no such block here
    block = SharedBlock.create(token, "data", 10)
    assert block is not None
    try:
        assert SharedBlock.attach(token, "data", 11) is None  # another layout: not ours
        assert block.path.exists()  # and the name is left for the right peer
    finally:
        block.unlink()
    assert SharedBlock.create(token, "empty", 0) is None  # nothing to share
