"""train.compile=true on CPU: the real trainer under torchrun (gloo, 2 processes), Inductor, DDP.

Slow: Inductor compiles the forward and backward once per resolution in each process, minutes on a
small shared CPU. tests/test_gpu.py compiles on a GPU (bench/gpu_check.sh)."""
import re
import subprocess
import sys

import pytest

from pipeline.train.config import REPO_ROOT
from tests.test_train import env, tiny_overrides

SIZE_MISMATCH = re.compile(r"Recompiling function forward in \S*ssal_models/model\.py.*?\n.*?guard failure.*?\n"
                           r".*?tensor 'images' size mismatch at index 2\. expected 16, actual 24")


@pytest.mark.slow
def test_compiled_ddp_trains_two_resolutions_with_one_static_recompile(tiny_demo, tmp_path):
    """4 steps of a tiny ResNet-18 under DDP with torch.compile: 2 at 16 px (epoch 1), 2 at 24 px
    (epoch 2, progressive resizing). Each rank compiles the model once per resolution, with static
    shapes: one recompile, for the new image size (none at a resolution's second step), and no
    symbolic size (dynamic shapes) anywhere."""
    overrides = tiny_overrides(tiny_demo, tmp_path, **{
        "method.name": "baseline", "model.width_multiplier": 0.125, "train.compile": "true",
        "data.batch_size": 8, "data.min_res": 16, "data.max_res": 24, "data.start_ramp": 0, "data.end_ramp": 1,
        "data.val_res": 16, "train.max_steps_per_epoch": 2, "tracking.enabled": "false"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pipeline.train", *overrides]
    compile_env = dict(env(), TORCH_LOGS="recompiles,dynamic", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=compile_env, capture_output=True, text=True, timeout=1500)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "epoch 2/2 step 2/2" in output and "done:" in output, output[-2000:]
    for rank in (0, 1):
        lines = "\n".join(line for line in output.splitlines() if line.startswith(f"[rank{rank}]:"))
        assert len(SIZE_MISMATCH.findall(lines)) == 1, lines[-4000:]
        assert lines.count("Recompiling function forward in") == 1, lines[-4000:]
        # DDP's gradient_as_bucket_view makes each parameter's .grad a view into a flat bucket: dynamo's guards on
        # that view (and its base) get symbols, metadata of the gradient buffers that the forward never computes
        # with; what must stay static is every input and activation size
        sizes = [line for line in lines.splitlines()
                 if "create_symbol" in line and ".size()" in line and ".grad" not in line]
        assert sizes == [], sizes[:3]  # dynamic=True / automatic dynamic shapes would make the size a symbol
