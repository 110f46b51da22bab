"""bench/gpu_check.sh where there is no GPU: the one-line stop, and the stage machinery it uses on a
GPU machine (time limits, the JSON written after every stage, the JUnit summary, the targets)."""
import json
import os
import subprocess
import sys

from bench import gpu_check
from pipeline.train.config import REPO_ROOT


def test_gpu_check_without_cuda_says_so_in_one_line_and_exits_2(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)  # no GPU, even on a GPU machine
    result = subprocess.run(["bash", str(REPO_ROOT / "bench" / "gpu_check.sh"), str(tmp_path / "out")], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(lines) == 1 and "CUDA is not available" in lines[0], lines
    assert not (tmp_path / "out").exists()  # stopped before writing anything


def test_gpu_check_stages_record_pass_fail_timeout_and_budget(tmp_path):
    check = gpu_check.Check(tmp_path, budget=120)
    py = sys.executable
    assert check.run("ok", [py, "-c", "print('stage output')"], limit=60)["status"] == "passed"
    assert check.run("bad", [py, "-c", "import sys; sys.exit(3)"], limit=60)["returncode"] == 3
    slow = check.run("slow", [py, "-c", "import time; time.sleep(120)"], limit=2)
    assert slow["status"] == "timed out" and slow["seconds"] < 30
    report = json.loads((tmp_path / "gpu_check.json").read_text())  # rewritten after every stage
    assert [report["stages"][n]["status"] for n in ("ok", "bad", "slow")] == ["passed", "failed", "timed out"]
    assert report["failed"] == ["bad", "slow"]
    assert "stage output" in (tmp_path / "gpu_check.log").read_text()
    (tmp_path / "late").mkdir()
    late = gpu_check.Check(tmp_path / "late", budget=0)
    assert late.run("late", [py, "-c", "pass"], limit=60)["status"].startswith("not run: out of time")


def test_gpu_check_summarises_the_gpu_tests_junit_and_the_targets(tmp_path):
    xml = tmp_path / "gpu_tests.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:randomly", "-p", "no:cacheprovider",
                    "-q", f"--junitxml={xml}", "tests/test_gpu.py::test_nccl_one_rank_process_group_ddp_step"],
                   cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    summary = gpu_check.junit_summary(xml)
    assert (summary["passed"], summary["failed"], summary["skipped"]) == (0, 0, 1)
    assert any("needs a CUDA device" in reason for reason in summary["skips"])

    check = gpu_check.Check(tmp_path, budget=60)
    check.report["stages"] = {
        "throughput": {"figures": {"p3_fed_over_synthetic": 0.9, "p4_img_s": 4000.0}},
        "branch_overhead": {"figures": {"rows": [
            {"arch": "resnet50", "method": "baseline", "step_ratio": 1.0, "step_over_flops": 1.0},
            {"arch": "resnet50", "method": "ssal", "step_ratio": 1.25, "step_over_flops": 1.05}]}},
        # the authors' heads: only step/FLOPs has a target (the 1.20x is the light heads')
        "branch_overhead_authors": {"figures": {"rows": [
            {"arch": "resnet50", "method": "ssal", "step_ratio": 1.5, "step_over_flops": 1.05},
            {"arch": "resnet50", "method": "gapcat", "step_ratio": 1.4, "step_over_flops": 1.2}]}}}
    gpu_check.check_targets(check, "NVIDIA H200")
    missed = check.report["targets_missed"]
    assert len(missed) == 4 and missed[0].startswith("P3") and missed[1].startswith("P4"), missed
    assert "SSAL x3" in missed[2] and missed[3] == "resnet50 gapcat (authors heads) step/FLOPs x1.20 > 1.10"
    (tmp_path / "a100").mkdir()
    other = gpu_check.Check(tmp_path / "a100", budget=60)
    other.report["stages"] = {"throughput": {"figures": {"p3_fed_over_synthetic": 0.97, "p4_img_s": 3000.0}}}
    gpu_check.check_targets(other, "NVIDIA A100")  # the 5000 img/s target is for H100/H200 only
    assert other.report["targets_missed"] == []


def test_gpu_memory_bench_steps_maxl_second_order_through_the_engine_on_cpu():
    """bench/gpu_memory.py's measurement on CPU (a smoke run; memory figures are CUDA-only): the
    engine's MAXL step with a second-order generator step, at a toy size."""
    from bench.gpu_memory import measure_step

    result = measure_step("resnet18", "maxl", batch=2, resolution=32, amp="bf16", steps=1, warmup=0,
                          options={"psi": 2, "meta_order": "second", "generator_every": 1}, device="cpu")
    assert result["step_ms"] > 0 and result["peak_gib"] is None
