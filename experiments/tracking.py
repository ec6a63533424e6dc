"""MLflow tracking for StepsLab: one MLflow run per CLI command, plus the frozen-model registry.

Store: by default an embedded SQLite database at ``<root>/mlruns/mlflow.db`` with artifacts under
``<root>/mlruns/artifacts`` (root = ``$STEPSLAB_HOME`` or the current directory). MLflow 3.x refuses the
plain ``./mlruns`` file store, hence SQLite. A team points at an ``mlflow server`` with ``--tracking-uri``
or ``MLFLOW_TRACKING_URI``.

Frozen models are logged with ``serialization_format="pickle"`` (MLflow 3's default, ``"pt2"``, traces the
model through ``torch.export`` and would drop our forward hooks and named sub-modules).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import threading
from importlib import metadata as _pkg_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

# Set before MLflow is imported: the workbench runs offline, so no telemetry thread, and no tqdm bars
# cluttering CLI output when models are loaded. Explicit user settings win.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow  # noqa: E402
import torch  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from models.errors import UserError  # noqa: E402
from models.registry import check_name  # noqa: E402

if TYPE_CHECKING:
    import pandas

__all__ = [
    "TrackingError", "resolve_tracking_uri", "configure", "tracked_run", "log_metrics", "log_dict_artifact",
    "log_figure", "register_frozen", "load_frozen", "newest_frozen", "resolve_frozen", "find_runs",
]

_log = logging.getLogger(__name__)

KIND_TAG = "stepslab.kind"
MODEL_TAG = "stepslab.model"  # on registered model versions: model_info["model"], searched by newest_frozen
_MODEL_ARTIFACT = "model"
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


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI: `uri` > env ``MLFLOW_TRACKING_URI`` > embedded SQLite under ``<root>/mlruns``.

    For the default, creates the ``mlruns`` folder (the database itself is created on first use).
    """
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
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


