"""A physically pruned classifier and its files: :class:`PrunedModel`, the architecture spec it
is rebuilt from, and :func:`load_pruned` (data only: the spec names layers and channel counts,
never code)."""

from __future__ import annotations

import copy
import importlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.nn.modules import batchnorm as _bn
from torch.nn.modules import conv as _conv

from netcarve.core._json_limits import loads_limited
from netcarve.core.costs import count_macs, count_parameters
from netcarve.core.errors import ModelSpecError, NetcarveError
from netcarve.core.graph import ModelGraph

__all__ = ["ARCHITECTURE_FORMAT", "CompressError", "PrunedModel", "build_from_spec", "load_pruned"]

ARCHITECTURE_FORMAT = "netcarve-pruned-model"
_FORMAT_VERSION = 1


class CompressError(NetcarveError):
    """Filters cannot be removed physically (the message says which layer and why)."""


# --------------------------------------------------------------------------- sizes


# --------------------------------------------------------------------------- the result


@dataclass
class PrunedModel:
    """A physically smaller copy of a model and what was removed.

    Attributes:
        module: the new, smaller ``nn.Module`` (in eval mode).
        kept: ``{layer: original indices of the filters kept}`` for every pruned layer.
        removed: ``{layer: original indices removed}``.
        params_before / params_after: parameter counts.
        macs_before / macs_after: multiply-accumulates per image (:func:`count_macs`).
        input_shape: one input's shape (without batch).
        spec: how to rebuild the base architecture (zoo name or ``package.module:factory``),
            or None when unknown (then :meth:`save` needs one).
        order: the pruning order ``[(layer, filter), ...]`` when known.
        max_rel_error: largest relative difference to the masked model on the check input.
        metadata: free-form string information saved with the files.
    """

    module: nn.Module
    kept: dict[str, list[int]]
    removed: dict[str, list[int]]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    input_shape: tuple[int, ...]
    spec: str | None = None
    order: list[tuple[str, int]] = field(default_factory=list)
    max_rel_error: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description (no weights)."""
        return {
            "format": ARCHITECTURE_FORMAT,
            "version": _FORMAT_VERSION,
            "spec": self.spec,
            "input_shape": list(self.input_shape),
            "kept": {k: list(v) for k, v in self.kept.items()},
            "removed": {k: list(v) for k, v in self.removed.items()},
            "filters_removed": sum(len(v) for v in self.removed.values()),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "params_ratio": self.params_after / max(1, self.params_before),
            "macs_ratio": self.macs_after / max(1, self.macs_before),
            "order": [[layer, int(f)] for layer, f in self.order],
            "max_rel_error": self.max_rel_error,
            "metadata": self.metadata,
        }

    def save(self, directory: str | Path, spec: str | None = None) -> Path:
        """Write ``model.safetensors`` and ``architecture.json`` into ``directory``.

        Args:
            directory: output folder (created).
            spec: base architecture spec, overriding :attr:`spec`.

        Returns:
            the folder.

        Raises:
            CompressError: no spec is known, so the files could not be loaded back.

        Example:
            >>> pruned.save("out/pruned")  # doctest: +SKIP
        """
        from netcarve.core.weights import save_weights

        spec = spec or self.spec
        if not spec:
            raise CompressError(
                "cannot save a pruned model without an architecture spec: pass spec= (a zoo "
                "name or 'package.module:factory' that builds the unpruned model)")
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        desc = self.to_dict()
        desc["spec"] = spec
        save_weights(self.module, out / "model.safetensors",
                     {"format": ARCHITECTURE_FORMAT, "spec": spec})
        (out / "architecture.json").write_text(json.dumps(desc, indent=2))
        return out


# --------------------------------------------------------------------------- surgery


def _check_masks(graph: ModelGraph, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not isinstance(masks, dict):
        raise CompressError(f"masks must be a dict {{layer: bool [out_channels]}}, got "
                            f"{type(masks).__name__}")
    out: dict[str, torch.Tensor] = {}
    for name, keep in masks.items():
        info = graph.layer(name)
        keep_t = torch.as_tensor(keep).detach().cpu()
        if tuple(keep_t.shape) != (info.out_channels,):
            raise CompressError(f"mask for {name} has shape {tuple(keep_t.shape)}, expected "
                                f"({info.out_channels},)")
        keep_t = keep_t.bool()
        if bool(keep_t.all()):
            continue
        if not bool(keep_t.any()):
            raise CompressError(f"the mask for {name} removes all {info.out_channels} filters; "
                                "keep at least one")
        out[name] = keep_t
    return out


def _new_param(value: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(value.detach().clone().contiguous(), requires_grad=like.requires_grad)


def _slice_out(mod: nn.Module, idx: torch.Tensor) -> None:
    idx = idx.to(mod.weight.device)
    mod.weight = _new_param(mod.weight.index_select(0, idx), mod.weight)
    if getattr(mod, "bias", None) is not None:
        mod.bias = _new_param(mod.bias.index_select(0, idx), mod.bias)
    if isinstance(mod, _conv._ConvNd):
        mod.out_channels = len(idx)
    else:
        mod.out_features = len(idx)


def _slice_bn(bn: _bn._BatchNorm, idx: torch.Tensor) -> None:
    dev_idx = idx.to(bn.running_mean.device if bn.running_mean is not None else "cpu")
    if bn.affine:
        bn.weight = _new_param(bn.weight.index_select(0, dev_idx.to(bn.weight.device)),
                               bn.weight)
        bn.bias = _new_param(bn.bias.index_select(0, dev_idx.to(bn.bias.device)), bn.bias)
    if bn.running_mean is not None:
        bn.running_mean = bn.running_mean.index_select(0, dev_idx).clone()
    if bn.running_var is not None:
        bn.running_var = bn.running_var.index_select(0, dev_idx).clone()
    bn.num_features = len(idx)


def _slice_in(mod: nn.Module, keep_pos: torch.Tensor, spatial: int) -> None:
    if isinstance(mod, _conv._ConvNd):
        idx = keep_pos.to(mod.weight.device)
        mod.weight = _new_param(mod.weight.index_select(1, idx), mod.weight)
        mod.in_channels = len(keep_pos)
    else:
        cols = (keep_pos[:, None] * spatial + torch.arange(spatial)[None, :]).reshape(-1)
        mod.weight = _new_param(mod.weight.index_select(1, cols.to(mod.weight.device)),
                                mod.weight)
        mod.in_features = len(cols)


def depthwise_followers(graph: ModelGraph, layer: str) -> list[str]:
    """Depthwise convs (one filter per input channel, ``groups == in == out``) that
    ``layer`` feeds: removing a filter of ``layer`` removes their channel with it (the
    depthwise filter then reads only zeros; its constant output is folded into the layers it
    feeds, see :func:`netcarve.surgery.prune.prune_filters`)."""
    out = []
    for consumer in graph.consumers(layer):
        info = graph.layers[consumer]
        if info.kind == "conv" and 1 < info.groups == info.in_channels == info.out_channels:
            out.append(consumer)
    return out


def _removed_positions(graph: ModelGraph, source: str, gone: set[int],
                       removed_pos: dict[str, set[int]], skip: set[str]) -> None:
    for consumer in graph.consumers(source):
        if consumer in skip:
            continue
        for link in graph.links[consumer]:
            if link.source != source:
                continue
            hit = [p for s, p in zip(link.source_channels.tolist(),
                                     link.input_channels.tolist(), strict=True) if s in gone]
            removed_pos.setdefault(consumer, set()).update(hit)


def _fold_constants(mod: nn.Module, gone_pos: set[int], spatial: int,
                    values: torch.Tensor | None) -> None:
    """Add the contribution of constant input channels (about to be removed) to the bias."""
    weight = mod.weight
    if getattr(mod, "bias", None) is None:
        out = weight.shape[0]
        mod.bias = nn.Parameter(torch.zeros(out, dtype=weight.dtype, device=weight.device),
                                requires_grad=weight.requires_grad)
    if values is None:
        return  # rebuilding a saved structure: the saved weights hold the folded bias
    pos = torch.tensor(sorted(gone_pos), dtype=torch.int64)
    with torch.no_grad():
        if isinstance(mod, _conv._ConvNd):
            taps = weight.index_select(1, pos.to(weight.device)).flatten(2).sum(2)
            mod.bias += taps @ values[pos].to(weight)
        else:
            cols = (pos[:, None] * spatial + torch.arange(spatial)[None, :]).reshape(-1)
            mod.bias += weight.index_select(1, cols.to(weight.device)) @ values[cols].to(weight)


def _apply_structure(module: nn.Module, graph: ModelGraph,
                     masks: dict[str, torch.Tensor],
                     constants: dict[str, torch.Tensor] | None = None) -> None:
    """Resize ``module`` (a copy) in place for ``masks`` (validated, prunable).

    A depthwise conv fed by a pruned layer loses the same channels; ``constants`` holds, for
    each layer that depthwise conv feeds, its input values under the masks (the removed
    channels are constant there and are folded into its bias). Without ``constants`` (when
    a saved model is rebuilt) the biases are only created, for the saved weights to fill.
    """
    mods = dict(module.named_modules())
    removed_pos: dict[str, set[int]] = {}
    folded: set[str] = set()
    for name, keep in masks.items():
        idx = keep.nonzero().reshape(-1)
        _slice_out(mods[name], idx)
        for bn_name in graph.bn_after.get(name, []):
            _slice_bn(mods[bn_name], idx)  # type: ignore[arg-type]
        gone = set((~keep).nonzero().reshape(-1).tolist())
        coupled = set(depthwise_followers(graph, name))
        _removed_positions(graph, name, gone, removed_pos, coupled)
        for dw in coupled:
            dw_gone = {p for link in graph.links[dw] if link.source == name
                       for s, p in zip(link.source_channels.tolist(),
                                       link.input_channels.tolist(), strict=True) if s in gone}
            dw_keep = torch.tensor([c for c in range(graph.layers[dw].out_channels)
                                    if c not in dw_gone], dtype=torch.int64)
            conv = mods[dw]
            _slice_out(conv, dw_keep)
            conv.in_channels = conv.groups = len(dw_keep)  # type: ignore[assignment]
            for bn_name in graph.bn_after.get(dw, []):
                _slice_bn(mods[bn_name], dw_keep)  # type: ignore[arg-type]
            before = {k: set(v) for k, v in removed_pos.items()}
            _removed_positions(graph, dw, dw_gone, removed_pos, set())
            for consumer, pos in removed_pos.items():
                new = pos - before.get(consumer, set())
                if new:
                    _fold_constants(mods[consumer], new, graph.layers[consumer].spatial,
                                    None if constants is None else constants[consumer])
                    folded.add(consumer)
    for consumer, gone_pos in removed_pos.items():
        info = graph.layers[consumer]
        keep_pos = torch.tensor([p for p in range(info.in_channels) if p not in gone_pos],
                                dtype=torch.int64)
        _slice_in(mods[consumer], keep_pos, info.spatial)


def _base_spec(model: nn.Module) -> str | None:
    spec = getattr(model, "netcarve_spec", None)
    return spec if isinstance(spec, str) else None


# --------------------------------------------------------------------------- loading


def build_from_spec(spec: str) -> nn.Module:
    """The unpruned architecture (random weights) named by a zoo name or a factory spec.

    Only call this with a spec the user gave: a ``package.module:factory`` spec imports and
    calls code. :func:`load_pruned` resolves a spec read from a file against the zoo only.

    Raises:
        ModelSpecError: the spec cannot be resolved.

    Example:
        >>> type(build_from_spec("fmnist_vgg")).__name__
        'FmnistVGG'
    """
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ModelSpecError(f"cannot resolve {spec!r}: {exc}") from exc
        model = factory()
    else:
        from netcarve.zoo import ZOO

        if spec not in ZOO:
            raise ModelSpecError(f"unknown zoo model {spec!r} in the architecture description")
        model = ZOO[spec].factory()
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec!r} did not build an nn.Module")
    return model


Architecture = str | Callable[[], nn.Module] | nn.Module


def _base_architecture(recorded: Any, given: Architecture | None, where: Path) -> nn.Module:
    """The unpruned module: the caller's ``architecture``, else the file's spec if a zoo name.

    A spec read from a file is a label, never imported: a ``module:factory`` string inside
    architecture.json could otherwise run any code on the machine that loads it.
    """
    from netcarve.zoo import ZOO

    if given is None:
        if isinstance(recorded, str) and recorded in ZOO:
            return ZOO[recorded].factory()
        shown = repr(recorded) if len(repr(recorded)) <= 80 else repr(recorded)[:77] + "..."
        raise ModelSpecError(
            f"{where} names architecture {shown}, which is not a zoo model; netcarve never "
            "imports code named inside a file. If you trust it, pass it yourself: "
            f"load_pruned(..., architecture={shown}) or a factory / module")
    if isinstance(given, nn.Module):
        return copy.deepcopy(given)
    if isinstance(given, str):
        return build_from_spec(given)
    model = given()
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"architecture factory returned {type(model).__name__}, "
                             "not an nn.Module")
    return model


def _input_shape(value: Any, where: Path) -> tuple[int, ...]:
    ok = (isinstance(value, list) and 1 <= len(value) <= 4
          and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 16
                  for v in value) and math.prod(value) <= 1 << 26)
    if not ok:
        raise CompressError(f"{where}: input_shape must be 1 to 4 positive integers of "
                            f"moderate size, got {str(value)[:60]}")
    return tuple(value)


def load_pruned(directory: str | Path, device: str | torch.device = "cpu", *,
                architecture: Architecture | None = None) -> PrunedModel:
    """Rebuild a pruned model saved by :meth:`PrunedModel.save`.

    The base architecture is built, resized to the kept filters, and filled with the saved
    weights. The file names its architecture, but only a zoo name is used from it; any other
    architecture must come from the caller.

    Args:
        directory: the folder with ``architecture.json`` and ``model.safetensors``.
        device: where to put the module.
        architecture: the unpruned architecture when it is not a zoo model: a
            ``package.module:factory`` spec, a zero-argument factory, or a module (copied).

    Returns:
        the :class:`PrunedModel` (module in eval mode).

    Raises:
        CompressError: missing or malformed files.
        ModelSpecError: the file names a non-zoo architecture and none was given, or the
            spec cannot be built. WeightsError: the weights do not fit.

    Example:
        >>> again = load_pruned("out/pruned")  # doctest: +SKIP
        >>> mine = load_pruned("out/pruned", architecture="mypkg.nets:build")  # doctest: +SKIP
    """
    from netcarve.core.devices import resolve_device
    from netcarve.core.weights import load_weights

    target_device = resolve_device(device)
    folder = Path(directory)
    desc_path = folder / "architecture.json"
    if not desc_path.is_file():
        raise CompressError(f"no architecture.json in {folder}")
    try:
        desc = loads_limited(desc_path.read_text(encoding="utf-8"), max_bytes=64 << 20)
    except (ValueError, OSError) as exc:
        raise CompressError(f"{desc_path} is not valid JSON: {exc}") from exc
    if not isinstance(desc, dict) or desc.get("format") != ARCHITECTURE_FORMAT:
        raise CompressError(f"{desc_path} is not a netcarve pruned-model description")
    version = desc.get("version", 0)
    if not isinstance(version, int) or version > _FORMAT_VERSION:
        raise CompressError(f"{desc_path} has format version {version!r}; this netcarve "
                            f"reads up to {_FORMAT_VERSION}")
    kept_desc = desc.get("kept")
    if not isinstance(kept_desc, dict) or not all(
            isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
            for v in kept_desc.values()):
        raise CompressError(f"{desc_path}: 'kept' must map layer names to lists of filter "
                            "indices")
    input_shape = _input_shape(desc.get("input_shape"), desc_path)
    base = _base_architecture(desc.get("spec"), architecture, desc_path).eval()
    graph = ModelGraph.build(base, torch.zeros(1, *input_shape))
    masks: dict[str, torch.Tensor] = {}
    for name, kept in kept_desc.items():
        keep = torch.zeros(graph.layer(name).out_channels, dtype=torch.bool)
        if any(not 0 <= i < len(keep) for i in kept):
            raise CompressError(f"{desc_path}: kept filters of {name} must lie in "
                                f"0..{len(keep) - 1}")
        keep[torch.tensor(kept, dtype=torch.int64)] = True
        masks[name] = keep
    checked = _check_masks(graph, masks)
    module = copy.deepcopy(base)
    _apply_structure(module, graph, checked)
    load_weights(module, folder / "model.safetensors")
    module.eval().to(target_device)
    new_graph = ModelGraph.build(module, torch.zeros(1, *input_shape, device=target_device))
    return PrunedModel(
        module=module, kept={k: list(v) for k, v in desc["kept"].items()},
        removed={k: list(v) for k, v in desc.get("removed", {}).items()},
        params_before=int(desc.get("params_before", count_parameters(base))),
        params_after=count_parameters(module),
        macs_before=int(desc.get("macs_before", count_macs(base, graph))),
        macs_after=count_macs(module, new_graph), input_shape=input_shape, spec=desc.get("spec"),
        order=[(str(a), int(b)) for a, b in desc.get("order", [])],
        max_rel_error=desc.get("max_rel_error"), metadata=desc.get("metadata", {}),
    )
