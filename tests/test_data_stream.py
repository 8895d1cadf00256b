"""Streams: tensors, DataLoaders and iterables give the same batches, fingerprints and results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _nets import make
from _state import assert_unchanged, snapshot
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from netcarve.circuits.circuit import data_fingerprint
from netcarve.circuits.extract import extract
from netcarve.core.errors import DataError
from netcarve.data import ImageFolderDataset, as_stream, image_folder_loader, load_image_folder
from netcarve.data.preset import Preset
from netcarve.data.stream import ImageStream, fingerprint_batches
from netcarve.training.evaluation import analysis_data, analysis_streams, evaluate

RGB8 = Preset(8, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), ("a", "b", "c"))


def _loader(x: torch.Tensor, y: torch.Tensor | None = None, batch_size: int = 3) -> DataLoader:
    data = TensorDataset(x) if y is None else TensorDataset(x, y)
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def _folder(root: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        cls = ("a", "b", "c")[i % 3]
        (root / cls).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(11, 9, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / cls / f"{i:03d}.png")
    return root


# ------------------------------------------------------------------------- the stream itself


def test_tensor_loader_list_and_generator_yield_the_same_images_and_labels():
    x = torch.randn(7, 2, 3, 3)
    y = torch.arange(7) % 3
    sources = {
        "tensor": as_stream(x, y),
        "loader": as_stream(_loader(x, y)),
        "list": as_stream([(x[:4], y[:4]), (x[4:], y[4:])]),
        "generator": as_stream((x[i:i + 2], y[i:i + 2]) for i in range(0, 7, 2)),
    }
    for name, stream in sources.items():
        got = list(stream.batches(3, labels=True))
        assert torch.equal(torch.cat([b for b, _ in got]), x), name
        assert torch.cat([lab for _, lab in got]).tolist() == y.tolist(), name
    assert [len(b) for b, _ in sources["tensor"].batches(3)] == [3, 3, 1]
    assert sources["loader"].count() == 7


def test_device_dtype_and_uint8_normalisation():
    raw = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    stream = as_stream(_loader(raw), preset=RGB8)
    (out,) = [b for b, _ in stream.batches(device="cpu", dtype=torch.float64)][:1]
    assert out.dtype == torch.float64
    assert torch.allclose(out[:3], RGB8.normalize(raw[:3]).double(), atol=1e-6)
    with pytest.raises(DataError, match="preset"):
        list(as_stream(raw).batches())


def test_fingerprint_does_not_depend_on_batching_or_source():
    x = torch.randn(10, 1, 4, 4)
    by_tensor = data_fingerprint(x)
    assert by_tensor == as_stream(_loader(x, batch_size=4)).fingerprint()
    assert by_tensor == fingerprint_batches([x[:1], x[1:7], x[7:]])
    assert by_tensor != data_fingerprint(x[:9])
    assert by_tensor != data_fingerprint(x.double())


def test_halves_are_disjoint_cover_everything_and_repeat():
    x = torch.arange(40.0).reshape(40, 1, 1, 1)
    for source in (x, _loader(x, batch_size=7)):
        a, b = as_stream(source).halves(3)
        first = torch.cat(list(a.images())).flatten().tolist()
        second = torch.cat(list(b.images())).flatten().tolist()
        assert sorted(first + second) == list(range(40))
        assert 10 <= len(first) <= 30  # a fair coin per image: far from all-or-nothing
        assert torch.cat(list(a.images())).flatten().tolist() == first  # same every pass


def test_misuse_gives_clear_errors():
    x = torch.randn(6, 1, 2, 2)
    gen = as_stream(b for b in (x[:3], x[3:]))
    list(gen.images())
    with pytest.raises(DataError, match="one-shot iterator"):
        list(gen.images())
    with pytest.raises(DataError, match="shuffle=True"):
        as_stream(DataLoader(TensorDataset(x), batch_size=2, shuffle=True))

    class Noisy:  # a re-iterable that yields new random images on every pass
        def __iter__(self):
            yield torch.randn(3, 1, 2, 2)

    noisy = as_stream(Noisy())
    list(noisy.images())
    with pytest.raises(DataError, match="differ between two passes"):
        list(noisy.images())
    with pytest.raises(DataError, match="tensor, a DataLoader"):
        as_stream("some/folder")
    with pytest.raises(DataError, match=r"\[N, C, H, W\]"):
        list(as_stream([torch.randn(3, 4)]).images())
    with pytest.raises(DataError, match="labels are needed"):
        list(as_stream(x).batches(labels=True))
    with pytest.raises(DataError, match="2 labels"):
        as_stream(x, torch.zeros(2, dtype=torch.int64))


# ------------------------------------------------------------------------- image folders


def test_folder_dataset_items_are_the_rows_of_load_image_folder(tmp_path):
    root = _folder(tmp_path, 7)
    whole = load_image_folder(root, RGB8)
    dataset = ImageFolderDataset(root, RGB8)
    assert dataset.paths == whole.paths and dataset.class_names == whole.class_names
    batches = list(image_folder_loader(dataset, batch_size=3))
    assert [len(b[0]) for b in batches] == [3, 3, 1]
    assert torch.allclose(torch.cat([b[0] for b in batches]), whole.images, atol=0)
    assert torch.cat([b[1] for b in batches]).tolist() == whole.labels.tolist()


def test_resize_then_centre_crop_when_the_preset_asks_for_it(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    (tmp_path / "a").mkdir()
    Image.fromarray(pixels).save(tmp_path / "a" / "x.png")
    preset = Preset(8, 3, (0.0,) * 3, (1.0,) * 3, resize=10)  # ImageNet-style: 8 of a 10
    image, _ = ImageFolderDataset(tmp_path, preset)[0]
    resized = Image.fromarray(pixels).resize((15, 10), Image.Resampling.BILINEAR)
    expected = np.asarray(resized)[1:9, 3:11] / 255.0
    assert image.shape == (3, 8, 8)
    assert torch.allclose(image, torch.from_numpy(expected).permute(2, 0, 1).float(), atol=1e-6)


def test_a_corrupt_file_in_a_worker_is_one_clean_error(tmp_path):
    root = _folder(tmp_path, 4)
    bad = root / "b" / "zz_bad.png"
    bad.write_bytes(b"not a png")
    loader = image_folder_loader(ImageFolderDataset(root, RGB8), batch_size=2, workers=1)
    with pytest.raises(DataError) as err:
        list(as_stream(loader).images())
    message = str(err.value)
    assert str(bad) in message and "Traceback" not in message and "\n" not in message


def test_analysis_streams_draw_the_same_images_as_analysis_data(tmp_path):
    root = _folder(tmp_path, 12)
    scoring, heldout = analysis_data(RGB8, 5, 4, images_dir=str(root), seed=7)
    s_loader, h_loader = analysis_streams(RGB8, 5, 4, images_dir=str(root), seed=7,
                                          batch_size=2)
    assert torch.equal(torch.cat(list(as_stream(s_loader).images())), scoring)
    assert torch.equal(torch.cat(list(as_stream(h_loader).images())), heldout)
    with pytest.raises(DataError, match="12 images"):
        analysis_streams(RGB8, 10, 5, images_dir=str(root))


# ------------------------------------------------------------------------- APIs on streams


def test_extract_on_loaders_equals_extract_on_tensors():
    model, _ = make("plain", seed=0, double=False)
    torch.manual_seed(1)
    x, h = torch.randn(24, 3, 8, 8), torch.randn(16, 3, 8, 8)
    snap = snapshot(model)
    ref = extract(model, "features.4:2", x, heldout=h, keep=0.3, batch_size=8)
    for crit in ("actgrad", "snip"):
        want = ref if crit == "actgrad" else extract(model, "features.4:2", x, heldout=h,
                                                     keep=0.3, batch_size=8, criterion=crit)
        got = extract(model, "features.4:2", _loader(x, batch_size=8), heldout=_loader(h,
                      batch_size=8), keep=0.3, batch_size=8, criterion=crit)
        for name in want.scores:
            assert torch.allclose(got.scores[name], want.scores[name], rtol=1e-5, atol=1e-7)
            assert torch.equal(got.masks[name], want.masks[name]), name  # no near-ties here
        assert got.preservation.pearson == pytest.approx(want.preservation.pearson, abs=1e-6)
        assert got.preservation_scoring.nmad == pytest.approx(want.preservation_scoring.nmad,
                                                              abs=1e-6)
        for key in ("scoring_images", "heldout_images", "scoring_data_fingerprint",
                    "heldout_data_fingerprint"):
            assert got.metadata[key] == want.metadata[key], key
    assert_unchanged(model, snap)


def test_extract_splits_a_stream_without_heldout_into_disjoint_halves():
    model, _ = make("plain", seed=0, double=False)
    x = torch.randn(30, 3, 8, 8)
    c = extract(model, "features.4:1", _loader(x, batch_size=7), keep=0.5)
    assert c.metadata["scoring_images"] + c.metadata["heldout_images"] == 30
    assert c.metadata["scoring_data_fingerprint"] != c.metadata["heldout_data_fingerprint"]
    assert c.preservation.n_images == c.metadata["heldout_images"]
    with pytest.raises(DataError, match="one-shot"):
        extract(model, "features.4:1", (b for b in (x[:10], x[10:])), heldout=x, keep=0.5)


def test_evaluate_on_a_loader_equals_evaluate_on_tensors():
    model, _ = make("plain", seed=0, double=False)
    x = torch.randn(20, 3, 8, 8)
    y = torch.arange(20) % 3
    preset = Preset(8, 3, (0.0,) * 3, (1.0,) * 3, ("a", "b", "c"))
    want = evaluate(model, x, y, preset, batch_size=6)
    got = evaluate(model, _loader(x, y, batch_size=6), preset=preset)
    assert got.n == want.n == 20
    assert got.accuracy == want.accuracy
    assert got.loss == pytest.approx(want.loss, abs=1e-6)
    assert got.per_class_accuracy == want.per_class_accuracy
    assert torch.equal(got.predictions, want.predictions)
    with pytest.raises(DataError, match="labels are needed"):
        evaluate(model, _loader(x), preset=preset)


def test_stream_object_passes_through_as_stream():
    s = ImageStream(torch.zeros(2, 1, 2, 2))
    assert as_stream(s) is s


def test_dataset_examples_and_class_preference_on_a_loader_equal_the_tensor_results():
    from netcarve.function.descriptors import class_preference
    from netcarve.viz.examples import dataset_examples

    model, _ = make("plain", seed=0, double=False)
    x = torch.randn(21, 3, 8, 8)
    want = dataset_examples(model, "features.4", x, top_k=4, batch_size=5)
    got = dataset_examples(model, "features.4", _loader(x, batch_size=5), top_k=4)
    assert torch.equal(got.indices, want.indices)  # random floats: no tied activations
    assert torch.allclose(got.values, want.values, rtol=0, atol=1e-6)
    assert torch.equal(got.boxes, want.boxes)
    few = dataset_examples(model, "features.4", _loader(x[:3], batch_size=2), top_k=9)
    assert few.indices.shape == (6, 3)
    pref = class_preference(model, "features.4", _loader(x, batch_size=4))
    ref = class_preference(model, "features.4", x, batch_size=8)
    assert pref.shape == (6, 3)
    assert torch.allclose(pref, ref, rtol=1e-5, atol=1e-9)


def test_in_memory_reads_a_stream_once_and_passes_tensors_through():
    """Methods that need every image at once (greedy CAR, sub-circuits, the fold) accept a
    DataLoader through ``in_memory``; greedy pruning on a loader equals it on the tensors."""
    from netcarve.car.greedy import greedy_prune
    from netcarve.data.stream import in_memory

    x = torch.randn(10, 3, 8, 8)
    y = torch.arange(10) % 3
    same_x, same_y = in_memory(x, y)
    assert same_x is x and same_y is y
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    got_x, got_y = in_memory(loader)
    assert torch.equal(got_x, x) and torch.equal(got_y, y)
    with pytest.raises(DataError, match="no images"):
        in_memory([])
    with torch.random.fork_rng(devices=[]):
        net, xs = make("plain", seed=3, batch=30)
    with torch.no_grad():
        ys = net(xs).argmax(1)
    want = greedy_prune(net, xs, ys, ["features.4"], amount=2)
    got = greedy_prune(net, torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(xs, ys), batch_size=7), None, ["features.4"], amount=2)
    assert got.order == want.order