def _short(exc: BaseException, limit: int = 200) -> str:
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    text = lines[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def configure(uri: str | None = None, experiment: str = "stepslab") -> str:
    """Point MLflow (tracking and registry) at `uri` (see `resolve_tracking_uri`) and ensure `experiment` exists.

    Checks that the store answers before any work starts: an unreachable server raises
    ``TrackingError("tracking URI <uri>: unreachable (...)")`` after one short attempt. Returns the URI.
    """
    uri = resolve_tracking_uri(uri)
    # The SQLite store logs every alembic migration step at INFO on first use.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # Check with a client of its own, so a failed configure leaves MLflow's global URIs as they were.
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    # Fail fast: one attempt, short timeout, for this check only (a real run keeps MLflow's retries).
    with _temp_env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5"):
        try:
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
            raise TrackingError(f"tracking URI {uri}: unreachable ({reason})") from None
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.set_experiment(experiment_id=exp_id)
    _state.update(uri=uri, experiment_id=exp_id)
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
        "stepslab.host": socket.gethostname(),
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


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def tracked_run(kind: str, params: dict, *, tags: dict | None = None, run_id: str | None = None,
                run_name: str | None = None, parent_run_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """Open ONE MLflow run for a CLI command (`kind`: train/probe/attribute/study/figures/bench ...).

    New run: logs `params` flattened (``a.b`` keys, stringified, long values truncated) and tags
    ``stepslab.kind``, git commit + dirty flag, host, torch version, device, plus `tags`.
    `run_id` given: resumes that run (same id, status back to RUNNING); params already logged with the same
    value are skipped, params whose value changed are kept as first logged (MLflow params are immutable) and
    named in a warning and the ``stepslab.resume_changed_params`` tag; environment tags are only filled in
    where missing. The run ends FINISHED on normal exit, FAILED when an exception escapes (re-raised), KILLED
    on KeyboardInterrupt or SIGTERM (turned into KeyboardInterrupt in the main thread for the duration).

    If MLflow already has an active run, the new run is nested under it (a `parent_run_id` other than the
    active run is refused by MLflow).
    """
    _ensure_configured()
    client = MlflowClient()
    flat = _flatten(params)
    outer = mlflow.active_run()
    outer_id, nested = (outer.info.run_id, True) if outer is not None else (None, False)
    env_tags = _environment_tags()
    user_tags = {k: str(v) for k, v in (tags or {}).items()}
    if run_id is None:
        active = mlflow.start_run(experiment_id=_state["experiment_id"], run_name=run_name, nested=nested,
                                  parent_run_id=parent_run_id, tags={KIND_TAG: kind, **env_tags, **user_tags})
        old = None
    else:
        try:
            old = client.get_run(run_id)
        except MlflowException:
            raise TrackingError(f"run {run_id}: not found in {_state['uri']} (find runs with find_runs / the "
                                "MLflow UI)") from None
        active = mlflow.start_run(run_id=run_id, run_name=run_name, nested=nested, parent_run_id=parent_run_id)

    # Signal handlers can only be installed from the main thread; elsewhere SIGTERM keeps its handler.
    in_main = threading.current_thread() is threading.main_thread()
    old_handler = signal.signal(signal.SIGTERM, _raise_interrupt) if in_main else None
    status = "FINISHED"
    try:
        if old is None:
            if flat:
                mlflow.log_params(flat)
        else:
            _resume_params_and_tags(old, flat, {KIND_TAG: kind, **env_tags}, user_tags)
        yield active
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except SystemExit as exc:
        status = "FINISHED" if exc.code in (None, 0) else "FAILED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        if in_main:  # None means "installed from C": the closest we can restore is the default
            signal.signal(signal.SIGTERM, old_handler if old_handler is not None else signal.SIG_DFL)
        try:
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


def _pip_requirements() -> list[str]:
    # Pinned list, so log_model does not infer requirements (which loads the model in a subprocess).
    reqs = [f"torch=={torch.__version__.split('+')[0]}"]
    for pkg in ("timm", "mlflow"):
        try:
            reqs.append(f"{pkg}=={_pkg_metadata.version(pkg)}")
        except _pkg_metadata.PackageNotFoundError:
            pass
    return reqs


def register_frozen(model: torch.nn.Module, registered_name: str, *, model_info: dict,
                    alias: str = "frozen") -> str:
    """Log `model` (eval mode, pickle serialization) in the active run and register it as `registered_name`.

    `model_info` (JSON-able: timm model name under ``"model"``, create kwargs, dataset, label counts ...) is
    stored in the model's MLmodel metadata and as the run artifact ``model_info.json``. The new version gets
    alias `alias` and the tag ``stepslab.model``. Returns ``models:/<name>@<alias>``.
    """
    _require_run("register_frozen")
    run = mlflow.active_run()
    info = json.loads(_to_json(model_info))  # plain types only: the MLmodel file is YAML
    was_training = model.training
    model.eval()
    pytorch_log = logging.getLogger("mlflow.pytorch")
    old_level = pytorch_log.level
    # We choose pickle knowingly (hooks, named sub-modules); MLflow warns about it on every save.
    pytorch_log.setLevel(logging.ERROR)
    try:
        # code_paths is left out on purpose: the pickle refers to the repo's `models` package, and a bundled
        # copy would be put ahead of the live package on sys.path at load time.
        logged = mlflow.pytorch.log_model(model, name=_MODEL_ARTIFACT, serialization_format="pickle",
                                          pip_requirements=_pip_requirements(),
                                          registered_model_name=registered_name,
                                          metadata={"model_info": info})
    finally:
        pytorch_log.setLevel(old_level)
        model.train(was_training)
    version = str(logged.registered_model_version)
    client = MlflowClient()
    client.set_model_version_tag(registered_name, version, MODEL_TAG, str(info.get("model", "")))
    client.set_model_version_tag(registered_name, version, "stepslab.run_id", run.info.run_id)
    client.set_registered_model_alias(registered_name, alias, version)
    log_dict_artifact(info, "model_info.json")
    return f"models:/{registered_name}@{alias}"


def _missing_model_message(ref: str, uri: str, client: MlflowClient) -> str:
    """Say what exists instead of `ref`, for a models:/ URI that did not resolve."""
    name = re.split(r"[@/]", uri[len("models:/"):], maxsplit=1)[0]
    hint = "a train run with register_frozen registers one"
    try:
        models = {m.name: m for m in client.search_registered_models(max_results=50)}
    except MlflowException:
        models = {}
    if name not in models:
        known = ", ".join(sorted(models)) or "none"
        return f"{ref}: no registered model {name!r} (registered: {known}; {hint})"
    aliases = ", ".join(f"@{a}" for a in sorted(models[name].aliases)) or "no aliases"
    return f"{ref}: registered model {name!r} has no such version/alias ({aliases}; {hint})"


def load_frozen(ref: str) -> tuple[torch.nn.Module, dict]:
    """Load a frozen model: `ref` is a run id (32 hex; its logged "model"), a ``models:/`` URI (name@alias or
    name/version) or a registered model name (its ``frozen`` alias).

    Returns ``(model, info)``: the model on CPU, in eval() with ``requires_grad=False`` everywhere, and
    model_info plus ``run_id`` and ``uri``. Unknown references raise `TrackingError`.
    """
    _ensure_configured()
    client = MlflowClient()
    ref = ref.strip()
    if _RUN_ID_RE.fullmatch(ref):
        try:
            run = client.get_run(ref)
        except MlflowException:
            raise TrackingError(f"{ref}: no run with this id in {_state['uri']}") from None
        # MLflow 3 keeps logged models as their own entities; find the one this run logged.
        logged = mlflow.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{ref}' AND name = '{_MODEL_ARTIFACT}'",
            order_by=[{"field_name": "creation_timestamp", "ascending": False}], max_results=1,
            output_format="list")
        if not logged:
            kind = run.data.tags.get(KIND_TAG, "?")
            raise TrackingError(f"run {ref} ({kind}): no model logged (a train run with register_frozen logs one)")
        uri = f"models:/{logged[0].model_id}"
    elif ref.startswith("models:/"):
        uri = ref
    else:
        uri = f"models:/{ref}@frozen"
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri)
    except MlflowException:
        raise TrackingError(_missing_model_message(ref, uri, client)) from None
    try:
        import models  # noqa: F401  # our model classes must be importable before unpickling
    except ImportError:
        pass
    model = mlflow.pytorch.load_model(local, map_location="cpu")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    mlmodel = mlflow.models.Model.load(local)
    info = dict((mlmodel.metadata or {}).get("model_info") or {})
    info.update(run_id=mlmodel.run_id, uri=uri)
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
        name = info.get("model") or str((getattr(net, "pretrained_cfg", None) or {}).get("architecture")
                                        or type(net).__name__)
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
