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
    seeds: 3                       # train every training (and lc) stage 3 times, train.seed 0, 1, 2 (default 1)
    local_jobs: 2                  # --local: up to 2 stages at once, cores / 2 threads each (default 1; --jobs N)
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

Seeds. ``seeds: N`` (N > 1) runs every training stage N times with ``train.seed`` 0..N-1, as stages
``<name>.seed<s>`` (run name, ``stage`` tag and folder; tags ``seed`` and ``seeded_stage=<name>``); an
``lc`` stage is fitted once per seed of its source; a ``${NAME}`` of a training stage means the same seed's
run; a ``groups`` stage reads all seeds of its source (their mean confusion, and the grouping of each seed
alone for its ARI); an ``explain`` stage draws the first seed. The report gives mean +- sd per stage.

Stage kinds: ``train`` (the engine, ``pipeline.train``), ``groups``, ``lc``, ``explain``, ``report``.
``${NAME}`` inside an override value is the output of stage NAME (a groups stage: its JSON; a
training stage: its run folder) and makes this stage depend on it; ``after: [NAME, ...]`` adds
dependencies by hand; ``from:`` is a dependency too. Stages without a path between them are
siblings: SLURM runs them in parallel, ``--local`` up to ``local_jobs`` (``--jobs``) at once, in file order
among the stages whose dependencies finished. Two stages at once, one thread each, beat one stage with two
threads on a small CPU box: a process's start (imports, FFCV's compilation, model logging) is single-threaded.

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

import re
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Sequence

from pipeline.launch.slurm import SlurmProfile
from pipeline.tracking import store
from pipeline.train import schema
from pipeline.train.config import REPO_ROOT, ConfigError, load_config, override_list, resolve_path
from pipeline.train.schema import SchemaError

ENTRIES = {"train": "pipeline.train.entry:main", "groups": "pipeline.stages.groups:main", "lc": "pipeline.stages.fit_lc:main",
           "explain": "pipeline.stages.explain:main", "report": "pipeline.stages.report:main"}
_ID_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_REF_RE = re.compile(r"\$\{([^}]*)\}")


class StudyError(Exception):
    """A bad study file or usage: printed as one line naming the key and the fix, exit 2."""


# ----------------------------------------------------------------------------- the file's schema


@dataclass
class BaseSpec:
    config: str = ""  # recipe of every training stage (default: the engine's embedded demo job)
    overrides: Any = None  # {section.key: value} or ["section.key=value", ...]


@dataclass
class StudyFile:
    study: str = ""  # id: tag `study` of every run (letters, digits, _ . -)
    experiment: str = ""  # default: study-<id>
    description: str = ""
    base: BaseSpec = field(default_factory=BaseSpec)
    stages: dict[str, Any] = field(default_factory=dict)  # name -> a spec of its kind's schema below
    report: bool = True  # add a final report stage
    slurm: dict[str, Any] = field(default_factory=dict)  # launcher profile keys for every stage's job
    seeds: int = 1  # runs of every training (and lc) stage, train.seed 0..seeds-1
    local_jobs: int = 1  # --local: stages run at once (--jobs overrides it)


StageKind = Literal["train", "groups", "lc", "explain", "report"]


@dataclass
class StageSpec:
    """The keys of every stage."""

    kind: StageKind = "train"
    after: list[str] = field(default_factory=list)  # dependencies by hand
    slurm: dict[str, Any] = field(default_factory=dict)  # launcher profile keys for this stage's job
    paper: Any = None  # the paper's {rule: top1 | [top1, top5]}, shown by the report


@dataclass
class TrainStage(StageSpec):
    config: str = ""  # default: base.config
    overrides: Any = None  # as base.overrides; ${NAME} is stage NAME's output


@dataclass
class FromStage(StageSpec):
    source: str = field(default="", metadata={"key": "from"})  # the training stage this one works on


@dataclass
class GroupsStage(FromStage):
    k: list[int] = field(default_factory=list)  # numbers of groups
    criterion: Literal["join", "split"] = "join"
    seed: int = 0
    restarts: int = 10
    split: Literal["auto", "holdout", "val"] = "auto"
    variant: Literal["paper", "authors"] = "paper"
    confusion: Literal["soft", "hard"] = "soft"


@dataclass
class LcStage(FromStage):
    epochs: int | None = None
    lr: float | None = None
    max_samples: int | None = None


