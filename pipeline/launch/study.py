"""Studies: a paper table as one command -- a graph of stages run in order, resumable as a whole.

    python pipeline/launch.py --study studies/demo.yaml --local [key=value ...]
    python pipeline/launch.py --study studies/imagenet_resnet50.yaml --cluster mycluster --nodes 4 [key=value ...]
    python pipeline/study.py studies/demo.yaml --status          # plan + what is finished, runs nothing

Study file (YAML)::

    study: demo                    # id: tag `study` of every run of the study (letters, digits, _ . -)
    experiment: demo-study         # MLflow experiment of every stage (default: study-<id>)
    description: free text
    base:                          # every training stage starts from this
      config: configs/demo.yaml    # recipe (default: the engine's embedded demo job)
      overrides: {schedule.epochs: 4}          # mapping or list of "key=value"
    slurm: {time: "02:00:00"}      # optional: launcher profile keys for every stage's job
    report: true                   # add a final `report` stage (default true)
    stages:                        # in order; each: kind (default train) + its keys
      baseline:
        overrides: {method.name: baseline, eval.holdout_fraction: 0.1}
      groups:
        kind: groups               # pipeline/groups.py on a training stage's confusion
        from: baseline
        k: [8]
        criterion: join            # join | split; also seed, restarts, split (auto|holdout|val),
                                   # variant (paper|authors), confusion (soft|hard; default soft)
      ssal3:
        overrides: {method.name: ssal, method.groups_file: "${groups}"}
      lc:
        kind: lc                   # pipeline/fit_lc.py: +LC head on a frozen SSAL stage
        from: ssal3                # also epochs, lr, max_samples
      cams:
        kind: explain              # pipeline/explain.py: CAM figure of a stage; also images (count)
        from: ssal3
      dks2:
        config: configs/imagenet/resnet50_dks2.yaml   # a stage may bring its own recipe
        slurm: {nodes: 8}          # and its own job resources
        paper: {main: [76.4, 93.3]}  # any stage: the paper's top-1 / top-5 per rule, shown by the report

Stage kinds: ``train`` (the engine, ``pipeline.train``), ``groups``, ``lc``, ``explain``, ``report``.
``${NAME}`` inside an override value is the output of stage NAME (a groups stage: its JSON; a
training stage: its run folder) and makes this stage depend on it; ``after: [NAME, ...]`` adds
dependencies by hand; ``from:`` is a dependency too. Stages without a path between them are
siblings: SLURM runs them in parallel, ``--local`` one after the other in file order.

Every training stage is the engine with: the base recipe <- base overrides <- stage overrides <-
command-line overrides, then ``tracking.experiment``, ``tracking.run_name=<stage>``,
``tracking.tags.study``/``.stage``, ``output_dir=<runs_root>/studies/<id>/<stage>`` and
``--resume auto``. Other stages log their own MLflow run with the same tags. Stage outputs live
under ``<runs_root>/studies/<id>/``.

Resuming. A stage whose MLflow run (tags ``study``, ``stage``) is FINISHED -- and, for a groups
stage, whose JSON exists -- is skipped; an unfinished training stage continues from its last
checkpoint (``--resume auto``). So re-running the same command after a crash, a preemption or an
added stage runs only what is missing. The report stage runs again whenever another stage ran. On SLURM, a
stage whose job from an earlier submission is still queued or running is not submitted again (what is
submitted now waits for that job), so the command may be repeated while the chain is in flight.

SLURM. One job per stage (1 node / 1 task for groups and report; 1 GPU for lc and explain when
the profile has GPUs; the profile and flags for training), each with ``--dependency=afterok:<the
jobs of its dependencies>`` and ``--kill-on-invalid-dep=yes`` (a failed stage cancels what
depends on it), all submitted at once through the launcher's submitit executor
(``pipeline.launch.slurm.make_executor``, ``pipeline.launch.task.TrainTask``). If sbatch refuses one (a bad
partition, more nodes than the partition has ...), the jobs submitted before it are cancelled and the error
is one line, exit 2. Job folders and logs: ``<study dir>/slurm/<stage>/<job id>/``.
"""
from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


import yaml

from pipeline.train.config import REPO_ROOT, ConfigError, load_config, resolve_path

EXIT_USAGE = 2
ENTRIES = {"train": "pipeline.train.entry:main", "groups": "pipeline.stages.groups:main", "lc": "pipeline.stages.fit_lc:main",
           "explain": "pipeline.stages.explain:main", "report": "pipeline.stages.report:main"}
