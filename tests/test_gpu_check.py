"""bench/gpu_check.sh where there is no GPU: the one-line stop, and the stage machinery it uses on a
GPU machine (time limits, the JSON written after every stage, the JUnit summary, the targets)."""
import json
import os
import subprocess
import sys

import pytest

from bench import gpu_check
from pipeline.train.config import REPO_ROOT


@pytest.mark.parametrize("part", ["1", "2"])
def test_gpu_check_without_cuda_says_so_in_one_line_and_exits_2(tmp_path, part):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)  # no GPU, even on a GPU machine
    result = subprocess.run(["bash", str(REPO_ROOT / "bench" / "gpu_check.sh"), str(tmp_path / "out"), "--part", part],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(lines) == 1 and "CUDA is not available" in lines[0], lines
    assert not (tmp_path / "out").exists()  # stopped before writing anything


def test_each_part_fits_its_budget_and_a_five_minute_call():
    """Two device calls of <= 5 minutes each: every stage's limit inside its part's budget."""
    assert gpu_check.PART_BUDGET_S <= 300
    for part in ("1", "2"):
        limits = [limit for _, limit in gpu_check.PARTS[part]]
        assert limits and sum(limits) <= gpu_check.PART_BUDGET_S, (part, limits)
    names = [name for part in ("1", "2") for name, _ in gpu_check.PARTS[part]]
    assert len(set(names)) == len(names) and [n for n, _ in gpu_check.PARTS["all"]] == names
    assert gpu_check.parse_args(["--part", "1"]).budget is None  # main() then takes PART_BUDGET_S


def _collected(args: list[str]) -> set[str]:
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly",
                             "-p", "no:cacheprovider", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {line for line in result.stdout.splitlines() if "::" in line}


def test_the_two_parts_split_the_gpu_tests():
    """Part 1 runs the loader case and a bf16 step of every method, part 2 every other `-m gpu` test:
    no test twice, none left out (the selections pytest collects, on this machine too)."""
    part1, part2 = _collected(gpu_check.pytest_selection("1")), _collected(gpu_check.pytest_selection("2"))
    everything = _collected(["-m", "gpu", "tests/"])
    from tests.step_checks import CASES

    assert part1 == {gpu_check.PART1_LOADER_CASE} | {f"tests/test_gpu.py::test_cuda_step_every_method[{c}-bf16]"
                                                     for c in CASES}
    assert not part1 & part2 and part1 | part2 == everything
    assert any("fp16" in node for node in part2) and any("compile" in node for node in part2)


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
        "throughput": {"figures": {"p3_fed_over_synthetic": 0.9, "p4_img_s": 4000.0, "max_syncs_per_step": 6.0}},
        "branch_overhead": {"figures": {"rows": [
            {"arch": "resnet50", "method": "baseline", "step_ratio": 1.0, "step_over_flops": 1.0},
            {"arch": "resnet50", "method": "ssal", "step_ratio": 1.25, "step_over_flops": 1.05}]}},
        # the authors' heads: only step/FLOPs has a target (the 1.20x is the light heads')
        "branch_overhead_authors": {"figures": {"rows": [
            {"arch": "resnet50", "method": "ssal", "step_ratio": 1.5, "step_over_flops": 1.05},
            {"arch": "resnet50", "method": "gapcat", "step_ratio": 1.4, "step_over_flops": 1.2}]}}}
    gpu_check.check_targets(check, "NVIDIA H200")
    missed = check.report["targets_missed"]
    assert len(missed) == 5 and missed[0].startswith("P3") and missed[1].startswith("P4"), missed
    assert missed[2] == "6.00 host syncs per training step > 1"
    assert "SSAL x3" in missed[3] and missed[4] == "resnet50 gapcat (authors heads) step/FLOPs x1.20 > 1.10"
    (tmp_path / "a100").mkdir()
    other = gpu_check.Check(tmp_path / "a100", budget=60)
    other.report["stages"] = {"throughput": {"figures": {"p3_fed_over_synthetic": 0.97, "p4_img_s": 3000.0,
                                                         "max_syncs_per_step": 0.25}}}
    gpu_check.check_targets(other, "NVIDIA A100")  # the 5000 img/s target is for H100/H200 only
    assert other.report["targets_missed"] == []


def test_gpu_memory_bench_steps_maxl_second_order_through_the_engine_on_cpu():
    """bench/gpu_memory.py's measurement on CPU (a smoke run; memory figures are CUDA-only): the
    engine's MAXL step with a second-order generator step, at a toy size."""
    from bench.gpu_memory import measure_step

    result = measure_step("resnet18", "maxl", batch=2, resolution=32, amp="bf16", steps=1, warmup=0,
                          options={"psi": 2, "meta_order": "second", "generator_every": 1}, device="cpu")
    assert result["step_ms"] > 0 and result["peak_gib"] is None


def test_train_throughput_times_the_real_loop_on_cpu(tiny_demo, tmp_path):
    """bench/train_throughput.py on CPU, a tiny case: the trainer's real loop (Trainer.fit ->
    train_one_epoch, the FFCV loader, DDP on a one-rank gloo group), FFCV-fed and synthetic img/s."""
    out = tmp_path / "throughput.json"
    result = subprocess.run([sys.executable, "bench/train_throughput.py", "--device", "cpu", "--recipes",
                             "configs/demo.yaml", "--batches", "8", "--res", "16", "--warmup", "1", "--steps", "2",
                             "--workers", "1", "--data", str(tiny_demo), "--json", str(out), "--set",
                             "method.name=baseline", "model.width_multiplier=0.125"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(out.read_text())
    (row,) = figures["rows"]
    assert row["ddp"] and row["method"] == "baseline" and row["batch"] == 8
    assert row["steps_trained"] == 3 * (1 + 2)  # warm-up epoch, FFCV-fed epoch, synthetic epoch
    assert row["ffcv_fed_img_s"] > 0 and row["synthetic_img_s"] > 0
    assert row["syncs_per_step_fed"] is None  # counted on CUDA only (torch.cuda.set_sync_debug_mode)
    assert figures["p4_img_s"] == row["ffcv_fed_img_s"] and figures["p4_batch"] == 8
    assert "P3 " in result.stdout and "img/s" in result.stdout


def test_the_part1_tests_stage_runs_its_selection_and_summarises_it(tmp_path):
    """The stage as a GPU machine runs it (here every selected test skips: no CUDA): the JUnit XML
    of exactly part 1's tests, summarised into the part's JSON."""
    from tests.step_checks import CASES

    check = gpu_check.Check(tmp_path, budget=280, name="gpu_check_part1")
    gpu_check.run_stage(check, "tests_part1", 250, tmp_path)
    stage = json.loads((tmp_path / "gpu_check_part1.json").read_text())["stages"]["tests_part1"]
    assert stage["status"] == "passed" and stage["limit_s"] == 250, stage
    assert stage["summary"]["skipped"] == 1 + len(CASES) and stage["summary"]["passed"] == 0, stage["summary"]
    assert (tmp_path / "gpu_tests_part1.xml").is_file()
