"""Shared pytest fixtures. Helpers add fixtures here with small appends; keep each one documented."""
import os

# Tests run on a 2-core box: keep every process to few threads unless a test says otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")


# --- real local MLflow server (tracking tests; the UI test reuses `mlflow_server`) -------------
import socket as _socket
import signal as _signal
import subprocess as _subprocess
import sys as _sys
import time as _time
import urllib.request as _urlrequest

import pytest as _pytest


# --- the `gpu` marker: one place decides, so `pytest -ra` gives one clear reason ------------------
def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip where torch sees no CUDA device (CI, this box); bench/gpu_check.sh
    runs them on a GPU machine."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = _pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False here); "
                                    "run bench/gpu_check.sh on a GPU machine")
    for item in gpu_items:
        item.add_marker(skip)


def free_port() -> int:
    with _socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1 (1 worker, no job runner: 2 processes, ~20 s to healthy here)
    over a SQLite store in `root`; artifacts proxied to `root/artifacts`. `stop()` SIGKILLs its
    own process group (an outage, not a clean shutdown); `start()` again reuses port and store."""

    def __init__(self, root, port=None):
        import os as _os

        self.root = str(root)
        _os.makedirs(self.root, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.backend_uri = "sqlite:///" + _os.path.join(self.root, "mlflow.db")
        self.artifacts = _os.path.join(self.root, "artifacts")
        self.proc = None
        self.extra_args: list = []  # e.g. ["--app-name", "basic-auth"]
        self.extra_env: dict = {}

    def start(self, timeout=120.0):
        import os as _os

        from pipeline.tracking.store import ensure_sqlite_store

        ensure_sqlite_store(self.backend_uri, self.artifacts)  # schema first (no race with the server)
        env = dict(_os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
                   MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1", **self.extra_env)
        cmd = [_sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_uri,
               "--artifacts-destination", self.artifacts, "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1", *self.extra_args]
        log = open(_os.path.join(self.root, "server.log"), "ab")
        self.proc = _subprocess.Popen(cmd, env=env, stdout=log, stderr=_subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = _time.monotonic() + timeout
        while _time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited rc={self.proc.returncode}; see {self.root}/server.log")
            if self.healthy():
                return self
            _time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {timeout} s; see {self.root}/server.log")

    def healthy(self) -> bool:
        try:
            with _urlrequest.urlopen(self.url + "/health", timeout=1) as r:
                return r.status == 200
        except Exception:
            return False

    def stop(self):
        import os as _os

        if self.proc is None:
            return
        try:
            _os.killpg(self.proc.pid, _signal.SIGKILL)  # the group this object started
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.proc = None
        deadline = _time.monotonic() + 10  # until the port refuses connections
        while _time.monotonic() < deadline and self.healthy():
            _time.sleep(0.1)


@_pytest.fixture
def mlflow_server_factory(tmp_path):
    """Call `factory(name)` to get a started MlflowServer under tmp_path/name; all stopped at teardown."""
    servers = []

    def factory(name="mlflow_server", port=None):
        srv = MlflowServer(tmp_path / name, port=port).start()
        servers.append(srv)
        return srv

    yield factory
    for srv in servers:
        srv.stop()


@_pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One shared, started MlflowServer for the session (do not stop it in a test)."""
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow_server")).start()
    yield srv
    srv.stop()


# --- a tiny demo dataset written once per session with the real FFCV writer -------------------
@_pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """16 classes in 4 super-classes, 12 train + 4 val images each, 32 px: betons + manifest."""
    out = tmp_path_factory.mktemp("tiny_demo") / "demo"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _subprocess.run([_sys.executable, os.path.join(repo, "datasets", "write_ffcv.py"), "demo", "--out", str(out),
                     "--num-classes", "16", "--num-superclasses", "4", "--images-per-class", "12",
                     "--val-images-per-class", "4", "--image-size", "32", "--workers", "2"],
                    check=True, capture_output=True, timeout=600)
    return out


