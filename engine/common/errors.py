"""The error a user can fix, how a command reports it, and the exit codes every command shares.

Every command runs under `run_cli`: whatever ends it, it ends in one line on stderr and a documented
exit code, never a traceback (LINEFLOW_DEBUG=1 shows the traceback of an unexpected error).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator

from engine.common.redact import redact, restore_stderr

__all__ = ["UserError", "OutputError", "RunError", "Terminated", "run_cli", "EXIT_BAD_INPUT", "EXIT_SOURCE_FAILED",
           "EXIT_OUTPUT_FAILED", "EXIT_INTERRUPTED", "EXIT_TERMINATED", "EXIT_INTERNAL", "os_reason", "one_line",
           "deferred_signals", "SIGNALS_TO_QUIT_AT_ONCE"]

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


SIGNALS_TO_QUIT_AT_ONCE = 3  # the third Ctrl-C or SIGTERM ends the process at once, cleanup or not


class _Signals:
    """How far the process is in being stopped: the first SIGINT/SIGTERM is raised in the main thread (every
    `finally` runs); later ones never cut a cleanup short: they are noted and ignored, and the third quits at once."""

    def __init__(self) -> None:
        self.raised = False  # the first signal has been raised: what runs now is cleanup
        self.deferring = 0  # inside deferred_signals(): a first signal waits too
        self.pending: int | None = None  # a signal that arrived while deferring, not yet raised
        self.count = 0


_signals = _Signals()


def _exception_for(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _on_signal(signum, frame) -> None:
    _signals.count += 1
    if _signals.count >= SIGNALS_TO_QUIT_AT_ONCE:
        os.write(2, b"\nquitting at once: outputs may be incomplete\n")
        restore_stderr()  # what waits in the redaction's pipe is delivered first
        os._exit(EXIT_TERMINATED if signum == signal.SIGTERM else EXIT_INTERRUPTED)
    if _signals.raised or _signals.deferring:
        _signals.pending = _signals.pending or signum
        if _signals.count == 2:
            os.write(2, b"\nfinishing the outputs first; a third signal quits at once\n")
        return
    _signals.raised = True
    raise _exception_for(signum)


class _Deferred:
    def raise_pending(self) -> None:
        """Raise the signal that arrived inside the block (the first of the process), if one did."""
        if _signals.pending is not None and not _signals.raised:
            _signals.raised = True
            signum, _signals.pending = _signals.pending, None
            raise _exception_for(signum)

    @property
    def signalled(self) -> bool:
        """A signal arrived (inside the block or before it): the run is being stopped."""
        return _signals.raised or _signals.pending is not None


@contextlib.contextmanager
def deferred_signals() -> Iterator[_Deferred]:
    """A cleanup no signal cuts short: inside, SIGINT/SIGTERM are noted, not raised (under run_cli); the caller
    raises a noted one with `.raise_pending()` when the cleanup is done."""
    _signals.deferring += 1
    try:
        yield _Deferred()
    finally:
        _signals.deferring -= 1


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run `main` and exit with its code; every failure becomes `error: <message>` on stderr and its exit code."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {}
    if main_thread:
        _signals.__init__()
        previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
                    if signal.getsignal(sig) is not signal.SIG_IGN}  # a background job's ignored Ctrl-C stays so
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
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    sys.stdout.flush()
    sys.exit(code or 0)


def _report(e: BaseException | str, code: int) -> int:
    print(f"error: {redact(str(e))}", file=sys.stderr)
    return code
