"""The engine's pool of conversion buffers: reuse across jobs, never while a result holds one."""

from __future__ import annotations

import torch

from mergelab.executors.streaming import _BufferPool


def test_released_buffers_are_reused_for_the_same_size() -> None:
    pool = _BufferPool(per_size=2)
    a = pool.convert(torch.ones(3, 4, dtype=torch.bfloat16), torch.float32)
    assert a.dtype == torch.float32 and a.shape == (3, 4) and bool((a == 1).all())
    ptr = a.data_ptr()
    pool.give_back([a], result=torch.zeros(12))
    b = pool.convert(torch.full((4, 3), 2.0, dtype=torch.bfloat16), torch.float32)
    assert b.data_ptr() == ptr and b.shape == (4, 3) and bool((b == 2).all())


def test_a_buffer_the_result_shares_is_not_reused() -> None:
    pool = _BufferPool(per_size=2)
    a = pool.convert(torch.ones(8, dtype=torch.bfloat16), torch.float32)
    result = a[2:5]  # e.g. a method that returned (a view of) its input
    pool.give_back([a], result=result)
    b = pool.convert(torch.full((8,), 3.0, dtype=torch.bfloat16), torch.float32)
    assert b.data_ptr() != a.data_ptr()
    assert bool((result == 1).all())  # untouched


def test_no_copy_when_no_cast_and_clear_drops_everything() -> None:
    pool = _BufferPool(per_size=1)
    x = torch.ones(5)
    assert pool.convert(x, torch.float32) is x
    a = pool.convert(torch.ones(5, dtype=torch.bfloat16), torch.float32)
    pool.give_back([a, a], result=None)  # the same buffer twice (base reused as an expert)
    assert len(pool._free[(5, torch.float32)]) == 1  # kept once, not twice
    pool.clear()
    assert pool._free == {}


def test_a_buffer_kept_by_the_result_is_forgotten_by_the_pool() -> None:
    pool = _BufferPool(per_size=2)
    a = pool.convert(torch.ones(8, dtype=torch.bfloat16), torch.float32)
    pool.give_back([a], result=a[1:3])
    assert pool._lent == {} and pool._free.get((8, torch.float32), []) == []