@dataclass
class ExplainStage(FromStage):
    images: int | None = None  # how many val images


STAGE_SCHEMAS = {"train": TrainStage, "groups": GroupsStage, "lc": LcStage, "explain": ExplainStage,
                 "report": StageSpec}
_AT_LEAST = {"seed": 0, "restarts": 0, "epochs": 1, "max_samples": 1, "images": 1}


@dataclass
class Stage:
    name: str
    kind: str
    spec: StageSpec
    deps: list[str] = field(default_factory=list)
    output: Path = Path()
    argv: list[str] = field(default_factory=list)
    slurm: dict = field(default_factory=dict)
    seed: int | None = None  # a study with seeds: this run's train.seed (name = <seeded_stage>.seed<seed>)
    seeded_stage: str = ""  # the study file's stage name this seeded run belongs to

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
    local_jobs: int = 1


# ----------------------------------------------------------------------------- parsing


def _refs(values: Sequence[str]) -> list[str]:
    return [m for v in values for m in _REF_RE.findall(v)]


def load_study(path: str | Path, cli_overrides: Sequence[str] = ()) -> Study:
    """Parse and validate a study file; every training stage's config is validated too."""
    path = Path(path)
    for text in cli_overrides:
        if "=" not in text:
            raise StudyError(f"override {text!r}: expected section.key=value")
    try:
        data = schema.read_yaml(path, "--study")
    except SchemaError as err:
        raise StudyError(str(err)) from None
    try:
        return _study(path, StudyFile() if data is None else data, list(cli_overrides))
    except SchemaError as err:
        raise StudyError(f"{path}: {err}") from None


def _study(path: Path, data: Any, cli_overrides: list[str]) -> Study:
    spec = StudyFile()
    schema.merge(spec, data)
    if not _ID_RE.match(spec.study):
        raise SchemaError(f"study: needs an id of letters, digits, '_', '.', '-' (got {spec.study!r})")
    base_overrides = override_list(spec.base.overrides, "base.overrides")
    slurm_all = schema.given_keys(SlurmProfile, spec.slurm, "slurm.")
    # the study's store and folder: from the base recipe + the command line
    try:
        base_cfg = load_config(_config_path(spec.base.config, path, "base.config"), base_overrides + cli_overrides)
    except ConfigError as err:
        raise SchemaError(f"base: {err}") from None
    runs_root = resolve_path(base_cfg.runs_root)
    study_dir = runs_root / "studies" / spec.study
    if not spec.stages:
        raise SchemaError("stages: needs a mapping of at least one stage (name: spec)")
    if spec.report and "report" not in spec.stages:
        spec.stages["report"] = {"kind": "report"}
    if spec.seeds < 1:
        raise SchemaError(f"seeds: must be >= 1 (runs of every training stage), got {spec.seeds!r}")
    if spec.local_jobs < 1:
        raise SchemaError(f"local_jobs: must be >= 1 (stages run at once with --local), got {spec.local_jobs!r}")
    stages: dict[str, Stage] = {}
    for name, raw in spec.stages.items():
        stage = Stage(name=name, kind="", spec=_stage_spec(name, raw))
        stage.kind, stage.deps = stage.spec.kind, list(stage.spec.after)
        stage.slurm = {**slurm_all, **schema.given_keys(SlurmProfile, stage.spec.slurm, f"stages.{name}.slurm.")}
        stage.output = study_dir / name / "groups.json" if stage.kind == "groups" else study_dir / name
        stages[name] = stage
    _link(stages)
    if spec.seeds > 1:
        stages = _seeded(stages, spec.seeds, study_dir)
    study = Study(id=spec.study, experiment=spec.experiment or f"study-{spec.study}", path=path.resolve(),
                  description=spec.description, stages={n: stages[n] for n in _topological(stages)},
                  runs_root=runs_root, uri=base_cfg.tracking.uri or store.sqlite_uri(runs_root),
                  dir=study_dir, slurm=slurm_all, local_jobs=spec.local_jobs)
    for stage in study.stages.values():
        _build_argv(study, stage, spec.base.config, base_overrides, cli_overrides)
    return study


