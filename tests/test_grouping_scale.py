"""The scalable grouping engine gives today's partition: ``group_classes`` against the dense
reference implementations kept in tests/grouping_reference.py, on many random inputs, ties
included (ties are broken by the seeded generator: equal means equal draws too)."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from ssal_models.grouping import group_classes
from tests.grouping_reference import reference_authors_group_classes, reference_group_classes

REFERENCE = {"paper": reference_group_classes, "authors": reference_authors_group_classes}


def random_confusion(case: int):
    """Dense floats (no ties), sparse Poisson counts (many exact ties), tiny integers (ties
    everywhere), all ones (nothing but ties), a soft-like matrix with empty rows."""
    rng = np.random.default_rng(case)
    num_classes = int(rng.integers(4, 70))
    k = int(rng.integers(2, num_classes // 2 + 1))
    kind = case % 5
    if kind == 0:
        matrix = rng.random((num_classes, num_classes))
    elif kind == 1:
        matrix = rng.poisson(0.2, (num_classes, num_classes)).astype(float)
        np.fill_diagonal(matrix, 20)
    elif kind == 2:
        matrix = rng.integers(0, 3, (num_classes, num_classes)).astype(float)
    elif kind == 3:
        matrix = np.ones((num_classes, num_classes))
    else:
        matrix = rng.dirichlet(np.full(num_classes, 0.3), num_classes)
        matrix[rng.random(num_classes) < 0.1] = 0.0  # classes without samples
    return matrix, k


@pytest.mark.parametrize("variant", ["paper", "authors"])
@pytest.mark.parametrize("criterion", ["join", "split"])
def test_equal_to_the_dense_reference_on_random_inputs(variant, criterion):
    for case in range(40):
        matrix, k = random_confusion(case)
        for seed in (0, 3):
            expected = REFERENCE[variant](matrix, k, criterion, seed)
            got = group_classes(matrix, k, criterion, seed=seed, variant=variant)
            assert np.array_equal(got, expected), (case, seed)


@pytest.mark.parametrize("variant", ["paper", "authors"])
def test_sparse_and_tensor_inputs_give_the_dense_result(variant):
    rng = np.random.default_rng(5)
    counts = rng.poisson(0.05, (300, 300)).astype(np.int64)
    np.fill_diagonal(counts, 30)
    expected = REFERENCE[variant](counts, 60, "join", 1)
    assert np.array_equal(group_classes(sp.csr_matrix(counts), 60, "join", seed=1, variant=variant), expected)
    assert np.array_equal(group_classes(torch.as_tensor(counts), 60, "join", seed=1, variant=variant), expected)


@pytest.mark.parametrize("variant", ["paper", "authors"])
@pytest.mark.parametrize("criterion", ["join", "split"])
def test_equal_at_imagenet_size_on_sparse_counts(variant, criterion):
    # the size the bench starts at (C = 1000, k = 200): a hold-out-like sparse count matrix
    # (split: nearly every (class, group) pair ties at distance 0 until the zeros run out)
    rng = np.random.default_rng(11)
    counts = rng.poisson(10 / 1000, (1000, 1000)).astype(float)
    np.fill_diagonal(counts, rng.integers(20, 40, 1000))
    expected = REFERENCE[variant](counts, 200, criterion, 0)
    assert np.array_equal(group_classes(counts, 200, criterion, variant=variant), expected)


def test_sparse_input_is_checked_like_a_dense_one():
    bad = sp.csr_matrix(np.diag([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="non-negative"):
        group_classes(bad, 2)
    with pytest.raises(ValueError, match="square"):
        group_classes(sp.csr_matrix(np.ones((4, 5))), 2)
