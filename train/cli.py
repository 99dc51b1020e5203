"""What the command-line tools share: the error a user can fix, and how it is reported."""

from __future__ import annotations

import sys
from collections.abc import Callable

__all__ = ["UserError", "run_cli"]


class UserError(ValueError):
    """A problem with the user's input (files, options); reported in one line, exit code 2."""


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run `main`; a UserError becomes `error: <message>` on stderr and exit code 2, no traceback."""
    try:
        code = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
