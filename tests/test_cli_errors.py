"""The CLI's error boundary: files never choose code to run; bad input is one line and an exit
code; bugs keep their traceback and ask to be reported; ``--debug`` shows every traceback."""

from __future__ import annotations

import copy
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from _nets import make
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import netcarve.zoo
from netcarve.circuits.extract import extract
from netcarve.cli.diagram import diagram
from netcarve.cli.errors import EXIT_BUG, EXIT_DATA, EXIT_INTERRUPTED, classify, report
from netcarve.cli.main import cli
from netcarve.core.errors import DataError, ModelSpecError, WeightsError

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def _extracted():
    net, _ = make("plain", double=False)
    x = net.example_input(8)
    return extract(net, "features.4:1", x, keep=0.5)


@pytest.fixture
def circuit(_extracted):
    # Tests edit the header (metadata) on purpose; each gets its own copy so that no edit
    # leaks into the next test (pytest-xdist orders tests differently on every machine).
    return copy.deepcopy(_extracted)


def _run(*args: str, canary: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NETCARVE_CANARY": str(canary),
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "netcarve.cli", *args], capture_output=True,
                          text=True, timeout=300, env=env)


def test_a_circuit_file_naming_importable_code_is_refused_without_importing_it(circuit,
                                                                               tmp_path):
    circuit.metadata["model"] = "_import_canary:build"
    path = tmp_path / "hostile.safetensors"
    circuit.save(path)
    canary = tmp_path / "canary.log"
    proc = _run("diagram", str(path), "--out", str(tmp_path / "out"), "--images", "0",
                canary=canary)
    assert proc.returncode == 2, proc.stderr
    assert not canary.exists(), "netcarve imported a module named inside a data file"
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "never imports code named inside a file" in proc.stderr
    assert "--model" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()

    # Control: the same spec typed by the user is honoured, so the canary does record imports.
    typed = _run("diagram", str(path), "--out", str(tmp_path / "out"), "--images", "0",
                 "--model", "_import_canary:build", canary=canary)
    assert canary.read_text().split() == ["imported", "called"]
    assert "was extracted from model '_import_canary:build'" not in typed.stderr
    assert typed.returncode == 2 and "no input preset" in typed.stderr


# (model label inside a circuit file, exit code of `netcarve diagram FILE`, message fragment)
LABEL_CASES = [
    ("os:abort", 2, "not a zoo model"), ("sys:exit", 2, "not a zoo model"),
    ("tempfile:mkdtemp", 2, "not a zoo model"), ("fmnist_vgx", 2, "not a zoo model"),
    ("x" * 5000, 3, "metadata.model must be a non-empty string"),
    (["not", "a", "string"], 3, "metadata.model must be a non-empty string"),
]


@pytest.mark.parametrize("label, code, text", LABEL_CASES)
def test_any_non_zoo_label_is_only_a_label(circuit, tmp_path, label, code, text):
    circuit.metadata["model"] = label
    path = tmp_path / "c.safetensors"
    circuit.save(path)
    imported = set(sys.modules)
    res = CliRunner().invoke(diagram, [str(path), "--out", str(tmp_path / "o"), "--images", "0"])
    assert res.exit_code == code and text in res.stderr
    assert len(res.stderr) < 400, "a long label must be shortened in the message"
    assert set(sys.modules) == imported


def test_a_zoo_label_is_used_and_a_different_model_flag_is_reported(tmp_path):
    from netcarve.core.graph import ModelGraph
    from netcarve.zoo import load_model

    lm = load_model("fmnist_vgg")
    x = torch.zeros(4, 1, 28, 28).normal_(generator=torch.Generator().manual_seed(0))
    c = extract(lm.model, "features.0:1", x, keep=0.5,
                graph=ModelGraph.build(lm.model, x[:1]))
    c.metadata["model"] = "fmnist_vgg"
    path = tmp_path / "c.safetensors"
    c.save(path)
    ok = CliRunner().invoke(diagram, [str(path), "--out", str(tmp_path / "a"), "--images", "0",
                                      "--format", "json"])
    assert ok.exit_code == 0, ok.output
    other = CliRunner().invoke(diagram, [str(path), "--out", str(tmp_path / "b"), "--images",
                                         "0", "--format", "json", "--model", "fmnist_resnet"])
    assert "was extracted from model 'fmnist_vgg'; drawing it with --model fmnist_resnet" \
        in other.stderr
    assert other.exit_code == 3 and "Traceback" not in other.stderr


# ------------------------------------------------------------------ malformed circuit headers


def _rewrite(path: Path, dest: Path, edit=None, tensors_edit=None, raw: str | None = None):
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["netcarve_circuit"])
    if edit is not None:
        edit(header)
    if tensors_edit is not None:
        tensors_edit(tensors)
    text = raw if raw is not None else json.dumps(header)
    save_file(tensors, str(dest), metadata={"netcarve_circuit": text})
    return dest


def _nest(levels: int) -> list:
    value: list = []
    for _ in range(levels):
        value = [value]
    return value