def _stage_spec(name: str, raw: Any) -> StageSpec:
    """One stage's mapping, checked against the schema of its kind."""
    what = f"stages.{name}"
    if not _ID_RE.match(name):
        raise SchemaError(f"{what}: stage names use letters, digits, '_', '.', '-'")
    raw = {} if raw is None else raw
    kind = raw.get("kind", "report" if name == "report" else "train") if isinstance(raw, dict) else "train"
    spec = STAGE_SCHEMAS[schema.coerce(kind, StageKind, f"{what}.kind")]()
    schema.merge(spec, raw, what + ".")
    spec.kind = kind
    for key, low in _AT_LEAST.items():
        value = getattr(spec, key, None)
        if value is not None and value < low:
            raise SchemaError(f"{what}.{key}: must be >= {low}, got {value!r}")
    if getattr(spec, "lr", None) is not None and not spec.lr > 0:
        raise SchemaError(f"{what}.lr: must be > 0, got {spec.lr!r}")
    if isinstance(spec, GroupsStage) and not spec.k:
        raise SchemaError(f"{what}.k: expected a list of numbers of groups, e.g. [200, 334, 500]")
    if spec.paper is not None:  # figures the report shows beside ours
        schema.paper_figures(spec.paper, f"{what}.paper")
    if isinstance(spec, TrainStage):
        spec.overrides = override_list(spec.overrides, f"{what}.overrides")
    return spec


def _link(stages: dict[str, Stage]) -> None:
    """Each stage's dependencies: `after`, `from`, the ${NAME} in its overrides; the report after all."""
    names = list(stages)
    for stage in stages.values():
        what = f"stages.{stage.name}"
        if stage.kind in ("groups", "lc", "explain"):
            source = stage.spec.source
            if source not in stages or stages[source].kind != "train":
                raise SchemaError(f"{what}.from: needs the name of a training stage (one of "
                                  f"{', '.join(n for n in names if stages[n].kind == 'train')}), got {source!r}")
            stage.deps.append(source)
        if stage.kind == "train":
            for ref in _refs(stage.spec.overrides):
                if ref not in stages or ref == stage.name:
                    raise SchemaError(f"{what}.overrides: ${{{ref}}} names no other stage (stages: {', '.join(names)})")
                stage.deps.append(ref)
        if stage.kind == "report":
            stage.deps.extend(n for n in names if n != stage.name and stages[n].kind != "report")
        for dep in stage.deps:
            if dep not in stages:
                raise SchemaError(f"{what}.after: no stage named '{dep}' (stages: {', '.join(names)})")
        stage.deps = list(dict.fromkeys(stage.deps))


SEEDED_KINDS = ("train", "lc")


def seeded_name(name: str, seed: int) -> str:
    return f"{name}.seed{seed}"


def _seeded(stages: dict[str, Stage], seeds: int, study_dir: Path) -> dict[str, Stage]:
    """Each training / lc stage as one stage per seed; dependencies on them point at the same seed, or
    (groups, report) at every seed; an explain stage draws the first seed."""
    def copies(name: str) -> list[str]:
        return [seeded_name(name, s) for s in range(seeds)] if stages[name].kind in SEEDED_KINDS else [name]

    out: dict[str, Stage] = {}
    for name, stage in stages.items():
        if stage.kind not in SEEDED_KINDS:
            expanded = [d for dep in stage.deps for d in copies(dep)]
            if stage.kind == "explain":  # one figure: the first seed's model
                expanded = [copies(dep)[0] for dep in stage.deps]
            out[name] = replace(stage, deps=list(dict.fromkeys(expanded)))
            continue
        for seed in range(seeds):
            own = seeded_name(name, seed)
            deps = [seeded_name(dep, seed) if stages[dep].kind in SEEDED_KINDS else dep for dep in stage.deps]
            out[own] = replace(stage, name=own, deps=deps, output=study_dir / own, seed=seed, seeded_stage=name)
    return out


def sources_of(study: Study, stage: Stage) -> list[Stage]:
    """The training stage(s) a from-stage reads: its source, or the source's seeded runs it depends on."""
    source = stage.spec.source
    return [study.stages[d] for d in stage.deps if d == source or study.stages[d].seeded_stage == source]


def _config_path(config: str, study_path: Path, key: str) -> str | None:
    if not config:
        return None
    for candidate in (Path(config), REPO_ROOT / config, study_path.parent / config):
        if candidate.is_file():
            return str(candidate.resolve())
    raise SchemaError(f"{key}: no such recipe {config} (paths are relative to the repository root)")


