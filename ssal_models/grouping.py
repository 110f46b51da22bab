"""Class groupings for SSAL branches (METHODS.md §1).

A grouping ``γ`` is an integer array of length ``C`` (one entry per original class) with
values ``0..k-1``, every group non-empty.

* :func:`group_classes`: the balanced clustering of a confusion matrix after the SSAL
  authors' ``create_grouping_v2``, in two variants.

  ``variant="paper"`` (the default; the algorithm as METHODS.md §1 states it):

  1. ``F`` = the row-normalised confusion matrix with its diagonal set to 0.
  2. distance ``D̂ = 1 - F`` (criterion ``join``: confusable classes end up together) or
     ``D̂ = F`` (``split``: confusable classes end up apart); ``D = (D̂ + D̂ᵀ) / 2``.
  3. seeds: the most-confused class (largest ``Σ_j F_ij + F_ji``), then repeatedly the class
     farthest from the seeds chosen so far (largest distance to its nearest seed); each seed
     opens one of the ``k`` groups.
  4. greedy fill: repeatedly assign the (unassigned class, group with room) pair with the
     smallest mean distance between the class and the group's members.  Capacity is
     ``ceil(C / k)``, so every group holds between 1 and ``ceil(C/k)`` classes.

  ``variant="authors"`` reproduces ``create_grouping_v2``'s partition (their
  ``pytorch/helper_pytorch.py``; same groups on matrices without ties, checked against their
  code), which differs in four ways:

  1. distance from raw counts: ``A`` = confusion with diagonal 0, ``D̂ = max(A) - A`` (join,
     diagonal 0) or ``A`` (split), ``D = 0.5 (D̂ + D̂ᵀ)`` (equal to the paper's only for
     balanced rows);
  2. first class: the smallest row sum of ``D`` -- the most-confused class for join, the
     *least*-confused one for split; it opens group 0;
  3. fill order: while a group is empty, the class farthest from its nearest populated group is
     placed (it opens the next group unless a populated group is at distance 0 -- a tie);
     afterwards the class closest to *any* group, full ones included, is placed; a placed class
     goes to its nearest group with room;
  4. capacity: a group is full at ``len >= 1.1 * C / k`` and has no minimum size (their
     published ImageNet k = 200 file has groups of 1 to 6).

  Ties (within 1e-12) are broken at random with ``numpy.random.default_rng(seed)`` (the
  authors' code takes ``argmin``'s first index or an unseeded ``numpy.random`` draw): the
  result is a deterministic function of ``(confusion, k, criterion, seed, variant)``.

  Scale: both variants run in O(C·k) memory (one k x C float64 array of per-group distance
  sums, the confusion kept sparse) and about O(C²) time when few pairs tie
  (ssal_models/grouping_fill.py), with the partition of the plain dense code, bit for bit.
  21,841 classes (ImageNet-21k), k = 4,368, sparse hard counts, join: 23 s (paper) / 29 s
  (authors) and 1.4 GiB peak RSS on a quiet 2-core box (bench/grouping_scale.py; the
  dense code, kept as tests/grouping_reference.py, needs 27 s already at 4,000 classes and
  hours at 21,841); ``split`` on the same counts, where nearly every pair ties at distance 0:
  21 s (paper) / 24 s (authors).  The confusion may be a numpy array, a torch tensor or a
  scipy.sparse matrix (give a sparse one at 21k classes: a dense float64 copy alone is 3.8 GB).
* :func:`random_grouping`: a seeded, balanced random grouping (a control, and for tests).
* :func:`validate_grouping`, :func:`grouping_to_index` (the ``C -> k`` index tensor the
  models use), :func:`save_groupings` / :func:`load_groupings` (JSON listing the class names
  of every group, one group per line, so that a person can read it).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ssal_models.grouping_fill import SparseDistance, authors_fill, dense_blocks, paper_fill

CRITERIA = ("join", "split")
VARIANTS = ("paper", "authors")
FILE_FORMAT = "ssal-groupings/1"


# ----------------------------------------------------------------------------- validation


def validate_grouping(grouping: Any, num_classes: Optional[int] = None, what: str = "grouping") -> np.ndarray:
    """``grouping`` as an int64 array, or ``ValueError``: 1-D, integer values ``0..k-1`` with
    every group used, ``k >= 2`` and (when given) length ``num_classes``."""
    if isinstance(grouping, torch.Tensor):
        grouping = grouping.detach().cpu().numpy()
    array = np.asarray(grouping)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{what} must be a 1-D sequence with one group index per class, got shape {array.shape}")
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer)
                                   or (np.issubdtype(array.dtype, np.floating) and np.all(array == np.round(array)))):
        raise ValueError(f"{what} must hold integer group indices, got dtype {array.dtype}")
    array = array.astype(np.int64)
    if num_classes is not None and array.size != num_classes:
        raise ValueError(f"{what} has {array.size} entries but there are {num_classes} classes")
    k = int(array.max()) + 1
    if array.min() < 0 or k < 2:
        raise ValueError(f"{what} must use group indices 0..k-1 with k >= 2, got values in "
                         f"[{array.min()}, {array.max()}]")
    sizes = np.bincount(array, minlength=k)
    if np.any(sizes == 0):
        raise ValueError(f"{what} leaves groups {np.flatnonzero(sizes == 0).tolist()} empty "
                         f"(use the group indices 0..k-1 with no gap)")
    return array


def grouping_to_index(grouping: Any, num_classes: Optional[int] = None,
                      device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """The ``(C,)`` int64 tensor ``γ`` mapping class index -> group index (validated)."""
    return torch.as_tensor(validate_grouping(grouping, num_classes), dtype=torch.long, device=device)


def num_groups(grouping: Any) -> int:
    return int(validate_grouping(grouping).max()) + 1


def groups_of(grouping: Any) -> List[List[int]]:
    """The member classes of each group: ``[[classes of group 0], [classes of group 1], ...]``."""
    array = validate_grouping(grouping)
    return [np.flatnonzero(array == g).tolist() for g in range(int(array.max()) + 1)]


def _check_confusion(confusion: Any) -> np.ndarray:
    if isinstance(confusion, torch.Tensor):
        confusion = confusion.detach().cpu().numpy()
    matrix = np.asarray(confusion, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"confusion must be a square C x C matrix, got shape {matrix.shape}")
    if matrix.shape[0] < 4:
        raise ValueError(f"confusion must cover at least 4 classes (k >= 2 groups of >= 2), got {matrix.shape[0]}")
    if not np.all(np.isfinite(matrix)):
        raise ValueError("confusion must be finite (no NaN / inf)")
    if np.any(matrix < 0):
        raise ValueError("confusion must be non-negative (counts or rates)")
    return matrix


def _check_k(k: Any, num_classes: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 2 <= k <= num_classes / 2:
        raise ValueError(f"k must be an integer in [2, C/2] = [2, {num_classes // 2}] for C = {num_classes}, got {k!r}")
    return int(k)


# ----------------------------------------------------------------------------- algorithms


def class_distance(confusion: Any, criterion: str = "join") -> np.ndarray:
    """The symmetric ``C x C`` distance of steps 1-2 (diagonal 0)."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; valid criteria: {', '.join(CRITERIA)}")
    rates = _row_normalised_off_diagonal(_check_confusion(confusion))
    distance_hat = 1.0 - rates if criterion == "join" else rates
    distance = (distance_hat + distance_hat.T) / 2.0
    np.fill_diagonal(distance, 0.0)
    return distance