def _first(prefix: str):
    def pick(t: dict) -> str:
        return next(k for k in sorted(t) if k.startswith(prefix))
    return pick


# case → (how the valid file is damaged, message fragment); `netcarve diagram FILE` exits 3
MALFORMED = {
    "not JSON": (dict(raw="{\"format\": "), "malformed circuit header"),
    "a JSON array": (dict(raw="[1, 2]"), "the header must be a JSON object"),
    "nested 100,000 deep": (dict(raw="[" * 100_000 + "]" * 100_000), "nested more than"),
    "nested metadata": (dict(edit=lambda h: h["metadata"].update(a=_nest(40))),
                        "nested more than"),
    "keep as text": (dict(edit=lambda h: h.update(keep="0.3")), "keep must be a number"),
    "keep above 1": (dict(edit=lambda h: h.update(keep=1.5)), "keep must be a number in"),
    "NaN keep": (dict(edit=lambda h: h.update(keep=float("nan"))), "NaN is not valid JSON"),
    "channel out of range": (dict(edit=lambda h: h["target"].update(channel=10_000)),
                             "target.channel must be an integer in 0..5"),
    "negative channel": (dict(edit=lambda h: h["target"].update(channel=-1)), "target.channel"),
    "channel as text": (dict(edit=lambda h: h["target"].update(channel="1")), "target.channel"),
    "target not an object": (dict(edit=lambda h: h.update(target="features.4:1")),
                             "target must be an object"),
    "bad position": (dict(edit=lambda h: h["target"].update(position=[1, "a"])),
                     "target.position"),
    "layers not a list": (dict(edit=lambda h: h.update(layers="features.0")), "layers must be"),
    "layer name not a string": (dict(edit=lambda h: h["layers"].append(7)), "layers["),
    "repeated layer": (dict(edit=lambda h: h["layers"].append(h["layers"][0])), "repeats"),
    "huge input shape": (dict(edit=lambda h: h["metadata"].update(
        input_shape=[3, 60000, 60000])), "metadata.input_shape"),
    "metadata not an object": (dict(edit=lambda h: h.update(metadata=[1])),
                               "metadata must be an object"),
    "newer format": (dict(edit=lambda h: h.update(format_version=99)), "upgrade netcarve"),
    "bad format version": (dict(edit=lambda h: h.update(format_version="1")), "format_version"),
    "preservation count as text": (dict(edit=lambda h: h["preservation"].update(n_images="8")),
                                   "preservation.n_images"),
    "collapsed as text": (dict(edit=lambda h: h.update(collapsed="no")), "collapsed"),
    "checksum missing": (dict(edit=lambda h: h.pop("mask_sha256")), "mask_sha256"),
    "keep edited (still valid)": (dict(edit=lambda h: h.update(keep=0.2)),
                                  "the header does not match its checksum"),
    "target channel edited": (dict(edit=lambda h: h["target"].update(channel=2)),
                              "the header does not match its checksum"),
    "preservation edited": (dict(edit=lambda h: h["preservation"].update(pearson=0.99)),
                            "the header does not match its checksum"),
    "header checksum not text": (dict(edit=lambda h: h.update(header_sha256=5)),
                                 "header_sha256"),
    "float mask": (dict(tensors_edit=lambda t: t.update(
        {_first("mask/")(t): t[_first("mask/")(t)].float()})), "2-D uint8 tensor"),
    "mask of 2s": (dict(tensors_edit=lambda t: t.update(
        {_first("mask/")(t): t[_first("mask/")(t)] * 2})), "0s and 1s"),
    "tensor missing": (dict(tensors_edit=lambda t: t.pop(_first("relevant/")(t))),
                       "present for every layer"),
    "extra tensor": (dict(tensors_edit=lambda t: t.update({"payload": torch.zeros(3)})),
                     "only mask/, relevant/ and score/"),
    "score of the wrong shape": (dict(tensors_edit=lambda t: t.update(
        {_first("score/")(t): torch.zeros(1)})), "score/"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_each_kind_of_malformed_header_is_exit_3_with_one_line(circuit, tmp_path, case):
    kwargs, message = MALFORMED[case]
    src = tmp_path / "c.safetensors"
    circuit.save(src)
    bad = _rewrite(src, tmp_path / "bad.safetensors", **kwargs)
    res = CliRunner().invoke(diagram, [str(bad), "--out", str(tmp_path / "o"),
                                       "--model", "fmnist_vgg", "--images", "0"])
    assert res.exit_code == EXIT_DATA, res.output
    assert message in res.stderr
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1
    assert "Traceback" not in res.stderr and not (tmp_path / "o").exists()


def test_the_header_size_limit_is_enforced(circuit, tmp_path, monkeypatch):
    import netcarve.circuits.files as circuit_io

    path = tmp_path / "c.safetensors"
    circuit.save(path)
    monkeypatch.setattr(circuit_io, "MAX_HEADER_BYTES", 100)
    with pytest.raises(circuit_io.CircuitFileError, match="more than the 100 accepted"):
        circuit_io.read_circuit_fields(path)


def test_a_diagram_json_nested_too_deeply_is_exit_3(tmp_path):
    p = tmp_path / "deep.json"
    p.write_text('{"format": "netcarve-diagram", "x": ' + "[" * 50_000 + "]" * 50_000 + "}")
    res = CliRunner().invoke(diagram, [str(p), "--out", str(tmp_path / "o")])
    assert res.exit_code == EXIT_DATA and "nested more than" in res.stderr
    assert "Traceback" not in res.stderr


# --------------------------------------------------------------------------- the boundary


# (exception reaching the boundary, exit code, message fragment)
BOUNDARY_CASES = [
    (ModelSpecError("unknown model 'x'"), 2, "unknown model 'x'"),
    (DataError("truncated"), 3, "truncated"),
    (WeightsError("shape mismatch"), 4, "shape mismatch"),
    (FileNotFoundError(errno.ENOENT, "No such file", "a/b.png"), 3, "no such file or folder: a/b"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "f/x"), 3, "is a file, not a folder"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "d"), 3, "d is a folder"),
    (PermissionError(errno.EACCES, "Permission denied", "/ro"), 3, "permission denied: /ro"),
    (OSError(errno.ENOSPC, "No space left", "out/x"), 3, "no space left"),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"), 3, "not valid text"),
    (MemoryError(), 1, "out of memory"),
    (KeyboardInterrupt(), 130, "interrupted"),
]


