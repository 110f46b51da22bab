"""The scalable engine behind :func:`ssal_models.grouping.group_classes` (both variants).

Same algorithm and the same partition, bit for bit, as the plain dense code (kept as
``tests/grouping_reference.py``): every distance and every per-group sum is computed with the
same float64 operations in the same order, and ties are collected in the same order and
broken with the same single draw of the seeded generator.  What changes is the bookkeeping:

* the confusion is kept sparse (its non-zero off-diagonal entries, CSR + CSC) and a distance
  row ``D[c, :]`` is rebuilt on demand in O(C); no C x C float64 copy is ever made (row totals,
  column sums and the authors' row sums of ``D`` are taken over dense blocks of rows, so that
  numpy's summation order -- and so every rounding -- is the dense code's);
* the per-group sums ``S[g, i] = sum of D[i, m] over the members m of g`` form one k x C
  array updated in place with one row per step (the dense code recomputed the whole C x k mean
  table every step: O(C^2 k) in all, hours at 21,841 classes);
* ``paper``: the minimum of every group's row over the unassigned classes (and how many
  classes attain it) is kept, so a step looks only at the groups that reach the global
  minimum; while that minimum is exactly 0 (``split`` on sparse counts: most pairs were
  never confused, so nearly every (class, group) pair ties) the ties are the zero sums,
  counted per class and updated from the one row that changed (:class:`_ZeroTies`);
  ``authors``: every class's minimum over the groups (and its attainer count) is kept
  and updated from the one row that changed.
"""
from __future__ import annotations

from typing import Any, Tuple

import numpy as np

_TIE_TOLERANCE = 1e-12
_BLOCK_ROWS = 256


def _pick(values: np.ndarray, rng: np.random.Generator, largest: bool) -> int:
    """Index of the best entry of ``values`` (inf / -inf never best unless all are), a seeded
    random one among ties within 1e-12 (``rng.choice(ties)``)."""
    best = values.max() if largest else values.min()
    ties = np.flatnonzero(np.abs(values - best) <= _TIE_TOLERANCE) if np.isfinite(best) \
        else np.flatnonzero(values == best)
    return int(ties[0] if ties.size == 1 else ties[rng.integers(0, ties.size)])


class SparseDistance:
    """The symmetric class distance ``D`` of one variant, row by row, from a sparse confusion.

    ``paper``: ``r`` = row-normalised confusion (diagonal 0), ``f = 1 - r`` (join) or ``r``
    (split), ``D = (f + fᵀ) / 2``.  ``authors``: ``A`` = raw counts with diagonal 0, ``f = max(A)
    - A`` (join, diagonal 0) or ``A`` (split), ``D = 0.5 * (f + fᵀ)``.  Diagonal of ``D`` is 0."""

    def __init__(self, blocks, num_classes: int, variant: str, criterion: str):
        import scipy.sparse as sp

        self.num_classes, self.variant, self.join = num_classes, variant, criterion == "join"
        rows, cols, vals = [], [], []
        score_rows, col_sums = [], np.zeros(num_classes)
        maximum = 0.0
        for start, block in blocks():  # dense float64 blocks of rows of the confusion
            span = np.arange(start, start + block.shape[0])
            if variant == "paper":  # rows with no samples stay 0
                np.divide(block, block.sum(axis=1, keepdims=True), out=block, where=block.any(axis=1)[:, None])
            block[span - start, span] = 0.0
            maximum = max(maximum, float(block.max()))
            r, c = np.nonzero(block)
            rows.append(r + start)
            cols.append(c)
            vals.append(block[r, c])
            if variant == "paper":  # the most-confused score: row sums (pairwise) + column sums (row order)
                score_rows.append(block.sum(axis=1))
                block[0] += col_sums  # numpy sums axis 0 row after row: the same order as one dense sum
                col_sums = block.sum(axis=0)
        matrix = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                               shape=(num_classes, num_classes))
        matrix.sort_indices()
        self.csr, self.csc = matrix, matrix.tocsc()
        self.csc.sort_indices()
        self.maximum = maximum
        self.min_positive = float(matrix.data[matrix.data > 0].min()) if matrix.nnz else np.inf
        self.confusion_score = np.concatenate(score_rows) + col_sums if variant == "paper" else None

    def _transform(self, values: np.ndarray) -> np.ndarray:
        if not self.join:
            return values
        return 1.0 - values if self.variant == "paper" else self.maximum - values

    def _dense_row(self, matrix, index: int) -> np.ndarray:
        out = np.zeros(self.num_classes)
        lo, hi = matrix.indptr[index], matrix.indptr[index + 1]
        out[matrix.indices[lo:hi]] = matrix.data[lo:hi]
        return out

    def row(self, c: int) -> np.ndarray:
        """``D[c, :]`` (= ``D[:, c]``), as the dense code computes it."""
        forward = self._transform(self._dense_row(self.csr, c))
        backward = self._transform(self._dense_row(self.csc, c))
        forward[c] = backward[c] = 0.0
        out = (forward + backward) / 2.0 if self.variant == "paper" else 0.5 * (forward + backward)
        out[c] = 0.0
        return out

    def row_sums(self) -> np.ndarray:
        """``D.sum(axis=1)`` summed as numpy sums a dense row (the authors' first pick)."""
        sums = []
        for start in range(0, self.num_classes, _BLOCK_ROWS):
            stop = min(start + _BLOCK_ROWS, self.num_classes)
            span = np.arange(start, stop)
            forward = self._transform(self.csr[start:stop].toarray())
            backward = self._transform(self.csc[:, start:stop].toarray().T)
            forward[span - start, span] = backward[span - start, span] = 0.0
            block = (forward + backward) / 2.0 if self.variant == "paper" else 0.5 * (forward + backward)
            block[span - start, span] = 0.0
            sums.append(block.sum(axis=1))
        return np.concatenate(sums)


