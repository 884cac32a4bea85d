"""The distillation loss computed from final hidden states in chunks of tokens, never holding whole logits.

A student's step on a 49k-token vocabulary spent more time on logits than on its decoder: measured on
SmolLM2-135M (2 x 512 tokens, bfloat16 autocast, 2 AMX cores) the KL over two [1024, 49152] float32 logit
tensors took 1.5-2.6 s of a 5-7 s step, and its backward through log-softmax most of another second. Here the
output layer, both log-softmaxes, the KL (and the next-token cross-entropy) and their gradient run one chunk
of tokens at a time, so each chunk's logits stay small and are dropped at once; the gradient with respect to
the student's hidden states (and the output layer's weight when it trains) is formed in the same pass and
handed to autograd. The value and the gradients are those of `distillation_loss` on full logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_TOKENS = 128  # [128, vocab] float32 temporaries: small enough to stay near the cores' caches


@dataclass(frozen=True)
class LossWeights:
    """What the loss holds besides T^2 x KL(teacher || student): next-token cross-entropy's weight."""

    temperature: float
    lm_weight: float = 0.0


def chunk_terms(
    logits: torch.Tensor,
    taught: torch.Tensor,
    targets: torch.Tensor | None,
    *,
    temperature: float,
    lm_scale: float,
    kl_grad_scale: float,
    lm_grad_scale: float,
    grad_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's part of the loss (T^2 x KL summed over its tokens, minus `lm_scale` x the log-likelihood of
    its `targets` where >= 0) and its gradient with respect to the student's `logits`:
    d(T^2 KL)/d logits = T (softmax(s/T) - softmax(t/T)) and d CE/d logits = softmax(s) - onehot, each scaled
    to the mean the loss takes. Elementwise work only, so that `torch.compile` can fuse it into a few passes
    (eager it was 1.4 s of a 4 s SmolLM2 step, twice the teacher's whole forward)."""
    log_student = F.log_softmax(logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(taught.float() / temperature, dim=-1)
    student_p, teacher_p = log_student.exp(), log_teacher.exp()
    total = (teacher_p * (log_teacher - log_student)).sum(dtype=torch.float64) * temperature**2
    grad = (student_p - teacher_p).mul_(kl_grad_scale)
    if targets is not None:
        log_p = log_student if temperature == 1.0 else F.log_softmax(logits.float(), dim=-1)
        p = student_p if temperature == 1.0 else log_p.exp()
        valid = targets >= 0
        picked = targets.clamp_min(0)[:, None]
        total = total - lm_scale * (log_p.gather(1, picked).squeeze(1) * valid).sum(dtype=torch.float64)
        row_scale = (valid.float() * lm_grad_scale)[:, None]
        if torch.compiler.is_compiling():  # inductor fused the scatter below away (its one-hot never counted)
            hit = torch.arange(p.shape[-1], device=p.device) == picked
            grad += torch.where(hit, p - 1.0, p) * row_scale
        else:  # one pass over the chunk, not three
            grad += (p * row_scale).scatter_add_(1, picked, -row_scale)
    return total, grad.to(grad_dtype)


@cache
def _compiled_chunk_terms():
    return torch.compile(chunk_terms, dynamic=False)


class _ChunkedLogitLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, weight, teacher_hidden, teacher_weight, labels, weights, compute_dtype, compiled):
        tokens, temperature = student_hidden.shape[0], weights.temperature
        with_lm = weights.lm_weight > 0 and labels is not None
        labelled = max(1, int((labels >= 0).sum())) if with_lm else 1
        terms = _compiled_chunk_terms() if compiled else chunk_terms
        grad_hidden = torch.empty_like(student_hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        student_w, teacher_w = weight.to(compute_dtype), teacher_weight.to(compute_dtype)
        total = torch.zeros((), dtype=torch.float64, device=student_hidden.device)
        for start in range(0, tokens, CHUNK_TOKENS):
            rows = slice(start, min(start + CHUNK_TOKENS, tokens))
            hidden = student_hidden[rows].to(compute_dtype)
            part, grad = terms(
                hidden @ student_w.T,
                teacher_hidden[rows].to(compute_dtype) @ teacher_w.T,
                labels[rows] if with_lm else None,
                temperature=temperature,
                lm_scale=weights.lm_weight * tokens / labelled,
                kl_grad_scale=temperature / tokens,
                lm_grad_scale=weights.lm_weight / labelled,
                grad_dtype=compute_dtype,
            )
            total += part
            grad_hidden[rows] = (grad @ student_w).to(grad_hidden.dtype)
            if grad_weight is not None:
                grad_weight += (grad.T @ hidden).float()
        ctx.gradients = (grad_hidden, grad_weight)  # formed here, scaled by the incoming gradient in backward
        return (total / tokens).to(torch.float32)

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.gradients
        weight_grad = None if grad_weight is None else grad_weight * grad_output
        return grad_hidden * grad_output, weight_grad, None, None, None, None, None, None


def chunked_logit_loss(
    *,
    student_hidden: torch.Tensor,
    output_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_output_weight: torch.Tensor,
    weights: LossWeights,
    labels: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
    compiled: bool = False,
) -> torch.Tensor:
    """T^2 x KL(teacher || student) of the softened next-token distributions, averaged over tokens, plus
    `lm_weight` x the next-token cross-entropy on `labels` (already shifted; -100 is ignored).

    Hidden states are [tokens, hidden]; output weights [vocab, hidden]; logits are formed in `compute_dtype`
    (bfloat16 under autocast, as the output layer would) and reduced in float32; `compiled`: each chunk's
    elementwise terms run as one compiled graph (`chunk_terms`).
    """
    return _ChunkedLogitLoss.apply(
        student_hidden, output_weight, teacher_hidden, teacher_output_weight, labels, weights, compute_dtype, compiled
    )


def plain_output_layer(model: nn.Module) -> nn.Linear | None:
    """The model's output layer when its logits are that layer of the final hidden state and nothing more (no
    bias, soft-capping or scaling), so the loss can form them itself; None otherwise."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if config is None or not isinstance(head, nn.Linear) or head.bias is not None:
        return None
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        value = getattr(config, name, None) or getattr(getattr(config, "text_config", None), name, None)
        if value not in (None, 1, 1.0):
            return None
    if not hasattr(model, model.base_model_prefix):
        return None
    return head


def final_hidden_states(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden state (after its final norm), i.e. what the output layer reads."""
    decoder = getattr(model, model.base_model_prefix)
    return decoder(input_ids=input_ids, use_cache=False).last_hidden_state
