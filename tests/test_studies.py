"""Studies: the study file (parsing, stage graph, errors), SLURM submission with afterok dependencies
(a recording executor: job shapes; the real cluster: tests/test_slurm_study.py), and the demo study end
to end on CPU (real FFCV, real MLflow SQLite store): grouping recovers the planted super-classes, the report has a row per stage, a re-run skips all."""
import json

import pytest

from pipeline.launch import slurm, study_jobs
from pipeline.launch import study as study_lib
from pipeline.train.config import REPO_ROOT


def write(tmp_path, text, name="s.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


BASIC = """\
study: t1
base:
  overrides: {schedule.epochs: 1}
stages:
  baseline:
    overrides: {method.name: baseline}
  groups: {kind: groups, from: baseline, k: [4]}
  ssal: {overrides: {method.name: ssal, method.groups_file: "${groups}"}}
  lc: {kind: lc, from: ssal}
  dks: {overrides: {method.name: dks}}
"""


# ----------------------------------------------------------------------------- parsing


def test_stage_graph_order_refs_and_commands(tmp_path):
    s = study_lib.load_study(write(tmp_path, BASIC), [f"runs_root={tmp_path / 'runs'}"])
    assert list(s.stages) == ["baseline", "groups", "ssal", "lc", "dks", "report"]
    assert s.stages["ssal"].deps == ["groups"] and s.stages["lc"].deps == ["ssal"]
    assert s.stages["dks"].deps == [] and set(s.stages["report"].deps) == {"baseline", "groups", "ssal", "lc", "dks"}
    assert s.experiment == "study-t1" and s.uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    ssal = s.stages["ssal"].argv
    assert f"method.groups_file={s.stages['groups'].output}" in ssal
    assert s.stages["groups"].output == tmp_path / "runs" / "studies" / "t1" / "groups" / "groups.json"
    for tag in ("tracking.tags.study=t1", "tracking.tags.stage=ssal", "tracking.run_name=ssal", "--resume"):
        assert tag in ssal
    # command-line overrides come after the stage's (they win), forced keys last
    assert ssal.index("schedule.epochs=1") < ssal.index(f"runs_root={tmp_path / 'runs'}")
    groups = s.stages["groups"].argv
    assert groups[groups.index("--from-run-dir") + 1] == str(s.stages["baseline"].output)
    # our studies group on the soft confusion with the balanced variant unless the stage says otherwise
    assert groups[groups.index("--matrix") + 1] == "soft" and groups[groups.index("--variant") + 1] == "paper"


def test_seeds_expand_training_stages_and_wire_each_seed(tmp_path):
    """seeds: 2 -> every training (and lc) stage twice, train.seed and the tags per seed; ${groups} is the one
    grouping; lc fits each seed of its source; groups reads both baselines; cams draws the first."""
    text = BASIC.replace("study: t1\n", "study: t1\nseeds: 2\n") + "  cams: {kind: explain, from: ssal}\n"
    s = study_lib.load_study(write(tmp_path, text), [f"runs_root={tmp_path / 'runs'}"])
    assert list(s.stages) == ["baseline.seed0", "baseline.seed1", "groups", "ssal.seed0", "ssal.seed1", "lc.seed0",
                              "lc.seed1", "dks.seed0", "dks.seed1", "cams", "report"]
    assert s.stages["groups"].deps == ["baseline.seed0", "baseline.seed1"]
    groups = s.stages["groups"].argv
    start = groups.index("--from-run-dir")
    assert groups[start + 1:start + 3] == [str(s.stages[f"baseline.seed{i}"].output) for i in (0, 1)]
    ssal1 = s.stages["ssal.seed1"]
    assert ssal1.deps == ["groups"] and ssal1.output == tmp_path / "runs" / "studies" / "t1" / "ssal.seed1"
    for item in ("train.seed=1", "tracking.tags.seed='1'", "tracking.tags.seeded_stage=ssal",
                 "tracking.run_name=ssal.seed1", f"method.groups_file={s.stages['groups'].output}"):
        assert item in ssal1.argv, item
    assert s.stages["lc.seed1"].deps == ["ssal.seed1"] and "seed=1" in s.stages["lc.seed1"].argv
    lc = s.stages["lc.seed1"].argv
    assert lc[lc.index("--run-dir") + 1] == str(ssal1.output)
    assert s.stages["cams"].deps == ["ssal.seed0"]
    assert len(s.stages["report"].deps) == 10
    with pytest.raises(study_lib.StudyError, match="seeds: must be >= 1"):
        study_lib.load_study(write(tmp_path, text.replace("seeds: 2", "seeds: 0")), [f"runs_root={tmp_path}"])


def test_groups_stage_variant_and_confusion_keys(tmp_path):
    text = BASIC.replace("groups: {kind: groups, from: baseline, k: [4]}",
                         "groups: {kind: groups, from: baseline, k: [4], variant: authors, confusion: hard}")
    argv = study_lib.load_study(write(tmp_path, text), [f"runs_root={tmp_path / 'runs'}"]).stages["groups"].argv
    assert argv[argv.index("--matrix") + 1] == "hard" and argv[argv.index("--variant") + 1] == "authors"
    from pipeline.stages import groups as groups_cli

    parsed = groups_cli.build_parser().parse_args(argv)  # the stage's command line is one groups.py accepts
    assert (parsed.variant, parsed.matrix) == ("authors", "hard")


@pytest.mark.parametrize("text, message", [
    ("study: x\nstages: {a: {kind: train, overrides: {method.name: nope}}}\n", "method.name"),
    ("study: x\nstages: {a: {colour: red}}\n", "stages.a.colour' (valid keys here: kind, after, slurm, paper, config"),
    ("study: x\nstages: {a: {overides: {}}}\n", "did you mean stages.a.overrides?"),
    ("study: x\nstuges: {a: {}}\n", "unknown key 'stuges' (did you mean stages?"),
    ("study: x\nbase: {recipe: a.yaml}\nstages: {a: {}}\n", "unknown key 'base.recipe'"),
    ("study: x\nbase: {overrides: 3}\nstages: {a: {}}\n", "base.overrides: expected a mapping {section.key: value}"),
    ("study: x\nstages: {a: {kind: fit}}\n", "stages.a.kind: 'fit' is not one of train, groups, lc, explain, report"),
    ("study: x\nstages: {a: {after: 3}}\n", "stages.a.after: expected a list"),
    ("study: x\nstages: {a: {after: [b]}}\n", "stages.a.after: no stage named 'b'"),
    ("study: x\nstages: {a: {}, l: {kind: lc, from: a, epochs: 0}}\n", "stages.l.epochs: must be >= 1, got 0"),
    ("study: x\nstages: {a: {}, l: {kind: lc, from: a, lr: 0}}\n", "stages.l.lr: must be > 0"),
    ("study: x\nstages: {a: {}, c: {kind: explain, from: a, images: 0}}\n", "stages.c.images: must be >= 1"),
    ("study: x\nstages: {a: {}, g: {kind: groups, from: a, k: [2], seed: -1}}\n", "stages.g.seed: must be >= 0"),
    ("study: x\nstages: {a: {}, g: {kind: groups, from: a}}\n", "stages.g.k: expected a list of numbers of groups"),
    ("study: x\nstages: {a: {paper: {main: [101]}}}\n", "stages.a.paper.main: expected top-1 or [top-1, top-5]"),
    ("study: x\nslurm: {gpu_per_node: 8}\nstages: {a: {}}\n", "unknown key 'slurm.gpu_per_node' (did you mean slurm.gpus_per_node?"),
    ("study: x\nstages: {a: {slurm: {nodes: two}}}\n", "stages.a.slurm.nodes: expected an integer, got 'two'"),
    ("study: x\nstages: {a: 5}\n", "stages.a: expected a mapping with keys kind, after"),
    ("- a\n", "expected a mapping with keys study, experiment"),
    ("study: x\nstages: {a: {after: [b]}, b: {after: [a]}}\n", "cycle"),
    ("study: x\nstages: {a: {overrides: {method.groups_file: '${zz}'}}}\n", "${zz} names no other stage"),
    ("study: x\nstages: {a: {}, g: {kind: groups, from: nope, k: [2]}}\n", "from: needs the name of a training stage"),
    ("study: x\nstages: {a: {}, g: {kind: groups, from: a, k: four}}\n", "stages.g.k: expected a list, got 'four'"),
    ("study: x\nstages: {a: {}, g: {kind: groups, from: a, k: [2], variant: mine}}\n", "stages.g.variant: 'mine' is not one of paper, authors"),
    ("study: x\nstages: {a: {}, g: {kind: groups, from: a, k: [2], confusion: fuzzy}}\n", "stages.g.confusion: 'fuzzy' is not one of soft, hard"),
    ("study: 'bad id!'\nstages: {a: {}}\n", "study: needs an id"),
    ("study: x\nstages: {}\n", "stages: needs a mapping"),
    ("study: x\nbase: {config: configs/missing.yaml}\nstages: {a: {}}\n", "no such recipe"),
    ("study: x\nstages: [1, 2\n", "not valid YAML"),
])
def test_bad_study_files_fail_with_one_line(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(study_lib.StudyError) as err:
        study_lib.load_study(path, [f"runs_root={tmp_path}"])
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith(str(path))  # every message names the file first


def test_launch_study_cli_errors_exit_2(tmp_path, capsys):
    from pipeline.launch import cli as launch

    assert launch.main(["--study", str(tmp_path / "nope.yaml"), "--local"]) == 2
    assert "no such file" in capsys.readouterr().err
    path = write(tmp_path, BASIC)
    assert launch.main(["--study", str(path), "--local", "--nodes", "2"]) == 2
    assert "--local does not take SLURM options" in capsys.readouterr().err
    assert launch.main(["--study", str(path), "--local", "--jobs", "0"]) == 2
    assert "--jobs 0: takes N >= 1" in capsys.readouterr().err
    assert launch.main(["--study", str(path), "--partition", "gpu", "--jobs", "2", "--dry-run"]) == 2
    assert "--jobs: stages run at once with --local" in capsys.readouterr().err
    assert launch.main(["--local", "--jobs", "2"]) == 2
    assert "--jobs: stages run at once by --study" in capsys.readouterr().err


def test_local_jobs_split_the_cores_between_training_stages(tmp_path):
    s = study_lib.load_study(write(tmp_path, "local_jobs: 2\n" + BASIC + "  pinned: {overrides: {train.threads: 3}}\n"),
                             [f"runs_root={tmp_path / 'runs'}"])
    assert s.local_jobs == 2
    assert study_jobs.stage_command(s.stages["ssal"], threads=1)[-1] == "train.threads=1"
    assert study_jobs.stage_command(s.stages["ssal"])[-1] != "train.threads=1"  # one at a time: the default
    assert "train.threads=1" not in study_jobs.stage_command(s.stages["pinned"], threads=1)  # the study's own
    assert not any(a.startswith("train.threads") for a in study_jobs.stage_command(s.stages["groups"], threads=1))
    with pytest.raises(study_lib.StudyError, match="local_jobs: must be >= 1"):
        study_lib.load_study(write(tmp_path, "local_jobs: 0\n" + BASIC, "bad.yaml"), [f"runs_root={tmp_path / 'runs'}"])


def test_study_cli_help_shows_the_study_file_format():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(REPO_ROOT / "pipeline" / "study.py"), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Study file (YAML)" in proc.stdout and "kind: groups" in proc.stdout


def test_stage_slurm_keys_are_checked_and_layered(tmp_path):
    text = BASIC.replace("study: t1\n", "study: t1\nslurm: {time: '01:00:00', sbatch: {exclusive: true}}\n").replace(
        "lc: {kind: lc, from: ssal}", "lc: {kind: lc, from: ssal, slurm: {time: '00:10:00', nodes: 2}}")
    s = study_lib.load_study(write(tmp_path, text), [f"runs_root={tmp_path / 'runs'}"])
    assert s.stages["lc"].slurm == {"time": "00:10:00", "nodes": 2, "sbatch": {"exclusive": True}}
    assert s.stages["baseline"].slurm == {"time": "01:00:00", "sbatch": {"exclusive": True}}


def test_report_reads_the_paper_figures_with_the_study_schema(tmp_path):
    from pipeline.stages.report import in_file_order, read_study_file
    from pipeline.stages.common import ToolError

    path = write(tmp_path, "study: x\nstages: {b: {paper: {main: [76.4, 93.3], joint: 77}}, a: {}}\n")
    assert read_study_file(path) == ({"b": {"main": (76.4, 93.3), "joint": (77.0, None)}}, ["b", "a"])
    # rows in the file's order whatever order the stages ran in (side by side with --jobs)
    rows = [{"stage": "lc"}, {"stage": "a"}, {"stage": "b"}]
    assert [r["stage"] for r in in_file_order(rows, ["b", "a"])] == ["b", "a", "lc"]
    path.write_text("study: x\nstages: {a: {paper: {main: [76.4, 93.3, 1]}}}\n")
    with pytest.raises(ToolError, match=r"s.yaml: stages.a.paper.main: expected top-1 or \[top-1, top-5\]"):
        read_study_file(path)
    with pytest.raises(ToolError, match="--paper: no such file"):
        read_study_file(tmp_path / "missing.yaml")


@pytest.mark.parametrize("name", ["demo", "imagenet_resnet50", "imagenet_resnet152", "tinyimagenet_resnet18"])
def test_shipped_studies_validate(tmp_path, name):
    s = study_lib.load_study(REPO_ROOT / "studies" / f"{name}.yaml", [f"runs_root={tmp_path}"])
    assert s.id == name and "report" in s.stages
    kinds = {st.kind for st in s.stages.values()}
    assert "train" in kinds
    if name != "imagenet_resnet152":
        assert {"groups", "lc"} <= kinds
        assert any("method.name=gapcat" in " ".join(st.argv) for st in s.stages.values())


# ----------------------------------------------------------------------------- SLURM (recording executor)


class RecordingExecutor:
    submitted = []

    def __init__(self, folder, settings, name, restart_run_dirs=()):
        self.folder, self.settings, self.name = folder, settings, name
        self.restart_run_dirs = list(restart_run_dirs)

    def submit(self, task):
        job_id = str(1000 + len(RecordingExecutor.submitted))
        RecordingExecutor.submitted.append((self.name, dict(self.settings, restart_run_dirs=self.restart_run_dirs),
                                            task, job_id))
        return type("Job", (), {"job_id": job_id})()


def test_slurm_chain_uses_afterok_dependencies(tmp_path):
    """Each stage's job settings without a cluster, in a second: the GPU shapes (2 nodes x 4 GPUs for training,
    one task for groups/report, one GPU for lc) that the CPU test cluster cannot show, and the dependency
    strings handed to sbatch. SLURM itself holding and honouring them: tests/test_slurm_study.py."""
    from pipeline.launch import cli as launch

    s = study_lib.load_study(write(tmp_path, BASIC), [f"runs_root={tmp_path / 'runs'}"])
    args = launch.build_parser().parse_args(["--partition", "gpu", "--nodes", "2", "--gpus-per-node", "4"])
    RecordingExecutor.submitted = []
    ids = study_jobs.submit_slurm(s, slurm.slurm_settings(args), make_executor=RecordingExecutor)
    jobs = {name.split("-", 1)[1]: (settings, task, job_id) for name, settings, task, job_id in RecordingExecutor.submitted}
    assert list(jobs) == ["baseline", "groups", "ssal", "lc", "dks", "report"] and set(ids) == set(jobs)
    dep = lambda stage: jobs[stage][0]["sbatch"].get("dependency")  # noqa: E731
    assert dep("baseline") is None and dep("dks") is None  # siblings start at once
    assert dep("groups") == f"afterok:{ids['baseline']}" and dep("ssal") == f"afterok:{ids['groups']}"
    assert dep("lc") == f"afterok:{ids['ssal']}"
    assert dep("report").split(":")[1:] == [ids[n] for n in ("baseline", "groups", "ssal", "lc", "dks")]
    assert jobs["groups"][0]["sbatch"]["kill-on-invalid-dep"] == "yes"
    # training stages get the cluster shape; light stages one task (lc one GPU)
    assert (jobs["ssal"][0]["nodes"], jobs["ssal"][0]["tasks_per_node"]) == (2, 4)
    assert (jobs["groups"][0]["nodes"], jobs["groups"][0]["gpus_per_node"]) == (1, 0)
    assert (jobs["lc"][0]["gpus_per_node"], jobs["lc"][0]["tasks_per_node"]) == (1, 1)
    assert jobs["ssal"][1].entry == "pipeline.train.entry:main" and jobs["groups"][1].entry == "pipeline.stages.groups:main"
    assert "--resume" in jobs["ssal"][1].argv
    # a training stage's job restarts after a failure from its run dir; the light stages' jobs do not
    assert jobs["ssal"][0]["restart_run_dirs"] == [s.stages["ssal"].output] and jobs["ssal"][1].run_dir
    assert jobs["groups"][0]["restart_run_dirs"] == [] and jobs["groups"][1].run_dir is None


# ----------------------------------------------------------------------------- end to end


def _client(demo_study):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=demo_study.uri)


@pytest.mark.slow
def test_demo_study_end_to_end(demo_study):
    assert demo_study.rc == 0, demo_study.out[-4000:]
    print(f"demo study: {demo_study.seconds:.0f} s")
    study_dir = demo_study.runs_root / "studies" / "ci"
    # grouping from the baseline's held-out confusion recovers the planted super-classes
    data = json.loads((study_dir / "groups" / "groups.json").read_text())
    meta = data["metadata"]
    assert meta["confusion_split"] == "holdout" and meta["criterion"] == "join" and meta["matrix"] == "soft"
    ari = meta["ari_vs_planted_superclasses"]["4"]
    print(f"ARI vs planted super-classes: {ari}")
    assert ari >= 0.8, meta
    manifest = json.loads((demo_study.data / "manifest.json").read_text())
    assert data["class_names"] == [c["name"] for c in manifest["classes"]]
    # every run carries the comparison tags; the report has a row per stage and the expected columns
    client = _client(demo_study)
    from pipeline.tracking import runs

    tagged = runs.study_runs(client, "ci")
    stages = {r.data.tags["stage"] for r in tagged}
    assert stages == {"baseline", "groups", "ssal1", "lc", "report"}
    for run in tagged:
        assert run.info.status == "FINISHED", run.data.tags
        if run.data.tags["stage"] in ("baseline", "ssal1", "lc"):
            for tag in ("study", "stage", "method", "arch", "dataset"):
                assert run.data.tags.get(tag), (tag, run.data.tags)
    ssal = next(r for r in tagged if r.data.tags["stage"] == "ssal1")
    assert {"val/top1/main", "val/top1/joint", "val/top5/joint"} <= set(ssal.data.metrics)
    lc = next(r for r in tagged if r.data.tags["stage"] == "lc")
    assert "val/top1/lc" in lc.data.metrics and lc.data.tags["source_run"] == ssal.info.run_id
    report = (study_dir / "report" / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    for column in ("stage", "run", "method", "top1 main", "top5 main", "top1 joint", "top5 joint", "top1 lc",
                   "params (M)", "img/s", "wall (min)"):
        assert column in header, header
    rows = {r.split("|")[1].strip(): r for r in table[1:]}
    assert set(rows) == {"baseline", "groups", "ssal1", "lc"}, report
    cells = dict(zip(header, [c.strip() for c in rows["ssal1"].strip("|").split("|")]))
    assert float(cells["top1 joint"]) >= 0 and float(cells["params (M)"]) > 1 and cells["img/s"]
    summary = next(r for r in tagged if r.data.tags["stage"] == "report")
    assert {"report.md", "report.png", "report.csv"} <= {a.path for a in client.list_artifacts(summary.info.run_id)}


@pytest.mark.slow
def test_demo_study_rerun_skips_finished_stages(demo_study):
    assert demo_study.rc == 0, demo_study.out[-4000:]
    client = _client(demo_study)
    from pipeline.tracking import runs

    before = len(runs.study_runs(client, "ci"))
    result = demo_study.run(timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("baseline", "groups", "ssal1", "lc", "report"):
        assert f"[study] {stage}: finished earlier, skipped" in result.stdout, result.stdout
    assert "pipeline.train" not in result.stdout.split("summary:")[-1]
    assert len(runs.study_runs(client, "ci")) == before


@pytest.mark.slow
def test_unfinished_stage_reruns_and_report_follows(demo_study, tmp_path):
    """Delete the groups output: that stage (and the report) run again; training stages stay skipped."""
    assert demo_study.rc == 0, demo_study.out[-4000:]
    groups_json = demo_study.runs_root / "studies" / "ci" / "groups" / "groups.json"
    saved = groups_json.read_bytes()
    groups_json.unlink()
    try:
        result = demo_study.run(timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        out = result.stdout
        assert "[study] baseline: finished earlier, skipped" in out and "[study] ssal1: finished earlier, skipped" in out
        assert "[study] groups: done" in out and "[study] report: done" in out
        assert groups_json.is_file()
    finally:
        if not groups_json.is_file():
            groups_json.write_bytes(saved)


@pytest.mark.parametrize("name", ["paper_ssal_imagenet", "paper_dks_imagenet"])
def test_paper_studies_run_the_paper_recipes_and_quote_the_paper(tmp_path, name):
    s = study_lib.load_study(REPO_ROOT / "studies" / f"{name}.yaml", [f"runs_root={tmp_path}"])
    train = [st for st in s.stages.values() if st.kind == "train"]
    for stage in train:  # every training stage runs one of configs/imagenet/paper/
        config = stage.argv[stage.argv.index("--config") + 1]
        assert "configs/imagenet/paper/" in config, (stage.name, config)
    report = s.stages["report"].argv
    assert report[report.index("--paper") + 1] == str((REPO_ROOT / "studies" / f"{name}.yaml").resolve())
    from pipeline.stages.report import read_study_file

    figures, _ = read_study_file(REPO_ROOT / "studies" / f"{name}.yaml")
    if name == "paper_dks_imagenet":
        assert len(train) == 9 and set(figures) == {f"{a}_{m}" for a in ("resnet18", "resnet50", "resnet152")
                                                    for m in ("baseline", "dks")}
        assert figures["resnet50_dks"]["main"] == (76.47, 93.60)  # 100 - the paper's 23.53 / 6.40 errors
    else:
        assert [st.name for st in train] == ["baseline", "ssal3", "gapcat"]
        assert set(figures) == {"baseline", "ssal3", "lc", "gapcat"}
        assert figures["ssal3"] == {"main": (76.4, 93.3), "joint": (76.9, 93.7)}
        groups = " ".join(s.stages["groups"].argv)
        assert "authors" in groups and "hard" in groups and "200 334 500" in groups


@pytest.mark.slow
def test_demo_study_registers_each_training_stage_model_with_the_best_alias(demo_study):
    assert demo_study.rc == 0, demo_study.out[-4000:]
    client = _client(demo_study)
    from pipeline.tracking import runs

    by_stage = {r.data.tags["stage"]: r for r in runs.study_runs(client, "ci")}
    for stage, method in (("baseline", "baseline"), ("ssal1", "ssal")):
        best = client.get_model_version_by_alias(f"ci-{method}", "best")
        assert best.run_id == by_stage[stage].info.run_id
    registered = {m.name for m in client.search_registered_models()}
    assert registered == {"ci-baseline", "ci-ssal"}  # the lc and groups stages log no model
    report = (demo_study.runs_root / "studies" / "ci" / "report" / "report.md").read_text()
    assert 'models:/ci-ssal@best' in report and 'models:/ci-baseline@best' in report


SEEDED_CI = """\
study: ci2
experiment: ci2-study
seeds: 2
local_jobs: 2
base:
  overrides:
    data.batch_size: 32
    data.val_batch_size: 64
    data.num_workers: 1
    schedule.epochs: 1
    train.max_steps_per_epoch: 3
    eval.holdout_fraction: 0.25
stages:
  baseline:
    overrides: {method.name: baseline}
  groups: {kind: groups, from: baseline, k: [4]}
  ssal1:
    overrides: {method.name: ssal, method.groups_file: "${groups}"}
"""


@pytest.mark.slow
def test_seeded_study_end_to_end(tmp_path):
    """seeds: 2 on the real engine, FFCV and MLflow (3 steps per run): each seed's run tagged and named, the
    grouping from both baselines with each seed's ARI and the held-out image count, report rows mean ± sd.
    local_jobs: 2 runs the seeds side by side, each training stage with half the cores, its lines tagged."""
    from tests.conftest import DemoStudy

    study = DemoStudy(tmp_path)
    study.study_file.write_text(SEEDED_CI)
    study.write_data()
    result = study.run(timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    from mlflow.tracking import MlflowClient
    from pipeline.tracking import runs

    tagged = runs.study_runs(MlflowClient(tracking_uri=study.uri), "ci2")
    by_stage = {r.data.tags["stage"]: r for r in tagged}
    assert set(by_stage) == {"baseline.seed0", "baseline.seed1", "groups", "ssal1.seed0", "ssal1.seed1", "report"}
    for name in ("baseline.seed1", "ssal1.seed1"):
        run = by_stage[name]
        assert run.info.run_name == name and run.data.tags["seed"] == "1" and run.data.params["train.seed"] == "1"
    # two stages at once: the seeds overlap in time, each trains with half the cores, its lines carry its name
    from ssal_datasets.cpus import usable_cpus

    for stage in ("baseline", "ssal1"):
        first, second = by_stage[f"{stage}.seed0"].info, by_stage[f"{stage}.seed1"].info
        assert max(first.start_time, second.start_time) < min(first.end_time, second.end_time), (first, second)
        assert by_stage[f"{stage}.seed0"].data.params["train.threads"] == str(max(1, usable_cpus() // 2))
    assert "[study] up to 2 stages at once" in result.stdout
    assert any(line.startswith("[baseline.seed1] epoch 1/1") for line in result.stdout.splitlines()), result.stdout[-3000:]
    meta = json.loads((study.runs_root / "studies" / "ci2" / "groups" / "groups.json").read_text())["metadata"]
    assert set(meta["ari_vs_planted_superclasses_per_seed"]) == {"0", "1"}
    assert meta["num_samples_in_confusion"] == 2 * 192  # 25 % of 16 x 48 train images, per seed
    report = (study.runs_root / "studies" / "ci2" / "report" / "report.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| ")}
    assert {"baseline", "ssal1", "groups"} <= set(rows) and "| 0,1 |" in rows["baseline"] and " ± " in rows["ssal1"]
    assert "seed 1 k4 ARI" in report
    # every seed's model is a version of its method's registered model; `best` is the higher top-1
    client = MlflowClient(tracking_uri=study.uri)
    versions = client.search_model_versions("name='ci2-ssal'")
    seeds = [by_stage["ssal1.seed0"], by_stage["ssal1.seed1"]]
    assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in seeds)
    best = max(seeds, key=lambda r: r.data.metrics["val/top1/main"])
    assert client.get_model_version_by_alias("ci2-ssal", "best").run_id == best.info.run_id
    assert "`ci2-ssal`: `best` = version" in report
