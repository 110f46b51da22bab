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

import argparse
import contextlib
import copy
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


import yaml

from pipeline.launch import slurm
from pipeline.launch.slurm import LIVE_STATES
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


def stage_status(study: Study) -> dict[str, str]:
    """stage -> 'finished' | 'unfinished' | 'new' from MLflow runs tagged study/stage (and outputs)."""
    from pipeline.tracking import runs

    try:
        client = runs.client(runs.resolve_uri(study.uri))
        tagged = runs.study_runs(client, study.id)
    except Exception as err:  # noqa: BLE001
        raise StudyError(f"cannot read the tracking store {study.uri} ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200] if str(err) else ''}); is the server up?") from None
    status = {}
    for name, stage in study.stages.items():
        mine = [r for r in tagged if r.data.tags.get("stage") == name]
        if any(r.info.status == "FINISHED" for r in mine) and (stage.kind != "groups" or stage.output.is_file()):
            status[name] = "finished"
        elif mine:
            status[name] = "unfinished"
        else:
            status[name] = "new"
    return status


def describe(study: Study, status: dict[str, str] | None = None) -> str:
    lines = [f"study '{study.id}' ({study.path}): {len(study.stages)} stages; MLflow experiment "
             f"'{study.experiment}' at {study.uri}; outputs in {study.dir}"]
    for stage in study.stages.values():
        state = f" [{status[stage.name]}]" if status else ""
        deps = f" after {', '.join(stage.deps)}" if stage.deps else ""
        lines.append(f"  {stage.name:<14} {stage.kind:<8}{deps}{state}")
    return "\n".join(lines)


def stage_command(stage: Stage) -> list[str]:
    return [sys.executable, "-m", stage.module, *stage.argv]


# ----------------------------------------------------------------------------- local


