"""MLflow tracking for StepsLab: one MLflow run per CLI command, plus the frozen-model registry.

Store: by default an embedded SQLite database at ``<root>/mlruns/mlflow.db`` with artifacts under
``<root>/mlruns/artifacts`` (root = ``$STEPSLAB_HOME`` or the current directory). MLflow 3.x refuses the
plain ``./mlruns`` file store, hence SQLite. A team points at an ``mlflow server`` with ``--tracking-uri``
or ``MLFLOW_TRACKING_URI``. Only the default store is created on demand; any other URI must name a store (or,
for SQLite, a folder) that exists.

Frozen models hold no pickle: the run artifact ``model/`` is ``model.safetensors`` (the state_dict) plus
``card.json`` (timm model name and create kwargs, classes, input size, training data, git commit, sha256 of the
weights). `load_frozen` checks the hash, rebuilds the model with ``timm.create_model`` from the installed code
and loads the weights with ``strict=True``, so a store's contents can change numbers but never run code.
Versions frozen the old way (MLflow's pickle flavour) are refused with the command that re-freezes them.

Every run records its host, pid, process start time and a heartbeat (experiments.runs); `configure` ends the
RUNNING runs of this host whose process died as FAILED.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from importlib import metadata as _pkg_metadata
from pathlib import Path
from urllib.parse import urlsplit
from typing import TYPE_CHECKING, Any, Iterator

# Set before MLflow is imported: the workbench runs offline, so no telemetry thread, and no tqdm bars
# cluttering CLI output when models are loaded. Explicit user settings win.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from experiments import runs as _runs  # noqa: E402
from experiments.errors import raise_interrupt  # noqa: E402
from experiments.options import FORBIDDEN_MODEL_KWARGS  # noqa: E402
from models.errors import UserError  # noqa: E402
from models.registry import check_name  # noqa: E402

if TYPE_CHECKING:
    import pandas

__all__ = [
    "TrackingError", "resolve_tracking_uri", "configure", "tracked_run", "log_metrics", "log_dict_artifact",
    "log_figure", "register_frozen", "load_frozen", "newest_frozen", "resolve_frozen", "find_runs", "check_uri",
    "get_run", "logged_steps", "build_model", "read_json_artifact", "download_run_file", "FROZEN_FORMAT",
    "read_weights", "find_pretrained", "sha256_file", "check_state", "run_name", "model_tags", "log_dataset",
    "set_description",
]

_log = logging.getLogger(__name__)
# MLflow's system-metrics monitor announces its start and stop at INFO on every run: noise in a CLI's output.
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)

KIND_TAG = "stepslab.kind"
MODEL_TAG = "stepslab.model"  # on registered model versions: model_info["model"], searched by newest_frozen
_MODEL_ARTIFACT = "model"
FROZEN_FORMAT = "stepslab-frozen/1"
_WEIGHTS, _CARD = "model.safetensors", "card.json"
_MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH in MLflow 3.17
_MAX_KEY = 250  # MAX_ENTITY_KEY_LENGTH
_TRUNCATED = "...[truncated]"
_RUN_ID_RE = re.compile(r"[0-9a-f]{32}")
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")  # MLflow accepts only these in param names
_REPO_ROOT = Path(__file__).resolve().parents[1]

# What configure() last set up; tracked_run & co. call configure() themselves when it has not run yet.
_state: dict[str, str | None] = {"uri": None, "experiment_id": None}


class TrackingError(UserError):
    """One-line user-facing error (unreachable URI, unknown run id, no frozen model)."""


# ---------------------------------------------------------------------------------------------- store


def _default_root() -> Path:
    return Path(os.environ.get("STEPSLAB_HOME") or os.getcwd()).expanduser().resolve() / "mlruns"


# Schemes MLflow 3 can track to. Plain paths and file:// (the file store) are refused by MLflow 3 itself.
_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")
_ALLOWED_URIS = "sqlite:///PATH/TO/mlflow.db, http(s)://HOST:PORT, postgresql://, mysql://, mssql://, databricks"


def check_uri(uri: str, source: str = "tracking URI") -> str:
    """`uri` if MLflow can use it, else a one-line `TrackingError` naming it and what is allowed.

    A ``sqlite:///`` path must lie in an existing folder: nothing is created for a mistyped path.
    """
    parts = urlsplit(uri.strip()) if "://" in uri else None
    scheme = parts.scheme.split("+")[0].lower() if parts else ""  # postgresql+psycopg2://
    if scheme not in _SCHEMES:
        what = f"unknown scheme {parts.scheme + '://'!r}" if parts and parts.scheme else "not a URI"
        raise TrackingError(f"{source} {uri!r}: {what}; allowed: {_ALLOWED_URIS}")
    if scheme in ("http", "https") and not parts.hostname:
        raise TrackingError(f"{source} {uri!r}: no host; allowed: http(s)://HOST:PORT")
    if scheme == "sqlite":
        if not uri.startswith("sqlite:///") or len(uri) == len("sqlite:///"):
            raise TrackingError(f"{source} {uri!r}: expected sqlite:///PATH/TO/mlflow.db (an absolute path "
                                "after a fourth slash, sqlite:////abs/x.db)")
        folder = Path(uri[len("sqlite:///"):]).expanduser().absolute().parent
        if not folder.is_dir():
            raise TrackingError(f"{source} {uri!r}: folder {folder} does not exist (nothing was created); "
                                "create it first or fix the path")
    return uri


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI: `uri` > env ``MLFLOW_TRACKING_URI`` > embedded SQLite under ``<root>/mlruns``.

    Given URIs are checked (`check_uri`); only for the default is the ``mlruns`` folder created (the database
    itself is created on first use).
    """
    if uri:
        return check_uri(uri)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return check_uri(os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI")
    root = _default_root()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def _sqlite_artifact_root(uri: str) -> Path | None:
    """``<db folder>/artifacts`` for a file-backed SQLite URI, else None (a server picks its own)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):]).expanduser().resolve().parent / "artifacts"


@contextlib.contextmanager
def _temp_env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _short(exc: BaseException) -> str:
    """The first line of `exc`'s message, whole (a cut sentence helps no one), else its type's name."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def configure(uri: str | None = None, experiment: str = "stepslab") -> str:
    """Point MLflow (tracking and registry) at `uri` (see `resolve_tracking_uri`) and ensure `experiment` exists.

    Checks that the store answers before any work starts: an unreachable server raises
    ``TrackingError("tracking URI <uri>: unreachable (...)")`` after one short attempt. Then ends the runs of
    this host whose process died as FAILED (`experiments.runs.mark_dead_runs`). Returns the URI.
    """
    uri = resolve_tracking_uri(uri)
    # The SQLite store logs every alembic migration step at INFO on first use.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # Fail fast: one attempt, short timeout, for this check only (a real run keeps MLflow's retries).
    with _temp_env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5"):
        try:
            # A client of its own, so a failed configure leaves MLflow's global URIs as they were.
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                art = _sqlite_artifact_root(uri)
                try:
                    exp_id = client.create_experiment(experiment, artifact_location=art.as_uri() if art else None)
                except MlflowException:
                    # Another process may have created it in between.
                    exp = client.get_experiment_by_name(experiment)
                    if exp is None:
                        raise
                    exp_id = exp.experiment_id
            else:
                exp_id = exp.experiment_id
                if exp.lifecycle_stage == "deleted":
                    client.restore_experiment(exp_id)
        except Exception as exc:  # requests/sqlalchemy errors surface as many types
            # MLflow wraps the socket error in a long urllib3 message; "[Errno 111] Connection refused" is the news.
            errno = re.search(r"\[Errno [^\]]*\][^'\")]*", str(exc))
            reason = errno.group(0).strip() if errno else _short(exc)
            what = "cannot be opened" if uri.startswith("sqlite:") else "unreachable"
            raise TrackingError(f"tracking URI {uri}: {what} ({reason})") from None
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.set_experiment(experiment_id=exp_id)
    _state.update(uri=uri, experiment_id=exp_id)
    try:
        _runs.mark_dead_runs(client, echo=lambda msg: print(msg, file=sys.stderr))
    except MlflowException as exc:  # housekeeping must not stop the command
        _log.warning("could not check for runs left RUNNING by dead processes (%s)", _short(exc))
    return uri


def _ensure_configured() -> None:
    if _state["uri"] is None:
        configure()


# ----------------------------------------------------------------------------------------------- runs


def _flatten(params: dict, prefix: str = "") -> dict[str, str]:
    """Nested dicts -> ``{"a.b": "value"}`` with keys MLflow accepts and values under its length limit."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
            continue
        name = _BAD_KEY_CHARS.sub("_", name)[:_MAX_KEY]
        text = str(value)
        if len(text) > _MAX_PARAM_VALUE:
            text = text[: _MAX_PARAM_VALUE - len(_TRUNCATED)] + _TRUNCATED
        out[name] = text
    return out


def _git(*args: str) -> str | None:
    try:
        # GIT_OPTIONAL_LOCKS=0: `git status` must not take index.lock while someone else commits.
        res = subprocess.run(["git", "-C", str(_REPO_ROOT), *args], capture_output=True, text=True, timeout=10,
                             env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def _environment_tags() -> dict[str, str]:
    commit = _git("rev-parse", "HEAD") or "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no") if commit != "unknown" else None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "stepslab.git_commit": commit,
        "mlflow.source.git.commit": commit,  # shown by the MLflow UI
        "stepslab.git_dirty": "unknown" if status is None else str(bool(status)).lower(),
        "stepslab.torch": torch.__version__,
        "stepslab.device": device,
    }


def _resume_params_and_tags(old: Any, flat: dict[str, str], env_tags: dict[str, str],
                            user_tags: dict[str, str]) -> None:
    """On resume: log only new params (MLflow refuses changing one), fill in missing tags, add user tags."""
    have = old.data.params
    changed = sorted(k for k in flat if k in have and have[k] != flat[k])
    new = {k: v for k, v in flat.items() if k not in have}
    if new:
        mlflow.log_params(new)
    tags = {k: v for k, v in env_tags.items() if k not in old.data.tags}
    if changed:
        _log.warning("resuming run %s: params %s differ from the logged values; keeping the logged ones",
                     old.info.run_id, ", ".join(changed))
        tags["stepslab.resume_changed_params"] = ",".join(changed)[:_MAX_PARAM_VALUE]
    tags.update(user_tags)
    if tags:
        mlflow.set_tags(tags)


@contextlib.contextmanager
def tracked_run(kind: str, params: dict, *, tags: dict | None = None, run_id: str | None = None,
                run_name: str | None = None, parent_run_id: str | None = None,
                system_metrics: bool = False) -> Iterator[mlflow.ActiveRun]:
    """Open ONE MLflow run for a CLI command (`kind`: train/probe/attribute/study/figures/bench ...).

    New run: logs `params` flattened (``a.b`` keys, stringified, long values truncated) and tags
    ``stepslab.kind``, git commit + dirty flag, host, torch version, device, plus `tags`.
    `run_id` given: resumes that run (same id, status back to RUNNING); params already logged with the same
    value are skipped, params whose value changed are kept as first logged (MLflow params are immutable) and
    named in a warning and the ``stepslab.resume_changed_params`` tag; environment tags are only filled in
    where missing. The run ends FINISHED on normal exit, FAILED when an exception escapes (re-raised), KILLED
    on KeyboardInterrupt or SIGTERM (turned into KeyboardInterrupt in the main thread for the duration); the
    tag ``stepslab.end_reason`` says why a run failed or was killed. Host, pid, process start time and a
    heartbeat are recorded (experiments.runs; refreshed on resume), so a run whose process dies without
    ending it is found and closed by the next command.

    If MLflow already has an active run, the new run is nested under it (a `parent_run_id` other than the
    active run is refused by MLflow). `system_metrics`: MLflow's CPU/memory (and GPU, where present) sampling
    for the run's duration, so a slow training or extraction shows why.
    """
    _ensure_configured()
    client = MlflowClient()
    flat = _flatten(params)
    outer = mlflow.active_run()
    outer_id, nested = (outer.info.run_id, True) if outer is not None else (None, False)
    env_tags = _environment_tags()
    proc_tags = _runs.process_tags()
    user_tags = {k: str(v) for k, v in (tags or {}).items()}
    if run_id is None:
        active = mlflow.start_run(experiment_id=_state["experiment_id"], run_name=run_name, nested=nested,
                                  parent_run_id=parent_run_id, log_system_metrics=system_metrics,
                                  tags={KIND_TAG: kind, **env_tags, **proc_tags, **user_tags})
        old = None
    else:
        try:
            old = client.get_run(run_id)
        except MlflowException:
            raise TrackingError(f"run {run_id}: not found in {_state['uri']} (list runs with: probe runs)"
                                ) from None
        active = mlflow.start_run(run_id=run_id, run_name=run_name, nested=nested, parent_run_id=parent_run_id,
                                  log_system_metrics=system_metrics)
        mlflow.set_tags({**proc_tags, _runs.REASON_TAG: ""})  # this process runs it now

    # Signal handlers can only be installed from the main thread; elsewhere SIGTERM keeps its handler.
    in_main = threading.current_thread() is threading.main_thread()
    old_handler = signal.signal(signal.SIGTERM, raise_interrupt) if in_main else None
    heartbeat = _runs.Heartbeat(client.set_tag, active.info.run_id).start()
    status, reason = "FINISHED", ""
    try:
        if old is None:
            if flat:
                mlflow.log_params(flat)
        else:
            _resume_params_and_tags(old, flat, {KIND_TAG: kind, **env_tags}, user_tags)
        yield active
    except KeyboardInterrupt as exc:
        status, reason = "KILLED", f"interrupted ({exc or 'SIGINT'})"
        raise
    except SystemExit as exc:
        status = "FINISHED" if exc.code in (None, 0) else "FAILED"
        reason = "" if status == "FINISHED" else f"exit status {exc.code}"
        raise
    except BaseException as exc:
        status, reason = "FAILED", f"{type(exc).__name__}: {_short(exc)}"
        raise
    finally:
        heartbeat.stop()
        if in_main:  # None means "installed from C": the closest we can restore is the default
            signal.signal(signal.SIGTERM, old_handler if old_handler is not None else signal.SIG_DFL)
        try:
            if reason:
                client.set_tag(active.info.run_id, _runs.REASON_TAG, reason[:_MAX_PARAM_VALUE])
            # Runs the block left open on top of ours are ended with it, so MLflow's run stack is back to
            # what it was before (the outer run, if any, stays active).
            ended = False
            while (top := mlflow.active_run()) is not None and top.info.run_id != outer_id:
                ended |= top.info.run_id == active.info.run_id
                mlflow.end_run(status)
            if not ended:  # someone ended ours already; still record how it ended
                client.set_terminated(active.info.run_id, status)
        except Exception as exc:
            if status == "FINISHED":
                raise TrackingError(f"run {active.info.run_id}: could not be ended ({_short(exc)})") from None
            # An exception is already propagating; do not mask it.
            _log.warning("run %s: could not be marked %s (%s)", active.info.run_id, status, _short(exc))


def run_name(kind: str, *parts: object) -> str:
    """A run name a person can read in the UI: the kind, then what the run is about, e.g.
    ``train steps_deit_micro fashion_mnist s0`` or ``probe steps_deit_micro fashion_mnist s0 slow|fast|full``."""
    return " ".join([kind, *(str(p) for p in parts if p is not None and str(p) != "")])


def model_tags(name: str) -> dict[str, str]:
    """Tags to group runs by in the UI: model, family, and pair (the Steps model and its matched baseline, the
    same value on both sides, so a filter on it shows the comparison)."""
    from models.registry import BASELINE_OF, family_of

    steps = name if name in BASELINE_OF else next((s for s, b in BASELINE_OF.items() if b == name), None)
    tags = {"stepslab.model": name, "stepslab.family": family_of(name)}
    if steps is not None:
        tags["stepslab.pair"] = f"{steps} vs {BASELINE_OF[steps]}"
    return tags


def log_dataset(ds: Any, *, context: str, location: str | None = None, limit: int | None = None,
                seed: int = 0) -> None:
    """Record one split as an MLflow dataset input of the active run (the UI's Dataset column and filter).

    name ``<dataset>/<split>``; digest = the split's fingerprint, the very key of the feature cache; source = the
    folder its files came from (`location`), or the generator for generated data; tags: split, examples and,
    where `limit` cut the split down (a subset drawn with `seed`), ``subset = "limit=2000 seed=0"``.
    """
    import warnings

    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    _require_run("log_dataset")
    if location and location.startswith(("http://", "https://")):
        from mlflow.data.http_dataset_source import HTTPDatasetSource

        source = HTTPDatasetSource(location)
    elif location:
        with warnings.catch_warnings():  # MLflow warns when it guesses the source type; a local folder is meant
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(location))
    else:
        source = CodeDatasetSource({"generator": f"experiments.data {ds.name}"})
    dataset = MetaDataset(source, name=f"{ds.name}/{ds.split}", digest=ds.fingerprint)
    tags = {"split": ds.split, "examples": str(len(ds))}
    if limit:
        tags["subset"] = f"limit={limit} seed={seed}"
    mlflow.log_input(dataset, context=context, tags=tags)


def set_description(markdown: str) -> None:
    """The active run's description (MLflow's note, shown on the run page and in the runs table)."""
    _require_run("set_description")
    mlflow.set_tag("mlflow.note.content", markdown)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log `metrics` to the active run in one call, skipping None and NaN values.

    Values may be floats, ints, 0-d tensors or numpy scalars. Without an active run this does nothing, so
    library code can call it outside a tracked CLI command.
    """
    if mlflow.active_run() is None:
        return
    clean = {}
    for key, value in metrics.items():
        if value is None:
            continue
        value = float(value)
        if not math.isnan(value):
            clean[key] = value
    if clean:
        mlflow.log_metrics(clean, step=step)


def _to_json(obj: Any) -> str:
    def fallback(o: Any) -> Any:
        if hasattr(o, "tolist"):  # tensors, numpy arrays and scalars
            return o.tolist()
        if isinstance(o, (set, tuple)):
            return list(o)
        return str(o)

    return json.dumps(obj, indent=2, sort_keys=True, default=fallback)


def _require_run(what: str) -> None:
    # MLflow's fluent API would silently start a fresh run; an artifact belongs to the command's run.
    if mlflow.active_run() is None:
        raise TrackingError(f"{what} needs an active run (open one with tracked_run)")


def log_dict_artifact(obj: Any, path: str) -> None:
    """Log `obj` as a JSON artifact at `path` (relative to the run's artifact root) in the active run.

    Tensors and numpy values become lists/numbers; other unknown objects their str().
    """
    _require_run("log_dict_artifact")
    mlflow.log_text(_to_json(obj), path)


def log_figure(fig: Any, path: str) -> None:
    """Log a matplotlib figure to the active run as an image artifact (format from `path`, e.g. ``.png``)."""
    _require_run("log_figure")
    mlflow.log_figure(fig, path)


# ------------------------------------------------------------------------------------------- registry


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for pkg in ("timm", "safetensors", "mlflow"):
        with contextlib.suppress(_pkg_metadata.PackageNotFoundError):
            out[pkg] = _pkg_metadata.version(pkg)
    return out


def build_model(name: str, kwargs: dict, what: str) -> torch.nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)`` for a StepsLab model name, with one-line
    `TrackingError`s naming `what` for unknown names, forbidden kwargs (ones that would load weights from
    elsewhere) and kwargs the model refuses."""
    try:
        check_name(name)
    except UserError as exc:
        raise TrackingError(f"{what}: {exc}") from None
    bad = sorted(set(kwargs) & set(FORBIDDEN_MODEL_KWARGS))
    if bad:
        raise TrackingError(f"{what}: create kwarg {bad[0]!r} is not allowed in a frozen model (it would load "
                            "weights from elsewhere)")
    import models  # noqa: F401  (registers the StepsLab models in timm)

    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - TypeError/ValueError/AssertionError from a model's __init__
        raise TrackingError(f"{what}: {name} cannot be built with {kwargs} ({type(exc).__name__}: "
                            f"{_short(exc)})") from None


sha256_file = _sha256  # the digest a card records, for callers outside this module


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from a weights file without unpickling code: ``.safetensors`` read as such, anything else
    with ``torch.load(weights_only=True)`` (a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is opened).
    One-line `TrackingError` for a missing or unreadable file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise TrackingError(f"--weights {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, ValueError, RuntimeError, EOFError) as exc:
        raise TrackingError(f"--weights {path} is not a readable weights file ({_short(exc)}); give a "
                            ".safetensors file or a torch state_dict") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TrackingError(f"--weights {path} holds no state_dict of tensors")
    return state


def find_pretrained(model: torch.nn.Module, name: str) -> Path:
    """The published weights of `model` (timm's pretrained_cfg names a Hugging Face repo) in the local Hugging
    Face cache, never downloaded. A `TrackingError` says where they were looked for when absent."""
    from huggingface_hub import constants, try_to_load_from_cache

    cfg = getattr(model, "pretrained_cfg", None) or {}
    repo = cfg.get("hf_hub_id") if not name.startswith("steps_") and "micro" not in name else None
    if not repo:
        raise TrackingError(f"{name} has no published weights (StepsLab's own models are trained here); freeze "
                            f"a file of its weights with --weights FILE")
    looked = []
    for filename in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(repo, filename, cache_dir=constants.HF_HUB_CACHE)
        if isinstance(hit, str):
            return Path(hit)
        looked.append(filename)
    where = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    raise TrackingError(f"no pretrained weights for {name}: looked for {' and '.join(looked)} of {repo} in {where} "
                        f"(the local Hugging Face cache; nothing is downloaded); fetch them where you are online "
                        f"(huggingface-cli download {repo}) or pass --weights FILE")


def _check_state(model: torch.nn.Module, name: str, state: dict[str, torch.Tensor], what: str) -> None:
    """Refuse weights whose names or shapes differ from `model`'s (load_state_dict would say so less clearly)."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    if want != have:
        missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
        diff = [k for k in want.keys() & have.keys() if want[k] != have[k]]
        detail = (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}" if extra else
                  f"{diff[0]} is {have[diff[0]]}, {name} has {want[diff[0]]}")
        raise TrackingError(f"{what}: the weights do not fit {name}: {detail}")


