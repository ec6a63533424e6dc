"""An MLflow store per test module for the tracking and UI tests (creating a SQLite store takes seconds)."""
import os

import mlflow
import pytest

from experiments import tracking


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One fresh default store (SQLite under <tmp>/mlruns) for the module; the URIs are restored afterwards."""
    root = tmp_path_factory.mktemp("stepslab_home")
    old_uri, old_env = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEPSLAB_HOME", str(root))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setattr(tracking, "_state", {"uri": None, "experiment_id": None})
        tracking.configure()
        yield root, dict(tracking._state)
    mlflow.set_tracking_uri(old_uri)
    mlflow.set_registry_uri(old_uri)
    if old_env is None:  # set_tracking_uri also sets the variable: left set, later modules would log to ./mlflow.db
        os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture
def store(home, monkeypatch):
    """The module's store, configured as the default; leaves no active run behind."""
    root, state = home
    monkeypatch.setenv("STEPSLAB_HOME", str(root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking, "_state", dict(state))
    mlflow.set_tracking_uri(state["uri"])
    mlflow.set_registry_uri(state["uri"])
    yield root
    while mlflow.active_run() is not None:
        mlflow.end_run()
