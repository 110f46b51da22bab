"""What a run is built from, for the trainer and the post-hoc stages alike.

The trainer builds a run from these, and so do the tools that look at a finished run again (``fit_lc``,
``explain``, ``pipeline.stages.common``), which import this module rather than the worker entry:

* the model with its method (``build_model``: ``model.*`` and ``method.*``, MAXL's psi file read by
  ``method_options``, every BatchNorm's momentum);
* the primary task's label space (``label_space``: classes, or super-classes with their table) and
  ``Relabelled``, the loader wrapper that sends every label through that table;
* the held-out part of the train split (``holdout_split``, seeded apart from the training seed's other uses);
* the SSAL / GapCat groupings (``load_groupings``: from ``method.groups_file``, or seeded random ones);
* the class that trains the method (``method_training_class``: ``engine.StandardTraining``, or the one
  registered in ``METHOD_TRAININGS``) and the run's arch tag (``arch_label``);
* the trainer's first look at the data (``ensure_dataset`` writes the demo set on first use,
  ``data_problem`` says why data.root must not train this config).

Each builder reads only the config, the data set's manifest and the groupings, so a stage that rebuilds a
run from its ``config.yaml`` gets the model, labels and split the trainer had.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from pipeline.train import dist as dist_util
from pipeline.train import engine
from pipeline.train.config import REPO_ROOT, Config, ConfigError, resolve_path
from ssal_datasets.files import Busy, exclusive_lock
from ssal_datasets.manifest import class_names, quick_check, superclasses

# methods that train differently from engine.StandardTraining (module:class, imported on use)
METHOD_TRAININGS = {"maxl": "pipeline.train.maxl_training:MaxlTraining"}


#: In data.root while a run writes the demo set there on first use (a hidden file that stays)
FIRST_USE_LOCK = ".first-use.lock"


def ensure_dataset(cfg: Config, info: dist_util.DistInfo) -> Path:
    """The dataset folder; the demo set is written on first use (rank 0, others wait). Runs started
    together on a fresh machine (a study's local jobs, seeds side by side) take turns through
    ``FIRST_USE_LOCK``: the first writes, the others wait and then find the set written."""
    root = resolve_path(cfg.data.root)
    if not (root / "manifest.json").is_file():
        if cfg.data.dataset != "demo" or not cfg.data.write_demo_if_missing:
            raise ConfigError(f"data.root: {root} has no manifest.json; write it with "
                              f"`python datasets/write_ffcv.py {cfg.data.dataset} --out {root} ...`")
        if info.is_main:
            with _first_use(root / FIRST_USE_LOCK):
                if not (root / "manifest.json").is_file():
                    print(f"demo dataset missing: writing it to {root}", flush=True)
                    writer = REPO_ROOT / "datasets" / "write_ffcv.py"
                    subprocess.run([sys.executable, str(writer), "demo", "--out", str(root)], check=True)
        dist_util.barrier()
    return root


@contextlib.contextmanager
def _first_use(lock: Path):
    try:
        with exclusive_lock(lock, wait=False):
            yield
            return
    except Busy as busy:
        print(f"demo dataset missing: {busy.who} is writing it to {lock.parent}; waiting", flush=True)
    with exclusive_lock(lock, wait=True):
        yield


def data_problem(cfg: Config, data_root: Path, manifest: dict) -> str | None:
    """Why the data in data.root must not train this config (None: it may). Cheap: see quick_check."""
    if manifest["dataset"] != cfg.data.dataset:
        return (f"data.dataset: '{cfg.data.dataset}', but {data_root / 'manifest.json'} holds '{manifest['dataset']}'; "
                f"set data.dataset={manifest['dataset']} or point data.root at the {cfg.data.dataset} betons")
    problems = quick_check(data_root, manifest)
    return f"data.root: {problems[0]}" if problems else None


def load_groupings(cfg: Config, num_classes: int) -> list[np.ndarray]:
    """SSAL/GapCat groupings: from the groups file, or seeded balanced random ones."""
    from ssal_models import grouping

    if cfg.method.groups_file:
        path = resolve_path(cfg.method.groups_file)
        try:
            groupings, _ = grouping.load_groupings(path)
        except (ValueError, KeyError, json.JSONDecodeError) as err:
            raise ConfigError(f"method.groups_file: {path} is not a groupings file ({err})") from None
        for gamma in groupings:
            if len(gamma) != num_classes:
                raise ConfigError(f"method.groups_file: {path} groups {len(gamma)} classes but the dataset in "
                                  f"data.root has {num_classes}; compute groups for this dataset")
        return [np.asarray(gamma, dtype=np.int64) for gamma in groupings]
    rng = np.random.default_rng(cfg.train.seed)
    groupings = []
    for k in cfg.method.num_groups:
        if not 2 <= k <= num_classes // 2:
            raise ConfigError(f"method.num_groups: {k} groups for {num_classes} classes; need 2 <= k <= C/2")
        gamma = np.empty(num_classes, dtype=np.int64)
        gamma[rng.permutation(num_classes)] = np.arange(num_classes) % k
        groupings.append(gamma)
    return groupings


def holdout_split(num_train: int, fraction: float, seed: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(train indices, held-out indices) of the train split; (None, None) when nothing is held out.
    Seeded apart from the training seed's other uses, so changing it does not move other randomness."""
    if fraction <= 0:
        return None, None
    order = np.random.default_rng([seed, 0x401D]).permutation(num_train)
    cut = max(1, int(round(num_train * fraction)))
    return np.sort(order[cut:]), np.sort(order[:cut])


def method_options(cfg: Config, groupings: list[np.ndarray] | None) -> dict:
    """The keyword options of ``ssal_models.build_model``: ``method.options`` with the groupings added
    and MAXL's psi read from its file when it names one."""
    options = dict(cfg.method.options)
    if groupings is not None:
        options["groupings"] = [g.tolist() for g in groupings]
    psi = options.get("psi")
    if isinstance(psi, str) and psi.endswith((".json", ".yaml", ".yml")):
        options["psi"] = read_hierarchy_file(psi)
    return options


def read_hierarchy_file(path_text: str) -> list[int]:
    """MAXL's ψ from a file: a YAML/JSON list of per-class auxiliary-class counts, or a mapping
    with key `psi` holding that list (ssal_models stays free of file I/O)."""
    path = resolve_path(path_text)
    if not path.is_file():
        raise ConfigError(f"method.options.psi: no such hierarchy file {path_text}")
    data = yaml.safe_load(path.read_text())
    counts = data.get("psi") if isinstance(data, dict) else data
    if not (isinstance(counts, list) and counts and all(isinstance(c, int) and c >= 1 for c in counts)):
        raise ConfigError(f"method.options.psi: {path_text} must hold a list of positive integers "
                          f"(auxiliary classes per primary class), or {{psi: [...]}}")
    return counts


def label_space(cfg: Config, manifest: dict) -> tuple[int, list[str], torch.Tensor | None]:
    """``(num_classes, class names, class -> label table or None)`` of the primary task (data.labels)."""
    if cfg.data.labels == "class":
        return int(manifest["num_classes"]), class_names(manifest), None
    table = superclasses(manifest)
    if table is None:
        raise ConfigError(f"data.labels: superclass, but the manifest of {cfg.data.root} names no super-classes "
                          f"(only the demo set has them); set data.labels=class")
    names = {c["superclass"]: c.get("superclass_name", str(c["superclass"])) for c in manifest["classes"]}
    return len(names), [names[i] for i in range(len(names))], torch.tensor(table, dtype=torch.int64)


class Relabelled:
    """A loader whose labels go through ``table`` (data.labels=superclass: class -> super-class);
    everything else is the wrapped loader's."""

    def __init__(self, loader, table: torch.Tensor):
        self.loader, self.table = loader, table

    def __iter__(self):
        for images, labels, *rest in self.loader:
            if self.table.device != labels.device:
                self.table = self.table.to(labels.device)
            yield (images, self.table[labels], *rest)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def build_model(cfg: Config, num_classes: int, groupings) -> nn.Module:
    """The model with its method as the config describes it (``model.*``, ``method.*``), on the CPU."""
    import ssal_models

    options = method_options(cfg, groupings)
    try:
        model = ssal_models.build_model(cfg.model.arch, cfg.method.name, num_classes,
                                        blurpool=cfg.model.blurpool, zero_init_residual=cfg.model.zero_init_residual,
                                        width_multiplier=cfg.model.width_multiplier, stem_convs=cfg.model.stem_convs,
                                        stem_conv_width=cfg.model.stem_conv_width, **options)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model/method: {err}") from None
    set_bn_momentum(model, cfg.model.bn_momentum)
    return model


def set_bn_momentum(model: nn.Module, momentum: float) -> None:
    """Every BatchNorm of the model, branches included (as the SSAL authors set theirs:
    ``1 - 0.9 ** (batch / 32)``, 0.28 at their batch of 100)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum


def method_training_class(method: str) -> type:
    """The class that trains ``method`` (its optimisers and one step): ``engine.StandardTraining`` unless
    the method is registered in ``METHOD_TRAININGS``."""
    target = METHOD_TRAININGS.get(method)
    if target is None:
        return engine.StandardTraining
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def arch_label(model_cfg) -> str:
    """The arch tag: the torchvision name, plus the capacity options when they are set
    (``resnet18-w1.5``, ``resnet18-stem4x256``), so capacity baselines differ in the report."""
    label = model_cfg.arch
    if model_cfg.width_multiplier != 1.0:
        label += f"-w{model_cfg.width_multiplier:g}"
    if model_cfg.stem_convs:
        label += f"-stem{model_cfg.stem_convs}x{model_cfg.stem_conv_width}"
    return label
