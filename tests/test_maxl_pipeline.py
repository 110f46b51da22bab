"""MAXL in the training pipeline (pipeline/train/maxl_training.py): the training class in process, and
end to end on the tiny demo set with real FFCV loaders, 2-process gloo DDP under torchrun, a real
MLflow SQLite store and real signals (SIGUSR2 mid-epoch, exact resume)."""
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ssal_models
from pipeline.train.config import REPO_ROOT, OptimConfig
from pipeline.train.optim import build_optimizer
from ssal_models import maxl as mx

CONFIG = "configs/demo_maxl.yaml"


# ----------------------------------------------------------------------------- in process


def tiny_model(**options):
    torch.manual_seed(0)
    options = {"psi": 2, "generator_arch": "resnet10", "meta_order": "first", "generator_every": 2, **options}
    return ssal_models.build_model("resnet18", "maxl", 4, **options)


def make_training(model):
    from pipeline.train.maxl_training import MaxlTraining

    MaxlTraining.prepare_model(model)
    optimizer = build_optimizer(model, OptimConfig(lr=0.1, weight_decay=5e-4), 256)
    return MaxlTraining(model, model, optimizer, 0.1, device=torch.device("cpu"), amp="none")


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 16, 16, generator=g), torch.arange(8) % 4


def snapshot(params):
    return [p.detach().clone() for p in params]


def changed(before, params):
    return any(not torch.equal(a, p) for a, p in zip(before, params))


