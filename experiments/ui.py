"""The MLflow UI for StepsLab's tracking store (`probe ui`).

For a local store (the default SQLite database, or any non-HTTP URI) this starts ``mlflow server`` from the
running interpreter's MLflow as a child process: 127.0.0.1, one uvicorn worker, a free port, artifacts in the
same folder tracking.py logs them to, working directory inside the store (never the repo, so no stray
``mlartifacts/``), background job execution off. For an ``http(s)://`` tracking URI (a team server) nothing is
started: the server's own UI is the answer.

Python::

    with serve_ui() as url:          # http://127.0.0.1:PORT/#/experiments/<id>/runs
        ...

or `UIServer` directly for the compare-runs link, `wait()` and `stop()`.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from pathlib import Path
from typing import IO, Iterator

from experiments.tracking import (TrackingError, _default_root, _short, _sqlite_artifact_root, _temp_env,
                                  resolve_tracking_uri)
from models.errors import UserError

__all__ = ["UIServer", "serve_ui", "compare_url", "save_view", "view_url", "probe_pair"]

HOST = "127.0.0.1"
COMPARE_MAX_RUNS = 10  # the compare-runs link covers the newest runs only; the runs table shows them all
_STOP_GRACE_S = 10.0
_PORT_RETRIES = 3  # a port picked for port=0 may be taken by someone else before the server binds it


def _is_remote(uri: str) -> bool:
    return uri.lower().startswith(("http://", "https://"))


def _free_port(port: int = 0) -> int:
    """`port` if nobody listens on it on HOST (any free one for 0); `TrackingError` when it is taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            s.bind((HOST, port))
        except OSError as exc:
            raise TrackingError(f"port {port} on {HOST}: {exc.strerror or exc} (pick another, or 0 for a free one)"
                                ) from None
        return s.getsockname()[1]


def compare_url(base_url: str, run_ids: list[str], experiment_id: str) -> str:
    """The MLflow UI's compare-runs page for `run_ids` (as the UI builds it: JSON lists, here URL-quoted)."""
    query = urllib.parse.urlencode({"runs": json.dumps(list(run_ids), separators=(",", ":")),
                                    "experiments": json.dumps([experiment_id])},
                                   quote_via=urllib.parse.quote)
    return f"{base_url.rstrip('/')}/#/compare-runs?{query}"


PROBE_FILTER = "tags.`stepslab.kind` = 'probe'"
# The columns of the DoL views: the dataset, the run's note (its result and verdict), each DoL with its interval.
DOL_COLUMNS = (["attributes.`Dataset`", "attributes.`Description`"]
               + [f"metrics.`{m}{ci}`" for m in ("dol.acc", "dol.mdl", "dol.acc_pca") for ci in ("", ".ci_low", ".ci_high")]
               + ["tags.`stepslab.pair`"])
SHARED_VIEW_TAG = "mlflow.sharedViewState."  # the experiment tag the UI's own "Share" button writes


def save_view(client, experiment_id: str, key: str, search_filter: str) -> str:
    """Store a runs view (search filter, sorted by dol.acc, DOL_COLUMNS) as the UI's shared view state `key`.

    The MLflow UI keeps its column choice in the browser; a shared view (an experiment tag, plain JSON) is the
    one way a link can preset it: ``#/experiments/<id>/runs?viewStateShareKey=<key>`` (`view_url`)."""
    state = {"searchFilter": search_filter, "orderByKey": "metrics.`dol.acc`", "orderByAsc": False,
             "selectedColumns": DOL_COLUMNS}
    client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + key, json.dumps(state))
    return key


def view_url(base_url: str, experiment_id: str, key: str) -> str:
    """The experiment's runs view opened on shared view `key` (see `save_view`)."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={urllib.parse.quote(key)}"


def probe_pair(client, experiment_id: str) -> list[str]:
    """[newest finished Steps probe run, the newest finished probe run of its baseline on the same dataset]:
    the comparison StepsLab exists for; shorter when either is missing."""
    def newest(clause: str):
        runs = client.search_runs([experiment_id], f"{PROBE_FILTER} AND attributes.status = 'FINISHED' AND {clause}",
                                  max_results=1, order_by=["attributes.start_time DESC"])
        return runs[0] if runs else None

    steps = newest("tags.`stepslab.role` = 'steps'")
    if steps is None:
        return []
    tags = steps.data.tags
    base = newest(f"tags.`stepslab.role` = 'baseline' AND tags.`stepslab.pair` = '{tags.get('stepslab.pair')}' "
                  f"AND tags.`stepslab.dataset` = '{tags.get('stepslab.dataset')}'")
    return [steps.info.run_id] + ([base.info.run_id] if base is not None else [])


def _tail(path: Path | None, lines: int = 8) -> str:
    """The last `lines` non-empty lines of the server's output, each on a new line as ``  | line``."""
    if path is None:
        return ""
    try:
        with open(path, errors="replace") as f:
            last = deque((line.rstrip() for line in f if line.strip()), maxlen=lines)
    except OSError:
        return ""
    return "".join(f"\n  | {line}" for line in last)


