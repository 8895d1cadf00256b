"""The atlas on a real local Ray cluster (2 workers): the same rows as in one process, a
worker killed mid-run (Ray retries its task; every unit ends up stored exactly once), and a
driver interrupted with Ctrl-C (a consistent store that the same command resumes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("pyarrow")

from netcarve.atlas import AtlasConfig, AtlasStore, atlas_query, run_atlas
from netcarve.training.evaluation import analysis_data
from netcarve.zoo import load_model

pytestmark = pytest.mark.slow

LAYER = "features.4"
ARGS = ["--layers", LAYER, "--images", "64", "--heldout", "64", "--car-images", "100",
        "--featureviz-steps", "8", "--workers", "2", "--task-units", "1"]


def _cli(out: Path, units: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "netcarve.cli", "atlas", "fmnist_vgg",
                             *ARGS, "--units", units, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ}, start_new_session=True)


def _task_pids() -> list[int]:
    """Ray worker processes executing an atlas unit task (their title is the task's name)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if cmdline.read_bytes().startswith(b"ray::_unit_job"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def _store_is_whole(out: Path) -> list[tuple[str, int]]:
    """Every stored row is readable and its unit's files are there; returns (layer, unit)s."""
    store = AtlasStore(out)
    assert not list(out.glob("store/**/*.tmp")) and not list(out.glob("units/**/*.tmp"))
    rows = store.rows()
    for r in rows:
        folder = out / "units" / r["layer"] / f"{r['unit']:05d}"
        assert (folder / "circuit.safetensors").exists() and (folder / "diagram.html").exists()
    return [(r["layer"], r["unit"]) for r in rows]


def test_ray_rows_equal_the_in_process_rows(tmp_path):
    lm = load_model("fmnist_vgg")
    s, h = analysis_data(lm.preset, 64, 64)
    config = AtlasConfig(featureviz_steps=8, examples=3)
    runs = {}
    for workers in (0, 2):
        run = run_atlas(lm.model, LAYER, tmp_path / str(workers), s, h, units="0,1,2,3",
                        config=config, workers=workers, task_units=2, progress=False)
        assert (run.mapped, run.failed, run.workers) == (4, [], workers)
        runs[workers] = AtlasStore(tmp_path / str(workers)).rows()
    for a, b in zip(runs[0], runs[2], strict=True):
        assert (a["unit"], a["keep"], a["kept_kernels"]) == (b["unit"], b["keep"],
                                                             b["kept_kernels"])
        # other thread counts may round differently: preservation agrees to float32 noise
        assert a["pearson"] == pytest.approx(b["pearson"], abs=1e-5)


def test_a_killed_worker_loses_nothing(tmp_path):
    out = tmp_path / "atlas"
    proc = _cli(out, "0,1,2,3,4,5")
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and time.monotonic() < deadline and proc.poll() is None:
        pids = _task_pids()
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed = pids[0]
        time.sleep(0.05)
    _stdout, stderr = proc.communicate(timeout=300)
    assert killed is not None, "no unit task was ever seen running"
    assert proc.returncode == 0, stderr
    units = _store_is_whole(out)
    assert units == [(LAYER, u) for u in range(6)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mapped"] == 6 and summary["failed"] == []
    assert atlas_query(out, "SELECT count(*), count(DISTINCT unit) FROM units").rows == [(6, 6)]


def test_an_interrupted_driver_leaves_a_store_the_same_command_resumes(tmp_path):
    out = tmp_path / "atlas"
    units = "0,1,2,3,4,5,6,7"
    proc = _cli(out, units)
    store = AtlasStore(out)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if store.done_units(LAYER):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    done = _store_is_whole(out)
    assert 1 <= len(done) < 8
    assert (out / "index.html").exists()  # the pages show what was finished
    again = _cli(out, units)
    stdout, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr
    assert f"{len(done)} already there" in stdout
    assert _store_is_whole(out) == [(LAYER, u) for u in range(8)]
    assert atlas_query(out, "SELECT count(*), count(DISTINCT unit) FROM units").rows == [(8, 8)]


_HEAD = """
import sys, time, ray
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the test closes our stdin
ray.shutdown()
"""


def test_joining_a_running_cluster_with_address(tmp_path):
    import secrets

    # Ray authenticates every client of a cluster: the head and the driver share a token the
    # way a user's cluster would (Ray's RAY_AUTH_TOKEN convention).
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    head = subprocess.Popen([sys.executable, "-c", _HEAD], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env)
    try:
        address = head.stdout.readline().strip()
        assert ":" in address, "the head did not start"
        out = tmp_path / "atlas"
        proc = subprocess.run(
            [sys.executable, "-m", "netcarve.cli", "atlas", "fmnist_vgg", *ARGS[:-4],
             "--address", address, "--units", "0,1", "--out", str(out)],
            capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr
        assert _store_is_whole(out) == [(LAYER, 0), (LAYER, 1)]
        assert f"on the Ray cluster at {address}" in proc.stderr
        # the driver joined the head's cluster: the head is still up after the run
        assert head.poll() is None
    finally:
        head.stdin.close()
        head.wait(timeout=60)
