"""The error a user can fix, how a command reports it, and the exit codes every command shares."""

from __future__ import annotations

import sys
from collections.abc import Callable

__all__ = ["UserError", "run_cli", "EXIT_BAD_INPUT", "EXIT_SOURCE_FAILED", "EXIT_INTERRUPTED"]

EXIT_BAD_INPUT = 2  # bad file, option or source: one line on stderr, nothing written
EXIT_SOURCE_FAILED = 3  # a source failed mid-run: the results up to the fault are written
EXIT_INTERRUPTED = 130  # Ctrl-C


class UserError(ValueError):
    """A problem with the user's input (files, options); reported in one line, exit code EXIT_BAD_INPUT."""


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run `main`; a UserError becomes `error: <message>` on stderr and exit code 2, no traceback."""
    try:
        code = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(code or 0)
