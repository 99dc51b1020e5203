"""The live view (engine.run --view) in a real browser: headless Chromium (Debian package `chromium`) driven by
Playwright, pointed at the system's browser (Playwright's own download cannot run here). The server binds a
free loopback port and stops with the run; a screenshot goes to $LINEFLOW_ARTIFACTS (default: the test's
temporary folder) for the test report.
"""

import json
import os
import shutil
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import cli, free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _wait_up(port: int, proc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"engine.run ended early: {proc.stderr.read()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("the view did not come up")


@pytest.fixture
def viewed_run(line):  # noqa: F811 - the fixture imported above
    """engine.run over the 60 frames at 8 frames/s (7.5 s) with --view on a free loopback port, 3 s held after."""
    port = free_port()
    proc = cli(line["engine"], "--source", line["frames"], "--quiet", "--max-fps", "8", "--view",
               f"127.0.0.1:{port}", "--view-hold", "3", wait=False)
    _wait_up(port, proc)
    yield f"http://127.0.0.1:{port}/", proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run does)")
def test_the_page_shows_the_run_live_in_a_browser(viewed_run, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
    url, proc = viewed_run
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        page.goto(url)
        assert "lineflow live view" in page.title()
        page.wait_for_function("Number(document.getElementById('frame').dataset.seq) > 0", timeout=15000)
        first_seq = int(page.get_attribute("#frame", "data-seq"))
        first_count = int(page.inner_text("#passed")) + int(page.inner_text("#failed"))
        page.wait_for_timeout(1500)
        seq = int(page.get_attribute("#frame", "data-seq"))
        count = int(page.inner_text("#passed")) + int(page.inner_text("#failed"))
        assert seq > first_seq, "the image did not update"
        assert count > first_count, "the counters did not move"
        assert int(page.get_attribute("#plot", "data-points")) > 0, "the plot has no points"
        assert float(page.inner_text("#fps")) > 0
        assert page.evaluate("document.getElementById('frame').naturalWidth") > 0  # a decodable JPEG
        artifacts = Path(os.environ.get("LINEFLOW_ARTIFACTS") or tmp_path)
        artifacts.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(artifacts / "live-view.png"))
        browser.close()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert (artifacts / "live-view.png").stat().st_size > 10_000


def test_the_view_serves_stats_and_frames_without_a_browser(viewed_run):
    url, proc = viewed_run
    time.sleep(1.0)
    status, body = _get(url + "stats.json")
    stats = json.loads(body)
    assert status == 200 and stats["passed"] + stats["failed"] > 0 and stats["scores"]
    status, jpeg = _get(url + "frame.jpg?after=0")
    assert status == 200 and jpeg[:2] == b"\xff\xd8"
    proc.communicate(timeout=60)
    assert proc.returncode == 0


