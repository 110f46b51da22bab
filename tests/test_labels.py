"""data.labels: the primary task on the classes (default) or on the planted super-classes of the demo set."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.train.config import REPO_ROOT, ConfigError, config_from_dict
from pipeline.train.factory import Relabelled, label_space

MANIFEST = {"num_classes": 4, "classes": [
    {"index": 0, "name": "disk-a", "superclass": 1, "superclass_name": "disk"},
    {"index": 1, "name": "star-a", "superclass": 0, "superclass_name": "star"},
    {"index": 2, "name": "disk-b", "superclass": 1, "superclass_name": "disk"},
    {"index": 3, "name": "star-b", "superclass": 0, "superclass_name": "star"}]}


def test_label_space_of_classes_and_superclasses():
    assert label_space(config_from_dict({}), MANIFEST) == (4, ["disk-a", "star-a", "disk-b", "star-b"], None)
    count, names, table = label_space(config_from_dict({"data": {"labels": "superclass"}}), MANIFEST)
    assert (count, names, table.tolist()) == (2, ["star", "disk"], [1, 0, 1, 0])


def test_superclass_labels_need_a_manifest_that_names_them():
    plain = {"num_classes": 2, "classes": [{"index": 0, "name": "a"}, {"index": 1, "name": "b"}]}
    with pytest.raises(ConfigError, match=r"^data.labels: superclass, but the manifest .* set data.labels=class$"):
        label_space(config_from_dict({"data": {"labels": "superclass"}}), plain)
    with pytest.raises(ConfigError, match="data.labels: 'fine' is not one of class, superclass"):
        config_from_dict({"data": {"labels": "fine"}})


def test_relabelled_loader_maps_labels_and_keeps_the_rest():
    class Loader:
        order = "random"

        def __iter__(self):
            yield torch.zeros(3, 1), torch.tensor([0, 1, 3]), torch.tensor([7, 8, 9])

        def __len__(self):
            return 1

    loader = Relabelled(Loader(), torch.tensor([1, 0, 1, 0]))
    (images, labels, index), = list(loader)
    assert labels.tolist() == [1, 0, 0] and index.tolist() == [7, 8, 9] and images.shape == (3, 1)
    assert len(loader) == 1 and loader.order == "random"


@pytest.mark.slow
def test_a_run_on_superclasses_trains_and_evaluates_the_superclass_task(tiny_demo, tmp_path):
    overrides = {"data.root": tiny_demo, "data.labels": "superclass", "method.name": "baseline",
                 "data.batch_size": 16, "data.val_batch_size": 32, "data.num_workers": 1, "schedule.epochs": 1,
                 "train.max_steps_per_epoch": 2, "runs_root": tmp_path / "runs", "output_dir": tmp_path / "run",
                 "tracking.log_model": "false"}
    result = subprocess.run([sys.executable, "-m", "pipeline.train", *(f"{k}={v}" for k, v in overrides.items())],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    weights = torch.load(tmp_path / "run" / "final_weights.pt", map_location="cpu", weights_only=True)
    assert weights["backbone.fc.weight"].shape[0] == 4  # the tiny demo's 4 super-classes, not its 16 classes
    confusion = np.load(tmp_path / "run" / "confusion_main.npy")
    assert confusion.shape == (4, 4) and confusion.sum() == 16 * 4  # every val image, on a super-class label
