"""Ctrl-C during a long command: one line, exit 130, and the output folder as it was before."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netcarve.cli.run_folder import manifest_name, run_folder

pytestmark = pytest.mark.slow

# Each command runs for minutes when left alone; the test interrupts it a moment after it has
# locked its output folder (the lock file names the process once the run has started).
COMMANDS = {
    "sweep": ["sweep", "fmnist_vgg", "--units-per-layer", "20", "--images", "500"],
    "car": ["car", "fmnist_vgg", "--prune", "0.5"],
    "reproduce-car": ["reproduce", "car"],
}


def _start(argv: list[str], out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", "from netcarve.cli import main; main()", *argv,
         "--out", str(out), "--device", "cpu"] if argv[0] != "reproduce" else
        [sys.executable, "-c", "from netcarve.cli import main; main()", *argv,
         "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_until_running(proc: subprocess.Popen, out: Path, seconds: float = 90) -> None:
    lock = out / ".netcarve.lock"
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        if lock.is_file() and lock.read_text().startswith(f"pid {proc.pid}"):
            return
        time.sleep(0.05)
    raise AssertionError(f"the command did not start: {proc.communicate()}")


def _earlier_run(out: Path, name: str) -> dict[str, str]:
    """Results of an earlier, finished run of the same command in ``out``."""
    files = {"summary.json": json.dumps({"run": "earlier"}), "scores.csv": "a,b\n1,2\n"}
    with run_folder(out, "netcarve earlier", name=name):
        for rel, text in files.items():
            (out / rel).write_text(text)
    return files


@pytest.mark.parametrize("name", list(COMMANDS))
def test_ctrl_c_is_one_line_exit_130_and_restores_the_folder(tmp_path, name):
    out = tmp_path / "out"
    earlier = _earlier_run(out, name)
    manifest = (out / manifest_name(name)).read_text()
    proc = _start(COMMANDS[name], out)
    _wait_until_running(proc, out)
    time.sleep(1.5)  # inside the model / data loading or the computation itself
    assert proc.poll() is None, "the command ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "error: interrupted"
    assert "Traceback" not in stderr
    # Nothing half-written remains and the earlier results are back, untouched.
    files = {p.relative_to(out).as_posix(): p.read_text() for p in out.rglob("*")
             if p.is_file() and p.name != ".netcarve.lock"
             and not p.name.startswith("netcarve-run-")}
    assert files == earlier
    assert (out / manifest_name(name)).read_text() == manifest


def test_ctrl_c_in_a_new_folder_leaves_no_folder(tmp_path):
    out = tmp_path / "new" / "out"
    proc = _start(COMMANDS["sweep"], out)
    _wait_until_running(proc, out)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and stderr.strip().splitlines()[-1] == "error: interrupted"
    assert not (tmp_path / "new").exists()
