"""Class hierarchies for MAXL (data + pure helpers; no file I/O).

MAXL (``ssal_models.maxl``) needs a hierarchy ``psi``: ``psi[y]`` is the number
of auxiliary classes owned by primary class ``y`` (``sum(psi)`` auxiliary
classes in all, owned in contiguous blocks: class 0 owns ``0..psi[0]-1``, and so
on).  This module ships

* the CIFAR-100 4-level hierarchy of the MAXL supplementary, Table 1
  (3 / 10 / 20 / 100 classes).  Fine (100) and coarse (20) class indices are
  those of the CIFAR-100 release (alphabetical names, as in
  ``torchvision.datasets.CIFAR100``); the 10- and 3-class levels are numbered in
  the order of Table 1, which is also the numbering of the authors' public code
  (lorenmt/maxl ``create_dataset.py``);
* :func:`make_psi` (``None`` / int / list of counts -> ``psi``),
  :func:`psi_from_parents` (a list "super-class id of every sub-class", e.g. from a
  dataset manifest -> ``psi``), and :func:`cifar100_psi` (``psi`` for a pair of
  CIFAR-100 levels, e.g. primary 20 / auxiliary 100 -> ``[5] * 20``).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

DEFAULT_AUX_PER_CLASS = 5

# --------------------------------------------------------------------------------------
# CIFAR-100, 4 levels (supplementary Table 1)
# --------------------------------------------------------------------------------------
CIFAR100_FINE_NAMES: Tuple[str, ...] = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)

CIFAR100_COARSE_NAMES: Tuple[str, ...] = (
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "large_omnivores_and_herbivores",
    "medium_mammals", "non-insect_invertebrates", "people", "reptiles", "small_mammals", "trees",
    "vehicles_1", "vehicles_2",
)

# Table 1, 20-class level -> its five 100-class members.
CIFAR100_COARSE_MEMBERS: Dict[str, Tuple[str, ...]] = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}

# Table 1, 10-class level (in Table 1's order) -> its 20-class members.
CIFAR100_L10_MEMBERS: Dict[str, Tuple[str, ...]] = {
    "large_animals": ("reptiles", "large_carnivores", "large_omnivores_and_herbivores"),
    "medium_animals": ("aquatic_mammals", "medium_mammals"),
    "small_animals": ("small_mammals", "fish"),
    "invertebrates": ("insects", "non-insect_invertebrates"),
    "people": ("people",),
    "vegetations": ("flowers", "fruit_and_vegetables", "trees"),
    "household_objects": ("food_containers", "household_electrical_devices", "household_furniture"),
    "construction": ("large_man-made_outdoor_things",),
    "natural_scenes": ("large_natural_outdoor_scenes",),
    "vehicles": ("vehicles_1", "vehicles_2"),
}

# Table 1, 3-class level -> its 10-class members.
CIFAR100_L3_MEMBERS: Dict[str, Tuple[str, ...]] = {
    "animals": ("large_animals", "medium_animals", "small_animals", "invertebrates", "people"),
    "vegetations": ("vegetations",),
    "objects_and_scenes": ("household_objects", "construction", "natural_scenes", "vehicles"),
}

CIFAR100_L10_NAMES: Tuple[str, ...] = tuple(CIFAR100_L10_MEMBERS)
CIFAR100_L3_NAMES: Tuple[str, ...] = tuple(CIFAR100_L3_MEMBERS)


def _parent_index(members: Dict[str, Tuple[str, ...]], child_names: Sequence[str]) -> Tuple[int, ...]:
    parent_names = list(members)
    of = {c: parent_names.index(p) for p, cs in members.items() for c in cs}
    assert sorted(of) == sorted(child_names), "hierarchy table does not cover every child exactly once"
    return tuple(of[c] for c in child_names)


#: parent of each fine class (100 -> 20), parent of each coarse class (20 -> 10), (10 -> 3)
CIFAR100_FINE_TO_COARSE: Tuple[int, ...] = _parent_index(CIFAR100_COARSE_MEMBERS, CIFAR100_FINE_NAMES)
CIFAR100_COARSE_TO_L10: Tuple[int, ...] = _parent_index(CIFAR100_L10_MEMBERS, CIFAR100_COARSE_NAMES)
CIFAR100_L10_TO_L3: Tuple[int, ...] = _parent_index(CIFAR100_L3_MEMBERS, CIFAR100_L10_NAMES)

CIFAR100_LEVELS: Tuple[int, ...] = (3, 10, 20, 100)


def cifar100_level_labels(fine_label: int) -> Tuple[int, int, int, int]:
    """Labels of one CIFAR-100 fine class at the 3 / 10 / 20 / 100 levels."""
    c20 = CIFAR100_FINE_TO_COARSE[fine_label]
    c10 = CIFAR100_COARSE_TO_L10[c20]
    return CIFAR100_L10_TO_L3[c10], c10, c20, fine_label


def cifar100_level_map(level: int) -> Tuple[int, ...]:
    """Label at ``level`` (3, 10, 20 or 100) of each of the 100 fine classes."""
    i = CIFAR100_LEVELS.index(level)
    return tuple(cifar100_level_labels(f)[i] for f in range(100))


def cifar100_psi(primary: int = 20, auxiliary: int = 100) -> List[int]:
    """``psi`` for CIFAR-100 primary level ``primary`` and auxiliary level ``auxiliary``.

    ``psi[y]`` = number of ``auxiliary``-level classes below primary class ``y``
    (e.g. ``cifar100_psi(20, 100) == [5] * 20``; ``cifar100_psi(3, 10) == [5, 1, 4]``).
    """
    if primary not in CIFAR100_LEVELS or auxiliary not in CIFAR100_LEVELS or auxiliary <= primary:
        raise ValueError(f"need two CIFAR-100 levels from {CIFAR100_LEVELS} with auxiliary > primary")
    pri, aux = cifar100_level_map(primary), cifar100_level_map(auxiliary)
    parent_of_aux = [None] * auxiliary
    for p, a in zip(pri, aux):
        parent_of_aux[a] = p
    return psi_from_parents(parent_of_aux, primary)


# --------------------------------------------------------------------------------------
# generic helpers
# --------------------------------------------------------------------------------------
def psi_from_parents(parent_ids: Sequence[int], num_primary: Optional[int] = None) -> List[int]:
    """``psi`` from the super-class id of every sub-class: ``psi[y] = #{k: parent_ids[k] == y}``.

    E.g. a dataset manifest lists, for each fine class, its super-class; with the
    super-classes as primary task the fine classes become the auxiliary space.
    ``num_primary`` defaults to ``max(parent_ids) + 1``; every primary class must own
    at least one auxiliary class (the mask softmax is undefined otherwise).
    """
    ids = [int(p) for p in parent_ids]
    if not ids or min(ids) < 0:
        raise ValueError("parent_ids must be a non-empty list of non-negative class ids")
    n = max(ids) + 1 if num_primary is None else int(num_primary)
    if max(ids) >= n:
        raise ValueError(f"parent id {max(ids)} out of range for {n} primary classes")
    psi = [0] * n
    for p in ids:
        psi[p] += 1
    empty = [y for y, k in enumerate(psi) if k == 0]
    if empty:
        raise ValueError(f"primary classes {empty[:10]} own no auxiliary class")
    return psi


PsiSpec = Union[None, int, Sequence[int]]


def make_psi(num_classes: int, psi: PsiSpec = None) -> List[int]:
    """Normalise a ``psi`` option: ``None`` -> 5 per class, int ``k`` -> ``k`` per class,
    a list of ``num_classes`` positive counts -> itself."""
    if psi is None:
        psi = DEFAULT_AUX_PER_CLASS
    if isinstance(psi, int):
        if psi < 1:
            raise ValueError("psi must be >= 1")
        return [psi] * int(num_classes)
    out = [int(k) for k in psi]
    if len(out) != num_classes:
        raise ValueError(f"psi has {len(out)} entries for {num_classes} classes")
    if min(out) < 1:
        raise ValueError("every primary class needs at least one auxiliary class")
    return out
