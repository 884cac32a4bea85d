"""Loading causal LMs (folder, .gguf, hf://org/name@revision), saving them, sparsity reports."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from pruning_core.adapters import adapter_for
from pruning_core.structured.storage import SHAPES_KEY, has_block_shapes, load_structured, save_structured


class ModelSpecError(ValueError):
    pass


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, as `from_pretrained` wants it."""

    location: str
    gguf_file: str | None = None
    revision: str | None = None

    @classmethod
    def parse(cls, spec: str) -> ModelSource:
        if spec.startswith("hf://"):
            name, _, revision = spec.removeprefix("hf://").partition("@")
            if name.count("/") != 1:
                raise ModelSpecError(f"hub models are hf://org/name[@revision], got {spec!r}")
            return cls(name, revision=revision or None)
        path = Path(spec)
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ModelSpecError(f"model file not found: {spec}")
            return cls(str(path.parent), gguf_file=path.name)
        if not path.is_dir():
            raise ModelSpecError(f"model not found: {spec} (give a folder, a .gguf file or hf://org/name@revision)")
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"{spec} is not a Hugging Face model folder (no config.json)")
        return cls(str(path))

    def kwargs(self, trust_remote_code: bool) -> dict:
        extra = {"trust_remote_code": trust_remote_code}
        if self.gguf_file:
            extra["gguf_file"] = self.gguf_file
        if self.revision:
            extra["revision"] = self.revision
        return extra


def load_model(
    spec: str, trust_remote_code: bool = False, dtype: str | torch.dtype = "auto", memory_limit: int | None = None
):
    """(model on CPU in eval mode, tokenizer) for a model spec.

    Refused (MemoryBudgetError) before anything is allocated when its weights, sized from config.json and
    the weight files' headers, need more than `memory_limit` bytes (default: the RAM available now).
    """
    from transformers import AutoModelForCausalLM

    source = _checked_source(spec)
    check_load_memory(spec, _bytes_per_parameter(spec, dtype), memory_limit)
    tokenizer = _tokenizer(source, trust_remote_code)
    if not source.gguf_file and has_block_shapes(source.location):
        # Structurally pruned with different widths per block: our loader, since from_pretrained cannot.
        return load_structured(source.location, dtype), tokenizer
    with _naming_the_file(source, "model"):
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, **source.kwargs(trust_remote_code))
    if source.gguf_file:
        # GGUF weights arrive dequantized to plain tensors; forget the quantizer so the model saves normally
        # and casts like any other (transformers refuses .float() on a model it thinks quantized).
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model.eval(), tokenizer


def load_for_compute(spec: str, device: str, trust_remote_code: bool = False):
    """(model on CPU, tokenizer) with its weights as stored (a GGUF rounded to bf16); on a CPU device they are
    computed in float32 (an exact upcast), on an accelerator in their storage dtype."""
    source = _checked_source(spec)  # a broken config.json is named before its dtype is read
    dtype = storage_dtype(spec)
    upcast = torch.device(device).type == "cpu" and dtype != torch.float32
    if upcast and not source.gguf_file:  # a GGUF load is sized in float32 already
        check_load_memory(spec, 4)  # the float32 copy it ends as, refused before the storage-dtype load
    model, tokenizer = load_model(spec, trust_remote_code=trust_remote_code, dtype=dtype)
    if upcast:
        model.float()
    return model, tokenizer


def check_load_memory(spec: str, bytes_per_parameter: int, memory_limit: int | None = None) -> None:
    """Refuse a local model whose weights (from config.json and weight headers) exceed the memory limit."""
    from pruning_core.memory import check_memory, load_estimate, model_shape

    shape = model_shape(spec)
    if shape is not None:
        check_memory(load_estimate(shape, bytes_per_parameter), limit=memory_limit)


def _bytes_per_parameter(spec: str, dtype: str | torch.dtype) -> int:
    """What a load in `dtype` holds per parameter; a GGUF is dequantized to float32 before it is cast."""
    if isinstance(dtype, str):
        dtype = storage_dtype(spec) if dtype == "auto" else DTYPES.get(dtype, torch.float32)
    return 4 if ModelSource.parse(spec).gguf_file else dtype.itemsize


def _checked_source(spec: str) -> ModelSource:
    """The spec's source with its local files checked: a broken JSON, safetensors or GGUF file is named."""
    from pruning_core.memory import gguf_header

    source = ModelSource.parse(spec)
    if source.gguf_file:
        gguf_header(Path(source.location) / source.gguf_file)  # truncation and bad headers, before transformers
    else:
        check_model_files(Path(source.location))
    return source


@contextmanager
def _naming_the_file(source: ModelSource, what: str) -> Iterator[None]:
    """A local model's load error as one ModelSpecError naming its file or folder (a hub id's passes through:
    transformers names the repository and may be retried)."""
    local = Path(source.location) / (source.gguf_file or "")
    if not local.exists():
        yield
        return
    try:
        yield
    except ModelSpecError:
        raise
    except Exception as error:  # tokenizers, gguf and transformers raise types of their own
        message = " ".join(str(error).split())[:500] or type(error).__name__
        raise ModelSpecError(f"{local}: cannot load the {what} ({message})") from error


