"""pipeline.train.metrics_journal against a real MLflow SQLite store: a key logged again by a later
process of the same run (resume, re-evaluation) stays one metric per step."""
from mlflow import MlflowClient

from pipeline.tracking.store import default_tracking_uri
from pipeline.tracking.tracker import Tracker
from pipeline.train.metrics_journal import JOURNAL, MetricsJournal


def _history(uri, run_id, key):
    return [(m.step, m.value) for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)]


def _started(tmp_path):
    """(store URI, run folder, a started Tracker, its run id)."""
    uri = default_tracking_uri(str(tmp_path / "runs"))
    tracker = Tracker(uri, "journal", str(tmp_path / "run"))
    return uri, tmp_path / "run", tracker, tracker.start("r")


def test_a_key_logged_again_by_a_later_process_is_kept_once(tmp_path):
    uri, run_dir, first, run_id = _started(tmp_path)
    MetricsJournal(run_dir, first).log("epoch 1", {"val/top1": 0.5}, step=1)
    first.end("KILLED")

    later = Tracker(uri, "journal", str(run_dir))  # the resumed process: same run, new values for epoch 1
    later.start("r", run_id=run_id)
    journal = MetricsJournal(run_dir, later)
    journal.log("epoch 1", {"val/top1": 0.75}, step=1)
    journal.log("epoch 2", {"val/top1": 0.875}, step=2)
    later.end("FINISHED")
    assert sorted(_history(uri, run_id, "val/top1")) == [(1, 0.5), (2, 0.875)]


def test_a_line_torn_by_a_kill_does_not_hide_the_next_one(tmp_path):
    uri, run_dir, tracker, run_id = _started(tmp_path)
    MetricsJournal(run_dir, tracker).log("epoch 1", {"loss": 2.0}, step=1)
    with open(run_dir / JOURNAL, "a") as handle:
        handle.write('{"key": "epoch 2", "st')  # killed mid-append: that call was never sent
    MetricsJournal(run_dir, tracker).log("epoch 2", {"loss": 1.0}, step=2)
    journal = MetricsJournal(run_dir, tracker)  # a third process reads both entries back
    assert "epoch 1" in journal and "epoch 2" in journal
    journal.log("epoch 2", {"loss": 9.0}, step=2)
    tracker.end("FINISHED")
    assert sorted(_history(uri, run_id, "loss")) == [(1, 2.0), (2, 1.0)]