TOP_KEYS = ("study", "experiment", "description", "base", "stages", "report", "slurm")
COMMON_KEYS = ("kind", "after", "slurm", "paper")
STAGE_KEYS = {
    "train": ("config", "overrides"),
    "groups": ("from", "k", "criterion", "seed", "restarts", "split", "variant", "confusion"),
    "lc": ("from", "epochs", "lr", "max_samples"),
    "explain": ("from", "images"),
    "report": (),
}
_ID_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_REF_RE = re.compile(r"\$\{([^}]*)\}")


class StudyError(Exception):
    """A bad study file or usage: printed as one line naming the key and the fix, exit 2."""


@dataclass
class Stage:
    name: str
    kind: str
    spec: dict
    deps: list[str] = field(default_factory=list)
    output: Path = Path()
    argv: list[str] = field(default_factory=list)
    slurm: dict = field(default_factory=dict)

    @property
    def entry(self) -> str:
        return ENTRIES[self.kind]

    @property
    def module(self) -> str:
        return self.entry.split(":")[0]


@dataclass
class Study:
    id: str
    experiment: str
    path: Path
    description: str
    stages: dict[str, Stage]  # in run order (a topological order that keeps file order where it can)
    runs_root: Path
    uri: str
    dir: Path
    slurm: dict


# ----------------------------------------------------------------------------- parsing


def _where(path: Path, key: str) -> str:
    return f"{path}: {key}"


def _overrides_list(value: Any, what: str) -> list[str]:
    """A mapping {key: value} or a list of 'key=value' strings -> ['key=value', ...] (values as JSON = YAML)."""
    if value is None:
        return []
    if isinstance(value, dict):
        out = []
        for key, v in value.items():
            text = v if isinstance(v, str) and not _needs_quoting(v) else json.dumps(v)
            out.append(f"{key}={text}")
        return out
    if isinstance(value, list) and all(isinstance(x, str) and "=" in x for x in value):
        return list(value)
    raise StudyError(f"{what}: expected a mapping {{section.key: value}} or a list of 'section.key=value' strings, "
                     f"got {value!r}")


def _needs_quoting(text: str) -> bool:
    """A string that YAML would read back as something else (a number, a bool, a list ...)."""
    try:
        return not isinstance(yaml.safe_load(text), str)
    except yaml.YAMLError:
        return True


def _check_keys(mapping: dict, allowed: Sequence[str], what: str) -> None:
    unknown = [k for k in mapping if k not in allowed]
    if unknown:
        raise StudyError(f"{what}: unknown key(s) {', '.join(map(str, unknown))} (valid: {', '.join(allowed)})")


def _refs(values: Sequence[str]) -> list[str]:
    return [m for v in values for m in _REF_RE.findall(v)]