check_state = _check_state


def register_frozen(model: torch.nn.Module, registered_name: str, *, model_info: dict,
                    alias: str = "frozen") -> str:
    """Freeze `model` in the active run and register it as a new version of `registered_name`.

    `model_info` (JSON-able) must hold the StepsLab model name under ``"model"`` and the ``timm.create_model``
    kwargs under ``"create_kwargs"`` (classes, channels, image size, ...); the rest (dataset, labels, metrics)
    is kept. Writes the run artifact ``model/`` = ``model.safetensors`` + ``card.json`` (model_info plus
    format, input size, git commit, package versions, the weights' sha256 and the run whose weights these are),
    and ``model_info.json`` (the card again, for `probe freeze` and readers of the run). Refuses, before writing
    anything, a model that `load_frozen` could not rebuild. The version gets alias `alias` and the tag
    ``stepslab.model``. Returns the version's own URI ``models:/<name>/<version>`` (the alias may move on).
    """
    from safetensors.torch import save_file

    _require_run("register_frozen")
    run = mlflow.active_run()
    info = json.loads(_to_json(model_info))
    name, kwargs = info.get("model"), info.get("create_kwargs")
    if not isinstance(name, str) or not isinstance(kwargs, dict):
        raise TypeError("register_frozen: model_info needs 'model' (a model name) and 'create_kwargs' (a dict)")
    # Tensors that share storage (tied weights) cannot be stored as such; separate copies load the same.
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    # Refuse now, before anything is written, what load_frozen could not rebuild.
    _check_state(build_model(name, kwargs, f"model {name}"), name, state, f"model {name}")
    commit = _git("rev-parse", "HEAD") or "unknown"
    card = {**info, "format": FROZEN_FORMAT, "run_id": info.get("run_id") or run.info.run_id,
            "frozen_in_run": run.info.run_id, "git_commit": commit, "versions": _versions()}
    if "input_size" not in card and info.get("in_chans") and info.get("img_size"):
        card["input_size"] = [info["in_chans"], info["img_size"], info["img_size"]]
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / _WEIGHTS
        save_file(state, str(weights), metadata={"format": FROZEN_FORMAT, "model": name})
        card["weights"] = {"file": _WEIGHTS, "sha256": _sha256(weights), "bytes": weights.stat().st_size}
        (Path(tmp) / _CARD).write_text(_to_json(card))
        mlflow.log_artifacts(tmp, _MODEL_ARTIFACT)
    client = MlflowClient()
    try:
        client.create_registered_model(registered_name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        registered_name, source=f"{run.info.artifact_uri}/{_MODEL_ARTIFACT}", run_id=run.info.run_id,
        tags={MODEL_TAG: name, "stepslab.run_id": card["run_id"], "stepslab.format": FROZEN_FORMAT}).version
    client.set_registered_model_alias(registered_name, alias, version)
    log_dict_artifact(card, "model_info.json")
    return f"models:/{registered_name}/{version}"


