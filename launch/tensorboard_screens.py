"""Screenshots of TensorBoard's dashboards for a runs folder, taken in headless Chromium.

    python launch/tensorboard_screens.py RUNS_DIR [OUT_DIR]     (or: bash launch/tensorboard_screens.sh ...)

Serves TensorBoard on 127.0.0.1 (a free port), waits until it has read the runs, and drives
Debian's Chromium through the DevTools protocol over a pipe (``--remote-debugging-pipe``: no port,
no extra package). TensorBoard's pages are single-page apps, so each page is screenshotted only once
its spinners are gone and its layout has stopped changing. TensorBoard is stopped at the end, also on
errors and Ctrl-C. Writes OUT_DIR/NN-<view>.png (default OUT_DIR: RUNS_DIR/screens) and prints the paths.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pipeline.errors import UsageError

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WIDTH, HEIGHT = 1400, 2400


class ScreensError(UsageError):
    """A problem the user can fix: a missing browser, an empty runs folder, TensorBoard not starting."""


@dataclass(frozen=True)
class View:
    """One screenshot: a file name, the page's URL (relative to TensorBoard's root) and what to do first."""

    name: str
    url: str
    plugin: str  # TensorBoard's plugin name; the view is skipped when the plugin has no data
    action: str = ""  # JavaScript run after the page settles (e.g. expanding groups), then it settles again


# Time series: each tag group's header is a button.group-toolbar whose icon is expand_less while the
# group is open (TensorBoard opens the first two groups, in its sort order, on first load). Closing every
# open one shows the whole list of groups with their card counts, in the order a user meets them.
COLLAPSE_ALL = """
(() => {
  const open = [...document.querySelectorAll('metrics-card-group-toolbar-component button.group-toolbar')]
    .filter(b => b.querySelector('mat-icon[svgIcon="expand_less_24px"]'));
  open.forEach(b => b.click());
  return open.length;
})()
"""

VIEWS = (
    View("timeseries", "/#timeseries", "timeseries"),
    View("timeseries-groups", "/#timeseries", "timeseries", COLLAPSE_ALL),
    View("timeseries-loss", "/?tagFilter=" + quote("^Loss/") + "#timeseries", "timeseries"),
    View("scalars", "/#scalars", "scalars"),
    View("images", "/#images", "images"),
    View("text", "/#text", "text"),
    View("projector", "/#projector", "projector"),
    View("hparams", "/#hparams", "hparams"),
    View("custom-scalars", "/#custom_scalars", "custom_scalars"),
)

# The page has settled when no spinner or progress bar is showing; the caller also waits for the
# document's height and element count to stay put for a while.
BUSY = """
(() => {
  const busy = document.querySelectorAll(
    'mat-spinner, mat-progress-spinner, mat-progress-bar, paper-spinner[active], .loading-spinner');
  let visible = 0;
  busy.forEach(e => { if (e.offsetParent !== null) visible += 1; });
  return JSON.stringify([visible, document.querySelectorAll('*').length,
                         document.documentElement.scrollHeight, document.readyState]);
})()
"""


def find_chromium() -> str:
    """The Chromium executable: $CHROMIUM, else the first of CHROMIUM_NAMES on PATH."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        if shutil.which(explicit) is None:
            raise ScreensError(f"CHROMIUM={explicit} is not an executable; unset it or point it at chromium")
        return str(shutil.which(explicit))
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    raise ScreensError(
        "no Chromium on PATH (looked for " + ", ".join(CHROMIUM_NAMES) + "); install Debian's package "
        "with `sudo apt-get install chromium`, or set CHROMIUM=/path/to/chrome"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def tensorboard_command(runs: Path, port: int) -> list[str]:
    """The venv's TensorBoard on localhost only; it reads every event file before it answers /data/runs."""
    exe = Path(sys.executable).with_name("tensorboard")
    head = [str(exe)] if exe.exists() else [sys.executable, "-m", "tensorboard.main"]
    return [
        *head,
        "--logdir",
        str(runs),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--reload_interval",
        "2",
    ]


def start_tensorboard(runs: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as f:
        return subprocess.Popen(
            tensorboard_command(runs, port), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_for_tensorboard(
    proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float
) -> dict[str, Any]:
    """Wait until TensorBoard answers and lists runs; returns its plugins listing."""
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    runs: list[str] = []
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ScreensError(f"TensorBoard exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            runs = get_json(base + "/data/runs")
            if runs:
                time.sleep(2.0)  # one more reload so every run's tags are in
                return get_json(base + "/data/plugins_listing")
        except OSError:
            pass
        time.sleep(0.5)
    detail = "it answers but lists no runs" if port_open(port) else "it does not answer"
    raise ScreensError(f"TensorBoard on port {port} not ready after {timeout:.0f} s ({detail}); see {log}")


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    """Stop a process group we started: SIGTERM, then SIGKILL after 5 s."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    except ProcessLookupError:
        pass


class DevTools:
    """Chromium driven over --remote-debugging-pipe: NUL-terminated JSON on fds 3 (in) and 4 (out)."""

    def __init__(self, chromium: str, profile: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def wire_fds() -> None:  # in the child: its fd 3 reads our commands, its fd 4 writes replies
            # Copy both ends first, so that moving one onto 3 or 4 cannot overwrite the other.
            commands, replies = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(commands, 3)
            os.dup2(replies, 4)
            os.set_inheritable(3, True)
            os.set_inheritable(4, True)

        args = [
            chromium,
            "--headless=new",
            "--remote-debugging-pipe",
            "--no-sandbox",  # containers run as root, where Chromium's sandbox refuses to start
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={WIDTH},{HEIGHT}",
            "about:blank",
        ]
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=wire_fds,
            close_fds=False,  # Python's own fds are close-on-exec anyway; 3 and 4 must survive the exec
            start_new_session=True,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._next_id = 0
        self._buffer = b""

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> Any:
        """Send one command and return its result (events that arrive meanwhile are dropped)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        try:
            os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        except BrokenPipeError:
            raise ScreensError(f"Chromium closed the DevTools pipe (exit code {self.proc.poll()})") from None
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise ScreensError(f"Chromium refused {method}: {reply['error']}")
                return reply.get("result", {})

    def _read(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise ScreensError(f"Chromium closed the DevTools pipe (exit code {self.proc.poll()})")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def evaluate(self, expression: str, session: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
        return result.get("result", {}).get("value")

    def close(self) -> None:
        with contextlib.suppress(OSError, ScreensError):
            self.call("Browser.close")
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def settle(tools: DevTools, session: str, timeout: float, quiet: float = 2.0) -> None:
    """Wait until no spinner shows and the DOM's size has not changed for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        state = json.loads(tools.evaluate(BUSY, session) or '[1, 0, 0, "loading"]')
        busy, shape = state[0] > 0 or state[3] != "complete", state[1:3]
        if busy or shape != last:
            last, since = shape, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.25)


def scroll_through(tools: DevTools, session: str) -> None:
    """Scroll the page's scrolling panes top to bottom and back, so lazily loaded cards render."""
    script = """
    (() => {
      const panes = [document.scrollingElement, ...document.querySelectorAll('*')]
        .filter(e => e && e.scrollHeight > e.clientHeight + 50 &&
                ['auto', 'scroll'].includes(getComputedStyle(e).overflowY));
      panes.forEach(p => { p.scrollTop = p.scrollHeight; });
      return panes.length;
    })()
    """
    tools.evaluate(script, session)
    time.sleep(1.0)
    tools.evaluate(script.replace("p.scrollTop = p.scrollHeight", "p.scrollTop = 0"), session)


def screenshot(tools: DevTools, base: str, view: View, out: Path, timeout: float) -> Path:
    """Open one view in a fresh tab, let it settle, run its action, and write the PNG."""
    target = tools.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = tools.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    try:
        metrics = {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False}
        tools.call("Emulation.setDeviceMetricsOverride", metrics, session)
        tools.call("Page.enable", {}, session)
        tools.call("Page.navigate", {"url": base + view.url}, session)
        settle(tools, session, timeout)
        if view.action:
            tools.evaluate(view.action, session)
            settle(tools, session, timeout)
        scroll_through(tools, session)
        settle(tools, session, timeout)
        png = tools.call("Page.captureScreenshot", {"format": "png"}, session)["data"]
        out.write_bytes(base64.b64decode(png))
        return out
    finally:
        with contextlib.suppress(ScreensError):  # a dead browser has already said so
            tools.call("Target.closeTarget", {"targetId": target})


def has_data(view: View, runs: Path, port: int, plugins: dict[str, Any]) -> bool:
    """Whether the view's plugin has something to show. The projector decides in a background thread
    (its listing says disabled at first), so a projector_config.pbtxt on disk counts too."""
    if view.plugin == "timeseries":
        return True
    if not plugins.get(view.plugin, {}).get("enabled"):
        plugins.update(get_json(f"http://127.0.0.1:{port}/data/plugins_listing"))
    if view.plugin == "projector" and any(runs.rglob("projector_config.pbtxt")):
        return True
    return bool(plugins.get(view.plugin, {}).get("enabled"))


def take_screens(runs: Path, out: Path, timeout: float = 60.0, views: tuple[View, ...] = VIEWS) -> list[Path]:
    """Serve TensorBoard for `runs`, screenshot every view whose plugin has data, stop TensorBoard."""
    if not runs.is_dir():
        raise ScreensError(
            f"runs folder {runs} does not exist; pass the folder given to --out (or its parent)"
        )
    if not any(runs.rglob("events.out.tfevents.*")):
        raise ScreensError(f"no TensorBoard event files under {runs}; run a recipe with --out under it first")
    chromium = find_chromium()
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = out / "tensorboard.log"
    tensorboard = tools = None
    written: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="tb-screens-") as profile:
        try:
            tensorboard = start_tensorboard(runs, port, log)
            plugins = wait_for_tensorboard(tensorboard, port, log, timeout)
            print(
                f"TensorBoard for {runs} at http://127.0.0.1:{port} (pid {tensorboard.pid})", file=sys.stderr
            )
            tools = DevTools(chromium, Path(profile))
            for view in views:
                if not has_data(view, runs, port, plugins):
                    print(
                        f"skipped {view.name}: TensorBoard's {view.plugin} plugin has no data",
                        file=sys.stderr,
                    )
                    continue
                path = (
                    out / f"{VIEWS.index(view) + 1:02d}-{view.name}.png"
                )  # stable names, whatever is skipped
                written.append(screenshot(tools, f"http://127.0.0.1:{port}", view, path, timeout))
        finally:
            if tools is not None:
                tools.close()
            stop(tensorboard)
    return written


def select_views(names: str) -> tuple[View, ...]:
    """The views named in a comma-separated list, in VIEWS's order."""
    wanted = {n.strip() for n in names.split(",") if n.strip()}
    known = {v.name for v in VIEWS}
    unknown = sorted(wanted - known)
    if unknown:
        raise ScreensError(
            f"--views: unknown view {', '.join(unknown)}; choose from {', '.join(sorted(known))}"
        )
    return tuple(v for v in VIEWS if v.name in wanted)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, help="the folder to serve (TensorBoard's --logdir)")
    parser.add_argument("out", type=Path, nargs="?", help="where the PNGs go (default: RUNS/screens)")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for TensorBoard and each page"
    )
    names = ",".join(v.name for v in VIEWS)
    parser.add_argument(
        "--views", default=names, help=f"comma-separated views to take (default: all of {names})"
    )
    args = parser.parse_args(argv)
    # SIGTERM (the shell wrapper's trap, a job scheduler) becomes SystemExit, so the finally blocks
    # that stop TensorBoard and Chromium still run.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        paths = take_screens(
            args.runs, args.out or args.runs / "screens", args.timeout, select_views(args.views)
        )
    except ScreensError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