def _parent_death_signal():
    """A pre-exec hook that has the kernel SIGTERM the child when we die (Linux), so even a SIGKILLed
    ``probe ui`` leaves no server behind; None elsewhere. Resolved here, before the fork: the child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def hook() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return hook


def _group_pids(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    pids = []
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            pids.append(int(d.name))
    return pids


class UIServer:
    """The MLflow UI for `uri` (see `resolve_tracking_uri`), opened on experiment `experiment`.

    ``start()`` (or ``with UIServer(...) as ui``) starts ``mlflow server`` for a local store and returns once
    ``/health`` answers (at most `startup_timeout` s; a server that dies or never answers raises `TrackingError`
    with the last lines of its output). Attributes once started: ``base_url``, ``url`` (the experiment's runs
    view, or the UI's home when the experiment does not exist yet), ``experiment_id``, ``run_ids`` (newest
    first, at most COMPARE_MAX_RUNS), ``pair_ids`` (`probe_pair`), ``compare_url`` (a runs view of that pair
    with the DoL columns when both exist, else the UI's compare page of the newest runs; None without runs),
    ``probes_url`` (the probe runs with the DoL columns, sorted by dol.acc; None without a Steps probe run),
    ``started`` (False for a team server).
    ``stop()`` terminates the server's whole process group (SIGTERM, then SIGKILL after a grace period).
    """

    def __init__(self, uri: str | None = None, port: int = 0, *, experiment: str = "stepslab",
                 startup_timeout: float = 90.0):
        if port < 0 or port > 65535:
            raise UserError(f"port {port}: must be 0 (a free one) or 1-65535")
        self.uri = resolve_tracking_uri(uri)
        self.port = port
        self.experiment = experiment
        self.startup_timeout = startup_timeout
        self.base_url: str | None = None
        self.url: str | None = None
        self.experiment_id: str | None = None
        self.run_ids: list[str] = []
        self.pair_ids: list[str] = []
        self.views: dict[str, str] = {}  # "probes" / "pair" -> shared view key
        self.compare_url: str | None = None
        self.probes_url: str | None = None
        self.started = False
        self._proc: subprocess.Popen | None = None
        self._log_path: Path | None = None
        self._log: IO[bytes] | None = None

    # ------------------------------------------------------------------------------------------ lookup

    def _lookup(self) -> None:
        """Experiment id and newest runs straight from the store (for a team server: over REST, fail-soft)."""
        from mlflow import MlflowClient

        from experiments.runs import mark_dead_runs

        client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        remote = _is_remote(self.uri)
        env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"} if remote else {}
        try:
            with _temp_env(**env):
                # As every command that opens the store: runs of this host whose process died end FAILED.
                mark_dead_runs(client, echo=lambda msg: print(msg, file=sys.stderr))
                exp = client.get_experiment_by_name(self.experiment)
                if exp is None or exp.lifecycle_stage == "deleted":
                    return
                self.experiment_id = exp.experiment_id
                runs = client.search_runs([exp.experiment_id], max_results=COMPARE_MAX_RUNS,
                                          order_by=["attributes.start_time DESC"])
                self.run_ids = [r.info.run_id for r in runs]
                self.pair_ids = probe_pair(client, exp.experiment_id)
                if self.pair_ids:
                    self.views["probes"] = save_view(client, exp.experiment_id, "stepslab-probes", PROBE_FILTER)
                if len(self.pair_ids) == 2:
                    ids = ", ".join(f"'{r}'" for r in self.pair_ids)
                    self.views["pair"] = save_view(client, exp.experiment_id, "stepslab-pair-" + "-".join(
                        r[:8] for r in self.pair_ids), f"attributes.run_id IN ({ids})")
        except Exception as exc:  # noqa: BLE001 - sqlalchemy/requests errors come as many types
            if not remote:
                raise TrackingError(f"tracking URI {self.uri}: cannot read the store ({_short(exc)})") from None
            print(f"warning: {self.uri}: experiment {self.experiment!r} not looked up ({_short(exc)})",
                  file=sys.stderr)

    def _set_urls(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        if self.experiment_id is None:
            self.url = f"{self.base_url}/"
        else:
            self.url = f"{self.base_url}/#/experiments/{self.experiment_id}/runs"
            # The comparison opens on the newest Steps probe run beside its baseline's, DoL columns shown;
            # without such a pair, on the UI's compare page of the newest runs.
            if "pair" in self.views:
                self.compare_url = view_url(self.base_url, self.experiment_id, self.views["pair"])
            elif self.run_ids:
                self.compare_url = compare_url(self.base_url, self.run_ids, self.experiment_id)
            if "probes" in self.views:
                self.probes_url = view_url(self.base_url, self.experiment_id, self.views["probes"])

    # ------------------------------------------------------------------------------------------ server

    def _artifact_root(self) -> Path:
        # Same place tracking.configure() logs to: <db folder>/artifacts for SQLite, else <root>/mlruns/artifacts.
        return _sqlite_artifact_root(self.uri) or (_default_root() / "artifacts")

    def _command(self, port: int, artifacts: Path) -> list[str]:
        return [sys.executable, "-m", "mlflow", "server",
                "--backend-store-uri", self.uri,
                "--default-artifact-root", artifacts.as_uri(),  # new experiments created in the UI
                "--artifacts-destination", artifacts.as_uri(),  # proxied mlflow-artifacts:/ (default ./mlartifacts)
                "--host", HOST, "--port", str(port),
                "--workers", "1"]

    def _spawn(self, port: int) -> None:
        artifacts = self._artifact_root()
        artifacts.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="stepslab-ui-", suffix=".log")
        os.close(fd)
        self._log_path = Path(name)
        self._log = open(self._log_path, "wb")
        env = {**os.environ,
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no huey consumer processes for a local UI
               "MLFLOW_DISABLE_TELEMETRY": os.environ.get("MLFLOW_DISABLE_TELEMETRY", "true"),
               # MLflow's own import-time deprecation notices would crowd out the lines that matter in an error.
               "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore::DeprecationWarning,"
                                                "ignore:starlette.middleware.wsgi is deprecated"),
               "PYTHONUNBUFFERED": "1"}
        env.pop("MLFLOW_TRACKING_URI", None)
        self._proc = subprocess.Popen(
            self._command(port, artifacts), stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            cwd=artifacts.parent,  # relative paths MLflow might still write to land in the store, not the repo
            env=env, start_new_session=True,  # own process group: stop() takes uvicorn with it
            preexec_fn=_parent_death_signal())

    def _wait_healthy(self, base_url: str) -> str | None:
        """None once /health answers; else why not (the process exited, or the timeout passed)."""
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                return f"exited with status {code}"
            try:
                with urllib.request.urlopen(f"{base_url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return None
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        return f"did not answer within {self.startup_timeout:.0f} s"

    def start(self) -> "UIServer":
        if self.base_url is not None:
            return self
        self._lookup()
        if _is_remote(self.uri):
            self._set_urls(self.uri)
            return self
        tries = _PORT_RETRIES if self.port == 0 else 1
        for attempt in range(tries):
            port = _free_port(self.port)  # an explicit port that is taken fails here, not after the slow start
            base_url = f"http://{HOST}:{port}"
            self._spawn(port)
            try:
                why = self._wait_healthy(base_url)
            except BaseException:  # Ctrl-C while starting: no server left behind
                self.stop()
                raise
            if why is None:
                self.started = True
                self._set_urls(base_url)
                return self
            tail = _tail(self._log_path)
            self.stop()
            if "address already in use" in tail.lower() and attempt + 1 < tries:
                continue
            raise TrackingError(f"mlflow server for {self.uri} on port {port} {why}"
                                + (f"; its last output:{tail}" if tail else ""))
        raise AssertionError("unreachable")

    def wait(self) -> None:
        """Block until the server exits (raises `TrackingError` with its last output: it should not)."""
        if self._proc is None:
            return
        code = self._proc.wait()
        tail = _tail(self._log_path)
        raise TrackingError(f"mlflow server stopped unexpectedly (status {code})"
                            + (f"; its last output:{tail}" if tail else ""))

    def stop(self) -> None:
        """Terminate the server's process group and wait for it; safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is not None:
            pgid = proc.pid  # start_new_session: the group id is the child's pid
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGTERM)  # the mlflow CLI and uvicorn both shut down on it
            deadline = time.monotonic() + _STOP_GRACE_S
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=_STOP_GRACE_S)
            while _group_pids(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _group_pids(pgid) or proc.returncode is None:  # hung past the grace period: no orphans
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._log_path is not None:
            with contextlib.suppress(OSError):
                self._log_path.unlink()
            self._log_path = None
        self.started = False

    def __enter__(self) -> "UIServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def serve_ui(uri: str | None = None, port: int = 0, *, experiment: str = "stepslab",
             startup_timeout: float = 90.0) -> Iterator[str]:
    """Run the MLflow UI for `uri` while the block runs; yields the URL of `experiment`'s runs view
    (``http://127.0.0.1:PORT/#/experiments/<id>/runs``; the UI's home when the experiment does not exist).

    A team server (``http(s)://`` URI) is not started, only pointed at. See `UIServer`.
    """
    with UIServer(uri, port, experiment=experiment, startup_timeout=startup_timeout) as ui:
        yield ui.url
