"""Stopping a run the way people and schedulers do: Ctrl-C in a real terminal, and SIGTERM.

The smoke experiment runs under a pseudo-terminal (``pty.fork``: the child is a session leader
with the pty as its controlling terminal, progress bars on); once training has written a
checkpoint, ``\\x03`` written to the master makes the line discipline send SIGINT to the
foreground process group, as a keyboard would. The run must exit with 130 within seconds, say how
to resume, keep its checkpoint, and a re-run must finish with the summary of an uninterrupted run.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "experiments" / "smoke.py")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def run(out: Path):
    return subprocess.run([sys.executable, "-m", "saejax.run", SMOKE, "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    r = run(out)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


class Terminal:
    """``python -m saejax.run SMOKE --out OUT`` on a pseudo-terminal, its output collected."""

    def __init__(self, out: Path):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: session leader, the pty its controlling terminal and stdio
            try:
                os.chdir(ROOT)
                os.execve(sys.executable, [sys.executable, "-m", "saejax.run", SMOKE, "--out", str(out)], ENV)
            finally:
                os._exit(127)
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        while True:
            try:
                data = os.read(self.fd, 4096)
            except OSError:  # EIO: the child has exited and closed the terminal
                return
            if not data:
                return
            self.chunks.append(data)

    @property
    def output(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def wait(self, timeout: float) -> int | None:
        """The exit status, or None if the child still runs after ``timeout`` seconds."""
        t = time.time()
        while time.time() - t < timeout:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.reader.join(5)
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.02)
        return None

    def kill(self):
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def _unfinished_checkpoint(out: Path) -> list[Path]:
    """Finished Orbax saves of a unit that is not done."""
    return [p for p in out.glob("units/*/ckpt/group0/*")
            if p.name.isdigit() and not (p.parents[2] / "done.json").exists()]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupt_keeps_the_checkpoint_and_resumes(reference, tmp_path, how):
    out = tmp_path / "out"
    term = Terminal(out)
    try:
        t = time.time()
        while not _unfinished_checkpoint(out):  # training has started and saved
            assert term.wait(0) is None, f"the run ended before it could be interrupted:\n{term.output[-3000:]}"
            assert time.time() - t < 240, term.output[-3000:]
            time.sleep(0.02)
        sent = time.time()
        if how == "ctrl-c":
            os.write(term.fd, b"\x03")  # the terminal's line discipline turns it into SIGINT for the foreground group
        else:
            os.kill(term.pid, signal.SIGTERM)
        code = term.wait(15)
        took = time.time() - sent
    finally:
        term.kill()
    text = term.output
    assert code == 130, (code, text[-3000:])
    assert took < 10, f"took {took:.1f} s to stop"
    assert "interrupted: finished cells and the last checkpoint are kept; run the same command to resume" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    if how == "ctrl-c":
        assert "^C" in text  # echoed by the line discipline: the byte went through the terminal, not a kill()
    assert _unfinished_checkpoint(out), "the checkpoint was not kept"
    assert not (out / "summary.json").exists() and not (out / ".lock").exists()

    again = run(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text()) == reference
    assert not list(out.rglob("*.tmp"))
