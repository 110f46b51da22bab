"""ssal_models.grouping: the balanced confusion clustering, its validation, index helper and JSON files."""
import json
import math

import numpy as np
import pytest
import torch

from ssal_models import grouping


def planted_confusion(num_blocks=8, block_size=5, seed=0, within=20, noise=3, correct=100):
    """Counts of a classifier that confuses classes inside planted blocks (+ Poisson noise)."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(num_blocks), block_size)
    counts = rng.poisson(noise, (truth.size, truth.size)).astype(float)
    counts += (truth[:, None] == truth[None, :]) * rng.poisson(within, counts.shape)
    np.fill_diagonal(counts, correct)
    return counts, truth


def same_partition(a, b):
    """Equal up to a renaming of the groups."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def block_pairs_together(g, truth):
    """How many pairs of classes of the same planted block share a group."""
    same_group = g[:, None] == g[None, :]
    same_block = truth[:, None] == truth[None, :]
    return int(np.triu(same_group & same_block, 1).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_join_recovers_planted_blocks_exactly(seed):
    counts, truth = planted_confusion(seed=seed)
    g = grouping.group_classes(counts, 8, "join", seed=seed)
    assert same_partition(g, truth)


def test_join_recovers_blocks_of_four_from_a_transposed_confusion():
    # rows/columns permuted: nothing depends on classes of a block being adjacent
    counts, truth = planted_confusion(num_blocks=8, block_size=4, within=8, seed=5)
    perm = np.random.default_rng(0).permutation(truth.size)
    g = grouping.group_classes(counts[np.ix_(perm, perm)], 8, "join")
    assert same_partition(g, truth[perm])


def test_split_spreads_every_block_across_groups():
    counts, truth = planted_confusion(seed=3)
    g = grouping.group_classes(counts, 5, "split", seed=0)
    assert block_pairs_together(g, truth) == 0  # each of the 5 groups holds one class of every block
    # whereas join puts them all together
    assert block_pairs_together(grouping.group_classes(counts, 8, "join"), truth) == 8 * math.comb(5, 2)


@pytest.mark.parametrize("num_classes,k", [(40, 8), (37, 5), (10, 4), (100, 33), (1000, 334)])
def test_balanced_nonempty_and_deterministic(num_classes, k):
    confusion = np.random.default_rng(num_classes).random((num_classes, num_classes))
    g = grouping.group_classes(confusion, k, "join", seed=7)
    sizes = np.bincount(g, minlength=k)
    assert g.shape == (num_classes,) and g.dtype == np.int64
    assert sizes.min() >= 1 and sizes.max() <= math.ceil(num_classes / k) and sizes.size == k
    assert np.array_equal(g, grouping.group_classes(confusion, k, "join", seed=7))


def test_seed_breaks_ties_differently():
    # an all-equal confusion is nothing but ties: the seed decides
    confusion = np.ones((20, 20))
    results = {tuple(grouping.group_classes(confusion, 4, seed=s)) for s in range(6)}
    assert len(results) > 1
    for g in results:
        assert np.bincount(g).tolist() == [5, 5, 5, 5]


def test_distance_follows_the_spec():
    counts = np.array([[8, 2, 0, 0], [1, 7, 2, 0], [0, 0, 10, 0], [5, 0, 0, 5]], dtype=float)
    rates = counts / counts.sum(1, keepdims=True)
    np.fill_diagonal(rates, 0)
    join = grouping.class_distance(counts, "join")
    split = grouping.class_distance(counts, "split")
    expected_join = ((1 - rates) + (1 - rates).T) / 2
    np.fill_diagonal(expected_join, 0)
    np.testing.assert_allclose(join, expected_join)
    np.testing.assert_allclose(split, (rates + rates.T) / 2)


def test_accepts_a_torch_confusion_and_rows_without_samples():
    counts, truth = planted_confusion()
    counts[3] = 0  # a class never seen in the held-out data
    g = grouping.group_classes(torch.as_tensor(counts), 8)
    assert np.bincount(g).tolist() == [5] * 8


@pytest.mark.parametrize("confusion,k,criterion,match", [
    (np.ones((10, 10)), 1, "join", "k must be"),
    (np.ones((10, 10)), 6, "join", "k must be"),
    (np.ones((10, 10)), 2.0, "join", "k must be"),
    (np.ones((10, 9)), 2, "join", "square"),
    (np.ones(10), 2, "join", "square"),
    (-np.ones((10, 10)), 2, "join", "non-negative"),
    (np.full((10, 10), np.nan), 2, "join", "finite"),
    (np.ones((10, 10)), 2, "merge", "criterion"),
])
def test_bad_arguments_raise(confusion, k, criterion, match):
    with pytest.raises(ValueError, match=match):
        grouping.group_classes(confusion, k, criterion)


def test_grouping_to_index_and_validation():
    index = grouping.grouping_to_index([1, 0, 2, 1], num_classes=4)
    assert index.dtype == torch.long and index.tolist() == [1, 0, 2, 1]
    for bad, match in [([0, 0, 0], "k >= 2"), ([0, 2, 2, 0], "empty"), ([0, -1, 1], "group indices"),
                       ([[0, 1]], "1-D"), ([0.5, 1.0], "integer"), ([True, False], "integer")]:
        with pytest.raises(ValueError, match=match):
            grouping.grouping_to_index(bad)
    with pytest.raises(ValueError, match="4 classes"):
        grouping.grouping_to_index([0, 1, 1], num_classes=4)


def test_random_grouping_is_balanced_and_seeded():
    g = grouping.random_grouping(10, 3, seed=1)
    assert sorted(np.bincount(g).tolist()) == [3, 3, 4]
    assert np.array_equal(g, grouping.random_grouping(10, 3, seed=1))
    assert not np.array_equal(g, grouping.random_grouping(10, 3, seed=2))


def test_save_load_roundtrip_is_readable(tmp_path):
    names = [f"class_{i}" for i in range(6)]
    groupings = [np.array([0, 0, 1, 1, 2, 2]), np.array([1, 0, 1, 0, 1, 0])]
    path = tmp_path / "groups.json"
    grouping.save_groupings(path, groupings, names, metadata={"criterion": "join"})
    loaded, loaded_names = grouping.load_groupings(path)
    assert loaded_names == names
    assert [g.tolist() for g in loaded] == [g.tolist() for g in groupings]
    text = path.read_text()
    assert '["class_0", "class_1"]' in text  # a group's class names on one line
    data = json.loads(text)
    assert data["groupings"][1]["groups"] == [["class_1", "class_3", "class_5"], ["class_0", "class_2", "class_4"]]
    assert data["metadata"] == {"criterion": "join"}


def test_load_derives_assignment_from_hand_written_groups(tmp_path):
    path = tmp_path / "hand.json"
    path.write_text(json.dumps({"class_names": ["a", "b", "c", "d"], "groupings": [{"groups": [["b", "d"], ["a", "c"]]}]}))
    loaded, _ = grouping.load_groupings(path)
    assert loaded[0].tolist() == [1, 0, 1, 0]


@pytest.mark.parametrize("content,match", [
    ({"class_names": ["a", "b", "c", "d"], "groupings": [{"groups": [["a", "b"], ["c"]]}]}, "in no group"),
    ({"class_names": ["a", "b", "c", "d"], "groupings": [{"groups": [["a", "b"], ["c", "a", "d"]]}]}, "two groups"),
    ({"class_names": ["a", "b", "c", "d"], "groupings": [{"assignment": [0, 0, 1, 1], "groups": [["a", "c"], ["b", "d"]]}]},
     "disagree"),
    ({"class_names": ["a", "b", "c", "d"], "groupings": [{"assignment": [0, 0, 1]}]}, "4 classes"),
    ({"groupings": []}, "not a groupings file"),
])
def test_load_rejects_inconsistent_files(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=match):
        grouping.load_groupings(path)


def test_save_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="single grouping"):
        grouping.save_groupings(tmp_path / "x.json", [0, 1, 0, 1], None)
    with pytest.raises(ValueError, match="class names"):
        grouping.save_groupings(tmp_path / "x.json", [[0, 1, 0, 1]], ["a", "b"])
    with pytest.raises(ValueError, match="different numbers of classes"):
        grouping.save_groupings(tmp_path / "x.json", [[0, 1, 0, 1], [0, 1, 0]], None)


