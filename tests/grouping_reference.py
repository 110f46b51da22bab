"""REFERENCE ONLY: ``group_classes`` exactly as ``ssal_models/grouping.py`` had it before issue 17
(dense float64 C x C distance, the whole C x k mean-distance table recomputed every step; O(C^2 k)).

Kept unchanged so that the equality tests (tests/test_grouping_scale.py) and the benchmark
(bench/grouping_scale.py) can run today's code beside the fast one.  Do not use it elsewhere.
"""
from __future__ import annotations

import math

import numpy as np

_TIE_TOLERANCE = 1e-12


def _row_normalised_off_diagonal(matrix: np.ndarray) -> np.ndarray:
    totals = matrix.sum(axis=1, keepdims=True)
    rates = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    np.fill_diagonal(rates, 0.0)
    return rates


def _pick(values: np.ndarray, rng: np.random.Generator, largest: bool) -> int:
    best = values.max() if largest else values.min()
    ties = np.flatnonzero(np.abs(values - best) <= _TIE_TOLERANCE) if np.isfinite(best) \
        else np.flatnonzero(values == best)
    return int(ties[0] if ties.size == 1 else rng.choice(ties))


def reference_group_classes(confusion, k: int, criterion: str = "join", seed: int = 0) -> np.ndarray:
    """The pre-issue-17 ``group_classes(confusion, k, criterion, seed)`` (argument checks left out)."""
    matrix = np.asarray(confusion, dtype=np.float64)
    rates = _row_normalised_off_diagonal(matrix)
    distance_hat = 1.0 - rates if criterion == "join" else rates
    distance = (distance_hat + distance_hat.T) / 2.0
    np.fill_diagonal(distance, 0.0)
    num_classes = distance.shape[0]
    rng = np.random.default_rng(seed)

    seeds = [_pick(rates.sum(axis=1) + rates.sum(axis=0), rng, largest=True)]
    nearest_seed = distance[seeds[0]].copy()
    nearest_seed[seeds[0]] = -np.inf
    for _ in range(k - 1):
        seed_class = _pick(nearest_seed, rng, largest=True)
        seeds.append(seed_class)
        nearest_seed = np.minimum(nearest_seed, distance[seed_class])
        nearest_seed[seeds] = -np.inf

    capacity = math.ceil(num_classes / k)
    grouping = np.full(num_classes, -1, dtype=np.int64)
    grouping[seeds] = np.arange(k)
    distance_sums = distance[:, seeds].copy()
    sizes = np.ones(k, dtype=np.int64)
    unassigned = np.flatnonzero(grouping < 0)
    while unassigned.size:
        mean_distance = distance_sums[unassigned] / sizes
        mean_distance[:, sizes >= capacity] = np.inf
        flat = _pick(mean_distance.ravel(), rng, largest=False)
        row, group = divmod(flat, k)
        chosen = unassigned[row]
        grouping[chosen] = group
        distance_sums[:, group] += distance[:, chosen]
        sizes[group] += 1
        unassigned = np.delete(unassigned, row)
    return grouping


def reference_authors_group_classes(confusion, k: int, criterion: str = "join", seed: int = 0) -> np.ndarray:
    """A slow, literal statement of the SSAL authors' ``create_grouping_v2`` (their
    ``pytorch/helper_pytorch.py``), written from its steps -- every step recomputes every class's
    mean distance to every group -- with their float operations (``0.5 * (A + Aᵀ)``, sums in
    member order, then ``/ len``) and our seeded tie-break (``_pick``) where theirs used
    ``argmin``'s first index or ``numpy.random``.  The reference for the fast ``variant="authors"``."""
    matrix = np.array(confusion, dtype=np.float64)
    np.fill_diagonal(matrix, 0.0)
    if criterion == "join":
        matrix = matrix.max() - matrix
        np.fill_diagonal(matrix, 0.0)
    distance = 0.5 * (matrix + matrix.T)
    num_classes = distance.shape[0]
    rng = np.random.default_rng(seed)
    limit = 1.1 * num_classes / k
    clusters = [[] for _ in range(k)]
    clusters[0].append(_pick(np.array([np.sum(distance[i]) for i in range(num_classes)]), rng, largest=False))
    for _ in range(num_classes - 1):
        unassigned = np.ones(num_classes, dtype=bool)
        unassigned[[c for members in clusters for c in members]] = False
        means = np.full((k, num_classes), np.inf)
        for j, members in enumerate(clusters):
            if members:
                total = np.zeros(num_classes)
                for m in members:
                    total = total + distance[m]
                means[j] = total / len(members)
        closest = means.min(axis=0)  # over populated clusters, full ones included
        populated = [len(members) > 0 for members in clusters]
        if all(populated):  # the class closest to any cluster
            chosen = _pick(np.where(unassigned, closest, np.inf), rng, largest=False)
        else:  # seeding: the class farthest from its nearest cluster
            chosen = _pick(np.where(unassigned, closest, -np.inf), rng, largest=True)
        place = means[:, chosen].copy()
        if not all(populated):
            place[populated.index(False)] = 0.0  # an empty cluster is at distance 0 (the first stands for all)
        for j, members in enumerate(clusters):
            if len(members) >= limit:
                place[j] = np.inf
        clusters[_pick(place, rng, largest=False)].append(chosen)
    grouping = np.full(num_classes, -1, dtype=np.int64)
    for j, members in enumerate(clusters):
        grouping[members] = j
    return grouping
