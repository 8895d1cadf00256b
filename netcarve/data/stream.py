"""One way in for image data: a tensor, a DataLoader or any iterable of batches.

Every API that takes images accepts

* a tensor ``[N, C, H, W]`` (normalised floats, or ``uint8`` with a preset), with optional
  labels ``[N]``;
* a :class:`torch.utils.data.DataLoader`, or any re-iterable (a list, a custom object whose
  ``__iter__`` starts over), yielding image tensors or ``(images, labels, ...)`` batches;
* a one-shot iterator or generator: fine for one-pass methods, a clear error for the others.

:class:`ImageStream` turns any of them into batches on the model's device and dtype, so each
API changes by one line, and memory is bounded by the batches in flight, never by ``N``.
A stream read several times must yield the same images in the same order on every pass
(no ``shuffle=True``): a cheap per-batch signature catches a loader that does not.

Example:
    >>> s = as_stream(torch.zeros(5, 1, 4, 4))
    >>> [tuple(x.shape) for x, _ in s.batches(2)]
    [(2, 1, 4, 4), (2, 1, 4, 4), (1, 1, 4, 4)]
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Union

import torch

from netcarve.core._memory import release_free_memory
from netcarve.core.errors import DataError
from netcarve.data.preset import Preset

__all__ = [
    "ImageStream",
    "Images",
    "as_stream",
    "fingerprint_batches",
    "image_folder_loader",
    "in_memory",
    "require_finite",
]

# What an ``images`` argument may be.
Images = Union[torch.Tensor, "ImageStream", Iterable[Any]]

_HASH_SLICE = 1024  # images hashed per update, so a large tensor is never copied whole


def require_finite(images: torch.Tensor, offset: int | None = 0) -> torch.Tensor:
    """Refuse images holding NaN or ±inf; return ``images`` unchanged otherwise.

    One NaN pixel makes every activation downstream NaN, so scores, correlations and CAR
    would all come out NaN (or, through max/argmax, silently arbitrary). netcarve refuses
    such data instead of propagating it.

    Args:
        images: a batch ``[N, C, H, W]`` (integer batches always pass).
        offset: index of the batch's first image in the whole data (for the message);
            None when unknown (a batch of a loader).

    Returns:
        ``images``.

    Raises:
        DataError: naming how many images are affected and the first one.

    Example:
        >>> require_finite(torch.zeros(2, 1, 4, 4)).shape
        torch.Size([2, 1, 4, 4])
    """
    if not images.is_floating_point():
        return images
    finite = torch.isfinite(images).flatten(1).all(dim=1) if images.dim() > 1 else \
        torch.isfinite(images)
    if bool(finite.all()):
        return images
    bad = (~finite).nonzero().flatten()
    first = (f"image {int(bad[0])} of a batch" if offset is None
             else f"image {offset + int(bad[0])}")
    raise DataError(
        f"{len(bad)} image(s) contain NaN or infinite values (the first is {first}); "
        "they would make every score NaN: replace or drop them "
        "(e.g. images[torch.isfinite(images).flatten(1).all(1)])"
    )


class _Fingerprint:
    """SHA-256 over per-image shape, dtype and bytes, then the image count (first 16 hex).

    Fed batch by batch, so a tensor and a stream of the same images agree."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._header: str | None = None
        self.count = 0

    def update(self, batch: torch.Tensor) -> None:
        header = f"{tuple(batch.shape[1:])}:{batch.dtype}"
        if self._header is None:
            self._hash.update(header.encode())
            self._header = header
        elif header != self._header:
            raise DataError(f"images change shape or dtype within the data: {self._header} "
                            f"then {header}; every batch must have the same [C, H, W] and dtype")
        for start in range(0, len(batch), _HASH_SLICE):
            t = batch[start:start + _HASH_SLICE].detach().cpu().contiguous()
            if t.numel():
                self._hash.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self.count += len(batch)

    def hexdigest(self) -> str:
        h = self._hash.copy()
        h.update(f":n={self.count}".encode())
        return h.hexdigest()[:16]


def fingerprint_batches(batches: Iterable[torch.Tensor]) -> str:
    """The data fingerprint of images given batch by batch (same for any batching).

    Example:
        >>> x = torch.arange(12.0).reshape(3, 1, 2, 2)
        >>> fingerprint_batches([x]) == fingerprint_batches([x[:1], x[1:]])
        True
    """
    fp = _Fingerprint()
    for batch in batches:
        fp.update(batch)
    return fp.hexdigest()