@pytest.mark.parametrize("content", [[1, 2], {"class_names": ["a", "b"], "groupings": [[0, 1]]},
                                     {"class_names": ["a", "b", "c", "d"], "num_classes": "4", "groupings": [{}]},
                                     {"class_names": ["a", "b", "c", "d"], "groupings": [{"groups": "ab"}]}])
def test_load_reports_malformed_structure_as_value_error(tmp_path, content):
    path = tmp_path / "odd.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError):
        grouping.load_groupings(path)


# ----------------------------------------------------------------------------- variant="authors"
# Expected partitions below are worked out by hand from create_grouping_v2's steps: first class =
# smallest row sum of D (join: D = max(M) - M, the most confused; split: D = M, the least
# confused), then while a group is empty the class farthest from its nearest group opens the
# next one, then the class closest to any group (full ones included) goes to its nearest group
# with room; a group is full at len >= 1.1 * C / k.


def blocks_confusion(sizes, within=10.0, correct=50.0):
    truth = np.repeat(np.arange(len(sizes)), sizes)
    counts = within * (truth[:, None] == truth[None, :])
    np.fill_diagonal(counts, correct)
    return counts, truth


def test_authors_split_starts_from_the_least_confused_class_and_allows_a_singleton():
    # symmetric off-diagonal counts; row sums 11, 11, 3, 7: class 2 is the least confused
    counts = np.diag([20.0] * 4)
    for i, j, v in [(0, 1, 6), (0, 3, 4), (1, 3, 3), (0, 2, 1), (1, 2, 2)]:
        counts[i, j] = counts[j, i] = v
    # group 0 = {2}; farthest from it: class 1 (D = 2) opens group 1; then class 3 (D = 0 to group 0)
    # joins group 0; then class 0 (mean 2.5 to group 0 vs 6 to group 1) joins group 0: 1.1*4/2 = 2.2,
    # so a group is full only at 3 members
    g = grouping.group_classes(counts, 2, "split", variant="authors")
    assert g.tolist() == [0, 1, 0, 0]
    assert sorted(np.bincount(g).tolist()) == [1, 3]  # no minimum size, no balance
    assert sorted(np.bincount(grouping.group_classes(counts, 2, "split")).tolist()) == [2, 2]  # paper: ceil(C/k)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_authors_capacity_is_1_1_c_over_k(seed):
    # C = 20, k = 4: full at len >= 5.5, so the block of 6 stays whole (the paper variant caps at 5)
    counts, truth = blocks_confusion([6, 5, 5, 4])
    counts[0, 1] = counts[1, 0] = 11  # class 0 is the single most confused one
    g = grouping.group_classes(counts, 4, "join", seed=seed, variant="authors")
    assert same_partition(g, truth) and g[0] == 0
    assert np.bincount(grouping.group_classes(counts, 4, "join", seed=seed)).max() == 5
    # a block of 7: the 7th class finds its group full and goes to another one (all at the same
    # distance: the seeded draw picks which); the other blocks stay whole
    counts, truth = blocks_confusion([7, 5, 4, 4])
    g = grouping.group_classes(counts, 4, "join", seed=seed, variant="authors")
    assert sorted(np.unique(g[truth == 0], return_counts=True)[1].tolist()) == [1, 6] and np.bincount(g).max() == 6
    assert all(len(set(g[truth == block].tolist())) == 1 for block in (1, 2, 3))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_authors_isolated_class_keeps_a_group_of_its_own(seed):
    # three blocks of 3 and class 9 confused with nobody: every seed after the first is at distance
    # max from the groups so far, one per block and class 9; the blocks then fill their own groups
    counts, truth = blocks_confusion([3, 3, 3, 1])
    g = grouping.group_classes(counts, 4, "join", seed=seed, variant="authors")
    assert same_partition(g, truth)
    assert np.bincount(g).tolist().count(1) == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_authors_fill_order_places_the_class_closest_to_a_full_group_first(seed):
    # classes 0-3 = clique A, 4-6 = clique B (counts 10), 7 = c (confused with nobody), 8 = x (7 with
    # each of A, 2 with each of B), 9 = y (6 with each of B, 2 with each of A); A-B pairs 1. C = 10,
    # k = 3: full at len >= 3.67. D = 10 - M: first class = one of A (row sum 48, the smallest);
    # farthest from it: c (D = 10) opens group 1, then one of B (9 vs y's 8) opens group 2; A and
    # B fill their groups at distance 0 (A full with 4, B at 3). Left: x (mean 3 to the *full* A)
    # and y (mean 4 to B): the authors place x first, into its nearest group with room, B (8 < 10),
    # which fills B, so y goes to c's group.
    counts = np.zeros((10, 10))

    def pair(i, j, value):
        counts[i, j] = counts[j, i] = value
    for block in (range(0, 4), range(4, 7)):
        for i in block:
            for j in block:
                pair(i, j, 10)
    for a in range(4):
        pair(8, a, 7)
        pair(9, a, 2)
        for b in range(4, 7):
            pair(a, b, 1)
    for b in range(4, 7):
        pair(8, b, 2)
        pair(9, b, 6)
    np.fill_diagonal(counts, 50)
    assert grouping.group_classes(counts, 3, "join", seed=seed, variant="authors").tolist() == \
        [0, 0, 0, 0, 2, 2, 2, 1, 2, 1]
    # the closest (class, group with room) pair instead gives y B's last place and x goes to c
    paper = grouping.group_classes(counts, 3, "join", seed=seed)
    assert paper[9] == paper[4] and paper[8] == paper[7]


@pytest.mark.parametrize("criterion", ["join", "split"])
def test_authors_variant_equals_a_literal_statement_of_create_grouping_v2(criterion):
    # dense random matrices have no ties: no random draw is involved, the groups must be the same
    from tests.grouping_reference import reference_authors_group_classes

    for case in range(12):
        rng = np.random.default_rng(case)
        num_classes = int(rng.integers(6, 40))
        k = int(rng.integers(2, num_classes // 2 + 1))
        counts = rng.integers(0, 10**6, (num_classes, num_classes)).astype(float) if case % 2 \
            else rng.random((num_classes, num_classes))
        expected = reference_authors_group_classes(counts, k, criterion)
        assert np.array_equal(grouping.group_classes(counts, k, criterion, variant="authors"), expected)


def test_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="variant"):
        grouping.group_classes(np.ones((8, 8)), 2, variant="mine")
