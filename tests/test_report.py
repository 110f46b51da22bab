"""pipeline/report.py on runs logged straight into a SQLite store (no training)."""

from pipeline.stages import report
from pipeline.tracking.store import default_tracking_uri
from pipeline.tracking.tracker import Tracker


def log_run(uri, tmp_path, stage, method, metrics, history=None, study="rep", model_dir=None):
    tracker = Tracker(uri=uri, experiment="rep-exp", run_dir=str(tmp_path / stage))
    tracker.start(stage, params={"model.arch": "resnet18"} if method != "groups" else {},
                  tags={"study": study, "stage": stage, "method": method, "arch": "resnet18", "dataset": "demo"})
    for step, values in enumerate(history or [], start=1):
        tracker.log_metrics(values, step=step)
    tracker.log_metrics(metrics, step=9)
    if model_dir is not None:
        tracker.log_model(str(model_dir), "model")
    tracker.end("FINISHED")
    return tracker.run_id


def test_table_rows_columns_and_artifacts(tmp_path, capsys):
    uri = default_tracking_uri(str(tmp_path / "runs"))
    log_run(uri, tmp_path, "baseline", "baseline", {"val/top1/main": 0.5, "val/top5/main": 0.9, "model/params": 11e6,
                                                      "run/wall_seconds": 120},
            history=[{"train/images_per_second": 100}, {"train/images_per_second": 300}, {"train/images_per_second": 200}])
    log_run(uri, tmp_path, "groups", "groups", {"groups/ari/k4": 1.0})
    log_run(uri, tmp_path, "ssal1", "ssal", {"val/top1/main": 0.52, "val/top1/joint": 0.55, "val/top5/main": 0.91,
                                             "val/top5/joint": 0.93, "model/params": 12e6})
    log_run(uri, tmp_path, "dks2", "dks", {"val/top1/main": 0.51, "val/top1/ensemble": 0.53, "val/top1/dks.0": 0.4})
    log_run(uri, tmp_path, "other", "baseline", {"val/top1/main": 0.1}, study="another")
    out = tmp_path / "out"
    assert report.main(["--study", "rep", "--tracking-uri", uri, "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert text in capsys.readouterr().out
    table = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[:5] == ["stage", "run", "method", "arch", "status"]
    # every rule's top-1 / top-5, known rules first, then the rest
    assert header[5:13] == ["top1 main", "top5 main", "top1 joint", "top5 joint", "top1 ensemble", "top5 ensemble",
                            "top1 dks.0", "top5 dks.0"]
    assert header[-3:] == ["params (M)", "img/s", "wall (min)"]
    rows = {r.strip("|").split("|")[0].strip(): dict(zip(header, [c.strip() for c in r.strip("|").split("|")]))
            for r in table[1:]}
    assert set(rows) == {"baseline", "groups", "ssal1", "dks2"}  # another study's run left out
    assert rows["baseline"]["top1 main"] == "50.00" and rows["baseline"]["top1 joint"] == ""
    assert rows["baseline"]["img/s"] == "200" and rows["baseline"]["wall (min)"] == "2.0"
    assert rows["ssal1"]["top1 joint"] == "55.00" and rows["ssal1"]["params (M)"] == "12.00"
    assert "groups: k4 ARI 1.000" in text
    assert (out / "report.png").stat().st_size > 5000 and (out / "report.csv").is_file()
    # the summary run: tagged, with the three files; not a row of the next report
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("rep-exp")
    summary = client.search_runs([exp.experiment_id], "tags.method = 'report'")
    assert len(summary) == 1 and summary[0].data.tags["study"] == "rep"
    assert {"report.md", "report.png", "report.csv"} <= {a.path for a in client.list_artifacts(summary[0].info.run_id)}
    assert report.main(["--study", "rep", "--tracking-uri", uri, "--out", str(out), "--no-mlflow"]) == 0
    assert "| report |" not in (out / "report.md").read_text()


def test_unknown_study_is_one_line_exit_2(tmp_path, capsys):
    uri = default_tracking_uri(str(tmp_path / "runs"))
    assert report.main(["--study", "nope", "--tracking-uri", uri, "--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (MLflow's own INFO lines come first)
    assert err.startswith("error: no runs tagged study='nope'")


def test_paper_figures_from_the_study_file_sit_beside_ours(tmp_path, capsys):
    uri = default_tracking_uri(str(tmp_path / "runs"))
    log_run(uri, tmp_path, "baseline", "baseline", {"val/top1/main": 0.5, "val/top5/main": 0.9})
    log_run(uri, tmp_path, "ssal3", "ssal", {"val/top1/main": 0.52, "val/top1/joint": 0.55, "val/top5/main": 0.91,
                                             "val/top5/joint": 0.93})
    study = tmp_path / "paper.yaml"
    study.write_text("study: rep\nstages:\n  baseline: {paper: {main: [75.5, 92.7]}}\n"
                     "  ssal3: {paper: {main: [76.4, 93.3], joint: 76.9}}\n"
                     "  lc: {kind: lc, from: ssal3, paper: {lc: [76.7, 93.4]}}\n")
    out = tmp_path / "out"
    assert report.main(["--study", "rep", "--tracking-uri", uri, "--out", str(out), "--no-mlflow",
                        "--paper", str(study)]) == 0
    table = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[5:11] == ["top1 main", "paper top1 main", "top5 main", "paper top5 main", "top1 joint",
                            "paper top1 joint"]
    assert "paper top1 lc" in header and "paper top5 joint" not in header  # no top-5 quoted for joint
    rows = {r.strip("|").split("|")[0].strip(): dict(zip(header, [c.strip() for c in r.strip("|").split("|")]))
            for r in table[1:]}
    assert rows["baseline"]["paper top1 main"] == "75.50" and rows["baseline"]["top1 main"] == "50.00"
    assert rows["ssal3"]["paper top1 joint"] == "76.90" and rows["ssal3"]["paper top5 main"] == "93.30"
    assert rows["lc"]["status"] == "not run" and rows["lc"]["paper top1 lc"] == "76.70"  # the paper's row, still to run
    capsys.readouterr()
    study.write_text("study: rep\nstages:\n  baseline: {paper: {main: [75.5, 192.7]}}\n")
    assert report.main(["--study", "rep", "--tracking-uri", uri, "--out", str(out), "--no-mlflow",
                        "--paper", str(study)]) == 2
    err = capsys.readouterr().err.strip()
    assert "stages.baseline.paper.main" in err and "\n" not in err


def test_the_models_of_a_study_are_registered_with_best_on_the_highest_top1(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    import ssal_models
    from pipeline.train.model_export import save_mlflow_model

    saved = save_mlflow_model(ssal_models.build_model("resnet18", "baseline", 4), tmp_path / "model", resolution=32,
                              method="baseline", class_names=list("abcd"))
    uri = default_tracking_uri(str(tmp_path / "runs"))
    ids = {stage: log_run(uri, tmp_path, stage, "baseline", {"val/top1/main": top1}, model_dir=saved)
           for stage, top1 in (("small", 0.4), ("large", 0.6), ("tiny", 0.2))}
    log_run(uri, tmp_path, "nomodel", "dks", {"val/top1/main": 0.9})  # no logged model: nothing registered
    out = tmp_path / "out"
    assert report.main(["--study", "rep", "--tracking-uri", uri, "--out", str(out)]) == 0
    client = MlflowClient(tracking_uri=uri)
    assert {m.name for m in client.search_registered_models()} == {"rep-baseline"}
    assert client.get_model_version_by_alias("rep-baseline", "best").run_id == ids["large"]
    assert {v.run_id for v in client.search_model_versions("name = 'rep-baseline'")} == set(ids.values())
    text = (out / "report.md").read_text()
    assert "`rep-baseline`: `best` = version" in text and "(stage large)" in text and "models:/rep-baseline@best" in text
    assert report.main(["--study", "rep", "--tracking-uri", uri, "--out", str(out)]) == 0  # again: no new versions
    assert len(client.search_model_versions("name = 'rep-baseline'")) == 3