def _row_normalised_off_diagonal(matrix: np.ndarray) -> np.ndarray:
    totals = matrix.sum(axis=1, keepdims=True)
    rates = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    np.fill_diagonal(rates, 0.0)
    return rates


def _confusion_source(confusion: Any) -> Tuple[int, Any]:
    """Shape checks of a dense array / tensor / scipy.sparse confusion, without a float64 copy."""
    if isinstance(confusion, torch.Tensor):
        confusion = confusion.detach().cpu().numpy()
    if not _is_sparse(confusion):
        confusion = np.asarray(confusion)
        if not (np.issubdtype(confusion.dtype, np.number) and confusion.dtype.kind != "c"):
            raise ValueError(f"confusion must be a real-valued matrix, got dtype {confusion.dtype}")
    if len(confusion.shape) != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be a square C x C matrix, got shape {confusion.shape}")
    if confusion.shape[0] < 4:
        raise ValueError(f"confusion must cover at least 4 classes (k >= 2 groups of >= 2), got {confusion.shape[0]}")
    return dense_blocks(confusion)


def _is_sparse(value: Any) -> bool:
    try:
        import scipy.sparse as sp
    except ImportError:  # pragma: no cover - scipy comes with scikit-learn
        return False
    return sp.issparse(value)


def group_classes(confusion: Any, k: int, criterion: str = "join", seed: int = 0, variant: str = "paper") -> np.ndarray:
    """Balanced grouping of the ``C`` classes of ``confusion`` (rows = true class; a numpy array,
    torch tensor or scipy.sparse matrix) into ``k`` groups; ``variant`` ``paper`` or ``authors``
    (see the module docstring).  Returns an int64 array of length C, a deterministic function of
    ``(confusion, k, criterion, seed, variant)``."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; valid criteria: {', '.join(CRITERIA)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
    num_classes, blocks = _confusion_source(confusion)
    k = _check_k(k, num_classes)
    distance = SparseDistance(blocks, num_classes, variant, criterion)  # checks finite, non-negative
    rng = np.random.default_rng(seed)
    fill = paper_fill if variant == "paper" else authors_fill
    return fill(distance, k, rng)


def random_grouping(num_classes: int, k: int, seed: int = 0) -> np.ndarray:
    """A seeded random grouping with balanced sizes (``floor`` or ``ceil`` of C/k)."""
    k = _check_k(k, num_classes)
    grouping = np.empty(num_classes, dtype=np.int64)
    grouping[np.random.default_rng(seed).permutation(num_classes)] = np.arange(num_classes) % k
    return grouping


# ----------------------------------------------------------------------------- JSON files


def _check_names(class_names: Optional[Sequence[str]], num_classes: int) -> List[str]:
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    names = [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    return names


def _check_grouping_list(groupings: Any) -> List[np.ndarray]:
    if isinstance(groupings, (np.ndarray, torch.Tensor)) and np.ndim(groupings) == 1 \
            or (isinstance(groupings, (list, tuple)) and groupings and np.ndim(groupings[0]) == 0):
        raise ValueError("groupings must be a list of groupings (one per branch), got a single grouping; "
                         "wrap it in a list")
    if not isinstance(groupings, (list, tuple)) or not groupings:
        raise ValueError("groupings must be a non-empty list of groupings (one per branch)")
    arrays = [validate_grouping(g, what=f"grouping {i}") for i, g in enumerate(groupings)]
    if len({a.size for a in arrays}) != 1:
        raise ValueError(f"groupings cover different numbers of classes: {[a.size for a in arrays]}")
    return arrays


def save_groupings(path: Union[str, Path], groupings: Sequence[Any], class_names: Optional[Sequence[str]],
                   metadata: Optional[dict] = None) -> None:
    """Write ``groupings`` (one per branch) as JSON: per grouping its number of groups, the
    class->group ``assignment``, and the class *names* of every group on one line each."""
    arrays = _check_grouping_list(groupings)
    names = _check_names(class_names, arrays[0].size)
    dumps = lambda value: json.dumps(value, ensure_ascii=False)  # noqa: E731 (one-line JSON values)
    lines = ["{", f'  "format": {dumps(FILE_FORMAT)},', f'  "num_classes": {arrays[0].size},',
             f'  "class_names": {dumps(names)},']
    if metadata:
        lines.append(f'  "metadata": {dumps(metadata)},')
    lines.append('  "groupings": [')
    for index, array in enumerate(arrays):
        groups = [[names[c] for c in members] for members in groups_of(array)]
        lines += ["    {", f'      "num_groups": {len(groups)},', f'      "assignment": {dumps(array.tolist())},',
                  '      "groups": [']
        lines += [f"        {dumps(group)}" + ("," if g < len(groups) - 1 else "") for g, group in enumerate(groups)]
        lines += ["      ]", "    }" + ("," if index < len(arrays) - 1 else "")]
    lines += ["  ]", "}"]
    text = "\n".join(lines) + "\n"
    json.loads(text)  # the hand-made layout must stay valid JSON
    Path(path).write_text(text, encoding="utf-8")


def load_groupings(path: Union[str, Path]) -> Tuple[List[np.ndarray], List[str]]:
    """``(groupings, class_names)`` from a :func:`save_groupings` file.  ``assignment`` may be
    left out of a hand-written file: it is then derived from the groups' class names (which
    must be unique).  Inconsistent or invalid content raises ``ValueError``."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("groupings"), list) \
            or not isinstance(data.get("class_names"), list) \
            or not all(isinstance(entry, dict) for entry in data["groupings"]):
        raise ValueError(f"{path}: not a groupings file (needs a 'class_names' list and a 'groupings' list "
                         f"of objects)")
    names = [str(n) for n in data["class_names"]]
    num_classes = data.get("num_classes", len(names))
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise ValueError(f"{path}: num_classes must be an integer, got {num_classes!r}")
    if len(names) != num_classes:
        raise ValueError(f"{path}: {len(names)} class names but num_classes = {num_classes}")
    index_of = {name: i for i, name in enumerate(names)}
    groupings = []
    for number, entry in enumerate(data["groupings"]):
        what = f"{path}: grouping {number}"
        groups = entry.get("groups")
        if "assignment" in entry:
            array = validate_grouping(entry["assignment"], num_classes, what)
            if groups is not None and [[names[c] for c in members] for members in groups_of(array)] != groups:
                raise ValueError(f"{what}: 'groups' disagree with 'assignment' (edit one, or drop 'assignment')")
        else:
            if groups is None:
                raise ValueError(f"{what}: needs 'assignment' or 'groups'")
            if len(index_of) != len(names):
                raise ValueError(f"{what}: class names are not unique, so 'groups' alone is ambiguous")
            array = np.full(num_classes, -1, dtype=np.int64)
            if not isinstance(groups, list) or not all(isinstance(members, list) for members in groups):
                raise ValueError(f"{what}: 'groups' must be a list of lists of class names")
            for group, members in enumerate(groups):
                for name in members:
                    if name not in index_of or array[index_of[name]] >= 0:
                        raise ValueError(f"{what}: class {name!r} is unknown or in two groups")
                    array[index_of[name]] = group
            if np.any(array < 0):
                raise ValueError(f"{what}: classes {[names[c] for c in np.flatnonzero(array < 0)][:5]} are in no group")
            array = validate_grouping(array, num_classes, what)
        if "num_groups" in entry and entry["num_groups"] != int(array.max()) + 1:
            raise ValueError(f"{what}: num_groups = {entry['num_groups']} but the assignment uses {array.max() + 1}")
        groupings.append(array)
    if not groupings:
        raise ValueError(f"{path}: no groupings")
    return groupings, names
