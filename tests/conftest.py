"""Test-wide isolation: no test writes the repo's mlruns/ or talks to a tracking server from the environment."""
import os

# Before torch loads OpenMP: busy-waiting threads slow a shared 2-core machine several-fold.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def stepslab_home(tmp_path_factory):
    """One throwaway MLflow store (SQLite under <tmp>/mlruns) for the session: creating one costs seconds."""
    root = tmp_path_factory.mktemp("stepslab_home")
    old = {k: os.environ.get(k) for k in ("STEPSLAB_HOME", "MLFLOW_TRACKING_URI", "STEPSLAB_CACHE")}
    os.environ["STEPSLAB_HOME"] = str(root)
    os.environ["STEPSLAB_CACHE"] = str(root / "cache")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield root
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
