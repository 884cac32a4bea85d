"""What a variant gains at inference: prefill and decode throughput on the evaluation device, and for 2:4
variants on CUDA the same with PyTorch's semi-structured sparse kernels."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from pruning_core.adapters import adapter_for

log = logging.getLogger(__name__)

SEMI_STRUCTURED_CAPABILITY = (8, 0)  # cuSPARSELt / CUTLASS 2:4 kernels: Ampere and later


@dataclass(frozen=True)
class SpeedProtocol:
    prefill_tokens: int = 512
    decode_tokens: int = 128
    batch_sizes: tuple[int, ...] = (1, 8)
    repeats: int = 3
    warmup: int = 1
    seed: int = 0


@dataclass
class SpeedResult:
    metrics: dict[str, float]  # prefill_tok_s.b1, decode_tok_s.b1, decode_ms_per_token.b1, ...
    device: str
    dtype: str
    notes: dict[str, str] = field(default_factory=dict)  # why a measurement was skipped


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(run: Callable[[], object], device: torch.device, protocol: SpeedProtocol) -> float:
    for _ in range(protocol.warmup):
        run()
    times = []
    for _ in range(protocol.repeats):
        _synchronize(device)
        started = time.perf_counter()
        run()
        _synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _vocab_size(model: nn.Module) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


@torch.inference_mode()
def throughput(model: nn.Module, protocol: SpeedProtocol) -> dict[str, float]:
    """Per batch size b: prefill tokens/s of a `prefill_tokens` prompt, and decode tokens/s of
    `decode_tokens` greedy tokens after it (generate(n) minus generate(1): the prompt's cost cancels)."""
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(protocol.seed)
    metrics = {}
    for batch in protocol.batch_sizes:
        prompt = torch.randint(0, _vocab_size(model), (batch, protocol.prefill_tokens), generator=generator)
        prompt = prompt.to(device)
        mask = torch.ones_like(prompt)

        def generate(new_tokens: int, prompt=prompt, mask=mask) -> None:
            model.generate(
                input_ids=prompt,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )

        prefill = _median_seconds(lambda prompt=prompt: model(input_ids=prompt, use_cache=False), device, protocol)
        first = _median_seconds(lambda generate=generate: generate(1), device, protocol)
        full = _median_seconds(lambda generate=generate: generate(protocol.decode_tokens), device, protocol)
        decode = max(full - first, 1e-9) / max(protocol.decode_tokens - 1, 1)
        metrics[f"prefill_tok_s.b{batch}"] = batch * protocol.prefill_tokens / prefill
        metrics[f"decode_tok_s.b{batch}"] = batch / decode
        metrics[f"decode_ms_per_token.b{batch}"] = 1000.0 * decode
    return metrics


def two_four_linears(model: nn.Module) -> list[str]:
    """The block linears whose weights are 2:4 sparse along their inputs (at least 2 zeros per 4)."""
    adapter = adapter_for(model)
    names = []
    for index, block in enumerate(adapter.blocks(model)):
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear) and module.weight.shape[1] % 4 == 0:
                zeros = (module.weight.detach().reshape(module.weight.shape[0], -1, 4) == 0).sum(dim=-1)
                if bool((zeros >= 2).all()):
                    names.append(f"{adapter.block_prefix(index)}.{name}")
    return names


def semi_structured_unavailable(model: nn.Module) -> str | None:
    """Why the semi-structured kernels cannot run this model here (None when they can)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return f"needs CUDA (device is {device.type})"
    if torch.cuda.get_device_capability(device) < SEMI_STRUCTURED_CAPABILITY:
        return f"needs compute capability >= 8.0 (have {torch.cuda.get_device_capability(device)})"
    if next(model.parameters()).dtype not in (torch.float16, torch.bfloat16):
        return f"needs float16/bfloat16 weights (have {next(model.parameters()).dtype})"
    return None


def to_semi_structured(model: nn.Module, names: list[str]) -> tuple[int, dict[str, str]]:
    """Swap the named linears' weights for semi-structured sparse tensors; (converted, name -> why not)."""
    from torch.sparse import to_sparse_semi_structured

    converted, skipped = 0, {}
    for name in names:
        linear = model.get_submodule(name)
        try:
            linear.weight = nn.Parameter(to_sparse_semi_structured(linear.weight.detach()), requires_grad=False)
            converted += 1
        except (RuntimeError, ValueError) as error:  # shapes the kernels do not take stay dense
            skipped[name] = " ".join(str(error).split())[:200]
    return converted, skipped


def measure_speed(model: nn.Module, protocol: SpeedProtocol) -> SpeedResult:
    """Throughput with the dense kernels; for a 2:4 model on a capable GPU also with the sparse kernels
    (`semi_structured.*`, and `semi_structured_ratio.*` = sparse / dense kernels, reported even below 1)."""
    parameter = next(model.parameters())
    result = SpeedResult(
        throughput(model, protocol), str(parameter.device), str(parameter.dtype).removeprefix("torch.")
    )
    names = two_four_linears(model)
    if not names:
        return result
    why_not = semi_structured_unavailable(model)
    if why_not is not None:
        result.notes["semi_structured"] = why_not
        log.info("2:4 variant: semi-structured kernels not measured: %s", why_not)
        return result
    converted, skipped = to_semi_structured(model, names)
    if skipped:
        result.notes["semi_structured_skipped"] = f"{len(skipped)} of {len(names)} linears stay dense"
    if not converted:
        result.notes["semi_structured"] = "no linear could be converted: " + next(iter(skipped.values()))
        return result
    try:
        sparse = throughput(model, protocol)
    except (RuntimeError, NotImplementedError) as error:
        result.notes["semi_structured"] = "failed: " + " ".join(str(error).split())[:300]
        return result
    result.metrics["semi_structured_linears"] = float(converted)
    for key, value in sparse.items():
        result.metrics[f"semi_structured.{key}"] = value
        if not key.startswith("decode_ms"):
            result.metrics[f"semi_structured_ratio.{key}"] = value / result.metrics[key]
    return result
