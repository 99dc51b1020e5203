"""The error a user can fix, how a command reports it, and the exit codes every command shares.

Every command runs under `run_cli`: whatever ends it, it ends in one line on stderr and a documented
exit code, never a traceback (LINEFLOW_DEBUG=1 shows the traceback of an unexpected error).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable

__all__ = ["UserError", "OutputError", "RunError", "Terminated", "run_cli", "EXIT_BAD_INPUT", "EXIT_SOURCE_FAILED",
           "EXIT_OUTPUT_FAILED", "EXIT_INTERRUPTED", "EXIT_TERMINATED", "EXIT_INTERNAL", "os_reason", "one_line"]

EXIT_INTERNAL = 1  # a backend or check that failed (RunError), or a lineflow bug: one line
EXIT_BAD_INPUT = 2  # bad file, option or source: one line on stderr, nothing written
EXIT_SOURCE_FAILED = 3  # a source failed mid-run: the results up to the fault are written
EXIT_OUTPUT_FAILED = 4  # an output could not be written mid-run (disk full, ...): what was written before is intact
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT)
EXIT_TERMINATED = 143  # SIGTERM


class UserError(ValueError):
    """A problem with the user's input (files, options); reported in one line, exit code EXIT_BAD_INPUT."""


class OutputError(OSError):
    """Writing an output failed mid-run (disk full, device gone); reported in one line, EXIT_OUTPUT_FAILED."""


class RunError(RuntimeError):
    """A failure that is not the user's input and not a bug: a backend failing mid-stream, a build whose accuracy
    check fails. One line, exit code EXIT_INTERNAL."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so every `finally` (flush, close, join) runs."""


def os_reason(e: OSError) -> str:
    """'No space left on device' rather than '[Errno 28] No space left on device: ...'."""
    return e.strerror or errno.errorcode.get(e.errno or 0, "") or str(e)


def one_line(e: BaseException, limit: int = 300) -> str:
    """'TypeName: first line of the message', for reporting an exception that is not ours in one line."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:limit]}" if text else type(e).__name__


def _terminate(signum, frame) -> None:
    raise Terminated()


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run `main` and exit with its code; every failure becomes `error: <message>` on stderr and its exit code."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        code = main(argv)
    except UserError as e:
        code = _report(e, EXIT_BAD_INPUT)
    except OutputError as e:
        code = _report(e, EXIT_OUTPUT_FAILED)
    except RunError as e:
        code = _report(e, EXIT_INTERNAL)
    except Terminated:
        print("terminated (SIGTERM)", file=sys.stderr)
        code = EXIT_TERMINATED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except MemoryError:
        code = _report("out of memory", EXIT_INTERNAL)
    except OSError as e:  # a file system fault met outside the paths that name it themselves
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        code = _report(f"{where}{os_reason(e)}", EXIT_OUTPUT_FAILED if e.errno in (errno.ENOSPC, errno.EDQUOT)
                       else EXIT_INTERNAL)
    except Exception as e:  # noqa: BLE001 - the last resort: one line, never a traceback
        if os.environ.get("LINEFLOW_DEBUG"):
            traceback.print_exc()
        code = _report(f"internal error ({one_line(e)}); this is a lineflow bug, please report it "
                       "(LINEFLOW_DEBUG=1 shows where)", EXIT_INTERNAL)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    sys.stdout.flush()
    sys.exit(code or 0)


def _report(e: BaseException | str, code: int) -> int:
    print(f"error: {e}", file=sys.stderr)
    return code
