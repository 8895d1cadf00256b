"""Hostile and mistaken inputs through the real command line, one table per kind of input.

Every case runs ``netcarve ARGS`` in-process through :func:`netcarve.cli.main` and checks what a
user sees: the exit code, exactly one ``error:`` line that is the last line of the output and
contains the expected text, no traceback, and no output folder left behind by a failed run.
The tables are also the source of docs/robustness.md (``scripts/robustness_table.py``).
Placeholders in the arguments: ``{W}`` weight files, ``{F}`` image folders, ``{C}`` circuit
files, ``{D}`` fake Fashion-MNIST folders, ``{OUT}`` a fresh output path.
"""

from __future__ import annotations

import os
import pickle
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from test_data_fashion_mnist import fake_dataset, write_split

from netcarve.circuits.extract import extract
from netcarve.cli.main import main
from netcarve.data import fashion_mnist as fm
from netcarve.zoo import load_model

# (case, arguments, exit code, text the error line contains; for exit 0 the text is in stdout)
NAMES = [
    ("keep 0", "extract fmnist_vgg features.11:5 --keep 0 --out {OUT}", 2, "not in the range"),
    ("keep 1.5", "extract fmnist_vgg features.11:5 --keep 1.5 --out {OUT}", 2, "0<x<=1"),
    ("keep nan", "extract fmnist_vgg features.11:5 --keep nan --out {OUT}", 2,
     "keep must be in (0, 1], got nan"),
    ("--images 0", "extract fmnist_vgg features.11:5 --images 0 --out {OUT}", 2, "x>=2"),
    ("--images above the data set", "extract fmnist_vgg features.11:5 --images 100000 "
     "--out {OUT}", 3, "at most 60000 scoring"),
    ("unknown criterion", "extract fmnist_vgg features.11:5 --criterion bogus --out {OUT}", 2,
     "'bogus' is not one of 'actgrad'"),
    ("BatchNorm as target", "extract fmnist_vgg features.1:1 --out {OUT}", 2,
     "is a BatchNorm2d, not a conv/linear layer"),
    ("unknown layer", "extract fmnist_vgg features.13:5 --out {OUT}", 2, "did you mean"),
    ("channel out of range", "extract fmnist_vgg features.11:500 --out {OUT}", 2,
     "channel 500 out of range for features.11 (0..127)"),
    ("logit:99", "extract fmnist_vgg logit:99 --out {OUT}", 2,
     "out of range for classifier.5 (0..9)"),
    ("position outside the map", "extract fmnist_vgg features.11:5@99,99 --out {OUT}", 2,
     "outside features.11's 7×7 map"),
    ("target without channel", "extract fmnist_vgg features.11 --out {OUT}", 2,
     "cannot parse target"),
    ("unknown model", "extract fmnist_vgx features.11:5 --out {OUT}", 2,
     "Did you mean fmnist_vgg"),
    ("--device cuda without CUDA", "extract fmnist_vgg features.11:5 --device cuda --out {OUT}",
     2, "no CUDA GPU"),
    ("--device tpu", "extract fmnist_vgg features.11:5 --device tpu --out {OUT}", 2,
     "unknown device 'tpu'"),
    ("unknown option", "extract fmnist_vgg features.11:5 --kep 0.1 --out {OUT}", 2,
     "No such option '--kep'"),
    ("missing argument", "car", 2, "Missing argument 'MODEL'"),
]

_EVAL = "evaluate fmnist_vgg --limit 20 --weights "
WEIGHTS = [
    ("missing file", _EVAL + "{W}/missing.safetensors", 4, "weight file not found"),
    ("a folder", _EVAL + "{W}", 4, "weight path is not a file"),
    ("another architecture's", _EVAL + "{W}/resnet.safetensors", 4,
     "do not fit FmnistVGG: 34 missing key(s)"),
    ("wrong shape", _EVAL + "{W}/shape.safetensors", 4,
     "1 shape conflict(s): features.0.weight: model expects [32, 1, 3, 3], file has [3, 3]"),
    ("integer values", _EVAL + "{W}/int64.safetensors", 4, "dtype conflict(s)"),
    ("float16 values (cast, like torch)", _EVAL + "{W}/half.safetensors", 0, "top-1"),
    ("truncated safetensors", _EVAL + "{W}/truncated.safetensors", 4, "is truncated"),
    ("a text file", _EVAL + "{W}/notes.pt", 4, "not a PyTorch/safetensors weight file"),
    ("pickle with a code payload", _EVAL + "{W}/payload.pth", 4, "refusing to load"),
    ("a whole pickled model", _EVAL + "{W}/whole.pth", 4, "FmnistVGG`), and unpickling"),
]

