"""launch/tensorboard_screens: TensorBoard served for a runs folder, screenshotted in headless Chromium.

The browser test needs Debian's `chromium` on PATH and skips with the reason otherwise; the
error-path tests run everywhere.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "launch"))

import tensorboard_screens as screens  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tiny_events(runs: Path) -> None:
    """One run with train and val loss, a text sample and an image, like a short pretrain."""
    import torch
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(runs / "pretrain" / "tiny" / "tb")
    for step in range(5):
        writer.add_scalar("train/loss", 4.0 - 0.5 * step, step)
        writer.add_scalar("val/loss", 4.2 - 0.4 * step, step)
    writer.add_text("samples/greedy", "To be, or not to be", 4)
    writer.add_image("attention/layer0", torch.rand(1, 16, 16), 4)
    writer.close()


def tensorboard_alive(runs: Path) -> list[int]:
    """Pids of TensorBoard processes serving `runs` (read from /proc, Linux only)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"tensorboard" in part for part in cmdline) and str(runs).encode() in cmdline:
            pids.append(int(proc.name))
    return pids


def served_port(stderr: str) -> int:
    match = re.search(r"at http://127\.0\.0\.1:(\d+)", stderr)
    assert match, f"the script did not say where TensorBoard ran:\n{stderr}"
    return int(match.group(1))


def test_missing_chromium_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CHROMIUM", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(screens.ScreensError, match="apt-get install chromium"):
        screens.find_chromium()


def test_bad_input_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(screens.ScreensError, match="does not exist"):
        screens.take_screens(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(screens.ScreensError, match="no TensorBoard event files"):
        screens.take_screens(tmp_path, tmp_path / "out")
    with pytest.raises(screens.ScreensError, match="unknown view imagez"):
        screens.select_views("timeseries,imagez")
    assert [v.name for v in screens.select_views("text, timeseries")] == ["timeseries", "text"]


def test_tensorboard_is_stopped_when_the_browser_fails(tmp_path: Path) -> None:
    """A browser that dies at once: the run fails with a clear error and TensorBoard is gone."""
    runs = tmp_path / "runs"
    tiny_events(runs)
    env = {**os.environ, "CHROMIUM": shutil.which("false") or "/bin/false"}
    done = subprocess.run(
        ["bash", str(ROOT / "launch" / "tensorboard_screens.sh"), str(runs), "--views", "timeseries"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "Chromium closed the DevTools pipe" in done.stderr
    assert not screens.port_open(served_port(done.stderr))
    assert tensorboard_alive(runs) == []


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)"
)
def test_screenshots_of_a_tiny_run(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    tiny_events(runs)
    done = subprocess.run(
        [
            "bash",
            str(ROOT / "launch" / "tensorboard_screens.sh"),
            str(runs),
            "--views",
            "timeseries,images,text",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    out = runs / "screens"
    expected = [out / "01-timeseries.png", out / "05-images.png", out / "06-text.png"]
    assert done.stdout.split() == [str(p) for p in expected]
    for png in expected:
        data = png.read_bytes()
        assert data[:8] == PNG_SIGNATURE, png
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert (width, height) == (screens.WIDTH, screens.HEIGHT), png
        assert len(data) > 20_000, f"{png} is {len(data)} bytes: a blank page?"
    assert not screens.port_open(served_port(done.stderr))
    assert tensorboard_alive(runs) == []
