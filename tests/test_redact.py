"""Issue 45, finding 7: a URL's password never leaves the process. engine.common.redact is the one place that hides
it; redacted_stderr passes what native libraries write on file descriptor 2 through it too."""

import subprocess
import sys

import pytest

from engine.common.redact import redact


@pytest.mark.parametrize("text,want", [
    ("rtsp://user:pw@cam/x", "rtsp://user:***@cam/x"),
    ("mqtt://u:p@ss@host:1883/line", "mqtt://u:***@host:1883/line"),  # a raw "@" in the password: hidden whole
    ("cannot open http://a:b@h:8/v.avi and rtsp://c:d@e/f", "cannot open http://a:***@h:8/v.avi and rtsp://c:***@e/f"),
    ("mqtt://user:s3cr3t@bad host:x/p", "mqtt://user:***@bad host:x/p"),
    ("http://user@h/x", "http://user@h/x"),  # a user name alone says which account, not how to log in
    ("mail me at a@b.c", "mail me at a@b.c"),
    ("/data/line@2/cam.mp4", "/data/line@2/cam.mp4"),
])
def test_redact_hides_passwords_only(text, want):
    assert redact(text) == want


def test_redacted_stderr_hides_what_native_code_writes():
    """Written straight to fd 2 (as OpenCV and FFmpeg do), by Python, and a status line redrawn with \\r: all arrive,
    in order, without the password; output written after the block is untouched."""
    code = """if True:
        import os, sys
        from engine.common.redact import redacted_stderr
        with redacted_stderr():
            os.write(2, b"[tcp] rtsp://u:S3CRET@h/x refused\\n")
            print("python http://u:S3CRET@h/y", file=sys.stderr)
            print("\\rstatus 1", end="", file=sys.stderr, flush=True)
        print("after http://u:visible@h", file=sys.stderr)
    """
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)  # bytes: \r kept
    stderr = r.stderr.decode()
    assert r.returncode == 0, stderr
    assert "S3CRET" not in stderr
    assert stderr == ("[tcp] rtsp://u:***@h/x refused\npython http://u:***@h/y\n\rstatus 1"
                        "after http://u:visible@h\n"), stderr
