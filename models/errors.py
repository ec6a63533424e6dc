"""The one exception type for a user's mistake, raised by all three rooms (models, probes, experiments).

It lives in the bottom room because every room must be able to raise it and rooms only import downwards. The
CLI (`experiments.errors`) prints a `UserError` as one line naming the bad value and what is allowed, and
exits 2; anything else is a bug and keeps its traceback. It subclasses ValueError so that library callers who
catch ValueError for bad arguments keep working.
"""
from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """A user's mistake: the message is one line naming the bad value and what is allowed."""
