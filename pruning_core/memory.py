"""Memory a run needs, estimated from shapes before anything is allocated.

A model's size comes from its config.json and the headers of its weight files (a safetensors file's
8-byte length + JSON header, a GGUF file's metadata and tensor infos): no weight is read. A run's needs
add what its recipe allocates: calibration windows (samples x seq_len token ids), the activations the
engine keeps per block (tokens x hidden size, inputs and outputs), statistics (a Hessian per input
width), gradients (structured pruning) and evaluation windows (logits of seq_len x vocab).

The estimates count only memory that is surely allocated (lower bounds: no allocator overhead, no
library temporaries), so a refusal is never wrong; a run that passes may still need more.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import psutil
import torch

from pruning_core.modeling import ModelSource, ModelSpecError

GIB = 2**30
SAFETENSORS_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
_GGUF_MAX_DIMS = 4  # GGML_MAX_DIMS
_HESSIAN_COPIES = 3  # the sum of outer products, its damped inverse and the inverse's Cholesky factor
_TOKEN_BYTES = 8  # calibration windows are int64 token ids

Needs = Literal["nothing", "column_norms", "hessian", "structured"]


class MemoryBudgetError(ValueError):
    """A run whose memory estimate exceeds what it may use: refused before any work."""


def gib(size: int) -> str:
    """A size for people: GiB, or MiB below one GiB."""
    return f"{size / GIB:,.1f} GiB" if size >= GIB else f"{size / 2**20:,.1f} MiB"


@dataclass(frozen=True)
class ModelShape:
    """What sizes a model's memory: read from its files' headers, never from its weights."""

    source: str  # the folder or .gguf file it was read from
    parameters: int
    hidden_size: int
    widest: int  # widest linear input: max of the hidden and MLP widths
    layers: int
    vocab_size: int
    storage_bytes: int  # bytes per parameter as stored (a GGUF's variants are bf16: 2)


@dataclass
class MemoryEstimate:
    """Bytes a run needs, per part, in RAM (`host`) and on the accelerator (`device`; empty on CPU)."""

    what: str
    host: dict[str, int] = field(default_factory=dict)
    device: dict[str, int] = field(default_factory=dict)


# --- weight file headers -------------------------------------------------------------------------------


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets), checked against
    the file's size, reading only the header."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= min(size - 8, SAFETENSORS_MAX_HEADER):
            raise ModelSpecError(
                f"{path}: not a readable safetensors file (truncated or not safetensors: "
                f"a header of {length:,} bytes in a file of {size:,})"
            )
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ModelSpecError(f"{path}: not a readable safetensors file (its header is not JSON: {error})") from None
    if not isinstance(header, dict):
        raise ModelSpecError(f"{path}: not a readable safetensors file (its header is not a mapping)")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if isinstance(entry, dict) else (None, None)
        if not _whole_numbers(shape) or not _whole_numbers(offsets) or len(offsets) != 2:
            raise ModelSpecError(f"{path}: not a readable safetensors file (entry {name[:100]!r} has no valid shape)")
        end = max(end, offsets[1])
    if end > size - 8 - length:
        raise ModelSpecError(
            f"{path}: not a readable safetensors file (truncated: its tensors need {end:,} bytes after the header, "
            f"the file holds {size - 8 - length:,})"
        )
    return header


def _whole_numbers(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


@dataclass(frozen=True)
class GGUFHeader:
    metadata: dict[str, Any]  # scalar values, and arrays of numbers; an array of strings is its length
    parameters: int
    data_bytes: int  # where the last tensor's data ends, from the start of the data section


class _Reader:
    """Bounded reads from a GGUF file: every length is checked against what the file holds before reading."""

    def __init__(self, handle: BinaryIO, path: Path, size: int) -> None:
        self.handle, self.path, self.size = handle, path, size

    def take(self, count: int) -> bytes:
        if count > self.size - self.handle.tell():
            raise ModelSpecError(
                f"{self.path}: truncated GGUF file: its header runs past the file's {self.size:,} bytes"
            )
        return self.handle.read(count)

    def unpack(self, fmt: str) -> Any:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("Q")).decode("utf-8", errors="replace")


# GGUF value types: struct format of each fixed-size one (8 is a string, 9 an array).
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_KEPT_ARRAY = 4096  # number arrays up to this length are kept (per-layer widths); longer ones are skipped


def _gguf_value(reader: _Reader, kind: int) -> Any:
    if kind in _GGUF_SCALARS:
        return reader.unpack(_GGUF_SCALARS[kind])
    if kind == _GGUF_STRING:
        return reader.string()
    if kind != _GGUF_ARRAY:
        raise ModelSpecError(f"{reader.path}: not a valid GGUF file (unknown value type {kind})")
    inner, count = reader.unpack("I"), reader.unpack("Q")
    if inner in _GGUF_SCALARS:
        fmt = _GGUF_SCALARS[inner]
        data = reader.take(count * struct.calcsize(fmt))
        return list(struct.unpack(f"<{count}{fmt}", data)) if count <= _KEPT_ARRAY else count
    if count > reader.size // 8:  # each element is at least a length: a hostile count fails here, not in a loop
        raise ModelSpecError(f"{reader.path}: truncated GGUF file: an array of {count:,} values cannot fit")
    for _ in range(count):
        _gguf_value(reader, inner)
    return count


def gguf_header(path: Path) -> GGUFHeader:
    """A GGUF file's metadata and tensor infos, checked against the file's size; no tensor data is read.

    Kept per (file, size, mtime): a load checks the header, sizes the model and loads the tokenizer from it.
    """
    stat = path.stat()
    return _gguf_header(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _gguf_header(path: Path, size: int, mtime_ns: int) -> GGUFHeader:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    with path.open("rb") as handle:
        reader = _Reader(handle, path, size)
        magic = handle.read(4)
        if magic != b"GGUF":
            raise ModelSpecError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
        version = reader.unpack("I")
        if version not in (2, 3):
            raise ModelSpecError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        tensors, entries = reader.unpack("Q"), reader.unpack("Q")
        if tensors > size // 24 or entries > size // 13:  # smallest tensor info 24 bytes, smallest entry 13
            raise ModelSpecError(f"{path}: truncated GGUF file: {tensors:,} tensors and {entries:,} entries cannot fit")
        metadata = {}
        for _ in range(entries):
            key = reader.string()
            metadata[key] = _gguf_value(reader, reader.unpack("I"))
        parameters = end = 0
        for _ in range(tensors):
            name = reader.string()
            dims = reader.unpack("I")
            if dims > _GGUF_MAX_DIMS:
                raise ModelSpecError(f"{path}: not a valid GGUF file (tensor {name[:100]!r} has {dims} dimensions)")
            shape = [reader.unpack("Q") for _ in range(dims)]
            kind, offset = reader.unpack("I"), reader.unpack("Q")
            try:
                block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            except (ValueError, KeyError):
                raise ModelSpecError(f"{path}: not a valid GGUF file (tensor {name[:100]!r} has type {kind})") from None
            elements = math.prod(shape)
            parameters += elements
            end = max(end, offset + elements // block * block_bytes)
        alignment = metadata.get("general.alignment", 32)
        start = -(-handle.tell() // alignment) * alignment if isinstance(alignment, int) and alignment > 0 else 0
    if start + end > size:
        raise ModelSpecError(
            f"{path}: truncated GGUF file: its tensors end at byte {start + end:,}, the file has {size:,}"
        )
    return GGUFHeader(metadata, parameters, end)


# --- model shapes --------------------------------------------------------------------------------------


def _width(config: dict[str, Any], *keys: str) -> int:
    """The first of `keys` that holds a whole number (a list: its largest); 0 when none does."""
    for key in keys:
        value = config.get(key)
        if isinstance(value, list) and value and _whole_numbers(value):
            value = max(value)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return 0


def _config_parameters(config: dict[str, Any]) -> int:
    """A lower bound on the parameters `from_config` allocates: embeddings, attention projections, MLPs."""
    hidden = _width(config, "hidden_size", "n_embd", "d_model")
    heads = _width(config, "num_attention_heads", "n_head")
    kv_heads = _width(config, "num_key_value_heads") or heads
    head_dim = _width(config, "head_dim") or (hidden // heads if heads else 0)
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim  # q, o and k, v
    experts = _width(config, "num_local_experts", "num_experts", "n_routed_experts")
    intermediate = _width(config, "intermediate_size", "ffn_dim", "n_inner")
    expert_width = _width(config, "moe_intermediate_size") or intermediate
    mlp = experts * 2 * hidden * expert_width if experts else 2 * hidden * intermediate  # at least up and down
    layers = _width(config, "num_hidden_layers", "n_layer", "num_layers")
    return layers * (attention + mlp) + _width(config, "vocab_size") * hidden


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelSpecError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ModelSpecError(f"{path}: not a mapping")
    text = config.get("text_config")  # a multimodal config keeps its decoder's widths here
    return {**config, **text} if isinstance(text, dict) else config


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def model_shape(spec: str) -> ModelShape | None:
    """The shape of a local model (folder or .gguf file) from its headers; None for a hub model."""
    source = ModelSource.parse(spec)
    folder = Path(source.location)
    if source.gguf_file:
        path = folder / source.gguf_file
        header = gguf_header(path)
        meta = header.metadata
        arch = meta.get("general.architecture", "")

        def value(*names: str) -> int:
            return _width(meta, *(f"{arch}.{name}" for name in names))

        hidden = value("embedding_length")
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = value("vocab_size") or (tokens if isinstance(tokens, int) else 0)
        widest = max(hidden, value("feed_forward_length", "expert_feed_forward_length"))
        return ModelShape(str(path), header.parameters, hidden, widest, value("block_count"), vocab, 2)
    if not folder.is_dir():
        return None  # a hub id: sized after it is downloaded
    config = _read_config(folder)
    counted = stored = 0
    for path in sorted(folder.glob("*.safetensors")):
        for name, entry in safetensors_header(path).items():
            if name != "__metadata__":
                counted += math.prod(entry["shape"])
                stored += entry["data_offsets"][1] - entry["data_offsets"][0]
    hidden = _width(config, "hidden_size", "n_embd", "d_model")
    widest = max(hidden, _width(config, "intermediate_size", "ffn_dim", "n_inner", "moe_intermediate_size"))
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    per_parameter = round(stored / counted) if counted and stored else _DTYPE_BYTES.get(name, 4)
    return ModelShape(
        str(folder),
        max(counted, _config_parameters(config)),  # from_config allocates the config's widths, whatever is on disk
        hidden,
        widest,
        _width(config, "num_hidden_layers", "n_layer", "num_layers"),
        _width(config, "vocab_size"),
        per_parameter,
    )


# --- estimates -----------------------------------------------------------------------------------------


def _compute_bytes(shape: ModelShape, device: str) -> int:
    """Bytes per parameter and activation while computing: float32 on a CPU, the storage dtype elsewhere."""
    return 4 if torch.device(device).type == "cpu" else shape.storage_bytes


def load_estimate(shape: ModelShape, bytes_per_parameter: int) -> MemoryEstimate:
    name = f"weights ({shape.parameters:,} parameters x {bytes_per_parameter} bytes)"
    return MemoryEstimate(f"loading {shape.source}", host={name: shape.parameters * bytes_per_parameter})


def method_needs(method: str) -> Needs:
    """What a method keeps besides activations: nothing, column norms, Hessians, or (structured) gradients."""
    from pruning_core.methods import METHODS, STRUCTURED_METHODS

    return "structured" if method in STRUCTURED_METHODS else METHODS[method].needs


def prune_estimate(shape: ModelShape, samples: int, seq_len: int, needs: Needs, device: str) -> MemoryEstimate:
    """A prune: the model, its calibration windows, and per block the engine's activations and statistics
    (structured: the gradients of the whole model, and one row's forward and backward)."""
    width = _compute_bytes(shape, device)
    tokens = samples * seq_len
    weights = shape.parameters * width
    estimate = MemoryEstimate(f"pruning {shape.source}")
    estimate.host[f"weights ({shape.parameters:,} parameters)"] = weights
    estimate.host[f"calibration windows ({samples:,} x {seq_len:,} tokens)"] = tokens * _TOKEN_BYTES
    on_device = estimate.device if torch.device(device).type != "cpu" else estimate.host
    if needs == "structured":
        # the whole model moves to the device; gradients and their running sums in float32
        if on_device is estimate.device:
            on_device["weights on the device"] = weights
        on_device["gradients and their sums"] = 2 * shape.parameters * 4
        row = seq_len * (shape.layers * (shape.hidden_size + shape.widest) + 2 * shape.vocab_size) * 4
        on_device[f"one row's forward and backward ({seq_len:,} tokens)"] = row
        return estimate
    activations = tokens * shape.hidden_size * width
    if on_device is estimate.device:
        estimate.host["block inputs (checkpointed per block)"] = activations
    on_device[f"block inputs and outputs ({tokens:,} tokens x {shape.hidden_size:,} wide)"] = 2 * activations
    if needs == "hessian":
        on_device[f"Hessian statistics ({shape.widest:,} wide)"] = _HESSIAN_COPIES * shape.widest**2 * 4
    return estimate


def evaluation_estimate(shape: ModelShape, seq_len: int, device: str) -> MemoryEstimate:
    """Perplexity: the model and one window's logits (as computed and in float32) and widest activation."""
    width = _compute_bytes(shape, device)
    estimate = MemoryEstimate(f"evaluating {shape.source}")
    estimate.host[f"weights ({shape.parameters:,} parameters)"] = shape.parameters * width
    window = estimate.device if torch.device(device).type != "cpu" else estimate.host
    if window is estimate.device:
        window["weights on the device"] = shape.parameters * width
    window[f"one window's logits ({seq_len:,} x {shape.vocab_size:,})"] = seq_len * shape.vocab_size * (width + 4)
    window[f"one window's activations ({seq_len:,} x {shape.widest:,})"] = seq_len * shape.widest * width
    return estimate


def available_memory() -> int:
    """RAM a new allocation can get now: available memory (psutil counts reclaimable caches) plus free swap."""
    return psutil.virtual_memory().available + psutil.swap_memory().free


def device_memory(device: str) -> int | None:
    """Free memory of an accelerator; None on a CPU or where torch sees no such device."""
    target = torch.device(device)
    if target.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info(target)[0]
    return None


def check_memory(estimate: MemoryEstimate, device: str = "cpu", limit: int | None = None, hint: str = "") -> None:
    """Refuse (one line, the largest parts named) an estimate above `limit` (default: RAM available now)
    or, on an accelerator, above its free memory."""
    allowed, bound = (limit, "the limit") if limit is not None else (available_memory(), "the available")
    sides = [("RAM", estimate.host, allowed, bound)]
    free = device_memory(device) if estimate.device else None
    if free is not None:
        sides.append((f"{device} memory", estimate.device, free, "the free"))
    for kind, parts, allowed, bound in sides:
        needed = sum(parts.values())
        if needed > allowed:
            largest = ", ".join(f"{name} {gib(size)}" for name, size in sorted(parts.items(), key=lambda p: -p[1])[:3])
            raise MemoryBudgetError(
                f"{estimate.what} needs at least {gib(needed)} of {kind} ({largest}), more than {bound} {gib(allowed)}"
                + (f"; {hint}" if hint else "")
            )
