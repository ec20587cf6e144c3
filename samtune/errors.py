"""Errors a user can fix, and how every command reports them: one line on stderr, exit status 2.

Bad data, bad config, missing files, unknown keys, incompatible options raise a ``UserError`` (or a subclass:
``ConfigError``, ``CocoFormatError``, ``ModelConfigError``) whose message names the file, id or key and what to
do. ``run_command`` turns it into ``samtune <command>: error: <message>`` without a traceback; anything else is a
bug and keeps its traceback. ``--debug`` (anywhere on the command line) or ``SAMTUNE_DEBUG=1`` shows tracebacks
for user errors too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

DEBUG_ENV = "SAMTUNE_DEBUG"
USER_ERROR = 2  # argparse's status for a bad command line, used for every error the user can fix
INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C


class UserError(ValueError):
    """A problem in what the user gave (data, config, files, options), not in samtune."""


def _is_reporting_process() -> bool:
    """Under DDP every process meets the same bad input; only the first one says so (all exit)."""
    return os.environ.get("RANK", "0") == "0"


def _one_line(error: UserError) -> str:
    """The message; raised in a DataLoader worker, PyTorch prepends the worker's traceback: keep the message."""
    text = str(error)
    if "\nOriginal Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def run_command(
    main: Callable[[list[str]], object], argv: list[str] | None = None, prog: str = "samtune", debug: bool = False
) -> int:
    """Run a command's ``main(argv)``; user errors and Ctrl-C become one line on stderr and an exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug or "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        main(argv)
    except UserError as error:
        if debug:
            raise
        if _is_reporting_process():
            print(f"{prog}: error: {_one_line(error)}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        if debug:
            raise
        if _is_reporting_process():
            print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    return 0
