"""The one error policy of every StepsLab command (the `probe` CLI, `python -m experiments.bench`, torchrun).

- A user's mistake raises `UserError` (or a subclass: unknown model, dataset, feature, tracking store, ...):
  the command prints ``error: <one line>`` to stderr and exits 2. ``STEPSLAB_DEBUG=1`` shows the traceback too.
- Anything else is a bug: its traceback is shown, then one line saying it is a bug, and the exit status is 1.
- SIGINT (Ctrl-C) and SIGTERM stop a command with one line and the shell's status for that signal, 128 + signal
  number (130, 143); the MLflow run open at that moment ends KILLED (experiments.tracking).
"""
from __future__ import annotations

import os
import signal
import sys
import traceback
from typing import Callable, NoReturn, TypeVar

__all__ = ["USER_ERROR_EXIT", "fail", "report", "guarded", "raise_interrupt", "catch_signals",
           "interrupted"]

USER_ERROR_EXIT = 2
T = TypeVar("T")


def __getattr__(name: str):
    # `UserError` lives in models.errors (every room raises it); loading it loads the models package and timm,
    # which a usage error or a signal must not wait for, so it is imported on first use only.
    if name == "UserError":
        from models.errors import UserError
        return UserError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_user_error(exc: BaseException) -> bool:
    errors = sys.modules.get("models.errors")  # not loaded yet: nothing can have raised a UserError
    return errors is not None and isinstance(exc, errors.UserError)


def fail(message: str) -> NoReturn:
    """Raise a `UserError` (for call sites that read better as a statement)."""
    from models.errors import UserError

    raise UserError(message)


def _one_line(text: str) -> str:
    # Whole messages, joined onto one line; never cut mid-sentence.
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def report(exc: BaseException) -> int:
    """Print `exc` by the policy above and return the exit status (2 for a user's mistake, 1 for a bug)."""
    if _is_user_error(exc):
        if os.environ.get("STEPSLAB_DEBUG"):
            traceback.print_exception(exc)
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return USER_ERROR_EXIT
    traceback.print_exception(exc)
    print(f"bug: StepsLab failed with {type(exc).__name__} (the traceback above); please report it",
          file=sys.stderr)
    return 1


# The signal that stopped the command, if any (SIGINT when Python raised KeyboardInterrupt by itself).
_last_signal: dict[str, int | None] = {"signum": None}


def raise_interrupt(signum: int, frame: object) -> None:
    """Signal handler: remember the signal, then stop the main thread with KeyboardInterrupt (so `finally`
    blocks run and the open MLflow run ends KILLED)."""
    _last_signal["signum"] = signum
    raise KeyboardInterrupt(signal.Signals(signum).name)


def catch_signals() -> Callable[[], None]:
    """Route SIGINT and SIGTERM through `raise_interrupt` (main thread only; elsewhere nothing changes).
    Returns a function that puts the previous handlers back (for callers that live on, e.g. tests)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    _last_signal["signum"] = None
    old = {sig: signal.signal(sig, raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, handler in old.items():  # None: installed from C; the default is the closest
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    return restore


def interrupted() -> int:
    """Say which signal stopped the command (one line) and return its exit status, 128 + the signal number."""
    signum = _last_signal["signum"] or signal.SIGINT
    print(f"interrupted ({signal.Signals(signum).name})", file=sys.stderr)
    return 128 + int(signum)


def guarded(main: Callable[[], T]) -> T:
    """Run `main()`; on an exception, print it by the policy and exit with its status (130 / 143 when SIGINT /
    SIGTERM stopped it)."""
    restore = catch_signals()
    try:
        return main()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        sys.exit(interrupted())
    except Exception as exc:  # noqa: BLE001 - the policy itself
        sys.exit(report(exc))
    finally:
        restore()