def load_study(path: str | Path, cli_overrides: Sequence[str] = ()) -> Study:
    """Parse and validate a study file; every training stage's config is validated too."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"--study: no such file {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise StudyError(f"{path}{' line ' + str(mark.line + 1) if mark else ''}: not valid YAML "
                         f"({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise StudyError(f"{path}: a study file is a mapping with keys {', '.join(TOP_KEYS)}")
    _check_keys(data, TOP_KEYS, str(path))
    study_id = data.get("study")
    if not isinstance(study_id, str) or not _ID_RE.match(study_id):
        raise StudyError(f"{_where(path, 'study')}: needs an id of letters, digits, '_', '.', '-' (got {study_id!r})")
    experiment = data.get("experiment") or f"study-{study_id}"
    if not isinstance(experiment, str):
        raise StudyError(f"{_where(path, 'experiment')}: expected a string, got {experiment!r}")
    base = data.get("base") or {}
    if not isinstance(base, dict):
        raise StudyError(f"{_where(path, 'base')}: expected a mapping with config / overrides")
    _check_keys(base, ("config", "overrides"), _where(path, "base"))
    base_config = base.get("config")
    base_overrides = _overrides_list(base.get("overrides"), _where(path, "base.overrides"))
    cli_overrides = list(cli_overrides)
    for text in cli_overrides:
        if "=" not in text:
            raise StudyError(f"override {text!r}: expected section.key=value")
    slurm_all = data.get("slurm") or {}
    if not isinstance(slurm_all, dict):
        raise StudyError(f"{_where(path, 'slurm')}: expected a mapping of launcher profile keys")

    # the study's store and folder: from the base recipe + the command line
    try:
        base_cfg = load_config(_config_path(base_config, path, "base.config"), base_overrides + cli_overrides)
    except ConfigError as err:
        raise StudyError(f"{path}: base: {err}") from None
    runs_root = resolve_path(base_cfg.runs_root)
    study_dir = runs_root / "studies" / study_id
    uri = base_cfg.tracking.uri or f"sqlite:///{runs_root / 'mlflow.db'}"

    raw_stages = data.get("stages")
    if not isinstance(raw_stages, dict) or not raw_stages:
        raise StudyError(f"{_where(path, 'stages')}: needs a mapping of at least one stage (name: spec)")
    if data.get("report", True) and "report" not in raw_stages:
        raw_stages = dict(raw_stages)
        raw_stages["report"] = {"kind": "report"}
    stages: dict[str, Stage] = {}
    for name, spec in raw_stages.items():
        name = str(name)
        what = _where(path, f"stages.{name}")
        if not _ID_RE.match(name):
            raise StudyError(f"{what}: stage names use letters, digits, '_', '.', '-'")
        spec = dict(spec or {})
        kind = spec.get("kind", "report" if name == "report" else "train")
        if kind not in STAGE_KEYS:
            raise StudyError(f"{what}.kind: '{kind}' is not one of {', '.join(STAGE_KEYS)}")
        _check_keys(spec, COMMON_KEYS + STAGE_KEYS[kind], what)
        after = spec.get("after") or []
        if isinstance(after, str):
            after = [after]
        if not isinstance(after, list) or not all(isinstance(a, str) for a in after):
            raise StudyError(f"{what}.after: expected a list of stage names")
        if "paper" in spec:  # figures the report shows beside ours
            from pipeline.stages.report import parse_paper
            try:
                parse_paper(spec["paper"], f"{what}.paper")
            except ValueError as err:
                raise StudyError(str(err)) from None
        slurm = spec.get("slurm") or {}
        if not isinstance(slurm, dict):
            raise StudyError(f"{what}.slurm: expected a mapping of launcher profile keys")
        stage = Stage(name=name, kind=kind, spec=spec, deps=list(after), slurm={**slurm_all, **slurm})
        if kind == "groups":
            stage.output = study_dir / name / "groups.json"
        else:
            stage.output = study_dir / name
        stages[name] = stage

    names = list(stages)
    for stage in stages.values():
        what = _where(path, f"stages.{stage.name}")
        if stage.kind in ("groups", "lc", "explain"):
            src = stage.spec.get("from")
            if src not in stages or stages[src].kind != "train":
                raise StudyError(f"{what}.from: needs the name of a training stage (one of "
                                 f"{', '.join(n for n in names if stages[n].kind == 'train')}), got {src!r}")
            stage.deps.append(src)
        if stage.kind == "train":
            stage.spec["overrides"] = _overrides_list(stage.spec.get("overrides"), f"{what}.overrides")
            for ref in _refs(stage.spec["overrides"]):
                if ref not in stages or ref == stage.name:
                    raise StudyError(f"{what}.overrides: ${{{ref}}} names no other stage (stages: {', '.join(names)})")
                stage.deps.append(ref)
        if stage.kind == "report":
            stage.deps.extend(n for n in names if n != stage.name and stages[n].kind != "report")
        for dep in stage.deps:
            if dep not in stages:
                raise StudyError(f"{what}.after: no stage named '{dep}' (stages: {', '.join(names)})")
        stage.deps = list(dict.fromkeys(stage.deps))

    order = _topological(stages, path)
    study = Study(id=study_id, experiment=experiment, path=path.resolve(), description=str(data.get("description", "")),
                  stages={n: stages[n] for n in order}, runs_root=runs_root, uri=uri, dir=study_dir, slurm=slurm_all)
    for stage in study.stages.values():
        _build_argv(study, stage, base_config, base_overrides, cli_overrides)
    return study


def _config_path(config: Any, study_path: Path, what: str) -> str | None:
    if config in (None, ""):
        return None
    if not isinstance(config, str):
        raise StudyError(f"{study_path}: {what}: expected a path, got {config!r}")
    for candidate in (Path(config), REPO_ROOT / config, study_path.parent / config):
        if candidate.is_file():
            return str(candidate.resolve())
    raise StudyError(f"{study_path}: {what}: no such recipe {config} (paths are relative to the repository root)")


def _topological(stages: dict[str, Stage], path: Path) -> list[str]:
    order, state = [], {}

    def visit(name: str, chain: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "active":
            cycle = chain[chain.index(name):] + [name]
            raise StudyError(f"{path}: stages depend on each other in a cycle: {' -> '.join(cycle)}")
        state[name] = "active"
        for dep in stages[name].deps:
            visit(dep, chain + [name])
        state[name] = "done"
        order.append(name)

    for name in stages:
        visit(name, [])
    return order


def _substitute(values: Sequence[str], study: Study, placeholder: Path | None = None) -> list[str]:
    """${NAME} -> the output of stage NAME (a placeholder file when it does not exist yet and one is given)."""
    def repl(match):
        out = study.stages[match.group(1)].output
        if placeholder is not None and not out.exists():
            return str(placeholder)
        return str(out)
    return [_REF_RE.sub(repl, v) for v in values]


def _build_argv(study: Study, stage: Stage, base_config: Any, base_overrides: list[str], cli: list[str]) -> None:
    common = ["--tracking-uri", study.uri, "--experiment", study.experiment, "--tag", f"study={study.id}",
              "--tag", f"stage={stage.name}"]
    spec = stage.spec
    what = _where(study.path, f"stages.{stage.name}")
    if stage.kind == "train":
        config = _config_path(spec.get("config", base_config), study.path,
                              f"stages.{stage.name}.config" if "config" in spec else "base.config")
        forced = [f"tracking.experiment={study.experiment}", f"tracking.run_name={stage.name}",
                  f"tracking.tags.study={study.id}", f"tracking.tags.stage={stage.name}",
                  f"output_dir={stage.output}", f"runs_root={study.runs_root}"]
        if study.uri != f"sqlite:///{study.runs_root / 'mlflow.db'}":
            forced.append(f"tracking.uri={study.uri}")
        overrides = base_overrides + spec["overrides"] + cli + forced
        # validate now (a groups file a dependency will write is replaced by a placeholder file)
        with tempfile.NamedTemporaryFile("w", suffix=".json") as placeholder:
            try:
                load_config(config, _substitute(overrides, study, Path(placeholder.name)))
            except ConfigError as err:
                raise StudyError(f"{what}: {err}") from None
        stage.argv = (["--config", config] if config else []) + ["--resume", "auto"] + _substitute(overrides, study)
    elif stage.kind == "groups":
        k = spec.get("k")
        if isinstance(k, int):
            k = [k]
        if not isinstance(k, list) or not k or not all(isinstance(x, int) and not isinstance(x, bool) for x in k):
            raise StudyError(f"{what}.k: expected a list of numbers of groups, e.g. [200, 334, 500]")
        criterion = spec.get("criterion", "join")
        if criterion not in ("join", "split"):
            raise StudyError(f"{what}.criterion: expected join or split, got {criterion!r}")
        split = spec.get("split", "auto")
        if split not in ("auto", "holdout", "val"):
            raise StudyError(f"{what}.split: expected auto, holdout or val, got {split!r}")
        variant, matrix = spec.get("variant", "paper"), spec.get("confusion", "soft")
        if variant not in ("paper", "authors"):
            raise StudyError(f"{what}.variant: expected paper or authors, got {variant!r}")
        if matrix not in ("soft", "hard"):
            raise StudyError(f"{what}.confusion: expected soft or hard, got {matrix!r}")
        ints = {key: spec.get(key, default) for key, default in (("seed", 0), ("restarts", 10))}
        for key, value in ints.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise StudyError(f"{what}.{key}: expected an integer >= 0, got {value!r}")
        stage.argv = ["--from-run-dir", str(study.stages[spec["from"]].output), "--k", *map(str, k),
                      "--criterion", criterion, "--split", split, "--variant", variant, "--matrix", matrix,
                      "--seed", str(ints["seed"]),
                      "--restarts", str(max(1, ints["restarts"])), "--out", str(stage.output),
                      "--run-name", stage.name, *common]
    elif stage.kind == "lc":
        stage.argv = ["--run-dir", str(study.stages[spec["from"]].output), "--out", str(stage.output),
                      "--run-name", stage.name, *common]
        for key, flag, kind in (("epochs", "--epochs", int), ("lr", "--lr", float), ("max_samples", "--max-samples", int)):
            if key in spec:
                if not isinstance(spec[key], (int, float)) or isinstance(spec[key], bool) or spec[key] <= 0:
                    raise StudyError(f"{what}.{key}: expected a positive number, got {spec[key]!r}")
                stage.argv += [flag, str(kind(spec[key]))]
    elif stage.kind == "explain":
        stage.argv = ["--run-dir", str(study.stages[spec["from"]].output), "--out", str(stage.output / "cams.png"),
                      "--run-name", stage.name, *common]
        if "images" in spec:
            if not isinstance(spec["images"], int) or spec["images"] < 1:
                raise StudyError(f"{what}.images: expected a number of val images >= 1, got {spec['images']!r}")
            stage.argv += ["--num-images", str(spec["images"])]
    elif stage.kind == "report":
        stage.argv = ["--study", study.id, "--tracking-uri", study.uri, "--experiment", study.experiment,
                      "--out", str(stage.output), "--run-name", stage.name,
                      "--paper", str(Path(study.path).resolve())]


# ----------------------------------------------------------------------------- state


# ----------------------------------------------------------------------------- local


# ----------------------------------------------------------------------------- SLURM


# ----------------------------------------------------------------------------- entry points

