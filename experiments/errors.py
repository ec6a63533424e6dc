"""The one error policy of every StepsLab command (the `probe` CLI, `python -m experiments.bench`, torchrun).

- A user's mistake raises `UserError` (or a subclass: unknown model, dataset, feature, tracking store, ...):
  the command prints ``error: <one line>`` to stderr and exits 2. ``STEPSLAB_DEBUG=1`` shows the traceback too.
- Anything else is a bug: its traceback is shown, then one line saying it is a bug, and the exit status is 1.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, NoReturn, TypeVar

from models.errors import UserError

__all__ = ["UserError", "USER_ERROR_EXIT", "fail", "report", "guarded"]

USER_ERROR_EXIT = 2
T = TypeVar("T")


def fail(message: str) -> NoReturn:
    """Raise a `UserError` (for call sites that read better as a statement)."""
    raise UserError(message)


def _one_line(text: str) -> str:
    # Whole messages, joined onto one line; never cut mid-sentence.
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def report(exc: BaseException) -> int:
    """Print `exc` by the policy above and return the exit status (2 for a user's mistake, 1 for a bug)."""
    if isinstance(exc, UserError):
        if os.environ.get("STEPSLAB_DEBUG"):
            traceback.print_exception(exc)
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return USER_ERROR_EXIT
    traceback.print_exception(exc)
    print(f"bug: StepsLab failed with {type(exc).__name__} (the traceback above); please report it",
          file=sys.stderr)
    return 1


def guarded(main: Callable[[], T]) -> T:
    """Run `main()`; on an exception, print it by the policy and exit with its status."""
    try:
        return main()
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - the policy itself
        sys.exit(report(exc))
