"""Errors that are the user's to fix, and how the commands report them.

A ``UserError`` (bad data, a bad config file, a missing path, a used output folder, a run
that diverged) ends a command with one line on stderr, ``<prog>: error: <message>``, and
exit code 2, with no traceback: the message names the file, line and field. Anything else
is a programming error and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """Something the user must fix; the message says what and where."""


class ConfigError(UserError, ValueError):
    """A configuration value or file that cannot be used."""


def user_message(error: BaseException) -> str:
    """The error's message on one line. An exception re-raised from a DataLoader worker
    carries the worker's traceback in its text; only the last line is the message."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1]
        text = text.split(": ", 1)[1] if ": " in text else text
    return " ".join(text.split())


def run_command(prog: str, main: Callable[[], object]) -> object:
    """Run ``main``; a ``UserError`` becomes one line on stderr and exit code 2."""
    try:
        return main()
    except UserError as e:
        print(f"{prog}: error: {user_message(e)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
