"""Finds and reads the weights of a model directory and maps them strictly onto our modules.

Supported layouts (as published): ``pytorch_model.bin``; ``pytorch_model-0000k-of-0000n.bin`` with
``pytorch_model.bin.index.json``; ``model.safetensors``; sharded safetensors with
``model.safetensors.index.json``. ``.bin`` files are read with ``torch.load(weights_only=True,
mmap=True)``: pickled code is refused, never executed. Safetensors files (what ``python -m
chatglm.download`` leaves) are memory-mapped (:mod:`chatglm.weights.mapped`): tensors the model keeps
as stored are used in place, and a tensor that is converted has its pages released after; where a
file cannot be mapped it is read tensor by tensor (:mod:`chatglm.weights.safetensors_read`). The model
is built on the meta device and filled tensor by tensor, so no second full copy of the weights is made.
"""
from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Iterator

import torch
from torch import nn

from ..config import ChatGLMConfig
from ..model.transformer import ChatGLMForConditionalGeneration
from ..quant.linear import Int4Linear, swap_to_int4
from ..quant.int4 import quantize_int4
from .mapped import MappedSafetensors, release
from .safetensors_read import SafetensorsFormatError, iter_safetensors, read_header

log = logging.getLogger(__name__)

IGNORED_KEYS = ("transformer.rotary_pos_emb.inv_freq",)
EMBEDDING_KEY = "transformer.embedding.word_embeddings.weight"
"""Only gathered from (a row per token): kept as stored when that is no wider than the compute dtype;
the model casts the looked-up rows."""
DOWNLOAD_HINT = "fill the directory with `python -m chatglm.download <repo>` (see the README)"


class CheckpointError(RuntimeError):
    """A model directory's weights are missing, unreadable or do not match the model."""


@dataclass
class WeightFiles:
    kind: str  # "safetensors" or "bin"
    files: list[Path]  # in shard order
    index: Path | None = None