def _worker_error(exc: DataError) -> DataError:
    # A DataLoader worker re-raises our DataError with its whole traceback in the message;
    # keep only the original message so the CLI prints one clear line.
    text = str(exc)
    if "Original Traceback" in text:
        for line in reversed(text.strip().splitlines()):
            if "DataError: " in line:
                return DataError(line.split("DataError: ", 1)[1])
    return exc


class ImageStream:
    """Batches of ``(images, labels or None)`` from a tensor, a loader or an iterable.

    Args:
        source: tensor ``[N, C, H, W]``, :class:`~torch.utils.data.DataLoader`, or an
            iterable of image tensors / ``(images, labels, ...)`` tuples.
        labels: int64 ``[N]`` labels of a tensor source (ignored for other sources, whose
            batches carry their labels).
        preset: normalises ``uint8`` batches (float batches are used as they are).

    Raises:
        DataError: a source of the wrong type, or tensor labels of the wrong length.

    Example:
        >>> s = ImageStream(torch.zeros(3, 1, 2, 2), torch.tensor([0, 1, 1]))
        >>> [y.tolist() for _, y in s.batches(2)]
        [[0, 1], [1]]
    """

    def __init__(self, source: Any, labels: torch.Tensor | None = None, *,
                 preset: Preset | None = None) -> None:
        if isinstance(source, ImageStream):
            raise DataError("already an ImageStream: use as_stream() to accept both")
        self.preset = preset
        self._one_shot = False
        self._passes = 0
        self._signature: list[tuple[int, float]] | None = None
        self._fingerprint: str | None = None
        self._count: int | None = None
        self._peeked: tuple[torch.Tensor, torch.Tensor | None] | None = None
        if isinstance(source, torch.Tensor):
            if source.dim() != 4:
                raise DataError(f"images must be a [N, C, H, W] tensor, got shape "
                                f"{tuple(source.shape)}")
            if labels is not None and len(labels) != len(source):
                raise DataError(f"{len(source)} images but {len(labels)} labels")
            require_finite(source)  # here, so the message counts images of the whole tensor
            self.tensor: torch.Tensor | None = source
            self.labels = labels
            self._count = len(source)
        elif isinstance(source, (str, bytes, Path, dict)) or not isinstance(source, Iterable):
            raise DataError(
                f"images must be a tensor, a DataLoader or an iterable of (images, labels) "
                f"batches, not {type(source).__name__}"
                + ("; for an image folder use netcarve.data.stream.image_folder_loader"
                   if isinstance(source, (str, Path)) else "")
            )
        else:
            self.tensor = None
            self.labels = None
            self._source = source
            # iter(x) is x: a generator or iterator, which can be read only once.
            self._one_shot = iter(source) is source
            if isinstance(source, torch.utils.data.DataLoader):
                if isinstance(source.sampler, torch.utils.data.RandomSampler):
                    raise DataError("the DataLoader shuffles (shuffle=True): netcarve may read "
                                    "the images several times and needs the same order on "
                                    "every pass; use shuffle=False")
                try:
                    self._count = len(source.dataset)  # type: ignore[arg-type]
                except TypeError:  # an IterableDataset without __len__
                    self._count = None

    # ------------------------------------------------------------------ facts

    @property
    def is_tensor(self) -> bool:
        """True when the images are one tensor in memory (random access is possible)."""
        return self.tensor is not None

    def count(self) -> int | None:
        """Number of images, when known without reading (tensor, sized DataLoader) or
        after one complete pass; otherwise None."""
        return self._count

    def fingerprint(self) -> str:
        """:func:`fingerprint_batches` of the images (reads the stream if not yet read once)."""
        if self.tensor is not None:
            return fingerprint_batches([self._normalised(self.tensor)])
        if self._fingerprint is None:
            for _ in self.batches():
                pass
        assert self._fingerprint is not None
        return self._fingerprint

    def first(self, *, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None) -> torch.Tensor:
        """The first image as a ``[1, C, H, W]`` batch (to trace a model's graph).

        Raises:
            DataError: no images.
        """
        if self.tensor is not None:
            if len(self.tensor) == 0:
                raise DataError("no images given")
            x = self._normalised(self.tensor[:1])
        else:
            if self._one_shot:
                if self._peeked is None and self._passes == 0:
                    self._peeked = self._read_one(next(iter(self._source), None))
                if self._peeked is None:
                    raise DataError("no images given (the iterator is empty or already read)")
                x = self._peeked[0][:1]
            else:
                batch = self._read_one(next(iter(self._source), None))
                if batch is None:
                    raise DataError("no images given: the loader yielded no batch")
                x = batch[0][:1]
        return x.to(device=device, dtype=dtype) if device or dtype else x

    def halves(self, seed: int) -> tuple[ImageStream, ImageStream]:
        """Split the images in two disjoint streams by a seeded coin per image.

        The coins are drawn again from ``seed`` on every pass, so each half yields the same
        images every time (the source must repeat itself, as every stream here must).

        Example:
            >>> a, b = as_stream(torch.arange(8.0).reshape(8, 1, 1, 1)).halves(0)
            >>> sorted(torch.cat([*a.images(), *b.images()]).flatten().tolist())
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
        """
        return (ImageStream(_Half(self, seed, True), preset=self.preset),
                ImageStream(_Half(self, seed, False), preset=self.preset))

    # ------------------------------------------------------------------ reading

    def _normalised(self, x: torch.Tensor, offset: int | None = 0) -> torch.Tensor:
        if x.dtype == torch.uint8:
            if self.preset is None:
                raise DataError("uint8 images need the model's preset to be normalised: pass "
                                "normalised float images, or the preset")
            return self.preset.normalize(x)
        if not x.is_floating_point():
            raise DataError(f"images must be float (normalised) or uint8, got {x.dtype}")
        return require_finite(x, offset)

    def _read_one(self, item: Any) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        if item is None:
            return None
        labels = None
        if isinstance(item, torch.Tensor):
            images = item
        elif isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
            images = item[0]
            if len(item) > 1 and isinstance(item[1], torch.Tensor):
                labels = item[1]
        else:
            raise DataError(f"each batch must be an image tensor or an (images, labels, ...) "
                            f"tuple, got {type(item).__name__}")
        if images.dim() != 4:
            raise DataError(f"each image batch must be [N, C, H, W], got shape "
                            f"{tuple(images.shape)}")
        if labels is not None and (labels.dim() != 1 or len(labels) != len(images)):
            labels = None  # not class labels (e.g. masks or paths): ignore them
        return self._normalised(images, None), labels

    def _raw(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        if self.tensor is not None:
            for lo in range(0, len(self.tensor), batch_size):
                y = None if self.labels is None else self.labels[lo:lo + batch_size]
                yield self._normalised(self.tensor[lo:lo + batch_size], lo), y
            return
        if self._one_shot and self._passes > 1:
            raise DataError(
                "this method reads the images more than once, but they come from a one-shot "
                "iterator (a generator): pass a DataLoader, a list of batches or a tensor")
        if self._peeked is not None:
            peeked, self._peeked = self._peeked, None
            yield peeked
        try:
            for item in self._source:
                batch = self._read_one(item)
                assert batch is not None
                yield batch
        except DataError as exc:
            raise _worker_error(exc) from None

    def batches(self, batch_size: int = 256, *, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None, labels: bool = False
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """One pass over the images: ``(images, labels or None)`` per batch.

        Args:
            batch_size: images per batch for a tensor source (a loader keeps its own).
            device / dtype: where the images go (default: unchanged).
            labels: require labels (tensor labels, or the second element of each batch).

        Yields:
            normalised images on ``device``/``dtype`` and their labels (CPU int64) or None.

        Raises:
            DataError: bad batches, labels required but missing, a one-shot iterator read
                twice, or a stream that yields different images on a later pass.
        """
        if int(batch_size) < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self._passes += 1
        first_pass = self._signature is None and self.tensor is None
        fp = _Fingerprint() if first_pass else None
        signature: list[tuple[int, float]] = []
        for x, y in self._raw(int(batch_size)):
            if labels and y is None:
                raise DataError("labels are needed: pass labels= with a tensor, or batches of "
                                "(images, labels)")
            if self.tensor is None:
                signature.append((len(x), float(x.sum(dtype=torch.float64))))
                if fp is not None:
                    fp.update(x)
            if len(x) == 0:
                continue
            out = x.to(device=device, dtype=dtype) if device or dtype else x
            yield out, (None if y is None else y.to(torch.int64).cpu())
            if self.tensor is None:
                # keeps a long stream's peak memory that of one batch (see core._memory)
                del out, x, y
                release_free_memory()
        if self.tensor is None:
            self._check_same(signature)
            if fp is not None:
                self._fingerprint = fp.hexdigest()
                self._count = fp.count

    def images(self, batch_size: int = 256, *, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> Iterator[torch.Tensor]:
        """One pass over the images only (see :meth:`batches`)."""
        for x, _ in self.batches(batch_size, device=device, dtype=dtype):
            yield x

    def _check_same(self, signature: list[tuple[int, float]]) -> None:
        if self._signature is None:
            self._signature = signature
            return
        same = len(signature) == len(self._signature) and all(
            n == m and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6 * max(n, 1))
            for (n, a), (m, b) in zip(signature, self._signature, strict=True))
        if not same:
            raise DataError(
                "the images differ between two passes over the same data (a DataLoader with "
                "shuffle=True or random augmentation?); netcarve reads them several times: "
                "use shuffle=False and deterministic transforms")


class _Half:
    """One side of :meth:`ImageStream.halves` (re-iterable: each pass re-reads the parent)."""

    def __init__(self, parent: ImageStream, seed: int, side: bool) -> None:
        self.parent, self.seed, self.side = parent, int(seed), side

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        coins = torch.Generator().manual_seed(self.seed)
        for x, y in self.parent.batches():
            pick = (torch.rand(len(x), generator=coins) < 0.5) == self.side
            if pick.any():
                yield x[pick.to(x.device)], None if y is None else y[pick]


def as_stream(images: Images, labels: torch.Tensor | None = None, *,
              preset: Preset | None = None) -> ImageStream:
    """``images`` as an :class:`ImageStream` (an ImageStream is returned as it is).

    Args:
        images: tensor, DataLoader, iterable of batches, or an ImageStream.
        labels: labels of a tensor source.
        preset: normalises uint8 images.

    Returns:
        an :class:`ImageStream`.

    Raises:
        DataError: an unsupported type.

    Example:
        >>> as_stream(torch.zeros(2, 3, 4, 4)).count()
        2
    """
    if isinstance(images, ImageStream):
        if preset is not None and images.preset is None:
            images.preset = preset
        return images
    return ImageStream(images, labels, preset=preset)


def image_folder_loader(
    dataset: Any,
    *,
    batch_size: int = 64,
    workers: int = 0,
    indices: Sequence[int] | None = None,
) -> torch.utils.data.DataLoader:
    """A deterministic DataLoader over an image folder (or any map-style data set).

    Images are decoded in ``workers`` processes (0: in this process), in index order, never
    shuffled, so every pass yields the same batches; memory holds only the batches in flight
    (about ``(2 × workers + 1) × batch_size`` images), whatever the folder's size.

    Args:
        dataset: an :class:`~netcarve.data.image_folder.ImageFolderDataset` or any map-style
            data set of ``(image, label)`` items.
        batch_size: images per batch.
        workers: decoding processes.
        indices: read only these items, in this order (e.g. a seeded split).

    Returns:
        a :class:`torch.utils.data.DataLoader` yielding ``(images, labels)``.

    Raises:
        DataError: ``workers`` < 0 or ``batch_size`` < 1.

    Example:
        >>> from netcarve.data import ImageFolderDataset  # doctest: +SKIP
        >>> loader = image_folder_loader(ImageFolderDataset("photos", preset), workers=2)
        ...     # doctest: +SKIP
    """
    if int(workers) < 0:
        raise DataError(f"workers must be >= 0, got {workers}")
    if int(batch_size) < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    data = dataset if indices is None else torch.utils.data.Subset(dataset, list(indices))
    return torch.utils.data.DataLoader(
        data, batch_size=int(batch_size), shuffle=False, num_workers=int(workers),
        # Workers stay alive between passes: methods read the data several times.
        persistent_workers=int(workers) > 0,
    )


def in_memory(images: Images, labels: torch.Tensor | None = None, *,
              preset: Preset | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``images`` (and their labels) as tensors; a stream is read once into memory.

    For methods that need random access to the images or many passes over the same ones
    (greedy CAR re-evaluates its scoring set for every removal, sub-circuits index image
    groups, the least-squares fold solves on all of them): their memory grows with the
    images either way, so they accept a DataLoader by reading it here.

    Args:
        images: a tensor (returned as it is, with ``labels``), a DataLoader or an iterable
            of ``(images, labels)`` batches.
        labels: labels of a tensor.
        preset: normalises uint8 batches of a stream.

    Returns:
        ``(images, labels)``; labels None when the stream's batches carry none.

    Raises:
        DataError: an empty stream or bad batches.

    Example:
        >>> x, y = in_memory(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]))
        >>> tuple(x.shape), y.tolist()
        ((2, 1, 4, 4), [0, 1])
    """
    if isinstance(images, torch.Tensor):
        return images, labels
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    for x, y in as_stream(images, preset=preset).batches():
        xs.append(x)
        if y is not None:
            ys.append(y)
    if not xs:
        raise DataError("the stream yielded no images")
    return torch.cat(xs), (torch.cat(ys) if len(ys) == len(xs) else None)