def output_dtype(requested: str, source_spec: str) -> torch.dtype:
    """The dtype a variant is saved in: the one a recipe asks for, else (`auto`) its source's."""
    return storage_dtype(source_spec) if requested == "auto" else DTYPES[requested]


def check_model_files(folder: Path) -> None:
    """A local folder's JSON files parse and its safetensors headers read: a broken one is named, not a traceback."""
    if not folder.is_dir():
        return  # a hub id: transformers resolves and reports it
    for path in sorted(folder.glob("*.json")):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ModelSpecError(f"{path}: not valid JSON ({error})") from None
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt") as handle:
                handle.keys()
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
            raise ModelSpecError(f"{path}: not a readable safetensors file ({error})") from None


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    """The model's tokenizer; a truncated or malformed tokenizer file is one error naming it."""
    return _tokenizer(_checked_source(spec), trust_remote_code)


def _tokenizer(source: ModelSource, trust_remote_code: bool):
    from transformers import AutoTokenizer

    with _naming_the_file(source, "tokenizer"):
        return AutoTokenizer.from_pretrained(source.location, **source.kwargs(trust_remote_code))


GGUF_STORAGE_DTYPE = torch.bfloat16  # a quantized source has no float dtype of its own: store its variants in bf16
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def storage_dtype(spec: str) -> torch.dtype:
    """The dtype a model's weights are stored in: its config's (dtype / torch_dtype), bf16 for a GGUF."""
    source = ModelSource.parse(spec)
    if source.gguf_file:
        return GGUF_STORAGE_DTYPE
    config_file = Path(source.location) / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    return DTYPES.get(name, torch.float32)


@contextmanager
def cast_for_saving(model: nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """The model in `dtype` while it is saved; afterwards back in its own dtype, holding the saved values
    (so what was saved is what later computations see)."""
    original = next(model.parameters()).dtype
    if dtype is None or dtype == original:
        yield
        return
    model.to(dtype)
    try:
        yield
    finally:
        model.to(original)


def save_model(model: nn.Module, tokenizer, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Hugging Face format: safetensors weights (in `dtype` when given), config, generation config, tokenizer."""
    if dtype is not None:
        with cast_for_saving(model, dtype):
            return save_model(model, tokenizer, out_dir)
    if hasattr(model.config, SHAPES_KEY):  # structurally pruned earlier: keep its per-block widths loadable
        save_structured(model, tokenizer, out_dir)
        return Path(out_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def prunable_weight_names(model: nn.Module) -> list[str]:
    """The prunable parameters as the model names them in memory (a block's fused experts weight is one)."""
    adapter = adapter_for(model)
    return [
        f"{adapter.block_prefix(i)}.{weight}"
        for i, block in enumerate(adapter.blocks(model))
        for weight in adapter.weight_names(block)
    ]


def saved_weight_names(model: nn.Module) -> list[str]:
    """The tensors the prunable parameters are saved as by `save_model`.

    Why not the in-memory names: save_pretrained reverts the conversions transformers applied on load, so a
    source that stores one tensor per expert (every published Mixtral, Qwen-MoE, OLMoE; and a model built from
    its config) gets its fused `gate_up_proj`/`down_proj` written back per expert under the source's own keys
    (`block_sparse_moe.experts.3.w1.weight`), while a source saved fused stays fused. Running that same revert
    over shape-only (meta) placeholders gives exactly the saved names, whatever the family's mapping.
    """
    from transformers.core_model_loading import revert_weight_conversion

    placeholders = {}
    for name in prunable_weight_names(model):
        parameter = model.get_parameter(name)
        placeholders[name] = torch.empty(parameter.shape, dtype=parameter.dtype, device="meta")
    saved = revert_weight_conversion(model, placeholders)
    # A revert that needs tensors besides the prunable ones (or skips one) would leave weights unchecked: refuse.
    if sum(t.numel() for t in saved.values()) != sum(t.numel() for t in placeholders.values()):
        raise ModelSpecError(f"cannot tell which saved tensors hold the prunable weights of {type(model).__name__}")
    return list(saved)


def sparsity_report(folder: str | Path, weight_names: list[str]) -> dict:
    """Zero fraction per prunable weight and in total, read from the saved safetensors files.

    `weight_names` are the names on disk (`saved_weight_names`): per expert where the folder stores experts so.
    """
    folder = Path(folder)
    wanted = set(weight_names)
    layers: dict[str, float] = {}
    zeros = total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                if name in wanted:
                    tensor = handle.get_tensor(name)
                    layer_zeros = int((tensor == 0).sum())
                    layers[name] = layer_zeros / tensor.numel()
                    zeros += layer_zeros
                    total += tensor.numel()
    missing = wanted - layers.keys()
    if missing:
        raise ModelSpecError(f"{folder}: saved weights lack {len(missing)} prunable tensors, e.g. {sorted(missing)[0]}")
    return {"total": zeros / max(total, 1), "parameters": total, "zeros": zeros, "layers": layers}
