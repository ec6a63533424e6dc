"""Which MLflow runs are alive: every StepsLab run records the process that runs it, so a run whose process died
(kill -9, OOM killer, a lost node) is found and closed instead of claiming RUNNING for ever.

A run records (tags): ``stepslab.host`` (hostname), ``stepslab.host_id`` (this boot of this machine in this pid
namespace: a hash of hostname, kernel boot id and pid namespace), ``stepslab.pid``, ``stepslab.proc_start``
(the process start time in clock ticks since boot, from /proc; it tells a reused pid from the original) and
``stepslab.heartbeat`` (unix seconds, refreshed every `HEARTBEAT_S` by a daemon thread while the run is open).

`mark_dead_runs` (called by `experiments.tracking.configure`, i.e. by every command that opens the store) ends
each RUNNING run of *this* host whose process is gone as FAILED, with the reason in ``stepslab.end_reason``.
Runs of other hosts cannot be checked that way; `list_runs` shows them as stale once their heartbeat is older
than `STALE_AFTER_S`. No torch here.
"""
from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from models.errors import UserError

__all__ = ["HEARTBEAT_S", "STALE_AFTER_S", "process_tags", "Heartbeat", "mark_dead_runs", "RunRow", "list_runs",
           "format_runs", "age"]

HEARTBEAT_S = 60.0
STALE_AFTER_S = 5 * HEARTBEAT_S   # a few missed heartbeats: a busy machine may delay one, not five
HOST_ID_TAG, PID_TAG, START_TAG, HEARTBEAT_TAG = ("stepslab.host_id", "stepslab.pid", "stepslab.proc_start",
                                                  "stepslab.heartbeat")
REASON_TAG = "stepslab.end_reason"
KIND_TAG = "stepslab.kind"


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def host_id() -> str:
    """This machine, this boot, this pid namespace: a pid is only meaningful within all three."""
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    text = f"{socket.gethostname()}|{_read('/proc/sys/kernel/random/boot_id')}|{pidns}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in ticks) of process `pid` from /proc, or None when there is no such process."""
    raw = _read(f"/proc/{pid}/stat")
    if not raw:
        return None
    fields = raw.rsplit(")", 1)[-1].split()  # the command name may hold spaces and parentheses
    return fields[0], fields[19]


def proc_start(pid: int) -> str:
    """Start time of `pid` (ticks since boot), "" where /proc is missing (then only the pid is checked)."""
    st = _stat(pid)
    return st[1] if st else ""


def alive(pid: int, start: str) -> bool:
    """Whether process `pid`, started at `start` (see `proc_start`), still runs (a zombie does not)."""
    if Path("/proc/self/stat").exists():
        st = _stat(pid)
        return st is not None and st[0] != "Z" and (not start or st[1] == start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_tags() -> dict[str, str]:
    """The tags that let a later command tell whether this process is still running the run."""
    pid = os.getpid()
    return {"stepslab.host": socket.gethostname(), HOST_ID_TAG: host_id(), PID_TAG: str(pid),
            START_TAG: proc_start(pid), HEARTBEAT_TAG: f"{time.time():.0f}"}


class Heartbeat:
    """A daemon thread setting ``stepslab.heartbeat`` on a run every `every` seconds until `stop()`.

    Failures (a busy store, a network blip) are ignored: a missed beat only makes a run look stale sooner.
    """

    def __init__(self, set_tag: Callable[[str, str, str], Any], run_id: str, every: float = HEARTBEAT_S):
        self._set_tag, self._run_id, self._every = set_tag, run_id, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{run_id[:8]}", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self._every):
            try:
                self._set_tag(self._run_id, HEARTBEAT_TAG, f"{time.time():.0f}")
            except Exception:  # noqa: BLE001 - see the class docstring
                pass

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _runs(client, filter_string: str, max_results: int = 1000) -> list:
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    if not exp_ids:
        return []
    return client.search_runs(exp_ids, filter_string=filter_string, max_results=max_results,
                              order_by=["attributes.start_time DESC"])


def mark_dead_runs(client, echo: Callable[[str], None] | None = None) -> list[str]:
    """End every RUNNING run of this host whose process is gone as FAILED; returns their ids.

    The end time is the last heartbeat (about when the process died); ``stepslab.end_reason`` says why.
    """
    me = host_id()
    dead = []
    for run in _runs(client, f"attributes.status = 'RUNNING' AND tags.`{HOST_ID_TAG}` = '{me}'"):
        tags = run.data.tags
        try:
            pid = int(tags.get(PID_TAG, ""))
        except ValueError:
            continue
        if alive(pid, tags.get(START_TAG, "")):
            continue
        beat = tags.get(HEARTBEAT_TAG)
        end_ms = int(float(beat) * 1000) if beat else None
        reason = (f"process {pid} on {tags.get('stepslab.host', '?')} died without ending the run (killed, e.g. "
                  f"kill -9 or out of memory); last heartbeat {age(float(beat)) + ' ago' if beat else 'unknown'}")
        client.set_tag(run.info.run_id, REASON_TAG, reason)
        client.set_terminated(run.info.run_id, "FAILED", end_time=end_ms)
        dead.append(run.info.run_id)
        if echo is not None:
            echo(f"note: run {run.info.run_id} ({tags.get(KIND_TAG, '?')} {tags.get('stepslab.model', '')}) was "
                 f"RUNNING but its process {pid} is gone; marked FAILED")
    return dead


def age(t: float, now: float | None = None) -> str:
    """Seconds since unix time `t` as 45s, 12m, 3h, 5d."""
    s = max(0.0, (time.time() if now is None else now) - t)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size:.0f}{unit}"
    return f"{s:.0f}s"