def _topological(stages: dict[str, Stage]) -> list[str]:
    order, state = [], {}

    def visit(name: str, chain: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "active":
            cycle = chain[chain.index(name):] + [name]
            raise SchemaError(f"stages depend on each other in a cycle: {' -> '.join(cycle)}")
        state[name] = "active"
        for dep in stages[name].deps:
            visit(dep, chain + [name])
        state[name] = "done"
        order.append(name)

    for name in stages:
        visit(name, [])
    return order


def _substitute(values: Sequence[str], study: Study, placeholder: Path | None = None,
                seed: int | None = None) -> list[str]:
    """${NAME} -> the output of stage NAME (a placeholder file when it does not exist yet and one is given);
    with a seed, NAME's run of that seed when NAME is seeded."""
    def repl(match):
        name = match.group(1)
        if seed is not None and seeded_name(name, seed) in study.stages:
            name = seeded_name(name, seed)
        out = study.stages[name].output
        if placeholder is not None and not out.exists():
            return str(placeholder)
        return str(out)
    return [_REF_RE.sub(repl, v) for v in values]


def _build_argv(study: Study, stage: Stage, base_config: str, base_overrides: list[str], cli: list[str]) -> None:
    common = ["--tracking-uri", study.uri, "--experiment", study.experiment, "--tag", f"study={study.id}",
              "--tag", f"stage={stage.name}"]
    spec = stage.spec
    if stage.kind == "train":
        config = _config_path(spec.config or base_config, study.path,
                              f"stages.{stage.name}.config" if spec.config else "base.config")
        forced = [f"tracking.experiment={study.experiment}", f"tracking.run_name={stage.name}",
                  f"tracking.tags.study={study.id}", f"tracking.tags.stage={stage.name}",
                  f"output_dir={stage.output}", f"runs_root={study.runs_root}"]
        if stage.seed is not None:
            forced += [f"train.seed={stage.seed}", f"tracking.tags.seed='{stage.seed}'",  # tags are strings
                       f"tracking.tags.seeded_stage={stage.seeded_stage}"]
        if study.uri != store.sqlite_uri(study.runs_root):
            forced.append(f"tracking.uri={study.uri}")
        overrides = base_overrides + spec.overrides + cli + forced
        # validate now (a groups file a dependency will write is replaced by a placeholder file)
        with tempfile.NamedTemporaryFile("w", suffix=".json") as placeholder:
            try:
                load_config(config, _substitute(overrides, study, Path(placeholder.name), stage.seed))
            except ConfigError as err:
                raise SchemaError(f"stages.{stage.name}: {err}") from None
        stage.argv = (["--config", config] if config else []) + ["--resume", "auto"] + _substitute(
            overrides, study, seed=stage.seed)
    elif stage.kind == "groups":
        stage.argv = ["--from-run-dir", *(str(s.output) for s in sources_of(study, stage)), "--k", *map(str, spec.k),
                      "--criterion", spec.criterion, "--split", spec.split, "--variant", spec.variant,
                      "--matrix", spec.confusion, "--seed", str(spec.seed), "--restarts", str(max(1, spec.restarts)),
                      "--out", str(stage.output), "--run-name", stage.name, *common]
    elif stage.kind == "lc":
        stage.argv = ["--run-dir", str(sources_of(study, stage)[0].output), "--out", str(stage.output),
                      "--run-name", stage.name, *common]
        if stage.seed is not None:
            stage.argv += ["--tag", f"seed={stage.seed}", "--tag", f"seeded_stage={stage.seeded_stage}"]
        for flag, value in (("--epochs", spec.epochs), ("--lr", spec.lr), ("--max-samples", spec.max_samples)):
            if value is not None:
                stage.argv += [flag, str(value)]
    elif stage.kind == "explain":
        stage.argv = ["--run-dir", str(sources_of(study, stage)[0].output), "--out", str(stage.output / "cams.png"),
                      "--run-name", stage.name, *common]
        if spec.images is not None:
            stage.argv += ["--num-images", str(spec.images)]
    elif stage.kind == "report":
        stage.argv = ["--study", study.id, "--tracking-uri", study.uri, "--experiment", study.experiment,
                      "--out", str(stage.output), "--run-name", stage.name,
                      "--paper", str(Path(study.path).resolve())]
