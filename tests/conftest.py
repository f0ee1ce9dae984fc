"""Fixtures the test modules share. What builds their inputs lives beside this
file as plain modules: `train_fixtures.py` (tiny teachers, their caches, train
configs), `peaked.py` (exact rows from the synthetic peaked teacher, damaged
shards) and `synthetic_cache.py` (the one writer of synthetic caches). Tests
import the product only, never `bench/`."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """torch on one intra-op thread until the module ends: on 2 shared cores, tiny
    matmuls run far faster single-threaded (several threads only contend)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