# What `probe runs` shows per kind: the metrics a reader looks at first (the first few present are shown).
KEY_METRICS = {
    "train": ("final/fine_acc", "final/coarse_acc", "final/steps"),
    "probe": ("dol.acc", "acc.slow.coarse", "acc.fast.fine", "acc.full.fine"),
    "attribute": ("share.slow.fine", "share.fast.fine", "selectivity.slow", "selectivity.fast"),
}


@dataclass
class RunRow:
    """One line of `probe runs`."""
    run_id: str
    kind: str
    model: str
    dataset: str
    status: str          # MLflow's, with " (stale: ...)" for a RUNNING run without a recent heartbeat
    metrics: str
    age: str             # since the run started
    reason: str = ""

    @property
    def stale(self) -> bool:
        return "stale" in self.status


def _status(run, now: float) -> str:
    status = run.info.status
    if status != "RUNNING":
        return status
    beat = run.data.tags.get(HEARTBEAT_TAG)
    last = float(beat) if beat else run.info.start_time / 1000
    if now - last > STALE_AFTER_S:
        return f"RUNNING (stale: no heartbeat for {age(last, now)})"
    return status


def list_runs(client, *, kind: str | None = None, model: str | None = None, dataset: str | None = None,
              status: str | None = None, stale: bool = False, limit: int = 50) -> list[RunRow]:
    """StepsLab runs, newest first, filtered by kind / model / dataset tags and status (``stale``: only RUNNING
    runs whose heartbeat is older than `STALE_AFTER_S`)."""
    clauses = [f"tags.`{KIND_TAG}` = '{kind}'" if kind else f"tags.`{KIND_TAG}` != ''"]
    for tag, value in (("stepslab.model", model), ("stepslab.dataset", dataset), (KIND_TAG, kind),
                       ("status", status)):
        if value and ("'" in value or "`" in value):  # would break MLflow's filter string
            raise UserError(f"--{tag.split('.')[-1]} {value!r}: quotes are not allowed")
    for tag, value in (("stepslab.model", model), ("stepslab.dataset", dataset)):
        if value:
            clauses.append(f"tags.`{tag}` = '{value}'")
    if stale:
        clauses.append("attributes.status = 'RUNNING'")
    elif status:
        clauses.append(f"attributes.status = '{status}'")
    now = time.time()
    rows = []
    for run in _runs(client, " AND ".join(clauses), max_results=max(limit, 1) * (20 if stale else 1)):
        tags, metrics = run.data.tags, run.data.metrics
        k = tags.get(KIND_TAG, "?")
        shown = [f"{m.split('/')[-1] if k == 'train' else m}={metrics[m]:.4g}" for m in KEY_METRICS.get(k, ())
                 if m in metrics][:3]
        row = RunRow(run.info.run_id, k, tags.get("stepslab.model", "-"), tags.get("stepslab.dataset", "-"),
                     _status(run, now), " ".join(shown) or "-", age(run.info.start_time / 1000, now),
                     tags.get(REASON_TAG, ""))
        if stale and not row.stale:
            continue
        rows.append(row)
        if len(rows) >= limit:
            break
    return rows


def format_runs(rows: Sequence[RunRow]) -> str:
    """`rows` as a table (the end reason of failed / killed runs on a line below each)."""
    header = ["run", "kind", "model", "dataset", "status", "age", "metrics"]
    body = [[r.run_id, r.kind, r.model, r.dataset, r.status, r.age, r.metrics] for r in rows]
    widths = [max(len(c) for c in col) for col in zip(header, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    out = []
    for i, line in enumerate(lines):
        out.append(line)
        if i >= 2 and rows[i - 2].reason and rows[i - 2].status != "FINISHED":
            out.append(f"    why: {rows[i - 2].reason}")
    return "\n".join(out)