def run_local(study: Study, dry_run: bool = False, env: dict | None = None) -> int:
    """Run the unfinished stages one after the other (file order, dependencies first). A failed stage
    blocks what depends on it; independent stages still run. Exit 0 iff every stage is finished."""
    status = stage_status(study)
    print(describe(study, status), flush=True)
    outcome: dict[str, str] = {}
    ran_any = False
    env = dict(env or os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("PYTHONUNBUFFERED", "1")
    for stage in study.stages.values():
        blocked = [d for d in stage.deps if outcome.get(d) not in ("done", "skipped")]
        if blocked:
            outcome[stage.name] = "blocked"
            print(f"[study] {stage.name}: not run (dependency {', '.join(blocked)} did not finish)", flush=True)
            continue
        if status[stage.name] == "finished" and not (stage.kind == "report" and ran_any):
            outcome[stage.name] = "skipped"
            print(f"[study] {stage.name}: finished earlier, skipped", flush=True)
            continue
        cmd = stage_command(stage)
        print(f"[study] {stage.name} ({stage.kind}): {shlex.join(cmd)}", flush=True)
        if dry_run:
            outcome[stage.name] = "done"
            continue
        started = time.perf_counter()
        rc = subprocess.call(cmd, cwd=str(REPO_ROOT), env=env)
        ran_any = True
        outcome[stage.name] = "done" if rc == 0 else "failed"
        print(f"[study] {stage.name}: {'done' if rc == 0 else f'FAILED (exit {rc})'} in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    failed = [n for n, o in outcome.items() if o in ("failed", "blocked")]
    print("[study] summary: " + ", ".join(f"{n} {o}" for n, o in outcome.items()), flush=True)
    if failed:
        print(f"[study] {len(failed)} stage(s) not finished; fix the cause and re-run the same command "
              f"(finished stages are skipped)", file=sys.stderr, flush=True)
        return 1
    print(f"[study] table: python pipeline/report.py --study {study.id} --tracking-uri {study.uri}", flush=True)
    return 0


# ----------------------------------------------------------------------------- SLURM


def stage_settings(study: Study, stage: Stage, base: dict) -> dict:
    """The launcher settings of one stage's job: the CLI/profile ones, narrowed for the light stages."""

    s = copy.deepcopy(base)
    if stage.kind in ("groups", "report"):
        s.update(nodes=1, gpus_per_node=0, tasks_per_node=1)
    elif stage.kind in ("lc", "explain"):
        gpus = 1 if base.get("gpus_per_node") else 0
        s.update(nodes=1, gpus_per_node=gpus, tasks_per_node=1)
    unknown = [k for k in stage.slurm if k not in slurm.PROFILE_KEYS]
    if unknown:
        raise StudyError(f"{study.path}: stages.{stage.name}.slurm: unknown key(s) {', '.join(unknown)} "
                         f"(valid: {', '.join(slurm.PROFILE_KEYS)})")
    for key, value in stage.slurm.items():
        s[key] = {**s[key], **value} if isinstance(s.get(key), dict) and isinstance(value, dict) else value
    if s["gpus_per_node"]:
        s["tasks_per_node"] = s["gpus_per_node"]
    s["sbatch"] = dict(s.get("sbatch") or {})
    return s


def live_jobs(study: Study) -> dict[str, tuple[str, str]]:
    """stage -> (id, state) of a job this study submitted for it earlier that is still queued or running.

    The ids are the job folders under ``<study dir>/slurm/<stage>/`` (submitit's ``%j``); squeue says which of
    them are alive (by job name, so that long-gone ids are no error). Without SLURM's clients, or without
    earlier submissions, nothing is alive."""
    recorded = {name: {p.name for p in (study.dir / "slurm" / name).glob("*") if p.is_dir() and p.name.isdigit()}
                for name in study.stages}
    if not any(recorded.values()):
        return {}
    names = ",".join(f"{study.id}-{name}" for name, ids in recorded.items() if ids)
    try:
        proc = subprocess.run(["squeue", "-h", "-o", "%i|%T|%j", f"--name={names}"], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        print(f"[study] warning: cannot ask squeue which earlier jobs are still queued ({err}); submitting "
              f"every unfinished stage", file=sys.stderr, flush=True)
        return {}
    if proc.returncode != 0:
        print(f"[study] warning: squeue failed ({proc.stderr.strip()[:200]}); submitting every unfinished stage",
              file=sys.stderr, flush=True)
        return {}
    live: dict[str, tuple[str, str]] = {}
    for line in proc.stdout.splitlines():
        job, _, rest = line.strip().partition("|")
        state, _, name = rest.partition("|")
        stage = name[len(study.id) + 1:]
        if state in LIVE_STATES and job in recorded.get(stage, ()) and int(job) >= int(live.get(stage, ("0",))[0]):
            live[stage] = (job, state)  # the newest one
    return live


def _scancel(job_ids: Sequence[str]) -> bool:
    try:
        return subprocess.run(["scancel", *job_ids], capture_output=True, text=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def submit_slurm(study: Study, settings: dict, dry_run: bool = False, make_executor=None) -> dict[str, str]:
    """Submit one job per unfinished stage with afterok dependencies. Returns stage -> job id.

    A stage whose earlier job is still queued or running (``live_jobs``) is not submitted again: stages
    submitted now depend on that job. The report is the exception when something new is submitted: a new
    report job follows everything, the old one is cancelled if it is still waiting (or, if it is running
    already, the new one starts after it). If a submission fails, the jobs submitted before it are cancelled
    and a StudyError names the stage and sbatch's message."""
    from pipeline.launch.task import TrainTask

    if make_executor is None:
        make_executor = slurm.make_executor
    status = stage_status(study)
    print(describe(study, status), flush=True)
    live = live_jobs(study)
    job_ids: dict[str, str] = {}  # stage -> the job it waits for: submitted now, or one still in the queue
    submitted: list[str] = []
    for stage in study.stages.values():
        if status[stage.name] == "finished" and not (stage.kind == "report" and submitted):
            print(f"[study] {stage.name}: finished earlier, skipped", flush=True)
            continue
        superseded = live.get(stage.name) if stage.kind == "report" and submitted else None
        if stage.name in live and not superseded:
            job_ids[stage.name] = live[stage.name][0]
            print(f"[study] {stage.name}: job {live[stage.name][0]} is still in the queue, not submitted again",
                  flush=True)
            continue
        s = stage_settings(study, stage, settings)
        deps = [job_ids[d] for d in stage.deps if d in job_ids]
        if deps:
            s["sbatch"]["dependency"] = "afterok:" + ":".join(deps)
            s["sbatch"]["kill-on-invalid-dep"] = "yes"
        if superseded:  # never two reports at once in the same folder (a cancelled one satisfies afterany)
            s["sbatch"]["dependency"] = ",".join(filter(None, [s["sbatch"].get("dependency"),
                                                               f"afterany:{superseded[0]}"]))
        folder = study.dir / "slurm" / stage.name
        task = TrainTask(argv=list(stage.argv), entry=stage.entry, max_requeues=s["max_requeues"],
                         env={str(k): str(v) for k, v in s["env"].items()})
        if dry_run:
            job_ids[stage.name] = f"<{stage.name}>"
            submitted.append(job_ids[stage.name])
            print(f"[study] would submit {stage.name} ({stage.kind}): {s['nodes']} node(s) x {s['tasks_per_node']} "
                  f"task(s){', ' + str(s['gpus_per_node']) + ' GPU/node' if s['gpus_per_node'] else ''}"
                  f"{', dependency ' + s['sbatch']['dependency'] if deps else ''}\n    {stage.entry} "
                  f"{shlex.join(stage.argv)}", flush=True)
            continue
        try:
            executor = make_executor(folder, s, f"{study.id}-{stage.name}")
            with contextlib.redirect_stderr(io.StringIO()):  # submitit echoes sbatch's refusal: it is in err
                job = executor.submit(task)
        except Exception as err:  # noqa: BLE001 - sbatch's refusal (submitit's FailedJobError) and the like
            message = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())[:400]
            if submitted:  # a half-submitted chain is worse than none
                message += (f"; cancelled the job(s) submitted before it ({', '.join(submitted)})" if
                            _scancel(submitted) else f"; could NOT cancel the jobs submitted before it: "
                            f"scancel {' '.join(submitted)}")
            raise StudyError(f"submitting stage {stage.name} failed: {type(err).__name__}: {message}") from None
        job_ids[stage.name] = str(job.job_id)
        submitted.append(str(job.job_id))
        print(f"[study] submitted {stage.name} ({stage.kind}) as job {job.job_id}"
              f"{' after ' + ','.join(deps) if deps else ''}; logs in {folder}", flush=True)
        if superseded and superseded[1] == "PENDING" and _scancel([superseded[0]]):
            print(f"[study] {stage.name}: cancelled its earlier job {superseded[0]}, which was still waiting "
                  f"(job {job.job_id} follows the new stages)", flush=True)
    if not job_ids:
        print("[study] every stage is finished; nothing submitted", flush=True)
    elif not submitted:
        print("[study] every unfinished stage is still in the queue; nothing submitted", flush=True)
    else:
        print(f"[study] follow: squeue -u $USER; re-run the same command after a failure (finished stages are "
              f"skipped); table: python pipeline/report.py --study {study.id} --tracking-uri {study.uri}", flush=True)
    return {name: job_ids[name] for name in job_ids if job_ids[name] in submitted}


# ----------------------------------------------------------------------------- entry points


def launch_study(args: argparse.Namespace) -> int:
    """Called by ``pipeline/launch.py --study``: --local runs here, otherwise SLURM jobs."""

    try:
        if args.config or args.array:
            raise StudyError("--study takes its recipes from the study file: drop --config / --array "
                             "(key=value overrides apply to every training stage)")
        unused = [f for f in ("output_dir", "resume", "wait") if getattr(args, f, None)]
        if unused:
            raise StudyError(f"--study does not take {', '.join('--' + f.replace('_', '-') for f in unused)} "
                             f"(stage folders come from the study; finished stages are skipped, the others resume)")
        if args.local:
            slurm_only = [f for f in ("partition", "nodes", "gpus_per_node", "cluster") if getattr(args, f, None)]
            if slurm_only:
                raise StudyError(f"--local does not take SLURM options "
                                 f"({', '.join('--' + f.replace('_', '-') for f in slurm_only)})")
        study = load_study(args.study, args.overrides)
        if args.local:
            return run_local(study, dry_run=getattr(args, "dry_run", False))
        settings = slurm.slurm_settings(args)
        if not args.dry_run:
            slurm.require_slurm()
        submit_slurm(study, settings, dry_run=args.dry_run)
        return 0
    except (StudyError, slurm.LaunchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python pipeline/study.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Show or run a study (a graph of training / groups / lc / explain / report stages). SLURM "
                    "submission: python pipeline/launch.py --study FILE [--cluster ...].",
        epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("study", help="study YAML (studies/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every training stage")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--status", action="store_true", help="print the plan and each stage's state (default)")
    mode.add_argument("--local", action="store_true", help="run the unfinished stages here, one after the other")
    mode.add_argument("--dry-run", action="store_true", help="print each stage's command, run nothing")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        study = load_study(args.study, args.overrides)
        if args.local or args.dry_run:
            return run_local(study, dry_run=args.dry_run)
        status = stage_status(study)
        for name, (job, _) in live_jobs(study).items():
            if status[name] != "finished":
                status[name] += f", SLURM job {job} in the queue"
        print(describe(study, status))
        return 0
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
