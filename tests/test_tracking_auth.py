"""A shared tracking server with a password, and the trained model as an MLflow model.

Against a real ``mlflow server --app-name basic-auth`` started here (its admin from a basic_auth.ini written
here, a user created through its REST API): a demo run with the credentials in the environment logs
everything, and no password or ``user:pass@`` reaches the run folder, the store's params / tags, or the
output; a wrong password is one line, exit 2. The run's ``runs:/<id>/model`` loads in a fresh process (with
``ssal_models`` from the model's own code) and gives the logged val/top1/main on the val beton through the
real FFCV loader. URIs with credentials are refused by the trainer, the launcher and the stage tools; the
SLURM dry-run prints no secret; a model logged while the server is away is journaled and ``sync`` logs it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient

from tests.conftest import MlflowServer

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

ADMIN_PASSWORD = "admin-Pw-0f-the-test-server"
USER, PASSWORD = "alice", "alice-Secret-Pw-7731"


class BasicAuthServer(MlflowServer):
    """MlflowServer with MLflow's basic-auth app; the admin comes from a basic_auth.ini written here."""

    def __init__(self, root):
        super().__init__(root)
        ini = Path(self.root) / "basic_auth.ini"
        ini.write_text("[mlflow]\ndefault_permission = READ\n"
                       f"database_uri = sqlite:///{Path(self.root) / 'basic_auth.db'}\n"
                       f"admin_username = admin\nadmin_password = {ADMIN_PASSWORD}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        self.extra_args = ["--app-name", "basic-auth"]
        self.extra_env = {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-csrf-key"}


def tiny_overrides(data_root: Path, work: Path, uri: str) -> list[str]:
    values = {"data.root": data_root, "data.batch_size": 16, "data.val_batch_size": 32, "data.num_workers": 1,
              "data.min_res": 32, "data.max_res": 32, "data.val_res": 32, "runs_root": work / "runs",
              "tracking.experiment": "auth-test", "tracking.uri": uri, "method.num_groups": "[4]",
              "schedule.epochs": 1, "schedule.peak_epoch": 1, "train.max_steps_per_epoch": 3,
              "output_dir": work / "run"}
    return [f"{key}={value}" for key, value in values.items()]


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    return dict(env, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)


def secrets_in(text: str) -> list[str]:
    return [s for s in (PASSWORD, ADMIN_PASSWORD, f"{USER}:{PASSWORD}", f"{USER}:") if s in text]


@pytest.fixture(scope="module")
def auth_run(tmp_path_factory, tiny_demo):
    """A basic-auth server, a user made through its REST API, and one demo run with the user's credentials
    in the environment; the server is stopped at the end of the module."""
    work = tmp_path_factory.mktemp("auth_run")
    server = BasicAuthServer(work / "server").start()
    try:
        created = requests.post(f"{server.url}/api/2.0/mlflow/users/create", auth=("admin", ADMIN_PASSWORD),
                                json={"username": USER, "password": PASSWORD}, timeout=30)
        assert created.status_code == 200, created.text
        env = clean_env(MLFLOW_TRACKING_USERNAME=USER, MLFLOW_TRACKING_PASSWORD=PASSWORD)
        result = subprocess.run([sys.executable, "-m", "pipeline.train", *tiny_overrides(tiny_demo, work, server.url)],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        yield {"server": server, "work": work, "result": result, "env": env, "data": tiny_demo}
    finally:
        server.stop()


def as_user(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)


def test_run_against_a_basic_auth_server_logs_everything_and_leaks_no_secret(auth_run, monkeypatch):
    server, work, result = auth_run["server"], auth_run["work"], auth_run["result"]
    assert result.returncode == 0, result.stderr[-3000:]
    as_user(monkeypatch)
    client = MlflowClient(tracking_uri=server.url)
    [run] = client.search_runs([client.get_experiment_by_name("auth-test").experiment_id])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    store_text = json.dumps([run.data.params, run.data.tags, run.info.run_name])
    assert run.info.status == "FINISHED" and "val/top1/main" in run.data.metrics
    assert {"config.yaml", "confusion_main.npy", "final_weights.pt"} <= artifacts
    assert run.data.params["tracking.uri"] == server.url
    assert not secrets_in(store_text)
    assert not secrets_in(result.stdout + result.stderr)
    leaks = [str(path) for path in (work / "run").rglob("*") if path.is_file()
             if secrets_in(path.read_bytes().decode("latin-1"))]
    assert not leaks
    assert not (work / "run" / "tracking_buffer.jsonl").exists()  # nothing buffered: the server took it all


def test_wrong_password_is_one_line_exit_2(auth_run, tmp_path):
    server, data = auth_run["server"], auth_run["data"]
    env = clean_env(MLFLOW_TRACKING_USERNAME=USER, MLFLOW_TRACKING_PASSWORD="not-the-password")
    result = subprocess.run([sys.executable, "-m", "pipeline.train", *tiny_overrides(data, tmp_path, server.url)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == (f"error: the server at {server.url} refused these credentials (HTTP 401); "
                                     f"set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")
    assert "buffer" not in result.stdout + result.stderr and not (tmp_path / "run" / "tracking_buffer.jsonl").exists()
    report = subprocess.run([sys.executable, "pipeline/report.py", "--study", "x", "--tracking-uri", server.url],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert report.returncode == 2 and report.stderr.count("\n") == 1 and "HTTP 401" in report.stderr


EVALUATE = r"""
import json, sys, torch, mlflow
model = mlflow.pytorch.load_model(sys.argv[1])
import ssal_models  # after the load: the copy MLflow put first on sys.path
from ssal_datasets import loader
val = loader.create_val_loader(sys.argv[2], batch_size=32, num_workers=1, resolution=32, device=torch.device("cpu"),
                               distributed=False)
hits = total = 0
with torch.no_grad():
    for images, labels in val:
        hits += int((model(images)[:, 0].argmax(1) == labels).sum())
        total += len(labels)
print(json.dumps({"top1": hits / total, "rules": model.rules, "ssal_models": ssal_models.__file__}))
"""


def test_the_logged_model_loads_in_a_fresh_process_and_gives_the_logged_top1(auth_run, tmp_path, monkeypatch):
    server, result, data = auth_run["server"], auth_run["result"], auth_run["data"]
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = (auth_run["work"] / "run" / "mlflow_run_id").read_text().strip()
    env = dict(auth_run["env"], MLFLOW_TRACKING_URI=server.url)
    loaded = subprocess.run([sys.executable, "-c", EVALUATE, f"runs:/{run_id}/model", str(data / "val.beton")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    found = json.loads(loaded.stdout.strip().splitlines()[-1])
    as_user(monkeypatch)
    logged = MlflowClient(tracking_uri=server.url).get_run(run_id).data.metrics["val/top1/main"]
    assert found["top1"] == pytest.approx(logged, abs=1e-9)
    assert found["rules"][0] == "main" and "joint" in found["rules"]
    assert "/code/ssal_models/" in found["ssal_models"]  # the model's own copy, not this repository's
    from mlflow.models import Model

    saved = Model.load(str(auth_run["work"] / "run" / "mlflow_model"))
    assert list(saved.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 3, 32, 32]
    assert set(saved.metadata["prediction_rules"]) == set(found["rules"]) and len(saved.metadata["class_names"]) == 16


@pytest.mark.parametrize("command", [
    ["-m", "pipeline.train", "tracking.uri=http://alice:alice-Secret-Pw-7731@127.0.0.1:5999"],
    ["pipeline/launch.py", "--local", "tracking.uri=http://127.0.0.1:5999/?token=alice-Secret-Pw-7731"],
    ["pipeline/report.py", "--study", "x", "--tracking-uri", "https://alice:alice-Secret-Pw-7731@host/mlflow"],
    ["pipeline/report.py", "--study", "x"],  # the URI from $MLFLOW_TRACKING_URI
], ids=["trainer", "launcher", "stage-tool", "stage-tool-env"])
def test_a_uri_with_credentials_is_refused_in_one_line_without_echoing_them(command, tmp_path):
    env = clean_env(MLFLOW_TRACKING_URI=f"http://{USER}@127.0.0.1:5999")
    result = subprocess.run([sys.executable, *command], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD" in result.stderr
    assert not secrets_in(result.stdout + result.stderr)


def test_slurm_dry_run_prints_no_secret_and_a_profile_may_not_hold_one(tmp_path):
    launch = [sys.executable, "pipeline/launch.py", "--dry-run", "--output-dir", str(tmp_path / "run")]
    env = clean_env(MLFLOW_TRACKING_USERNAME=USER, MLFLOW_TRACKING_PASSWORD=PASSWORD)
    dry = subprocess.run([*launch, "--cluster", "testcluster"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "#SBATCH" in dry.stdout and not secrets_in(dry.stdout + dry.stderr)
    for body in (f"env: {{MLFLOW_TRACKING_PASSWORD: {PASSWORD}}}\n", f"setup: ['export MLFLOW_TRACKING_TOKEN={PASSWORD}']\n"):
        profile = tmp_path / "secret.yaml"
        profile.write_text(body)
        refused = subprocess.run([*launch, "--cluster", str(profile)], cwd=REPO, env=env, capture_output=True,
                                 text=True, timeout=300)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr[-2000:]
        assert "export it in the shell that submits" in refused.stderr and not secrets_in(refused.stderr + refused.stdout)


def test_a_model_logged_while_the_server_is_away_is_journaled_then_synced(tmp_path, caplog, monkeypatch):
    import mlflow.pytorch

    import ssal_models
    from pipeline.tracking import models
    from pipeline.tracking.journal import BUFFER_FILE, read_jsonl
    from pipeline.tracking.store import default_tracking_uri
    from pipeline.tracking.sync import sync_run_dir
    from pipeline.tracking.tracker import Tracker
    from pipeline.train.model_export import save_mlflow_model
    from tests.conftest import free_port

    run_dir = tmp_path / "run"
    saved = save_mlflow_model(ssal_models.build_model("resnet18", "baseline", 4), run_dir, resolution=32,
                              method="baseline", class_names=list("abcd"))
    tracker = Tracker(f"http://127.0.0.1:{free_port()}", "away", str(run_dir), timeout=1, retry_interval=0)
    tracker.start("away-run", params={"a": 1})
    tracker.log_model(str(saved), "model")
    tracker.end("FINISHED")
    assert [op["op"] for op in read_jsonl(run_dir / BUFFER_FILE)] == ["start", "model", "end"]
    assert "mlflow.pytorch.load_model" in caplog.text  # the warning says how to load it meanwhile
    uri = default_tracking_uri(tmp_path / "store")
    run_id = sync_run_dir(str(run_dir), uri)
    assert run_id and not (run_dir / BUFFER_FILE).exists()
    client = MlflowClient(tracking_uri=uri)
    assert models.run_model(client, run_id, "model") is not None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert mlflow.pytorch.load_model(f"runs:/{run_id}/model").rules == ["main"]


@pytest.mark.parametrize("method, options", [
    ("baseline", {}), ("ssal", {"groupings": "two"}), ("gapcat", {"groupings": "two"}), ("dks", {}), ("ds", {}),
    ("maxl", {"psi": 2}),
])
def test_every_method_saves_as_an_mlflow_model_whose_rules_match_predict(method, options, tmp_path):
    import mlflow.pytorch
    import numpy as np
    import torch

    import ssal_models
    from pipeline.train.model_export import save_mlflow_model

    if options.get("groupings") == "two":
        options = dict(options, groupings=[np.arange(4) % 2])
    model = ssal_models.build_model("resnet18", method, 4, **options).eval()
    saved = save_mlflow_model(model, tmp_path, resolution=32, method=method, class_names=list("abcd"))
    loaded = mlflow.pytorch.load_model(str(saved))
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        rules = model.method.predict(model(images))
        output = loaded(images)
    assert loaded.rules[0] == "main" and set(loaded.rules) == set(rules)
    for index, name in enumerate(loaded.rules):
        torch.testing.assert_close(output[:, index], rules[name])


def test_sync_refuses_a_uri_with_credentials(tmp_path, capsys):
    from pipeline.tracking import sync
    from pipeline.tracking.journal import BUFFER_FILE

    (tmp_path / BUFFER_FILE).write_text("")
    assert sync.main(["sync", str(tmp_path), "--uri", f"http://{USER}:{PASSWORD}@127.0.0.1:5999"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --uri: ") and err.count("\n") == 1 and not secrets_in(err)