def _missing_model_message(ref: str, uri: str, client: MlflowClient) -> str:
    """Say what exists instead of `ref`, for a models:/ URI that did not resolve."""
    name = re.split(r"[@/]", uri[len("models:/"):], maxsplit=1)[0]
    hint = "probe train freezes one; list runs with: probe runs --kind train"
    try:
        models = {m.name: m for m in client.search_registered_models(max_results=50)}
    except MlflowException:
        models = {}
    if name not in models:
        known = ", ".join(sorted(models)) or "none"
        return f"{ref}: no registered model {name!r} (registered: {known}; {hint})"
    aliases = ", ".join(f"@{a}" for a in sorted(models[name].aliases)) or "no aliases"
    return f"{ref}: registered model {name!r} has no such version/alias ({aliases}; {hint})"


def _refreeze(run_id: str | None) -> str:
    return f"probe freeze --run {run_id}" if run_id else "probe freeze --run <its train run id>"


def _old_format_run(local: Path) -> str | None:
    """The run id in an MLflow-flavour model folder's MLmodel file (read as text: nothing is unpickled)."""
    with contextlib.suppress(OSError):
        m = re.search(r"^run_id:\s*([0-9a-f]{32})", (local / "MLmodel").read_text(), re.M)
        return m.group(1) if m else None
    return None


