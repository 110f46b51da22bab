"""pipeline/explain.py on the demo study's trained SSAL run (tests/conftest.py: demo_study)."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pipeline.train.config import REPO_ROOT

pytestmark = pytest.mark.slow


def test_cams_of_main_head_and_branch_with_group_names(demo_study, tmp_path):
    assert demo_study.rc == 0, demo_study.out[-3000:]
    run_dir = demo_study.runs_root / "studies" / "ci" / "ssal1"
    out = tmp_path / "cams.png"
    cmd = [sys.executable, str(REPO_ROOT / "pipeline" / "explain.py"), "--run-dir", str(run_dir), "--num-images", "3",
           "--out", str(out), "--tracking-uri", demo_study.uri, "--tag", "study=ci-explain"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "heads main, ssal.0" in result.stdout
    lines = [line for line in result.stdout.splitlines() if line.strip().startswith("image ")]
    assert len(lines) == 3 and all("ssal.0 -> group" in line and "[" in line for line in lines)
    image = np.asarray(Image.open(out))
    assert image.shape[0] > 400 and image.shape[1] > 500
    # image files too, and a clear error for an unreadable one
    Image.fromarray((np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8)).save(tmp_path / "x.png")
    ok = subprocess.run(cmd[:4] + ["--images", str(tmp_path / "x.png"), "--out", str(tmp_path / "f.png"),
                                   "--no-mlflow"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    bad = subprocess.run(cmd[:4] + ["--images", str(tmp_path / "missing.png"), "--no-mlflow"], capture_output=True,
                         text=True, timeout=600, cwd=tmp_path)
    assert bad.returncode == 2 and "error: --images: cannot read" in bad.stderr


def test_a_one_position_feature_map_is_said_not_drawn_flat():
    """At 32 px the main head's layer4 map (and a late SSAL branch's) is 1x1: its CAM is flat, so the panel says
    so instead of painting one colour over the image; a 2x2 map is drawn. A random tiny model, no training."""
    import ssal_models
    import torch

    from pipeline.stages.explain import compute_cams, draw

    torch.manual_seed(0)
    groupings = [np.arange(8) % 2, np.arange(8) % 4]
    model = ssal_models.build_model("resnet18", "ssal", 8, groupings=[g.tolist() for g in groupings],
                                    stages=["layer2", "layer3"]).eval()
    with torch.no_grad():  # as the stage runs it
        cams = compute_cams(model, torch.randn(2, 3, 32, 32))
    sizes = {name: size for name, _, _, _, size in cams}
    assert sizes["main"] == (1, 1) and sizes["ssal.0"][0] > 1
    shown = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    fig = draw(shown, cams, [f"c{i}" for i in range(8)], groupings, {"ssal.0": 0, "ssal.1": 1}, [0, 1], 4)
    main_ax, branch_ax = fig.axes[1], fig.axes[2]
    assert len(main_ax.images) == 1 and "no spatial map" in " ".join(t.get_text() for t in main_ax.texts)
    assert len(branch_ax.images) == 2  # the image and its heat map