_DIAGRAM = "diagram {C}/%s --images 0 --format json --out {OUT}"
CIRCUITS = [
    ("mask bit flipped", _DIAGRAM % "flipped.safetensors", 3, "checksum"),
    ("another model's circuit", _DIAGRAM % "vgg.safetensors" + " --model fmnist_resnet", 3,
     "which this model lacks: is it the model the circuit was extracted from?"),
    ("not safetensors at all", _DIAGRAM % "notes.safetensors", 3,
     "is not a readable safetensors file"),
    ("truncated", _DIAGRAM % "truncated.safetensors", 3, "truncated"),
    ("a weight file", _DIAGRAM % "weights.safetensors", 3, "not a netcarve circuit"),
    ("missing", _DIAGRAM % "missing.safetensors", 3, "circuit file not found"),
]

_FOLDER = "evaluate fmnist_vgg --images-dir {F}/"
FOLDERS = [
    ("missing", _FOLDER + "missing", 3, "does not exist"),
    ("a file, not a folder", _FOLDER + "a_file", 3, "is not a directory"),
    ("empty", _FOLDER + "empty", 3, "has no class sub-folders"),
    ("no images", _FOLDER + "no_images", 3, "but no images with extensions"),
    ("class names not the model's", _FOLDER + "cats", 3, "are not all among fmnist_vgg's"),
    ("corrupt image", _FOLDER + "corrupt", 3, "corrupt/Bag/2.png"),
    ("0-byte file", _FOLDER + "zero", 3, "cannot identify image file"),
    ("text file named .png", _FOLDER + "text", 3, "cannot identify image file"),
    ("9000×9000 image (decompression bomb)", _FOLDER + "bomb", 3,
     "9000×9000 pixels is over the limit"),
    ("one class (a subset of the model's)", _FOLDER + "one_class --json", 0, '"n": 2'),
    ("nested folders", _FOLDER + "nested --json", 0, '"n": 2'),
    ("RGB and odd-sized images for a greyscale model", _FOLDER + "rgb --json", 0, '"n": 2'),
    ("greyscale images for an RGB model",
     "evaluate shapes_cnn --images-dir {F}/grey_shapes --json", 0, '"n": 2'),
]

_DATA = "evaluate fmnist_vgg --limit 5 --split test"
DATA = [
    ("Fashion-MNIST missing", "missing", 3, "Fashion-MNIST files not found. Looked in:"),
    ("Fashion-MNIST truncated", "truncated", 3, "IDX data truncated"),
    ("Fashion-MNIST bad header", "bad_header", 3, "bad IDX magic number"),
    ("labels and images disagree", "short_labels", 3, "labels"),
]

OUTPUTS = [
    ("--out is an existing file", "extract fmnist_vgg features.11:5 --images 8 --out {F}/a_file",
     2, "is a file"),
    ("--out below a file", "extract fmnist_vgg features.11:5 --images 8 --out {F}/a_file/x", 3,
     "a_file"),
]

SECTIONS = {"Names and values": NAMES, "Weight files (`--weights`)": WEIGHTS,
            "Circuit files (`netcarve diagram`)": CIRCUITS,
            "Image folders (`--images-dir`)": FOLDERS,
            "Fashion-MNIST files (`$NETCARVE_DATA`)": DATA, "Output folders (`--out`)": OUTPUTS}


def _png(path: Path, size: tuple[int, int] = (28, 28), mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.random.default_rng(len(str(path))).random(size[::-1]) * 255).astype(np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)


