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

    def start(self, timeout=120.0):
        import os as _os

        from pipeline.tracking import ensure_sqlite_store

        ensure_sqlite_store(self.backend_uri, self.artifacts)  # schema first (no race with the server)
        env = dict(_os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
                   MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1")
        cmd = [_sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_uri,
               "--artifacts-destination", self.artifacts, "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]
        log = open(_os.path.join(self.root, "server.log"), "ab")
        self.proc = _subprocess.Popen(cmd, stdout=log, stderr=_subprocess.STDOUT, start_new_session=True)
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