def _load_card(local: Path, ref: str, run_id: str | None, where: str) -> dict:
    card_path = f"{where}/{_CARD}"
    if not (local / _CARD).is_file():
        if (local / "MLmodel").is_file():
            run_id = _old_format_run(local) or run_id
            raise TrackingError(f"{ref} was frozen in the old pickle format, which StepsLab no longer loads (loading "
                                f"a pickle can run code); re-freeze it from its run's checkpoint: "
                                f"{_refreeze(run_id)}")
        raise TrackingError(f"{ref}: no {_CARD} in {where}; not a StepsLab frozen model")
    try:
        card = json.loads((local / _CARD).read_text())
        assert isinstance(card, dict)
    except (ValueError, AssertionError, UnicodeDecodeError):
        raise TrackingError(f"{card_path} is not a JSON object (corrupt or truncated); re-freeze the model: "
                            f"{_refreeze(run_id)}") from None
    if card.get("format") != FROZEN_FORMAT:
        raise TrackingError(f"{card_path}: format {card.get('format')!r}, this StepsLab reads {FROZEN_FORMAT!r}; "
                            f"re-freeze the model: {_refreeze(card.get('run_id') or run_id)}")
    return card


def _load_local(local: Path, ref: str, run_id: str | None = None, where: str | None = None
                ) -> tuple[torch.nn.Module, dict]:
    """Rebuild the frozen model in folder `local` (card.json + model.safetensors); see `load_frozen`. Messages
    name the files as `where`/<file> (the store's own folder, or a runs:/ URI for a downloaded copy)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    where = where or str(local)
    card = _load_card(local, ref, run_id, where)
    fix = _refreeze(card.get("run_id") or run_id)
    spec = card.get("weights") or {}
    card_path, shown = f"{where}/{_CARD}", f"{where}/{_WEIGHTS}"
    if spec.get("file") != _WEIGHTS or not isinstance(spec.get("sha256"), str):
        raise TrackingError(f"{card_path}: its weights entry must name {_WEIGHTS} and its sha256; re-freeze "
                            f"the model: {fix}")
    weights = local / _WEIGHTS
    if not weights.is_file():
        raise TrackingError(f"{shown} is missing; re-freeze the model: {fix}")
    digest = _sha256(weights)
    if digest != spec["sha256"]:
        raise TrackingError(f"{shown}: sha256 {digest[:12]}... differs from its card's {spec['sha256'][:12]}... "
                            f"(the file is corrupt, truncated or was replaced); re-freeze the model: {fix}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise TrackingError(f"{shown} is not a readable safetensors file ({_short(exc)}); re-freeze the model: "
                            f"{fix}") from None
    name, kwargs = card.get("model"), card.get("create_kwargs")
    if not isinstance(name, str) or not isinstance(kwargs, dict):
        raise TrackingError(f"{card_path}: needs 'model' and 'create_kwargs'; re-freeze the model: {fix}")
    model = build_model(name, kwargs, card_path)
    _check_state(model, name, state, shown)
    model.load_state_dict(state, strict=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, card


def load_frozen(ref: str) -> tuple[torch.nn.Module, dict]:
    """Load a frozen model: `ref` is a run id (32 hex; the model that run froze), a ``models:/`` URI
    (name@alias or name/version) or a registered model name (its ``frozen`` alias).

    Nothing read from the store is unpickled: the card and weights are checked (sha256, names, shapes), the
    model is built by ``timm.create_model`` from the installed code and the safetensors weights are loaded
    with ``strict=True``. Returns ``(model, info)``: the model on CPU, in eval() with ``requires_grad=False``
    everywhere, and the card (model_info) plus ``uri``; ``info["run_id"]`` is the run whose weights these are.
    Unknown references, old pickle-format versions and corrupt files raise `TrackingError` (one line, with
    the fix).
    """
    _ensure_configured()
    client = MlflowClient()
    ref = ref.strip()
    run_id = None
    if _RUN_ID_RE.fullmatch(ref):
        try:
            run = client.get_run(ref)
        except MlflowException:
            raise TrackingError(f"{ref}: no run with this id in {_state['uri']}") from None
        run_id = ref
        names = {Path(a.path).name for a in client.list_artifacts(ref, _MODEL_ARTIFACT)}
        if not names:
            kind = run.data.tags.get(KIND_TAG, "?")
            hint = f"freeze it with: probe freeze --run {ref}" if kind == "train" else "freeze a train run"
            raise TrackingError(f"run {ref} ({kind}): no frozen model logged; {hint}")
        uri = f"runs:/{ref}/{_MODEL_ARTIFACT}"
        # Only the files the new format reads (an old version's pickle is never even fetched).
        with tempfile.TemporaryDirectory(prefix="stepslab-frozen-") as tmp:
            for n in (_CARD, _WEIGHTS, "MLmodel"):
                if n in names:  # each lands in <tmp>/<name> (mlflow drops the folder)
                    got = mlflow.artifacts.download_artifacts(run_id=ref, artifact_path=f"{_MODEL_ARTIFACT}/{n}",
                                                              dst_path=tmp)
                    if Path(got).parent != Path(tmp):
                        os.replace(got, Path(tmp) / n)
            model, card = _load_local(Path(tmp), ref, run_id, where=uri)
    else:
        uri = ref if ref.startswith("models:/") else f"models:/{ref}@frozen"
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
        except MlflowException:
            raise TrackingError(_missing_model_message(ref, uri, client)) from None
        with contextlib.suppress(MlflowException, ValueError):
            name, _, ver = uri[len("models:/"):].partition("/")
            mv = (client.get_model_version(name, ver) if ver else
                  client.get_model_version_by_alias(*uri[len("models:/"):].split("@", 1)))
            run_id = mv.tags.get("stepslab.run_id") or mv.run_id
        model, card = _load_local(local, ref, run_id)
    info = dict(card)
    info.update(uri=uri, run_id=card.get("run_id") or run_id)
    return model, info


def newest_frozen(model_name: str) -> str | None:
    """URI ``models:/<name>/<version>`` of the newest registered version whose model_info["model"] is
    `model_name`, or None when there is none."""
    _ensure_configured()
    if "'" in model_name:  # no timm name has one; keeps the filter string well-formed
        return None
    versions = MlflowClient().search_model_versions(
        f"tags.`{MODEL_TAG}` = '{model_name}'", max_results=1,
        order_by=["creation_timestamp DESC", "version_number DESC"])
    return f"models:/{versions[0].name}/{versions[0].version}" if versions else None


def resolve_frozen(model: str | None, run: str | None, dataset: str | None = None,
                   echo=print) -> tuple[torch.nn.Module, dict, str, str]:
    """The frozen model a job works on: `run` (run id, models:/ URI or name), else the newest one of `model`.

    Returns (model, its info, model name, the reference used). One-line errors when neither is given, when
    they disagree, or when `model` has no frozen model yet (with the `probe train` command that makes one;
    `dataset` only shapes that hint).
    """
    if run:
        net, info = load_frozen(run)
        name = info["model"]
        if model and model != name:
            raise TrackingError(f"--run {run} holds model {name!r}, not --model {model!r}")
        return net, info, name, run
    if not model:
        raise TrackingError("give --model NAME (its newest frozen model is used) or --run RUN_ID / models:/URI")
    check_name(model)
    uri = newest_frozen(model)
    if uri is None:
        # The 224 px models want 224 px images: fashion_mnist would give them one patch per image.
        data = dataset or ("fashion_mnist" if model.endswith("_micro")
                           else "imagefolder --data-dir DIR --data-option img_size=224")
        raise TrackingError(f"no frozen model for {model}; make one with: probe train --model {model} "
                            f"--dataset {data}")
    net, info = load_frozen(uri)
    echo(f"using frozen model {uri} (newest for {model}; run {info.get('run_id')})")
    return net, info, model, uri


def find_runs(kind: str, filter_tags: dict | None = None, max_results: int = 100) -> "pandas.DataFrame":
    """Runs with tag ``stepslab.kind == kind`` (and each of `filter_tags`), across experiments, newest first."""
    _ensure_configured()
    clauses = [f"tags.`{k}` = '{v}'" for k, v in {KIND_TAG: kind, **(filter_tags or {})}.items()]
    return mlflow.search_runs(search_all_experiments=True, filter_string=" AND ".join(clauses),
                              order_by=["attributes.start_time DESC"], max_results=max_results)


def get_run(run_id: str):
    """The MLflow run `run_id`, or a one-line `TrackingError` saying how to find run ids."""
    _ensure_configured()
    if not _RUN_ID_RE.fullmatch(run_id.strip()):
        raise TrackingError(f"run id {run_id!r}: expected 32 hex digits (list runs with: probe runs)")
    try:
        return MlflowClient().get_run(run_id.strip())
    except MlflowException:
        raise TrackingError(f"run {run_id}: not found in {_state['uri']} (list runs with: probe runs)") from None


def logged_steps(run_id: str) -> dict[str, int]:
    """metric key -> the highest step logged for it in run `run_id` (to log each step of a resumed run once)."""
    client = MlflowClient()
    return {key: max(m.step for m in client.get_metric_history(run_id, key))
            for key in client.get_run(run_id).data.metrics}


def download_run_file(run_id: str, path: str, dst: str | Path) -> Path | None:
    """Download the run artifact `path` into folder `dst`; None when the run has no such artifact."""
    folder, _, name = path.rpartition("/")
    if name not in {Path(a.path).name for a in MlflowClient().list_artifacts(run_id, folder or None)}:
        return None
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst)))


def read_json_artifact(run_id: str, path: str) -> Any:
    """The run's JSON artifact `path` parsed (plain JSON, nothing executable), or None when it has none."""
    with tempfile.TemporaryDirectory() as tmp:
        local = download_run_file(run_id, path, tmp)
        if local is None:
            return None
        try:
            return json.loads(local.read_text())
        except ValueError:
            raise TrackingError(f"run {run_id}: artifact {path} is not valid JSON (corrupt or truncated)") from None