class _Payload:
    """Unpickling this runs ``os.system``: the file-loading code must never do it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    w, f, c = root / "weights", root / "folders", root / "circuits"
    for d in (w, f, c):
        d.mkdir()
    vgg = load_model("fmnist_vgg").model
    state = {k: v.clone().contiguous() for k, v in vgg.state_dict().items()}
    save_file(state, w / "good.safetensors")
    save_file({k: v.to(torch.int64) if v.is_floating_point() else v for k, v in state.items()},
              w / "int64.safetensors")
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()},
              w / "half.safetensors")
    save_file({**state, "features.0.weight": torch.zeros(3, 3)}, w / "shape.safetensors")
    resnet = load_model("fmnist_resnet").model
    save_file({k: v.contiguous() for k, v in resnet.state_dict().items()},
              w / "resnet.safetensors")
    blob = (w / "good.safetensors").read_bytes()
    (w / "truncated.safetensors").write_bytes(blob[: len(blob) // 2])
    (w / "notes.pt").write_text("these are not weights\n")
    with (w / "payload.pth").open("wb") as fh:
        pickle.dump({"weight": _Payload(root / "PAYLOAD_RAN")}, fh)
    torch.save(vgg, w / "whole.pth")

    _png(f / "one_class/Bag/1.png"), _png(f / "one_class/Bag/2.png")
    _png(f / "nested/Bag/deep/er/1.png"), _png(f / "nested/Coat/2.png")
    _png(f / "rgb/Bag/1.png", mode="RGB"), _png(f / "rgb/Coat/2.png", (50, 30), "RGB")
    _png(f / "grey_shapes/circle/1.png", (64, 64)), _png(f / "grey_shapes/star/2.png", (40, 40))
    _png(f / "cats/cat/1.png"), _png(f / "cats/dog/2.png")
    _png(f / "corrupt/Bag/1.png")
    (f / "corrupt/Bag/2.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    _png(f / "zero/Bag/1.png")
    (f / "zero/Bag/2.png").write_bytes(b"")
    _png(f / "text/Bag/1.png")
    (f / "text/Bag/notes.png").write_text("not a picture")
    (f / "bomb/Bag").mkdir(parents=True)
    Image.new("1", (9000, 9000)).save(f / "bomb/Bag/big.png")  # ~10 kB on disk
    (f / "empty").mkdir()
    (f / "no_images/Bag").mkdir(parents=True)
    (f / "no_images/Bag/readme.txt").write_text("x")
    (f / "a_file").write_text("x")

    x = torch.zeros(8, 1, 28, 28).normal_(generator=torch.Generator().manual_seed(0))
    circuit = extract(vgg, "features.4:3", x, keep=0.5)
    circuit.metadata["model"] = "fmnist_vgg"
    circuit.save(c / "vgg.safetensors")
    blob = (c / "vgg.safetensors").read_bytes()
    (c / "truncated.safetensors").write_bytes(blob[: len(blob) - 50])
    with safe_open(c / "vgg.safetensors", "pt") as fh:
        header, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    tensors["mask/features.4"][3, 5] ^= 1  # still a valid 0/1 mask, but not the one saved
    save_file(tensors, c / "flipped.safetensors", metadata=header)
    (c / "notes.safetensors").write_text("hello")
    save_file(state, c / "weights.safetensors")
    return {"W": w, "F": f, "C": c, "root": root}


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def _check(case: str, args: str, code: int, text: str, subs: dict[str, Path], tmp_path: Path,
           capsys) -> None:
    out_dir = tmp_path / "out"
    argv = [a.format(OUT=out_dir, **{k: v for k, v in subs.items() if len(k) == 1})
            for a in shlex.split(args)]
    got, out, err = _run(argv, capsys)
    assert got == code, f"{case}: exit {got}, wanted {code}\n{err}"
    assert "Traceback" not in err
    if code == 0:
        assert text in out, f"{case}: {text!r} not in {out!r}"
        return
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and lines[-1].startswith("error: "), f"{case}: {err!r}"
    assert text in lines[-1], f"{case}: {text!r} not in {lines[-1]!r}"
    assert not out_dir.exists(), f"{case}: a failed run left {out_dir}"


@pytest.mark.parametrize("case, args, code, text", NAMES, ids=[c[0] for c in NAMES])
def test_names_and_values(case, args, code, text, files, tmp_path, capsys):
    _check(case, args, code, text, files, tmp_path, capsys)


@pytest.mark.parametrize("case, args, code, text", WEIGHTS, ids=[c[0] for c in WEIGHTS])
def test_weight_files(case, args, code, text, files, tmp_path, capsys):
    model = load_model("fmnist_vgg").model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _check(case, args, code, text, files, tmp_path, capsys)
    assert not (files["root"] / "PAYLOAD_RAN").exists(), "a pickle payload was executed"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "bundled weights changed"


@pytest.mark.parametrize("case, args, code, text", CIRCUITS, ids=[c[0] for c in CIRCUITS])
def test_circuit_files(case, args, code, text, files, tmp_path, capsys):
    _check(case, args, code, text, files, tmp_path, capsys)


def test_the_good_circuit_draws(files, tmp_path, capsys):
    code, _, err = _run(["diagram", str(files["C"] / "vgg.safetensors"), "--images", "0",
                         "--format", "json", "--out", str(tmp_path / "d")], capsys)
    assert code == 0, err
    assert any((tmp_path / "d").iterdir())


@pytest.mark.parametrize("case, args, code, text", FOLDERS, ids=[c[0] for c in FOLDERS])
def test_image_folders(case, args, code, text, files, tmp_path, capsys):
    _check(case, args, code, text, files, tmp_path, capsys)


@pytest.fixture
def fake_data(tmp_path, monkeypatch):
    """Point netcarve at a damaged Fashion-MNIST copy (and nowhere else)."""
    def make(kind: str) -> None:
        root = tmp_path / "fm"
        if kind != "missing":
            fake_dataset(root, n=5, gz=False)
            images = root / "t10k-images-idx3-ubyte"
            if kind == "truncated":
                images.write_bytes(images.read_bytes()[:-100])
            elif kind == "bad_header":
                images.write_bytes(b"\x01\x02" + images.read_bytes()[2:])
            elif kind == "short_labels":
                write_split(root, "t10k", np.zeros((5, 28, 28), np.uint8),
                            np.zeros(4, np.uint8), gz=False)
        monkeypatch.setenv("NETCARVE_DATA", str(root))
        monkeypatch.setattr(fm, "DEFAULT_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
        fm._read_cached.cache_clear()
    return make


@pytest.mark.parametrize("case, kind, code, text", DATA, ids=[c[0] for c in DATA])
def test_fashion_mnist_files(case, kind, code, text, fake_data, tmp_path, capsys):
    fake_data(kind)
    _check(case, _DATA, code, text, {}, tmp_path, capsys)


@pytest.mark.parametrize("case, args, code, text", OUTPUTS, ids=[c[0] for c in OUTPUTS])
def test_output_paths(case, args, code, text, files, tmp_path, capsys):
    _check(case, args, code, text, files, tmp_path, capsys)
    assert (files["F"] / "a_file").read_text() == "x", "the user's file was touched"


def test_nan_or_inf_images_are_refused_by_the_api():
    from netcarve.car.scores import car_scores
    from netcarve.core.errors import DataError

    model = load_model("fmnist_vgg").model
    x = torch.zeros(12, 1, 28, 28).normal_(generator=torch.Generator().manual_seed(1))
    x[7, 0, 3, 3] = float("nan")
    with pytest.raises(DataError, match=r"1 image\(s\) contain NaN .*the first is image 7"):
        extract(model, "features.11:5", x, keep=0.5)
    x[7, 0, 3, 3], x[9, 0, 0, 0] = float("inf"), -float("inf")
    with pytest.raises(DataError, match=r"2 image\(s\) contain NaN or infinite"):
        car_scores(model, x, torch.zeros(12, dtype=torch.long), layers="features.11")
    batches = [(x[:6], torch.zeros(6, dtype=torch.long)), (x[6:], torch.zeros(6, dtype=torch.long))]
    with pytest.raises(DataError, match="image 1 of a batch"):
        extract(model, "features.11:5", batches, keep=0.5)