# --- real SLURM test cluster (slurm/testcluster.sh) for tests/test_slurm*.py -----------------------
class SlurmTestCluster:
    """A running slurm/testcluster.sh cluster: `dir`, `env` (os.environ + SLURM_CONF, + the sacct stand-in
    on PATH when ACCOUNTING=0), `nodes`; `cmd(*args)` runs a SLURM client and returns its stdout."""

    def __init__(self, directory, env, nodes):
        self.dir, self.env, self.nodes = directory, env, nodes

    def cmd(self, *args, check=True, timeout=60):
        proc = _subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed rc={proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout


@_pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """Start a real 2-node SLURM cluster once per session (munge, slurmctld, slurmdbd+MariaDB, one slurmd per
    node in its own network namespace; own namespace prefix and ports so it cannot clash with another one),
    tear it down (by PID) at the end. Skips only when not root or `ip netns` is unavailable; a cluster that
    fails to start is an error (its log tail is in the message)."""
    import os as _os
    import shutil as _shutil
    from pathlib import Path as _Path

    if _os.geteuid() != 0:
        _pytest.skip("the SLURM test cluster needs root (network namespaces, daemons)")
    if _shutil.which("ip") is None or _subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        _pytest.skip("`ip netns` is unavailable: cannot build the SLURM test cluster")
    script = _Path(__file__).resolve().parents[1] / "slurm" / "testcluster.sh"
    directory = tmp_path_factory.mktemp("slurm") / "cluster"
    nodes = 2
    env = dict(_os.environ, NODES=str(nodes), CPUS="6", GPUS="2", ACCOUNTING=_os.environ.get("TESTCLUSTER_ACCOUNTING", "1"),
               NS_PREFIX=f"pt{_os.getpid() % 100000}", CTL_PORT=str(free_port()), DBD_PORT=str(free_port()))
    up = _subprocess.run(["bash", str(script), "up", str(directory)], env=env, capture_output=True, text=True,
                         timeout=900)
    if up.returncode != 0:
        _subprocess.run(["bash", str(script), "down", str(directory)], env=env, capture_output=True, timeout=300)
        raise RuntimeError(f"slurm/testcluster.sh up failed (rc={up.returncode}):\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}")
    cenv = dict(_os.environ, SLURM_CONF=str(directory / "slurm.conf"))
    if (directory / "bin" / "sacct").exists():
        cenv["PATH"] = f"{directory / 'bin'}:{cenv.get('PATH', '')}"
    try:
        yield SlurmTestCluster(directory, cenv, nodes)
    finally:
        _subprocess.run(["bash", str(script), "down", str(directory)], env=env, capture_output=True, timeout=300)


# --- the demo study run once per session (tests/test_studies.py, test_explain.py, test_ui.py) -----------
class DemoStudy:
    """A finished small demo study: `root` (tmp), `data` (its demo set: 16 classes in 4 planted
    super-classes), `study_file`, `runs_root`, `uri` (SQLite store), `out` (stdout+stderr of the run),
    `rc`, `seconds`, and `run(*extra)` to launch the same study again (returns CompletedProcess)."""

    STUDY = """\
study: ci
experiment: ci-study
base:
  overrides:
    data.batch_size: 32
    data.val_batch_size: 64
    data.num_workers: 1
    schedule.epochs: 6
    schedule.peak_epoch: 2
    eval.holdout_fraction: 0.25
stages:
  baseline:
    overrides: {method.name: baseline}
  groups:
    kind: groups
    from: baseline
    k: [4]
    criterion: join
  ssal1:
    overrides: {method.name: ssal, method.groups_file: "${groups}", schedule.epochs: 2}
  lc:
    kind: lc
    from: ssal1
    epochs: 5
"""

    def __init__(self, root):
        import os as _os
        from pathlib import Path as _Path

        self.root = _Path(root)
        self.repo = _Path(__file__).resolve().parents[1]
        self.data = self.root / "demo16"
        self.runs_root = self.root / "runs"
        self.uri = f"sqlite:///{self.runs_root / 'mlflow.db'}"
        self.study_file = self.root / "ci.yaml"
        self.study_file.write_text(self.STUDY)
        self.env = dict(_os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")

    def write_data(self):
        _subprocess.run([_sys.executable, str(self.repo / "datasets" / "write_ffcv.py"), "demo", "--out", str(self.data),
                         "--num-classes", "16", "--num-superclasses", "4", "--images-per-class", "48",
                         "--val-images-per-class", "16", "--image-size", "32", "--workers", "2"],
                        check=True, capture_output=True, timeout=600)

    def run(self, *extra, timeout=1500):
        cmd = [_sys.executable, str(self.repo / "pipeline" / "launch.py"), "--study", str(self.study_file), "--local",
               f"data.root={self.data}", f"runs_root={self.runs_root}", *extra]
        return _subprocess.run(cmd, cwd=self.repo, env=self.env, capture_output=True, text=True, timeout=timeout)


@_pytest.fixture(scope="session")
def demo_study(tmp_path_factory):
    """The CI demo study (baseline -> groups -> ssal1 -> lc -> report) run once with --local."""
    study = DemoStudy(tmp_path_factory.mktemp("demo_study"))
    study.write_data()
    started = _time.monotonic()
    result = study.run()
    study.seconds = _time.monotonic() - started
    study.rc, study.out = result.returncode, result.stdout + result.stderr
    return study
