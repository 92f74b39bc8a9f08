"""vita_jax.sizes and parallel.data_parallel_size: the one place each for rounding up and the data-parallel size."""
import numpy as np
import pytest

from vita_jax import parallel
from vita_jax.sizes import ceil_div, round_up


@pytest.mark.parametrize("n,m,want", [(0, 64, 0), (1, 64, 64), (64, 64, 64), (65, 64, 128), (6199, 8, 6200), (7, 1, 7)])
def test_round_up(n, m, want):
    assert round_up(n, m) == want


def test_ceil_div_and_arrays():
    assert [ceil_div(n, 3) for n in range(7)] == [0, 1, 1, 1, 2, 2, 2]
    np.testing.assert_array_equal(round_up(np.array([0, 1, 16, 17], np.int64), 16), [0, 16, 16, 32])


def test_data_parallel_size_follows_the_rules_table():
    import jax
    mesh = parallel.make_mesh({"data": 1, "fsdp": -1}, devices=jax.devices()[:1])
    assert parallel.data_parallel_size(None) == 1
    assert parallel.data_parallel_size(mesh) == 1

    class FakeMesh:  # a mesh's shape is all the helper reads
        shape = {"data": 2, "fsdp": 4, "tensor": 8}
    assert parallel.data_parallel_size(FakeMesh()) == 8
    rules = tuple((k, "data" if k == "batch" else v) for k, v in parallel.DEFAULT_RULES)
    assert parallel.data_parallel_size(FakeMesh(), rules) == 2
