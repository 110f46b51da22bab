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