def test_training_options_are_validated_by_the_model_builder():
    model = tiny_model(generator_lr=0.05, generator_every=3)
    assert model.method.training_options == {"generator_lr": 0.05, "generator_weight_decay": 5e-4,
                                             "generator_momentum": 0.0, "generator_every": 3,
                                             "schedule": "interleave"}
    for bad in ({"generator_every": -1}, {"generator_every": 1.5}, {"generator_lr": 0},
                {"generator_weight_decay": "x"}, {"generator_momentum": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            tiny_model(**bad)
    with pytest.raises(ValueError, match="unknown option"):
        tiny_model(generator_steps=2)


def test_two_optimisers_alternation_metrics_state_and_artifacts(tmp_path):
    model = tiny_model()
    training = make_training(model)
    gen, net = mx.generator_parameters(model), mx.multitask_parameters(model)
    # the generator is kept out of DDP and out of the multi-task optimiser
    assert {f"method.generator.{n}" for n, _ in model.method.generator.named_parameters()} \
        <= set(model._ddp_params_and_buffers_to_ignore)
    net_opt, gen_opt = training.optimizers["net"], training.optimizers["generator"]
    assert {id(p) for g in net_opt.param_groups for p in g["params"]} == {id(p) for p in net}
    assert [id(p) for p in gen_opt.param_groups[0]["params"]] == [id(p) for p in gen]
    assert gen_opt.param_groups[0]["weight_decay"] == 5e-4 and gen_opt.param_groups[0]["momentum"] == 0.0
    training.set_lr_factor(0.5)  # every optimiser follows the schedule from its own peak lr
    assert net_opt.param_groups[0]["lr"] == pytest.approx(0.05) and gen_opt.param_groups[0]["lr"] == 5e-4
    training.set_lr_factor(1.0)

    g0, n0 = snapshot(gen), snapshot(net)
    loss, parts = training.step(*batch(0))  # iteration 1: multi-task step only
    assert torch.isfinite(loss) and set(parts) == {"focal/main", "focal/aux"}
    assert changed(n0, net) and not changed(g0, gen)
    n1 = snapshot(net)
    training.step(*batch(1))  # iteration 2: multi-task step, then a generator meta step
    assert changed(g0, gen) and changed(n1, net)
    assert all(p.grad is None for p in gen)  # no stale generator gradients

    state = training.state_dict()
    metrics = training.epoch_metrics()
    assert metrics["train/generator_steps"] == 1 and metrics["train/generator_skipped"] == 0
    assert 0 < metrics["train/label_fraction"] <= 1 and metrics["train/entropy_term"] <= 0
    assert 0 <= metrics["train/aux_acc"] <= 1 and metrics["train/meta_loss"] > 0
    assert metrics["train/entropy_estimate"] < 0  # the configured estimate (batch) over generator steps
    assert 0 < metrics["train/label_entropy_frac"] <= 1 and 0.5 <= metrics["train/label_max_prob"] <= 1
    assert sum(training.label_history[-1]["counts"]) == 16 and training.sums.sum() == 0  # reset
    assert training.label_sums.sum() == 0

    # a fresh training object restores both optimisers, the alternation counter and the epoch sums
    other = make_training(tiny_model())
    other.load_state_dict(state)
    assert other.iteration == 2 and other.label_sums[:8].sum() == 16
    assert other.optimizers["net"].state_dict()["state"].keys() == net_opt.state_dict()["state"].keys()
    assert other.epoch_metrics() == pytest.approx(metrics)

    paths = training.final_artifacts(tmp_path)
    assert [p.name for p in paths] == ["maxl_label_distribution.json", "maxl_label_distribution.png"]
    info = json.loads(paths[0].read_text())
    assert info["psi"] == [2, 2, 2, 2] and sum(info["counts"]) == 16 and len(info["per_class"]) == 4
    assert info["label_fraction"] == metrics["train/label_fraction"]


def test_generator_every_zero_never_trains_the_generator():
    model = tiny_model(generator_every=0)
    training = make_training(model)
    g0 = snapshot(mx.generator_parameters(model))
    for seed in range(2):
        training.step(*batch(seed))
    assert not changed(g0, mx.generator_parameters(model))
    assert "train/meta_loss" not in training.epoch_metrics()


def optimizer_state(optimizer):
    return [{k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
            for group in optimizer.param_groups for p in group["params"]]


def same_state(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(torch.as_tensor(x[k]), torch.as_tensor(y[k]))
                                                                  for k in x) for x, y in zip(a, b))


def net_buffers(model):
    return [b.detach().clone() for n, b in model.named_buffers() if not n.startswith("method.")]


def test_alternate_epochs_trains_only_the_epochs_network():
    model = tiny_model(schedule="alternate_epochs", generator_momentum=0.9, generator_every=1)
    training = make_training(model)
    gen, net = mx.generator_parameters(model), mx.multitask_parameters(model)
    for epoch in range(3):
        training.begin_epoch(epoch)
        g0, n0, b0 = snapshot(gen), snapshot(net), net_buffers(model)
        gen_state, net_state = optimizer_state(training.optimizers["generator"]), optimizer_state(training.optimizers["net"])
        for seed in range(3):
            loss, parts = training.step(*batch(10 * epoch + seed))
            assert torch.isfinite(loss) and set(parts) == {"focal/main", "focal/aux"}
        metrics = training.epoch_metrics()
        assert 0 < metrics["train/label_fraction"] <= 1 and metrics["train/label_entropy"] > 0
        if epoch % 2 == 0:  # the multi-task net's epoch
            assert changed(n0, net) and not changed(g0, gen)
            assert same_state(gen_state, optimizer_state(training.optimizers["generator"]))
            assert metrics["train/generator_steps"] == 0 and "train/aux_acc" in metrics
        else:  # the generator's epoch: one meta step per batch, the net and its optimizer untouched
            assert changed(g0, gen) and not changed(n0, net)
            assert all(torch.equal(a, b) for a, b in zip(b0, net_buffers(model)))  # BN statistics too
            assert same_state(net_state, optimizer_state(training.optimizers["net"]))
            assert metrics["train/generator_steps"] == 3 and metrics["train/meta_loss"] > 0
            assert "train/aux_acc" not in metrics  # no multi-task forward in this epoch
    assert training.iteration == 6  # multi-task steps only
    assert len(training.optimizers["generator"].state) > 0  # momentum buffers exist (epoch 1) ...


def test_alternate_epochs_resumes_mid_epoch_exactly():
    options = dict(schedule="alternate_epochs", generator_momentum=0.9, entropy_estimate="ema")

    def start():
        model = tiny_model(**options)
        return model, make_training(model)

    def train(training, epoch, seeds):
        training.begin_epoch(epoch)
        for seed in seeds:
            training.step(*batch(seed))

    model, training = start()
    train(training, 0, [0, 1])
    first = training.epoch_metrics()
    train(training, 1, [2, 3])
    saved = copy.deepcopy((model.state_dict(), training.state_dict()))
    train(training, 1, [4, 5])
    straight = training.epoch_metrics()

    resumed_model, resumed = start()
    resumed_model.load_state_dict(saved[0])
    resumed.load_state_dict(saved[1])
    train(resumed, 1, [4, 5])
    assert resumed.epoch_metrics() == straight and first["train/generator_steps"] == 0
    a, b = model.state_dict(), resumed_model.state_dict()
    assert any(k.startswith("method.collapse.") for k in a)  # the running estimate is checkpointed
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("net", "generator"):
        assert same_state(optimizer_state(training.optimizers[name]), optimizer_state(resumed.optimizers[name]))


def test_initial_metrics_describe_the_untrained_generator_and_change_nothing():
    from ssal_models import maxl_labels as mxl

    model = tiny_model()
    training = make_training(model)
    before = copy.deepcopy(model.state_dict())
    batches = [batch(0), batch(1), batch(2)]
    metrics = training.initial_metrics(batches, steps=2)  # the first two batches
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running statistics included
    gen = model.method.generator
    with torch.no_grad():
        lps = [mx.mask_log_softmax(gen(x), y, model.method.mask) for x, y in batches[:2]]
    model.load_state_dict(before)
    sums = [mxl.label_sums(lp, y, model.method.psi) for lp, (_, y) in zip(lps, batches)]
    expected = mxl.label_metrics({k: sums[0][k] + sums[1][k] for k in sums[0]}, model.method.psi)
    for key in ("label_entropy", "label_entropy_frac", "label_max_prob", "label_fraction", "label_marginal_entropy"):
        assert metrics[f"train/{key}"] == pytest.approx(expected[key], rel=1e-6)
    assert training.label_history[0]["epoch"] == 0 and training.label_history[0]["counts"] == expected["counts"]


# ----------------------------------------------------------------------------- end to end


def tiny_overrides(data_root: Path, work: Path, **extra) -> list[str]:
    values = {
        "data.root": str(data_root), "data.batch_size": 16, "data.val_batch_size": 32, "data.num_workers": 1,
        "data.min_res": 32, "data.max_res": 32, "data.val_res": 32, "runs_root": str(work / "runs"),
        "tracking.experiment": "maxl-test", "train.log_every": 1, "schedule.epochs": 2,
        "train.max_steps_per_epoch": 4, "output_dir": str(work / "run"),
        "train.sync_every": 2,  # a stop is seen inside an epoch of 4 steps
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def env() -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def torchrun_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "pipeline.train", "--config", CONFIG, *args]


def only_run(work: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("maxl-test").experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def steps_of(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


# logged at: step 0 (the untrained generator) and after both epochs / after the multi-task epoch /
# after the generator epoch (schedule alternate_epochs); top-4: the tiny demo's 4 super-classes
LABEL_METRICS = ("train/label_entropy", "train/label_entropy_frac", "train/label_max_prob", "train/label_fraction",
                 "train/label_marginal_entropy", "train/label_marginal_entropy_frac")
MAXL_METRICS = {**{k: [0, 1, 2] for k in LABEL_METRICS},
                **{k: [1, 2] for k in ("train/entropy_term", "train/generator_steps", "train/generator_lr",
                                       "val/aux_acc", "val/aux_in_set", "val/top1/main", "val/top4/main",
                                       "val/top1/aux_sum", "train/loss")},
                "train/aux_acc": [1], "train/meta_loss": [2], "train/entropy_estimate": [2]}


@pytest.mark.slow
def test_two_process_gloo_maxl_run_logs_metrics_and_resumes_exactly(tiny_demo, tmp_path):
    """Uninterrupted 2-process run vs the same run stopped by SIGUSR2 inside epoch 2 (the generator's
    epoch of alternate_epochs) and resumed: identical final weights (both networks, the running
    collapse estimate), one MLflow run with every epoch's MAXL metrics."""
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    # meta_order=second: the exact meta step under DDP; ema: the collapse estimate over both ranks
    extra = {"method.options.meta_order": "second", "method.options.schedule": "alternate_epochs",
             "method.options.entropy_estimate": "ema"}
    result = subprocess.run(torchrun_cmd(*tiny_overrides(tiny_demo, straight, **extra)), cwd=REPO_ROOT, env=env(),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    client, run = only_run(straight)
    assert run.info.status == "FINISHED" and run.data.tags["method"] == "maxl" and run.data.tags["world_size"] == "2"
    metrics = run.data.metrics
    for key, steps in MAXL_METRICS.items():
        assert key in metrics, sorted(metrics)
        assert steps_of(client, run.info.run_id, key) == steps, key
    assert metrics["train/generator_steps"] == 4  # the generator's epoch: a meta step per batch
    assert 0 < metrics["train/label_fraction"] <= 1 and metrics["train/entropy_term"] < 0
    assert metrics["train/entropy_estimate"] < 0
    assert metrics["val/samples"] == 64
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"maxl_label_distribution.json", "maxl_label_distribution.png", "final_weights.pt"} <= artifacts
    labels = json.loads((straight / "run" / "maxl_label_distribution.json").read_text())
    # the config's primary task: the tiny demo's 4 super-classes (data.labels), psi 4 labels each
    assert labels["psi"] == [4] * 4 and sum(labels["counts"]) == 4 * 16 * 2  # last epoch, both ranks
    assert labels["label_fraction"] == pytest.approx(metrics["train/label_fraction"])
    assert [e["epoch"] for e in labels["epochs"]] == [0, 1, 2]  # the untrained generator first
    assert all(sum(e["counts"]) == 4 * 16 * 2 for e in labels["epochs"])

    proc = subprocess.Popen(torchrun_cmd(*tiny_overrides(tiny_demo, interrupted, **extra)), cwd=REPO_ROOT,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "epoch 2/2 step 1/4" in line:
                break
        assert "epoch 2/2 step 1/4" in lines[-1], "".join(lines)[-3000:]
        for pid in children(proc.pid):  # SLURM sends the pre-end signal to every task
            os.kill(pid, signal.SIGUSR2)
        rest = proc.communicate(timeout=600)[0]
    finally:
        proc.kill()
    assert "checkpoint saved" in rest, rest[-3000:]
    state = torch.load(interrupted / "run" / "last.pt", map_location="cpu", weights_only=False)
    assert state["epoch"] == 1 and 1 <= state["step_in_epoch"] < 4  # stopped inside epoch 2
    assert set(state["training"]["optimizers"]) == {"net", "generator"}
    assert state["training"]["maxl"]["iteration"] == 4  # multi-task steps: epoch 1 only

    result = subprocess.run(torchrun_cmd("--resume", "auto", *tiny_overrides(tiny_demo, interrupted, **extra)),
                            cwd=REPO_ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout

    a = torch.load(straight / "run" / "final_weights.pt", map_location="cpu", weights_only=True)
    b = torch.load(interrupted / "run" / "final_weights.pt", map_location="cpu", weights_only=True)
    assert a.keys() == b.keys() and any(k.startswith("method.generator.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    client_b, run_b = only_run(interrupted)  # the resumed job continued the same MLflow run
    assert run_b.info.status == "FINISHED"
    for key, steps in MAXL_METRICS.items():
        assert steps_of(client_b, run_b.info.run_id, key) == steps, key
        # every rank's share of the interrupted epoch is in the checkpoint: the epoch means match
        assert run_b.data.metrics[key] == pytest.approx(metrics[key], rel=1e-6, abs=1e-9), key


def test_psi_from_a_hierarchy_file(tmp_path):
    from pipeline.train.config import ConfigError, load_config
    from pipeline.train.factory import build_model, method_options

    hierarchy = tmp_path / "psi.yaml"
    hierarchy.write_text("psi: [2, 3, 1, 4]\n")
    cfg = load_config(None, ["method.name=maxl", f"method.options.psi={hierarchy}"])
    assert method_options(cfg, None)["psi"] == [2, 3, 1, 4]
    model = build_model(cfg, 4, None)
    assert model(torch.randn(2, 3, 32, 32))["aux"].shape == (2, 10)  # sum of psi auxiliary classes
    hierarchy.write_text("[2, zero]\n")
    with pytest.raises(ConfigError, match="must hold a list of positive integers"):
        method_options(cfg, None)
    with pytest.raises(ConfigError, match="wrong length|psi"):
        build_model(load_config(None, ["method.name=maxl", "method.options.psi=[1, 2]"]), 4, None)
