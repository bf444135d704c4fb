"""The report in a real browser: headless Chromium, driven over the DevTools protocol (a small websocket client
below, no extra package). The page must render (non-blank screenshot, plots decoded), show the verdict at the top,
make no network request, log no console error, and show a hostile class label as text.

Skipped only when Chromium is not installed (CI's .ci/run installs Debian's chromium)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from collapse_detect.cli import main

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser")
                             or "") if p and os.path.exists(p)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (/usr/bin/chromium); "
                                                         "apt-get install chromium to run the browser test")
EVIL = "<img src=x onerror=alert(1)>"
COLLAPSE_RED = (0xB3, 0x26, 0x1E)  # .COLLAPSE background in report.html.j2


class DevTools:
    """Just enough of RFC 6455 and the Chrome DevTools protocol: masked text frames out, frames in, events kept."""

    def __init__(self, ws_url: str, timeout: float = 30.0):
        m = re.match(r"ws://([^:/]+):(\d+)(/.*)", ws_url)
        self.sock = socket.create_connection((m.group(1), int(m.group(2))), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {m.group(3)} HTTP/1.1\r\nHost: {m.group(1)}:{m.group(2)}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head
        self.next_id = 0
        self.events: list[dict] = []

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("DevTools closed the connection")
            data += chunk
        return data

    def _send_frame(self, payload: bytes, opcode: int = 1) -> None:
        header = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 65536:
            header += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def _message(self) -> dict:
        parts = []
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(n)  # the server never masks
            opcode = b0 & 0x0F
            if opcode == 9:  # ping
                self._send_frame(payload, opcode=10)
                continue
            if opcode == 8:
                raise ConnectionError("DevTools sent close")
            parts.append(payload)
            if b0 & 0x80:
                return json.loads(b"".join(parts))

    def call(self, method: str, **params):
        self.next_id += 1
        self._send_frame(json.dumps({"id": self.next_id, "method": method, "params": params}).encode())
        while True:
            msg = self._message()
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        seen = len(self.events)
        while time.monotonic() < deadline:
            for event in self.events[seen:]:
                if event.get("method") == method:
                    return event
            seen = len(self.events)
            self.events.append(self._message())
        raise TimeoutError(method)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def close(self):
        self.sock.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium-profile")
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-extensions", "--hide-scrollbars",
         "--window-size=1200,900", f"--user-data-dir={profile}", "--remote-debugging-port=0",
         # any host name fails to resolve: a request the page makes cannot reach anything, and shows as failed
         "--host-resolver-rules=MAP * ~NOTFOUND", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            assert proc.poll() is None, "chromium exited at start"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port in 60 s"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(t for t in targets if t["type"] == "page")
        tools = DevTools(page["webSocketDebuggerUrl"])
        for domain in ("Page", "Runtime", "Log", "Network"):
            tools.call(f"{domain}.enable")
        tools.call("Emulation.setDeviceMetricsOverride", width=1200, height=900, deviceScaleFactor=1, mobile=False)
        yield tools
        tools.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def visit(tools: DevTools, path: Path) -> dict:
    """Load a file and return what the page did: requests, console errors, exceptions, log errors."""
    tools.events.clear()
    tools.call("Page.navigate", url=path.resolve().as_uri())
    tools.wait_for("Page.loadEventFired")
    tools.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    tools.call("Runtime.evaluate", expression="1")  # flush pending events
    events = tools.events
    return {
        "requests": [e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"],
        "console_errors": [e["params"] for e in events if e.get("method") == "Runtime.consoleAPICalled"
                           and e["params"]["type"] in ("error", "assert")],
        "exceptions": [e["params"] for e in events if e.get("method") == "Runtime.exceptionThrown"],
        "log_errors": [e["params"]["entry"] for e in events if e.get("method") == "Log.entryAdded"
                       and e["params"]["entry"]["level"] == "error"],
        "dialogs": [e["params"] for e in events if e.get("method") == "Page.javascriptDialogOpening"],
    }


def screenshot(tools: DevTools) -> np.ndarray:
    from PIL import Image

    data = base64.b64decode(tools.call("Page.captureScreenshot", format="png")["data"])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _only_local(requests: list[str]) -> list[str]:
    return [u for u in requests if not (u.startswith("file:") or u.startswith("data:"))]


@pytest.fixture(scope="module")
def hostile_report(tmp_path_factory):
    """A collapse report whose never-predicted class is named like an XSS payload (from a predictions file)."""
    root = tmp_path_factory.mktemp("hostile")
    gold = np.repeat([0, 1, 2], [60, 20, 20])
    probs = np.tile([0.8, 0.1, 0.1], (100, 1))
    probs[:60] = [0.7, 0.1, 0.2]
    probs[80:] = [0.2, 0.1, 0.7]  # 'business' is recognised: only the hostile class collapses
    frame = pd.DataFrame({"gold": [["sports", EVIL, "business"][g] for g in gold],
                          "prob_sports": probs[:, 0], f"prob_{EVIL}": probs[:, 1], "prob_business": probs[:, 2]})
    frame.to_csv(root / "preds.csv", index=False)
    here = os.getcwd()
    os.chdir(root)
    try:
        code = main(["--predictions", "preds.csv", "--out", "out", "--quiet", "--format", "html"])
    finally:
        os.chdir(here)
    assert code == 1
    return root / "out" / "report.html"


def test_the_detectors_see_requests_and_console_errors(browser, tmp_path):
    """A control page: without this the checks below could pass because nothing is recorded."""
    page = tmp_path / "control.html"
    page.write_text('<!DOCTYPE html><html><body><p>control</p><img src="http://example.com/x.png">'
                    '<script>console.error("boom")</script></body></html>')
    seen = visit(browser, page)
    assert _only_local(seen["requests"]) == ["http://example.com/x.png"]
    assert [e["args"][0]["value"] for e in seen["console_errors"]] == ["boom"]


def test_the_report_renders_offline_with_the_verdict_on_top(browser, hostile_report):
    html = hostile_report.read_text()
    assert not re.findall(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", html, re.I)
    assert "default-src 'none'" in re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html).group(1)
    seen = visit(browser, hostile_report)
    assert _only_local(seen["requests"]) == []
    assert seen["console_errors"] == [] and seen["exceptions"] == [] and seen["log_errors"] == []
    verdict = browser.evaluate("""(() => { const v = document.getElementById('verdict');
        const r = v.getBoundingClientRect();
        return {text: v.innerText, top: r.top, bottom: r.bottom, width: r.width}; })()""")
    assert verdict["text"].startswith(f"COLLAPSE: {EVIL} never predicted")
    assert 0 <= verdict["top"] < 60 and verdict["bottom"] < 300 and verdict["width"] > 600
    images = browser.evaluate("""Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0])""")
    assert dict(images) == {name: True for name in ("prior_vs_predicted.png", "recall_by_class.png",
                                                    "confusion_matrix.png", "confidence_by_class.png",
                                                    "reliability.png")}
    pixels = screenshot(browser)
    assert pixels.shape[:2] == (900, 1200)
    assert pixels.astype(float).std() > 20  # not a blank page
    top = pixels[: int(verdict["bottom"]) + 1]
    red = (np.abs(top.astype(int) - COLLAPSE_RED).sum(axis=2) < 12).mean()
    assert red > 0.3  # the verdict banner fills the top of the screenshot


def test_a_hostile_label_shows_as_text(browser, hostile_report):
    seen = visit(browser, hostile_report)
    assert seen["dialogs"] == []  # alert(1) never ran
    found = browser.evaluate(f"""(() => ({{
        handlers: document.querySelectorAll('[onerror], [onload], script').length,
        injected: Array.from(document.images).filter(i => i.getAttribute('src') === 'x').length,
        textHits: document.body.innerText.split({json.dumps(EVIL)}).length - 1 }}))()""")
    assert (found["handlers"], found["injected"]) == (0, 0)
    assert found["textHits"] >= 3  # verdict, per-class table, findings: shown as text
    assert "&lt;img src=x onerror=alert(1)&gt;" in hostile_report.read_text()


def test_the_model_report_renders_without_errors(browser, collapsed_report):
    seen = visit(browser, collapsed_report["out"] / "report.html")
    assert _only_local(seen["requests"]) == []
    assert seen["console_errors"] == [] and seen["exceptions"] == [] and seen["log_errors"] == []
    text = browser.evaluate("document.body.innerText")
    assert text.startswith("COLLAPSE: politics, business never predicted")
    for heading in ("Findings", "Per class", "Calibration", "Plots"):
        assert f"\n{heading}\n" in text
    assert browser.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)") is True