@pytest.mark.parametrize("exc, code, text", BOUNDARY_CASES)
def test_input_problems_map_to_their_exit_codes(exc, code, text, capsys):
    assert classify(exc)[0] == code
    assert report(exc, debug=False) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and text in err and "Traceback" not in err


def test_a_bug_keeps_its_traceback_and_asks_to_be_reported(capsys):
    try:
        [][1]
    except IndexError as exc:
        assert classify(exc) is None
        assert report(exc, debug=False) == EXIT_BUG
    err = capsys.readouterr().err
    assert "Traceback" in err and "IndexError" in err
    assert "This is a bug in netcarve" in err and "please report it" in err


@pytest.mark.parametrize("raised, code, text", [
    (TypeError("unsupported operand"), EXIT_BUG, "please report it"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "x.txt/out"), 3, "not a folder"),
    (KeyboardInterrupt(), EXIT_INTERRUPTED, "error: interrupted"),
])
def test_the_boundary_wraps_real_commands(monkeypatch, raised, code, text):
    def explode(*args, **kwargs):
        raise raised

    monkeypatch.setattr(netcarve.zoo, "load_model", explode)
    res = CliRunner().invoke(cli, ["evaluate", "fmnist_vgg"])
    assert res.exit_code == code and text in res.stderr
    assert ("Traceback" in res.stderr) == (code == EXIT_BUG)


def test_debug_flag_and_env_show_the_traceback_with_the_same_exit_code():
    plain = CliRunner().invoke(cli, ["evaluate", "fmnist_vgx"])
    assert plain.exit_code == 2 and "Traceback" not in plain.stderr
    flag = CliRunner().invoke(cli, ["--debug", "evaluate", "fmnist_vgx"])
    assert flag.exit_code == 2 and "Traceback" in flag.stderr and "ModelSpecError" in flag.stderr
    assert flag.stderr.rstrip().splitlines()[-1].startswith("error: unknown model")
    env = CliRunner().invoke(cli, ["evaluate", "fmnist_vgx"], env={"NETCARVE_DEBUG": "1"})
    assert env.exit_code == 2 and "Traceback" in env.stderr


def _commands(group: click.Group, prefix: str = "") -> list[tuple[str, click.Command]]:
    found = []
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            found += _commands(cmd, f"{prefix}{name} ")
        else:
            found.append((prefix + name, cmd))
    return found


def test_every_command_runs_inside_the_boundary():
    commands = _commands(cli)
    assert len(commands) >= 10
    unguarded = [n for n, c in commands
                 if not getattr(c.callback, "netcarve_error_boundary", False)]
    assert unguarded == []


# (--device on a machine without CUDA, message fragment); exit code 2
DEVICE_CASES = [("cuda", "no CUDA GPU"), ("cuda:0", "no CUDA GPU"), ("tpu", "unknown device")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("device, text", DEVICE_CASES)
def test_unavailable_or_unknown_device_is_one_line_exit_2(device, text):
    res = CliRunner().invoke(cli, ["evaluate", "fmnist_vgg", "--device", device])
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error: ") and text in res.stderr
    assert res.stderr.count("\n") == 1 and "Usage" not in res.stderr


def test_robustness_doc_lists_the_tested_cases():
    import importlib.util

    spec = importlib.util.spec_from_file_location("robustness_table",
                                                  TESTS.parent / "scripts" / "robustness_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    doc = module.DOC.read_text(encoding="utf-8")
    assert module.render(doc) == doc, "run scripts/robustness_table.py to regenerate the doc"
    assert "| `os:abort` | 2 |" in doc and "| channel out of range |" in doc
