"""Credentials of a tracking server: from MLflow's own sources, never from a URI.

MLflow's client reads them from ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``,
``MLFLOW_TRACKING_TOKEN``, ``~/.mlflow/credentials``, and (through ``requests``) ``~/.netrc``. A URI is
logged as a param, written to ``config.yaml`` and the journal and printed in every link, so a URI that
carries credentials (``user:pass@``, ``user@``, a token in the query) is refused before anything runs
(:func:`uri_problem`). :func:`check_server_accepts` asks the server once, at start, whether it takes the
credentials: a refusal (HTTP 401/403) is a usage error, told apart from a server that does not answer
(which the tracker's journal rides out).
"""
from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit

__all__ = ["CredentialsError", "SECRET_VARIABLES", "uri_problem", "check_uri", "check_server_accepts", "redacted"]

#: The environment variables that hold a secret: never written into a file, a job script or a log.
SECRET_VARIABLES = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
_USE_VARIABLES = ("set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the "
                  "environment, or use ~/.netrc")
_SECRET_QUERY_KEY = re.compile(r"token|passw|secret|key|auth|credential|signature", re.IGNORECASE)
# an authenticated, read-only call that every tracking server answers
_PROBE_ENDPOINT = "/api/2.0/mlflow/experiments/search"


class CredentialsError(ValueError):
    """A URI with credentials in it, or a server that refused the credentials: one line, exit 2."""


def redacted(uri: str) -> str:
    """``uri`` without its user info and query: safe to print."""
    parts = urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else host + parts.path


def uri_problem(uri: str, what: str = "tracking.uri") -> str | None:
    """The one-line refusal of a URI that carries credentials (naming ``what``, never echoing them), or None."""
    parts = urlsplit(uri)
    secret_keys = [key for key, _ in parse_qsl(parts.query, keep_blank_values=True) if _SECRET_QUERY_KEY.search(key)]
    if "@" not in parts.netloc and not secret_keys:
        return None
    carried = f"a token in the query ({', '.join(secret_keys)})" if secret_keys else "a user name or password (user@)"
    return (f"{what}: '{redacted(uri)}' is given with {carried}, which would be logged with the run; "
            f"give the URI without it and {_USE_VARIABLES}")


def check_uri(uri: str, what: str = "tracking.uri") -> None:
    """Raise :class:`CredentialsError` for a URI that carries credentials."""
    problem = uri_problem(uri, what)
    if problem:
        raise CredentialsError(problem)


def check_server_accepts(uri: str, timeout: float = 10) -> None:
    """For a tracking server (``http(s)://``): one authenticated request with the credentials MLflow's
    client will use; HTTP 401/403 raises :class:`CredentialsError`. A server that does not answer passes
    (the tracker journals until it does); other stores have no credentials to check."""
    if not uri.startswith(("http://", "https://")):
        return
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(get_default_host_creds(uri), _PROBE_ENDPOINT, "GET", params={"max_results": 1},
                                max_retries=0, backoff_factor=0, backoff_jitter=0, timeout=timeout,
                                raise_on_status=False)
    except Exception:  # noqa: BLE001 - not answering (MLflow wraps requests' errors in its own): the journal's case
        return
    code = response.status_code
    if code in (401, 403):
        raise CredentialsError(f"the server at {redacted(uri)} refused these credentials (HTTP {code}); "
                               f"set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")
