"""Load a local HTML file in real headless Chromium and report what a person would see.

Stdlib only: it speaks the Chrome DevTools protocol over `--remote-debugging-pipe`, where the browser
reads NUL-terminated JSON commands on its fd 3 and writes NUL-terminated JSON responses and events on
its fd 4. Used by the tests of the HTML report:

    page = load_page(Path("report.html"), screenshot=tmp_path / "report.png")
    assert page.console_errors == []
    assert all(img["complete"] and img["natural_width"] > 0 for img in page.images)

Needs a Chromium binary (`apt-get install chromium`), or set OPDISTILL_CHROMIUM to one.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")

CHROMIUM_FLAGS = (
    "--headless=new",
    "--remote-debugging-pipe",
    "--no-sandbox",  # root in a container has no usable sandbox
    "--disable-dev-shm-usage",  # /dev/shm is small in containers
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--mute-audio",
    "--hide-scrollbars",
    "--window-size=1280,2000",
)

# Waits for every <img> to be decoded (a broken one counts as done); lazy images are made eager first,
# since a person scrolling down would see them too.
WAIT_FOR_IMAGES_JS = """
Promise.all(Array.from(document.images, (img) => {
  if (img.loading === "lazy") img.loading = "eager";
  return img.decode().catch(() => null);
})).then(() => document.images.length)
"""

COLLECT_JS = """
({
  title: document.title,
  text: document.body ? document.body.innerText : "",
  images: Array.from(document.images, (img) => ({
    alt: img.alt,
    complete: img.complete,
    natural_width: img.naturalWidth,
    natural_height: img.naturalHeight,
    src_prefix: img.src.slice(0, 40),
  })),
})
"""


@dataclass
class PageLoad:
    title: str
    console_errors: list[str]  # console.error/assert, uncaught exceptions, Log entries of level "error"
    images: list[dict[str, Any]]  # one per <img>: alt, complete, natural_width, natural_height, src_prefix
    text: str  # document.body.innerText
    screenshot: Path | None  # the full-page PNG written, when asked


def find_chromium() -> str:
    """The Chromium binary: $OPDISTILL_CHROMIUM, else the first of CHROMIUM_NAMES on PATH."""
    configured = os.environ.get("OPDISTILL_CHROMIUM")
    if configured:
        found = shutil.which(configured)
        if found is None:
            raise RuntimeError(f"OPDISTILL_CHROMIUM={configured!r} is not an executable")
        return found
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found is not None:
            return found
    raise RuntimeError(f"no Chromium found (looked for {', '.join(CHROMIUM_NAMES)} on PATH and $OPDISTILL_CHROMIUM); "
                       "install it: apt-get install chromium")


class DevToolsPipe:
    """One DevTools connection over a pair of pipe fds; every wait shares one overall deadline."""

    def __init__(self, write_fd: int, read_fd: int, deadline: float, timeout: float) -> None:
        self.write_fd = write_fd
        self.read_fd = read_fd
        self.deadline = deadline
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []  # every event, in arrival order, kept for later waits
        self.responses: dict[int, dict[str, Any]] = {}
        self.next_id = 1
        self.buffer = bytearray()
        self.scanned = 0  # how much of the buffer is known to hold no NUL

    def send(self, method: str, params: dict[str, Any] | None = None, session_id: str | None = None) -> int:
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session_id is not None:
            message["sessionId"] = session_id
        self.next_id += 1
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self.write_fd, data):]
        return message["id"]

    def call(self, method: str, params: dict[str, Any] | None = None, session_id: str | None = None) -> dict[str, Any]:
        """Send a command and return its result; events arriving meanwhile are kept."""
        command_id = self.send(method, params, session_id)
        while command_id not in self.responses:
            self._read_one(f"the reply to {method}")
        response = self.responses.pop(command_id)
        if "error" in response:
            raise RuntimeError(f"DevTools {method} failed: {response['error']}")
        return response.get("result", {})

    def wait_for_event(self, method: str, session_id: str | None, since: int = 0) -> dict[str, Any]:
        """The first event `method` of that session at index >= `since` in self.events, reading until it comes."""
        index = since
        while True:
            while index < len(self.events):
                event = self.events[index]
                if event["method"] == method and event.get("sessionId") == session_id:
                    return event
                index += 1
            self._read_one(f"the event {method}")

    def _read_one(self, waiting_for: str) -> None:
        message = self._read_message(waiting_for)
        if "id" in message:
            self.responses[message["id"]] = message
        else:
            self.events.append(message)

    def _read_message(self, waiting_for: str) -> dict[str, Any]:
        while True:
            end = self.buffer.find(b"\0", self.scanned)
            if end >= 0:
                raw = bytes(self.buffer[:end])
                del self.buffer[:end + 1]
                self.scanned = 0
                return json.loads(raw)
            self.scanned = len(self.buffer)
            remaining = self.deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.read_fd], [], [], remaining)[0]:
                raise TimeoutError(f"Chromium: timed out after {self.timeout:g}s waiting for {waiting_for}")
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed the DevTools pipe (did it exit?) while we waited for {waiting_for}")
            self.buffer += chunk


def load_page(path: Path, screenshot: Path | None = None, timeout: float = 60.0) -> PageLoad:
    """Open `path` in a fresh headless Chromium, wait until it and its images have loaded, and report it.

    Raises TimeoutError (naming what it waited for) when all of it takes longer than `timeout` seconds.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(path)
    chromium = find_chromium()
    deadline = time.monotonic() + timeout
    profile = Path(tempfile.mkdtemp(prefix="opdistill-chromium-"))
    log_path = profile / "chromium.log"
    # Two pipes: we write commands into to_browser, the browser answers into from_browser. Making all four
    # fds before starting also makes sure fds 3 and 4 are taken here, so subprocess's own error pipe
    # cannot be 3 or 4 and be overwritten in the child. (os.pipe fds are not inherited by default.)
    to_browser_read, to_browser_write = os.pipe()
    from_browser_read, from_browser_write = os.pipe()

    def put_pipes_on_fds_3_and_4() -> None:  # runs in the child, between fork and exec
        # Copy both ends above 10 first, so that moving one onto 3 or 4 cannot clobber the other.
        commands = fcntl.fcntl(to_browser_read, fcntl.F_DUPFD, 10)
        answers = fcntl.fcntl(from_browser_write, fcntl.F_DUPFD, 10)
        os.dup2(commands, 3)  # os.dup2 makes the new fd inheritable
        os.dup2(answers, 4)

    process: subprocess.Popen[bytes] | None = None
    devtools: DevToolsPipe | None = None
    try:
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile / 'profile'}", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                pass_fds=(3, 4), preexec_fn=put_pipes_on_fds_3_and_4, start_new_session=True,
            )
        os.close(to_browser_read)
        os.close(from_browser_write)
        to_browser_read = from_browser_write = -1
        devtools = DevToolsPipe(to_browser_write, from_browser_read, deadline, timeout)
        try:
            return _load(devtools, path, screenshot)
        except RuntimeError as error:
            raise RuntimeError(f"{error}\nChromium's log ends with:\n{_tail(log_path)}") from error
    finally:
        for fd in (to_browser_read, from_browser_write):
            if fd >= 0:
                os.close(fd)
        if process is not None:
            _close_browser(process, devtools)
        os.close(to_browser_write)
        os.close(from_browser_read)
        shutil.rmtree(profile, ignore_errors=True)