def dense_blocks(confusion: Any) -> Tuple[int, Any]:
    """``(C, blocks)``: ``blocks()`` yields ``(first row, float64 block of rows)`` of a dense
    array or a scipy.sparse matrix, checking every block (finite, non-negative)."""
    import scipy.sparse as sp

    sparse = sp.issparse(confusion)
    matrix = confusion.tocsr() if sparse else confusion
    num_classes = matrix.shape[0]

    def blocks():
        for start in range(0, num_classes, _BLOCK_ROWS):
            part = matrix[start:start + _BLOCK_ROWS]
            block = part.toarray().astype(np.float64) if sparse else np.array(part, dtype=np.float64)
            if not np.all(np.isfinite(block)):
                raise ValueError("confusion must be finite (no NaN / inf)")
            if np.any(block < 0):
                raise ValueError("confusion must be non-negative (counts or rates)")
            yield start, block
    return num_classes, blocks


# ----------------------------------------------------------------------------- paper


def paper_fill(distance: SparseDistance, k: int, rng: np.random.Generator) -> np.ndarray:
    """Seeds (most-confused class, then farthest point), then the greedy fill: the globally
    closest (unassigned class, group with room) pair by mean distance, capacity ceil(C/k)."""
    num_classes = distance.num_classes
    sums = np.empty((k, num_classes))  # (k, C): S[g, i], first the seeds' rows; assigned columns +inf
    seeds = [_pick(distance.confusion_score, rng, largest=True)]
    sums[0] = distance.row(seeds[0])
    nearest_seed = sums[0].copy()
    nearest_seed[seeds[0]] = -np.inf
    for group in range(1, k):
        seed_class = _pick(nearest_seed, rng, largest=True)
        seeds.append(seed_class)
        sums[group] = distance.row(seed_class)
        nearest_seed = np.minimum(nearest_seed, sums[group])
        nearest_seed[seeds] = -np.inf

    capacity = -(-num_classes // k)
    grouping = np.full(num_classes, -1, dtype=np.int64)
    grouping[seeds] = np.arange(k)
    sums[:, seeds] = np.inf
    sizes = np.ones(k, dtype=np.int64)
    open_groups = np.ones(k, dtype=bool)
    near = _RowMinima(sums, sizes)
    zeros = _ZeroTies(sums) if _ZeroTies.exact(distance, capacity) else None
    for _ in range(num_classes - k):
        group_best = np.where(open_groups, near.minimum / sizes, np.inf)  # min over i of S/n = (min S)/n
        best = group_best.min()
        if zeros is not None and best == 0.0:
            chosen, group = zeros.pick(open_groups, rng)
        else:
            tied_groups = np.flatnonzero(np.abs(group_best - best) <= _TIE_TOLERANCE)
            chosen, group = near.pick_tie(tied_groups, best, rng)
        grouping[chosen] = group
        near.remove_class(chosen, open_groups, group)
        row = distance.row(chosen)
        if zeros is not None:
            zeros.before_add(chosen, group, row)
        sums[group] += row
        sizes[group] += 1
        if sizes[group] >= capacity:
            open_groups[group] = False
            if zeros is not None:
                zeros.close(group)
        else:
            near.refresh(group)
    return grouping


class _ZeroTies:
    """While the smallest mean is exactly 0, the tied (class, group) pairs are the zero sums
    ``S[g, i] == 0`` of the open groups over the unassigned classes: ``per_class[i]`` counts
    them, so a step finds the pair the dense code picks (class-major, then group order, one
    draw) in O(C + k) instead of scanning every tied group's row.

    Exact only if no positive sum ``S`` can be within the tie window of 0, i.e. if the smallest
    positive distance exceeds ``1e-12 * capacity`` (a positive sum of non-negative distances is
    at least its largest term; a mean ``S/n <= 1e-12`` needs ``S <= 1e-12 n``); :meth:`exact`
    checks it once (for hard counts: while every class has fewer than 5e11 / capacity samples;
    soft rates with tinier entries take the general path)."""

    def __init__(self, sums: np.ndarray):
        self.sums = sums  # (k, C), assigned columns +inf: every group is open here
        self.per_class = np.count_nonzero(sums == 0.0, axis=0)

    @staticmethod
    def exact(distance: SparseDistance, capacity: int) -> bool:
        if distance.join:  # D = 1 - rate: zero distances are rare, the general path handles them
            return False
        smallest = distance.min_positive / 2.0  # D = (r + r^T) / 2 >= max(r, r^T) / 2
        return smallest > _TIE_TOLERANCE * capacity

    def pick(self, open_groups: np.ndarray, rng: np.random.Generator) -> Tuple[int, int]:
        cumulative = np.cumsum(self.per_class)
        total = int(cumulative[-1])
        pick = 0 if total == 1 else int(rng.integers(0, total))
        chosen = int(np.searchsorted(cumulative, pick, side="right"))
        within = pick - (int(cumulative[chosen - 1]) if chosen else 0)
        groups = np.flatnonzero(open_groups & (self.sums[:, chosen] == 0.0))
        return chosen, int(groups[within])

    def before_add(self, chosen: int, group: int, row: np.ndarray) -> None:
        """Class ``chosen`` joins ``group`` (its column is already +inf): the group's zero sums
        where ``row`` is positive stop being ties."""
        self.per_class[chosen] = 0
        lost = np.flatnonzero((row > 0.0) & (self.sums[group] == 0.0))
        self.per_class[lost] -= 1

    def close(self, group: int) -> None:
        """``group`` is full: none of its zero sums is a tie any more."""
        self.per_class -= self.sums[group] == 0.0


class _RowMinima:
    """Per group: the minimum of its row of sums over the unassigned classes, how many classes
    attain it, and the classes within a small margin of it (every candidate of a tie: the tie
    window is 1e-12 in the mean, far inside the margin), so that a step never scans a row
    except the one that changed or one whose minimum left."""

    NEAR_CAP = 256  # a longer near list (many equal sums) is not kept: a tie scans the row

    def __init__(self, sums: np.ndarray, sizes: np.ndarray):
        self.sums, self.sizes = sums, sizes
        k = sums.shape[0]
        self.minimum, self.count = np.empty(k), np.empty(k, dtype=np.int64)
        self.margin = np.empty(k)
        self.near = [None] * k
        self.has_near = np.zeros(k, dtype=bool)
        for group in range(k):
            self.refresh(group)

    def refresh(self, group: int) -> None:
        row = self.sums[group]
        minimum = row.min()
        self.minimum[group] = minimum
        self.count[group] = np.count_nonzero(row == minimum)
        self.margin[group] = 1e-9 * (self.sizes[group] + abs(minimum))
        close = np.flatnonzero(row <= minimum + self.margin[group])
        self.has_near[group] = close.size <= self.NEAR_CAP
        self.near[group] = close if self.has_near[group] else None

    def remove_class(self, chosen: int, open_groups: np.ndarray, skip: int) -> None:
        """Class ``chosen`` is assigned: its column becomes +inf."""
        column = self.sums[:, chosen].copy()
        self.sums[:, chosen] = np.inf
        touched = open_groups & (column <= self.minimum + self.margin)
        touched[skip] = False  # refreshed by the caller
        attained = touched & (column == self.minimum)
        self.count[attained] -= 1
        emptied = attained & (self.count == 0)
        for group in np.flatnonzero(emptied):
            self.refresh(group)
        for group in np.flatnonzero(touched & ~emptied & self.has_near):
            self.near[group] = self.near[group][self.near[group] != chosen]

    def pick_tie(self, groups: np.ndarray, best: float, rng: np.random.Generator) -> Tuple[int, int]:
        """The (class, group) pair the dense code picks among those of ``groups`` whose mean is
        within 1e-12 of ``best``: ties in flat (class-major, then group) order, one draw
        ``rng.integers(0, n)`` (= ``rng.choice(ties)``) when there are n > 1."""
        if not self.has_near[groups].all():  # many equal sums: the rows themselves, counted per class
            mask = np.abs(self.sums[groups] / self.sizes[groups, None] - best) <= _TIE_TOLERANCE
            per_class = np.cumsum(mask.sum(axis=0))
            pick = 0 if per_class[-1] == 1 else int(rng.integers(0, per_class[-1]))
            chosen = int(np.searchsorted(per_class, pick, side="right"))
            within = pick - (per_class[chosen - 1] if chosen else 0)
            return chosen, int(groups[np.flatnonzero(mask[:, chosen])[within]])
        candidates = [self.near[g] for g in groups]
        owners = np.repeat(groups, [c.size for c in candidates])
        candidates = np.concatenate(candidates)
        hits = np.abs(self.sums[owners, candidates] / self.sizes[owners] - best) <= _TIE_TOLERANCE
        classes, owners = candidates[hits], owners[hits]
        order = np.lexsort((owners, classes))
        pick = order[0] if order.size == 1 else order[rng.integers(0, order.size)]
        return int(classes[pick]), int(owners[pick])


# ----------------------------------------------------------------------------- authors


def authors_fill(distance: SparseDistance, k: int, rng: np.random.Generator) -> np.ndarray:
    """``create_grouping_v2``: the first class opens group 0; while a group is empty, the class
    farthest from its nearest populated group is placed; then the class closest to any group
    (full ones included) is.  A placed class goes to its nearest group with room (an empty group
    counts as distance 0; group i is full at ``len >= 1.1*C/k``)."""
    num_classes = distance.num_classes
    limit = 1.1 * num_classes / k  # the authors' size_margin * num_classes / num_groups
    first = _pick(distance.row_sums(), rng, largest=False)
    grouping = np.full(num_classes, -1, dtype=np.int64)
    sums = np.full((k, num_classes), np.inf)  # empty groups: +inf (never the nearest)
    sizes = np.zeros(k, dtype=np.int64)
    class_min = np.full(num_classes, np.inf)  # per class: min over populated groups of S/n ...
    class_min_count = np.zeros(num_classes, dtype=np.int64)  # ... and how many groups attain it
    assigned = np.zeros(num_classes, dtype=bool)
    chosen, group = first, 0
    for step in range(num_classes):
        grouping[chosen] = group
        assigned[chosen] = True
        old_mean = sums[group] / max(sizes[group], 1)
        row = distance.row(chosen)
        sums[group] = row if sizes[group] == 0 else sums[group] + row
        sizes[group] += 1
        new_mean = sums[group] / sizes[group]
        was = old_mean == class_min
        lower, equal = new_mean < class_min, new_mean == class_min
        class_min_count[equal & ~was] += 1
        class_min_count[was & ~equal & ~lower] -= 1
        class_min[lower], class_min_count[lower] = new_mean[lower], 1
        stale = np.flatnonzero((class_min_count == 0) & ~assigned)
        if stale.size:
            means = sums[:, stale] / np.maximum(sizes, 1)[:, None]
            class_min[stale] = means.min(axis=0)
            class_min_count[stale] = (means == class_min[stale]).sum(axis=0)
        if step == num_classes - 1:
            break
        empty = np.flatnonzero(sizes == 0)
        if empty.size:
            chosen = _pick(np.where(assigned, -np.inf, class_min), rng, largest=True)
        else:
            chosen = _pick(np.where(assigned, np.inf, class_min), rng, largest=False)
        place = np.where(sizes > 0, sums[:, chosen] / np.maximum(sizes, 1), np.inf)
        place[sizes >= limit] = np.inf
        if empty.size:
            place[empty[0]] = 0.0
        group = _pick(place, rng, largest=False)
    return grouping
