"""Output folders: one writer, one whole run, earlier results back after a failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from netcarve.cli.run_folder import OutputFolderError, manifest_name, run_folder


def _tree(root: Path) -> dict[str, str]:
    """Every non-control file under ``root`` with its content."""
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith((".netcarve", "netcarve-run-"))
            and ".netcarve-previous" not in p.parts}


def _manifest(out: Path, name: str = "cmd") -> dict:
    return json.loads((out / manifest_name(name)).read_text())


def _run(out: Path, files: dict[str, str], *, name: str = "cmd", fail: BaseException | None = None,
         **kw) -> None:
    with run_folder(out, f"netcarve {name}", name=name, **kw) as folder:
        for rel, text in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_text(text)
        if fail is not None:
            raise fail


def test_a_second_run_replaces_the_first_and_never_mixes(tmp_path):
    out = tmp_path / "out"
    _run(out, {"summary.json": "1", "a.csv": "1", "sub/plot.png": "1"})
    first = _manifest(out)
    assert first["status"] == "complete" and first["files"] == ["a.csv", "sub/plot.png",
                                                                 "summary.json"]
    # The second run writes fewer files: the first run's extra ones must not stay behind.
    _run(out, {"summary.json": "2"})
    assert _tree(out) == {"summary.json": "2"}
    second = _manifest(out)
    assert second["files"] == ["summary.json"] and second["replaced_run"] == first["run_id"]
    assert not (out / ".netcarve-previous").exists() and not (out / "sub").exists()


@pytest.mark.parametrize("fail", [RuntimeError("boom"), KeyboardInterrupt(), SystemExit(3)])
def test_a_failed_or_interrupted_run_leaves_the_folder_as_it_was(tmp_path, fail):
    out = tmp_path / "out"
    _run(out, {"summary.json": "old", "a.csv": "old"})
    before, manifest = _tree(out), _manifest(out)
    with pytest.raises(type(fail)):
        _run(out, {"summary.json": "new", "b.csv": "new", "deep/x.txt": "new"}, fail=fail)
    assert _tree(out) == before
    assert _manifest(out) == manifest


def test_a_failed_first_run_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        _run(out, {"summary.json": "x"}, fail=RuntimeError())
    assert not out.exists()  # the folder it created is removed again
    nested = tmp_path / "a" / "b" / "c"
    with pytest.raises(KeyboardInterrupt):
        _run(nested, {"x": "1"}, fail=KeyboardInterrupt())
    assert not (tmp_path / "a").exists()


def test_a_successful_exit_zero_counts_as_success(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        _run(out, {"summary.json": "x"}, fail=SystemExit(0))
    assert _tree(out) == {"summary.json": "x"} and _manifest(out)["status"] == "complete"


def test_files_of_other_commands_and_of_the_user_are_left_alone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _run(out, {"circuit.safetensors": "c1"}, name="extract")
    _run(out, {"diagram.html": "d1"}, name="diagram")
    _run(out, {"diagram.html": "d2"}, name="diagram")
    assert _tree(out) == {"notes.txt": "mine", "circuit.safetensors": "c1", "diagram.html": "d2"}
    _run(out, {"notes.txt": "overwritten"}, name="extract")
    manifest = _manifest(out, "extract")
    assert manifest["overwrote"] == ["notes.txt"] and "circuit.safetensors" not in _tree(out)


def test_an_input_inside_the_folder_stays_where_the_command_reads_it(tmp_path):
    out = tmp_path / "out"
    _run(out, {"model.safetensors": "w1", "summary.json": "1"})
    seen = []
    with run_folder(out, "netcarve cmd", name="cmd", inputs=[out / "model.safetensors"]):
        seen.append((out / "model.safetensors").read_text())
        (out / "summary.json").write_text("2")
    assert seen == ["w1"] and _tree(out) == {"model.safetensors": "w1", "summary.json": "2"}


def test_an_existing_file_or_unwritable_folder_is_a_clear_error(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(OutputFolderError, match="existing file; give a folder"):
        _run(target, {})
    with pytest.raises(OutputFolderError, match="a part of this path is a file"):
        _run(target / "sub", {})
    if os.geteuid() == 0:
        pytest.skip("root ignores folder permissions (the next test covers it for root)")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputFolderError, match="permission denied"):
            _run(ro, {})
        with pytest.raises(OutputFolderError, match="permission denied"):
            _run(ro / "new", {})
    finally:
        ro.chmod(0o700)


def test_permission_denied_is_a_clear_error_also_for_root(tmp_path, monkeypatch):
    # Root ignores a folder's mode bits, so the refusal is simulated where the OS would raise it.
    import netcarve.cli.run_folder as rf

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(args[0]))

    monkeypatch.setattr(rf.os, "open", denied)
    with pytest.raises(OutputFolderError, match=r"cannot write to the output folder .* "
                                                r"\(permission denied\)"):
        _run(tmp_path / "ro", {})
    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(OutputFolderError, match=r"cannot create the output folder .* "
                                                r"\(permission denied\)"):
        _run(tmp_path / "new" / "deeper", {})


def test_a_run_killed_outright_is_undone_by_the_next_one(tmp_path):
    out = tmp_path / "out"
    _run(out, {"summary.json": "old", "a.csv": "old"})
    script = textwrap.dedent(f"""
        import os, pathlib
        from netcarve.cli.run_folder import run_folder
        with run_folder({str(out)!r}, "netcarve cmd", name="cmd") as out:
            (out / "summary.json").write_text("half")
            (out / "partial.bin").write_text("half")
            os._exit(9)  # no clean-up runs, as after SIGKILL
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert _manifest(out)["status"] == "running"
    # The next run first restores the results from before the killed run, then replaces them.
    with run_folder(out, "netcarve cmd", name="cmd") as folder:
        assert sorted(_tree(folder)) == []  # old results are set aside, the half-run is gone
        (folder / "summary.json").write_text("new")
    assert _tree(out) == {"summary.json": "new"}