def _load(devtools: DevToolsPipe, path: Path, screenshot: Path | None) -> PageLoad:
    target_id = devtools.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = devtools.call("Target.attachToTarget", {"targetId": target_id, "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Log"):
        devtools.call(f"{domain}.enable", session_id=session)

    navigation_start = len(devtools.events)  # a load event of the initial about:blank may come earlier
    navigation = devtools.call("Page.navigate", {"url": path.as_uri()}, session_id=session)
    if navigation.get("errorText"):
        raise RuntimeError(f"Chromium could not open {path}: {navigation['errorText']}")
    devtools.wait_for_event("Page.loadEventFired", session, since=navigation_start)
    _evaluate(devtools, session, WAIT_FOR_IMAGES_JS, "the images to decode")
    seen = _evaluate(devtools, session, COLLECT_JS, "the page's title, text and images")

    written = None
    if screenshot is not None:
        metrics = devtools.call("Page.getLayoutMetrics", session_id=session)
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = devtools.call("Page.captureScreenshot",
                             {"format": "png", "captureBeyondViewport": True, "clip": clip}, session_id=session)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        written = screenshot

    errors = []
    for event in devtools.events:
        error = _console_error(event) if event.get("sessionId") == session else None
        if error is not None:
            errors.append(error)
    return PageLoad(title=seen["title"], console_errors=errors, images=seen["images"], text=seen["text"],
                    screenshot=written)


def _evaluate(devtools: DevToolsPipe, session: str, expression: str, what: str) -> Any:
    result = devtools.call("Runtime.evaluate",
                           {"expression": expression, "awaitPromise": True, "returnByValue": True},
                           session_id=session)
    if "exceptionDetails" in result:
        raise RuntimeError(f"evaluating JavaScript for {what} failed: {result['exceptionDetails']}")
    return result["result"].get("value")


def _console_error(event: dict[str, Any]) -> str | None:
    """The error an event reports, or None for an event that is not an error."""
    params = event.get("params", {})
    if event["method"] == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
        words = [_describe(arg) for arg in params.get("args", [])]
        return f"console.{params['type']}: {' '.join(words)}"
    if event["method"] == "Runtime.exceptionThrown":
        details = params.get("exceptionDetails", {})
        description = details.get("exception", {}).get("description")
        return f"uncaught exception: {description or details.get('text', '?')}"
    if event["method"] == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
        entry = params["entry"]
        where = f" ({entry['url']})" if entry.get("url") else ""
        return f"{entry.get('source', 'log')}: {entry.get('text', '')}{where}"
    return None


def _describe(remote_object: dict[str, Any]) -> str:
    """A console argument as text, the way DevTools prints it."""
    if "value" in remote_object:
        value = remote_object["value"]
        return value if isinstance(value, str) else json.dumps(value)
    return str(remote_object.get("unserializableValue") or remote_object.get("description") or remote_object["type"])


def _close_browser(process: subprocess.Popen[bytes], devtools: DevToolsPipe | None) -> None:
    """Ask the browser to quit; if it has not within a few seconds, end its whole process group."""
    if devtools is not None and process.poll() is None:
        with contextlib.suppress(OSError):
            devtools.send("Browser.close")
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
    if process.poll() is None:
        _signal_group(process, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
    _signal_group(process, signal.SIGKILL)  # the browser, if still there, and any helper it left behind
    process.wait()


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)  # started with start_new_session, so its group id is its pid


def _tail(log_path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