def test_the_page_stays_up_for_the_hold_after_the_last_frame(line):  # noqa: F811
    port = free_port()
    proc = cli(line["engine"], "--source", line["frames"], "--quiet", "--max-fps", "30", "--view",
               f"127.0.0.1:{port}", "--view-hold", "4", wait=False)
    _wait_up(port, proc)
    url, deadline = f"http://127.0.0.1:{port}/stats.json", time.monotonic() + 60
    while True:  # until every frame is scored: the run is over, only the hold keeps the page up
        stats = json.loads(_get(url)[1])
        if stats["passed"] + stats["failed"] == line["n"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert stats["passed"] + stats["failed"] == line["n"]
    time.sleep(1.5)
    assert proc.poll() is None, "the run did not hold the page"
    assert _get(url)[0] == 200
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "still serving" in stderr and "for 4 s" in stderr


def test_a_token_is_asked_for_on_every_request(line):  # noqa: F811
    port, token = free_port(), "s3cret-token-0123456789"
    proc = cli(line["engine"], "--source", line["frames"], "--quiet", "--max-fps", "20", "--view", f"127.0.0.1:{port}",
               "--view-token", token, "--view-hold", "1", wait=False)
    _wait_up(port, proc)
    base = f"http://127.0.0.1:{port}/"
    assert _get(base)[0] == 401 and _get(base + "stats.json")[0] == 401 and _get(base + "frame.jpg")[0] == 401
    assert _get(base + "stats.json?token=wrong-token-0123456789")[0] == 401
    assert _get(base + f"?token={token}")[0] == 200 and _get(base + f"stats.json?token={token}")[0] == 200
    proc.communicate(timeout=60)
    assert proc.returncode == 0


def test_beyond_loopback_a_token_is_made_up_when_none_is_given():
    from engine.common.net import is_loopback
    from engine.sinks.view import parse_view_address
    assert parse_view_address("8080") == ("127.0.0.1", 8080) and parse_view_address("0.0.0.0:80") == ("0.0.0.0", 80)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.7") and not is_loopback("cam-box.local")


@pytest.mark.parametrize("option,why", [("in_use", "the port is in use"), ("bad_token", "--view-token: 16 to 128"),
                                        ("bad_port", "expected [HOST:]PORT")])
def test_bad_view_options_are_bad_input_before_any_frame(line, tmp_path, option, why):  # noqa: F811
    out = tmp_path / "r.jsonl"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        args = {"in_use": ["--view", f"127.0.0.1:{busy.getsockname()[1]}"],
                "bad_token": ["--view", f"127.0.0.1:{free_port()}", "--view-token", "short"],
                "bad_port": ["--view", "127.0.0.1:http"]}[option]
        proc = cli(line["engine"], "--source", line["frames"], "--out", out, *args)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert why in proc.stderr and "Traceback" not in proc.stderr and not out.exists()


def _post(url: str, body: dict, headers: dict | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run does)")
def test_the_review_page_labels_a_frame_in_a_browser_behind_the_token(line, tmp_path):  # noqa: F811
    """engine.run --view --review: each queued frame on /review with two buttons; clicking "defect" appends the
    label to DIR/labels.jsonl; every review route asks for the token; a cross-site POST is refused."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
    from engine.review_store import LABELS, read_queue
    port, token, rev = free_port(), "review-token-0123456789", tmp_path / "rev"
    proc = cli(line["engine"], "--source", line["frames"], "--quiet", "--max-fps", "60", "--view",
               f"127.0.0.1:{port}", "--view-token", token, "--view-hold", "30", "--review", rev, wait=False)
    try:
        _wait_up(port, proc)
        base = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 30
        while len(read_queue(rev)) < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        first = read_queue(rev)[0].id
        assert _get(base + "review")[0] == 401 and _get(base + "review.json")[0] == 401
        assert _get(base + f"review/{first}.jpg")[0] == 401
        assert _post(base + "review/label", {"id": first, "label": "good"})[0] == 401
        assert _post(base + f"review/label?token={token}", {"id": first, "label": "good"},
                     {"Origin": "http://evil.example"})[0] == 403
        assert _post(base + f"review/label?token={token}", {"id": "no-such-id", "label": "good"})[0] == 400
        assert not (rev / LABELS).exists()
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.goto(base + f"review?token={token}")
            assert "lineflow review" in page.title()
            item = page.locator(f"figure.item[data-id='{first}']")
            item.wait_for(timeout=15000)
            item.locator("button.defect").click()
            page.wait_for_function(f"document.querySelector(\"figure[data-id='{first}']\").dataset.label === 'defect'",
                                   timeout=10000)
            assert item.locator("img").evaluate("img => img.complete && img.naturalWidth > 0")  # the overlay shows
            browser.close()
        labels = [json.loads(line) for line in (rev / LABELS).read_text().splitlines()]
        assert [(x["id"], x["label"], x["who"]) for x in labels] == [(first, "defect", "view")]
    finally:
        proc.terminate()  # ends the hold: a normal end of the run
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode in (0, 143) and "Traceback" not in stderr, stderr


def test_the_view_follows_each_results_threshold_and_reports_drift():
    import numpy as np

    from engine.results import Result
    from engine.sinks.view import LiveView
    view = LiveView(f"127.0.0.1:{free_port()}", threshold=1.0)
    try:
        frame, amap = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.float32)
        view.write(Result(0.5, False, amap, frame=frame, threshold=2.5, drift=[]))
        stats = json.loads(_get(view.url + "stats.json")[1])
        assert stats["threshold"] == 2.5 and stats["drift"] == [] and stats["review"] is False
        assert _get(view.url + "review")[0] == 404  # no review folder, no review page
        view.write(Result(3.0, True, amap, frame=frame, threshold=2.75, drift=["input"]))
        stats = json.loads(_get(view.url + "stats.json")[1])
        assert stats["threshold"] == 2.75 and stats["drift"] == ["input"]
    finally:
        view.close()


def _status_with_host(port: int, host: str | None, path: str = "/stats.json") -> int:
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.putrequest("GET", path, skip_host=True)
        if host is not None:
            conn.putheader("Host", host)
        conn.endheaders()
        return conn.getresponse().status
    finally:
        conn.close()


def test_a_loopback_view_answers_only_to_loopback_names():
    """DNS rebinding: a page at evil.example rebinds its name to 127.0.0.1 and reads the view, its requests naming
    evil.example in Host. Bound to loopback, the view answers only to loopback names and addresses (any port: an
    SSH tunnel's local port differs) and refuses the rest with 421 Misdirected Request."""
    from engine.sinks.view import LiveView
    view = LiveView("127.0.0.1:0")
    try:
        port = view.port
        for own in (f"127.0.0.1:{port}", f"localhost:{port}", f"LocalHost.:{port}", f"[::1]:{port}", "127.0.0.1",
                    f"127.1.2.3:{port}", "localhost:9000"):
            assert _status_with_host(port, own) == 200, own
        for foreign in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", "localhost.evil",
                        "0.0.0.0", "user@127.0.0.1", "127.0.0.1:x", "", None):
            for path in ("/", "/stats.json", "/frame.jpg?after=0", "/nothing-here"):
                assert _status_with_host(port, foreign, path) in (400, 421), (foreign, path)
        assert _status_with_host(port, "evil.example") == 421
        assert _status_with_host(port, f"127.0.0.1:{port}", "/frame.jpg?after=x") == 400  # not a 500 and a traceback
    finally:
        view.close()


def test_the_camera_name_is_escaped_in_the_pages(tmp_path):
    """--camera-name lands in the pages' HTML title and heading: escaped, never markup; in JSON as plain data."""
    from engine.sinks.view import LiveView
    name = '</title><script>alert("x")</script>&'
    view = LiveView("127.0.0.1:0", title=name, review_dir=tmp_path)
    try:
        for page in ("", "review"):
            status, body = _get(view.url + page)
            assert status == 200 and b"<script>alert" not in body, page
            assert b"&lt;/title&gt;&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;" in body, page
        assert json.loads(_get(view.url + "stats.json")[1])["title"] == name
        assert json.loads(_get(view.url + "review.json")[1])["title"] == name
    finally:
        view.close()


def test_the_views_labels_hide_a_urls_password():
    import numpy as np

    from engine.results import Result
    from engine.sinks.view import LiveView
    view = LiveView("127.0.0.1:0", threshold=1.0)
    try:
        frame, amap = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.float32)
        view.write(Result(3.0, True, amap, source="rtsp://user:s3cr3t@cam/x", frame=frame))
        body = _get(view.url + "stats.json")[1]
        assert b"s3cr3t" not in body and json.loads(body)["anomalies"][0]["source"] == "rtsp://user:***@cam/x"
    finally:
        view.close()