def test_a_resumable_run_keeps_earlier_and_partial_results(tmp_path):
    out = tmp_path / "out"
    _run(out, {"unit_0.json": "done"}, resumable=True)
    with pytest.raises(KeyboardInterrupt):
        _run(out, {"unit_1.json": "done"}, resumable=True, fail=KeyboardInterrupt())
    assert _tree(out) == {"unit_0.json": "done", "unit_1.json": "done"}
    assert _manifest(out)["status"] == "interrupted"
    _run(out, {"unit_2.json": "done"}, resumable=True)
    assert _manifest(out)["files"] == ["unit_0.json", "unit_1.json", "unit_2.json"]


def test_a_resumable_run_that_fails_before_writing_leaves_nothing(tmp_path):
    out = tmp_path / "new" / "out"
    with pytest.raises(ValueError):
        _run(out, {}, resumable=True, fail=ValueError("unknown layer"))
    assert not (tmp_path / "new").exists()  # the folders it created are gone too
    kept = tmp_path / "kept"
    _run(kept, {"unit_0.json": "done"}, resumable=True)
    before = _manifest(kept)
    with pytest.raises(ValueError):
        _run(kept, {}, resumable=True, fail=ValueError("unknown layer"))
    assert _tree(kept) == {"unit_0.json": "done"} and _manifest(kept) == before


def test_two_writers_at_once_the_second_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "out"
    ready = tmp_path / "ready"
    script = textwrap.dedent(f"""
        import pathlib, time
        from netcarve.cli.run_folder import run_folder
        with run_folder({str(out)!r}, "netcarve first --out x", name="cmd") as out:
            pathlib.Path({str(ready)!r}).write_text("1")
            time.sleep(30)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 60
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.05)
        assert ready.exists()
        with pytest.raises(OutputFolderError, match=r"another netcarve run is writing to .*"
                                                     r"pid \d+: netcarve first --out x"):
            _run(out, {"summary.json": "second"})
        assert _tree(out) == {}
    finally:
        holder.kill()
        holder.wait()
    # The lock dies with its process: the folder is usable again at once.
    _run(out, {"summary.json": "third"})
    assert _tree(out) == {"summary.json": "third"}


def test_manifest_entries_outside_the_folder_are_ignored(tmp_path):
    out = tmp_path / "out"
    outside = tmp_path / "precious.txt"
    outside.write_text("keep")
    _run(out, {"summary.json": "1"})
    manifest = _manifest(out)
    manifest["files"] += ["../precious.txt", "/etc/passwd", ""]
    (out / manifest_name("cmd")).write_text(json.dumps(manifest))
    _run(out, {"summary.json": "2"})
    assert outside.read_text() == "keep" and _tree(out) == {"summary.json": "2"}
