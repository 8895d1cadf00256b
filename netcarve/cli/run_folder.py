"""Output folders that always hold one whole run: a lock, a manifest and a way back.

A command that writes into ``--out`` runs inside :func:`run_folder`, which promises:

* **One writer.** The folder is locked (``flock`` on ``.netcarve.lock``) for the whole run; a
  second process pointed at the same folder stops at once with a message naming the first.
* **Never a mix of two runs.** Each command keeps a manifest, ``netcarve-run-<command>.json``
  (``netcarve-run-extract.json``, ``netcarve-run-reproduce-car.json``, ...). The files the
  command's previous run listed there are moved aside before the new run writes anything.
  When the run succeeds they are deleted and the manifest lists the new run's files (and
  which earlier run they replaced); when it fails
  or is interrupted, every file it wrote is removed and the previous results are put back, so
  the folder is exactly as it was. A run killed outright (``SIGKILL``, power loss) leaves its
  manifest marked ``running``; the next run into the folder undoes it first.
* **Other files are left alone.** Results of other commands in the same folder (a diagram
  drawn next to the circuit it shows) and files that no netcarve manifest lists (your own notes, or
  results of a netcarve older than the manifest) are never moved or deleted; when the run
  overwrites one, the manifest says so under ``overwrote``.

Resumable commands pass ``resumable=True``: earlier results stay in place (the command skips
what is done), and an interrupted run keeps what it finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from netcarve.core.errors import NetcarveError

__all__ = ["OutputFolderError", "manifest_name", "run_folder"]

_LOCK = ".netcarve.lock"
_PREVIOUS = ".netcarve-previous"


def manifest_name(command: str) -> str:
    """The manifest file of ``command`` (``"extract"`` -> ``netcarve-run-extract.json``)."""
    return f"netcarve-run-{command}.json"


def _is_control(rel: str) -> bool:
    return rel == _LOCK or (rel.startswith("netcarve-run-") and
                            (rel.endswith(".json") or rel.endswith(".json.tmp")))


class OutputFolderError(NetcarveError):
    """The output folder cannot be used: it is a file, not writable, or in use by another run."""

    exit_code = 3


def _files(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every file under ``root`` except the control files: relative path -> (inode, size, mtime)."""
    found: dict[str, tuple[int, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir == Path("."):
            dirnames[:] = [d for d in dirnames if d != _PREVIOUS]
        for name in filenames:
            rel = (rel_dir / name).as_posix()
            if _is_control(rel):
                continue
            st = os.stat(os.path.join(dirpath, name))
            found[rel] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return found


def _read_manifest(out: Path, name: str) -> dict[str, Any] | None:
    try:
        data = json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_manifest(out: Path, name: str, data: dict[str, Any] | None) -> None:
    path = out / name
    if data is None:
        path.unlink(missing_ok=True)
        return
    tmp = out / (name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _safe_rel(rel: Any) -> bool:
    """A manifest entry is only trusted when it stays inside the folder."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel:
        return False
    return ".." not in Path(rel).parts


def _remove_empty_dirs(root: Path) -> None:
    for dirpath, _, _ in sorted(os.walk(root), key=lambda w: -len(w[0])):
        if Path(dirpath) != root:
            with contextlib.suppress(OSError):  # not empty: it holds files of others
                os.rmdir(dirpath)


def _move(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)


def _undo(out: Path, keep: set[str]) -> None:
    """Delete files not in ``keep`` and move the set-aside previous results back."""
    for rel in _files(out):
        if rel not in keep:
            (out / rel).unlink(missing_ok=True)
    previous = out / _PREVIOUS
    if previous.is_dir():
        for rel in _files(previous):
            _move(previous / rel, out / rel)
        shutil.rmtree(previous, ignore_errors=True)
    _remove_empty_dirs(out)


class _Lock:
    """An exclusive, non-blocking ``flock`` on the folder's lock file (released on exit, also
    when the process dies)."""

    def __init__(self, out: Path, command: str) -> None:
        self.path = out / _LOCK
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError:
            raise OutputFolderError(
                f"cannot write to the output folder {out} (permission denied); choose a "
                "folder you can write to with --out") from None
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking, the rest still holds
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 4096, 0).decode("utf-8", "replace").strip()
            os.close(self.fd)
            raise OutputFolderError(
                f"another netcarve run is writing to {out} ({holder or 'process unknown'}); "
                "wait for it to finish or choose another --out") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()}: {command}"[:4000].encode(), 0)

    def release(self) -> None:
        try:
            os.ftruncate(self.fd, 0)
        finally:
            os.close(self.fd)


def _recover(out: Path, name: str, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """Undo a run that was killed before it could clean up; return the manifest before it."""
    before = manifest.get("before")
    keep = {r for r in before if _safe_rel(r)} if isinstance(before, list) else set(_files(out))
    _undo(out, keep)
    earlier = manifest.get("previous_manifest")
    earlier = earlier if isinstance(earlier, dict) else None
    _write_manifest(out, name, earlier)
    return earlier


@contextmanager
def run_folder(out: str | Path, command: str, *, name: str, resumable: bool = False,
               inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Run a command that writes into ``out`` so the folder ends up holding one whole run.

    Args:
        out: the output folder (created if missing, parents included).
        command: the command line, recorded in the manifest and shown to a second writer.
        name: the command's name (``"extract"``, ``"reproduce-car"``): each command keeps its
            own manifest, so results of several commands can share a folder.
        resumable: keep earlier results in place and keep partial results on failure (for
            commands that skip finished work when re-run).
        inputs: files or folders the command reads; an earlier result among them is left in
            place (``--weights out/car/model.safetensors --out out/car`` still finds it).

    Yields:
        ``out`` as a :class:`~pathlib.Path`, locked for this run.

    Raises:
        OutputFolderError: ``out`` is an existing file, cannot be written, or another
            netcarve process is writing to it.

    Example:
        >>> with run_folder("out/x", "netcarve extract ...", name="extract") as out:
        ...     _ = (out / "summary.json").write_text("{}")  # doctest: +SKIP
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"--out {out} is an existing file; give a folder path "
                                "(it is created when missing)")
    created = []  # the folders this run creates, innermost first, removed again on failure
    for folder in (out, *out.parents):
        if folder.exists():
            break
        created.append(folder)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputFolderError(f"--out {out}: a part of this path is a file, not a folder"
                                ) from None
    except PermissionError:
        raise OutputFolderError(f"cannot create the output folder {out} (permission denied); "
                                "choose a folder you can write to with --out") from None
    lock = _Lock(out, command)
    ok = False
    partial = False  # a resumable run that failed after writing: its results stay
    try:
        mname = manifest_name(name)
        manifest = _read_manifest(out, mname)
        if manifest is not None and manifest.get("status") == "running":
            if manifest.get("resumable") is True:
                manifest = {**manifest, "status": "interrupted"}
            else:
                manifest = _recover(out, mname, manifest)
        shutil.rmtree(out / _PREVIOUS, ignore_errors=True)
        finished = ("complete", "interrupted") if resumable else ("complete",)
        earlier = manifest if manifest is not None and manifest.get("status") in finished \
            else None
        moved: list[str] = []
        read = [Path(p).resolve() for p in inputs]
        if earlier is not None and not resumable:
            for rel in earlier.get("files", []):
                here = (out / rel).resolve() if _safe_rel(rel) else None
                if here is None or any(here == p or p in here.parents for p in read):
                    continue
                if here.is_file():
                    _move(out / rel, out / _PREVIOUS / rel)
                    moved.append(rel)
        start = _files(out)
        run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        _write_manifest(out, mname, {
            "status": "running", "run_id": run_id, "command": command, "pid": os.getpid(),
            "started": started, "resumable": resumable, "before": sorted(start),
            "previous_manifest": earlier,
        })
        try:
            yield out
            ok = True
        except SystemExit as exc:  # the CLI's error boundary exits; 0 / None is success
            ok = exc.code in (0, None)
            raise
        finally:
            now = _files(out)
            new = {r for r in now if r not in start}
            changed = {r for r in now if r in start and now[r] != start[r]}
            # A resumable run keeps what it wrote; one that failed before writing anything
            # (a bad layer name, a missing file) is undone like any other, folder included.
            partial = resumable and not ok and bool(new or changed)
            if ok or partial:
                earlier_files = set() if earlier is None else set(earlier.get("files", []))
                # An earlier result left in place belongs to this run only when resuming.
                kept = {r for r in now if r in start and now[r] == start[r]
                        and r in earlier_files} if resumable else set()
                shutil.rmtree(out / _PREVIOUS, ignore_errors=True)
                _remove_empty_dirs(out)
                _write_manifest(out, mname, {
                    "status": "complete" if ok else "interrupted", "run_id": run_id,
                    "command": command, "started": started,
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "files": sorted(new | changed | kept),
                    "overwrote": sorted(changed - earlier_files),
                    "replaced_run": None if earlier is None else earlier.get("run_id"),
                })
            else:
                _undo(out, set(start))
                _write_manifest(out, mname, earlier)
    finally:
        lock.release()
        if created and not ok and not partial and not _files(out) \
                and not any(p.name.startswith("netcarve-run-") for p in out.iterdir()
                            if p.name != mname):
            (out / _LOCK).unlink(missing_ok=True)
            for folder in created:
                try:
                    folder.rmdir()
                except OSError:
                    break