def find_weight_files(model_dir: str | Path) -> WeightFiles:
    """Locate the weight files of ``model_dir`` (safetensors preferred); check every shard exists."""
    d = Path(model_dir)
    if not d.is_dir():
        raise CheckpointError(f"model directory {d} does not exist; {DOWNLOAD_HINT}")
    for kind, single, index in (("safetensors", "model.safetensors", "model.safetensors.index.json"),
                                ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (d / index).is_file():
            weight_map = read_weight_map(d / index)
            names = list(dict.fromkeys(weight_map.values()))
            missing = [n for n in names if not (d / n).is_file()]
            if missing:
                raise CheckpointError(f"{d / index} lists shard files that are missing: {', '.join(missing)}; "
                                      f"{DOWNLOAD_HINT}")
            return WeightFiles(kind, [d / n for n in sorted(names)], d / index)
        if (d / single).is_file():
            return WeightFiles(kind, [d / single])
    present = ", ".join(sorted(p.name for p in d.iterdir())) or "nothing"
    raise CheckpointError(f"no weights in {d} (found: {present}); expected model.safetensors, "
                          f"pytorch_model.bin or a sharded index; {DOWNLOAD_HINT}")


def read_weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a shard index: tensor name -> shard file name, both strings, each file a
    plain name in the same directory."""
    try:
        raw = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{index}: not a valid shard index (not JSON: {exc})") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: not a valid shard index: needs a \"weight_map\" object of "
                              "tensor name -> shard file name")
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name or Path(name).name != name:
            shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:80] + "..."
            raise CheckpointError(f"{index}: weight_map[{key!r}] must be a shard file name in the same "
                                  f"directory, got {shown}")
    return weight_map


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"{path}: refused to load: the file holds pickled objects other than plain "
                              f"tensors, and code from weight files is never executed ({first})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint (truncated or corrupt?): {exc}; "
                              f"re-download it: {DOWNLOAD_HINT}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(sd).__name__}")
    bad = next((k for k in sd if not isinstance(k, str)), None)
    if bad is not None:
        raise CheckpointError(f"{path}: expected a dict of tensors keyed by name, found the key {bad!r} "
                              f"({type(bad).__name__})")
    return sd


def _unreadable_safetensors(path: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(f"{path}: unreadable safetensors file (truncated or corrupt?): {exc}; "
                           f"re-download it: {DOWNLOAD_HINT}")


def iter_tensors(files: WeightFiles) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """Yield ``(key, tensor, file)`` one file at a time; safetensors tensors are views of a mapping of
    the file where it can be mapped."""
    for path in files.files:
        if files.kind == "bin":
            yield from ((k, v, path) for k, v in _read_bin(path).items())
            continue
        try:
            for key, tensor in _safetensors(path):
                yield key, tensor, path
        except (SafetensorsFormatError, OSError) as exc:
            raise _unreadable_safetensors(path, exc) from None


def _safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        mapped = MappedSafetensors(path)
    except SafetensorsFormatError:
        raise
    except (OSError, ValueError, AttributeError) as exc:  # no mmap here: read the file instead
        log.warning("%s cannot be memory-mapped (%s: %s); reading it instead", path, type(exc).__name__, exc)
        return iter_safetensors(path)
    return mapped.tensors()


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    mod_name, _, attr = key.rpartition(".")
    mod = model.get_submodule(mod_name)
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[attr] = value


def stored_keys(files: WeightFiles) -> list[str]:
    """The tensor names a checkpoint holds (from the index, or from the file's header)."""
    if files.index is not None:
        return list(read_weight_map(files.index))
    if files.kind == "bin":
        return list(_read_bin(files.files[0]))
    path = files.files[0]
    try:
        return list(read_header(path)[1])
    except (SafetensorsFormatError, OSError) as exc:
        raise _unreadable_safetensors(path, exc) from None


def _spec(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def load_model(model_dir: str | Path, config: ChatGLMConfig, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, quantize: int | None = None,
               on_int4_layer: Callable[[Int4Linear], None] | None = None,
               keep_stored: Collection[str] = ()) -> ChatGLMForConditionalGeneration:
    """Build the model for ``config`` and fill it from ``model_dir``.

    ``quantize=None`` keeps the checkpoint as stored (int4 stays int4); ``quantize=4`` makes an int4
    model, quantizing a float checkpoint tensor by tensor; ``quantize=0`` requires a float checkpoint.
    Float tensors are cast to ``dtype`` except the embedding table (see ``EMBEDDING_KEY``) and the
    keys in ``keep_stored`` (which the caller converts itself); int4 codes stay int8 and their scales
    fp16. ``on_int4_layer`` is called with each int4 layer as soon as its tensors are in (e.g. to pack
    it for a kernel), so that work overlaps reading the rest of the file.
    """
    if quantize not in (None, 0, 4):
        raise ValueError(f"quantize must be None, 0 or 4, got {quantize!r}")
    files = find_weight_files(model_dir)
    stored_int4 = config.quantization_bit == 4 or any(k.endswith(".weight_scale") for k in stored_keys(files))
    if stored_int4 and quantize == 0:
        raise CheckpointError(f"{model_dir} holds an int4 checkpoint; it cannot be loaded unquantized "
                              "(quantize=0). Use quantize=None or 4, or download the fp16 model.")
    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(config)
        float_spec = _spec(model)
        if stored_int4 or quantize == 4:
            swap_to_int4(model)
    expected = _spec(model) if stored_int4 else float_spec
    int4_modules = {name for name, m in model.named_modules() if isinstance(m, Int4Linear)}

    pending = {name: {k for k in expected if k.rpartition(".")[0] == name} for name in int4_modules}
    errors: list[str] = []
    seen: dict[str, Path] = {}
    for key, tensor, path in iter_tensors(files):
        if key in IGNORED_KEYS:
            continue
        if key in seen:
            errors.append(f"duplicate key {key} in {path.name} (also in {seen[key].name})")
            continue
        seen[key] = path
        if key not in expected:
            errors.append(f"unexpected key {key} in {path.name}")
            continue
        shape, want = expected[key]
        if tuple(tensor.shape) != shape:
            errors.append(f"{key} in {path.name}: shape {tuple(tensor.shape)}, expected {shape}")
        elif (want == torch.int8) != (tensor.dtype == torch.int8) or not (
                tensor.dtype == torch.int8 or tensor.is_floating_point()):
            errors.append(f"{key} in {path.name}: dtype {tensor.dtype}, expected "
                          f"{'torch.int8' if want == torch.int8 else 'a floating-point dtype'}")
        elif not errors:
            module = key.rpartition(".")[0]
            kept = _assign(model, key, tensor, device, dtype, keep_stored, quantize_now=module in int4_modules
                           and not stored_int4 and key.endswith(".weight"))
            if not kept:
                release(tensor)
            if on_int4_layer is not None and module in pending:
                pending[module].discard(key)
                if not pending[module]:
                    on_int4_layer(model.get_submodule(module))

    missing = [k for k in expected if k not in seen]
    if missing:
        where = ", ".join(p.name for p in files.files)
        errors.extend(f"missing key {k} (looked in {where})" for k in missing)
    if errors:
        shown = errors[:20] + ([f"... and {len(errors) - 20} more"] if len(errors) > 20 else [])
        raise CheckpointError(f"checkpoint in {model_dir} does not match the model "
                              f"({len(errors)} problem(s)):\n  " + "\n  ".join(shown))
    model.requires_grad_(False).eval()
    return model


def _assign(model: nn.Module, key: str, tensor: torch.Tensor, device, dtype: torch.dtype,
            keep_stored: Collection[str], quantize_now: bool) -> bool:
    """Set ``key`` from ``tensor`` (converted as the model needs it); True if ``tensor`` itself is kept."""
    if quantize_now:
        packed, scale = quantize_int4(tensor)
        _set_tensor(model, key, packed.to(device))
        _set_tensor(model, key + "_scale", scale.to(device))
        return False
    if key.endswith(".weight_scale"):
        value = tensor.to(device=device, dtype=torch.float16)
    elif tensor.dtype == torch.int8 or key in keep_stored or (
            key == EMBEDDING_KEY and tensor.element_size() <= dtype.itemsize):
        value = tensor.to(device)
    else:
        value = tensor.to(device=device, dtype=dtype)
    _set_tensor(model, key, value)
    return value.data_ptr() == tensor.data_ptr()
