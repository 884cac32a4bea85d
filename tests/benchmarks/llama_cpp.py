"""llama.cpp as the serving runtime of the speed benchmarks: what a team serving on CPUs runs in 2026.

transformers' eager `generate` spends a fixed time per token (Python dispatch, KV-cache concatenation,
small element-wise kernels) that does not shrink with the model: on SmolLM2-135M, 2 cores, about 24 of the
dense model's 56 ms per token. A runtime that has no such overhead shows what a smaller model really gains.

Everything comes from PyPI: the `llama-cpp-python` source distribution carries llama.cpp's sources, its
`convert_hf_to_gguf.py` and `gguf-py`. It is downloaded once, `llama-batched-bench` is built with CMake
(5 minutes on 2 cores) and both are cached under `~/.cache/secateur/llama.cpp/<version>`. Folders
are converted with llama.cpp's own converter, so a folder that converts is one llama.cpp serves. f32 and bf16
GGUFs run; q8_0 ones crashed `llama-batched-bench` here (segmentation fault on 2 AMX cores, dense as well).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"  # its sdist vendors llama.cpp's sources, converter and gguf-py
CACHE = Path(os.environ.get("SECATEUR_LLAMA_CPP_CACHE", Path.home() / ".cache" / "secateur" / "llama.cpp"))
BENCH_TARGET = "llama-batched-bench"


def _run(command: list[str], log: Path, **kwargs) -> None:
    with log.open("w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False, **kwargs)
    if done.returncode:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{' '.join(command[:3])} ... failed ({done.returncode}): {tail[0]} (log: {log})")


def llama_cpp_sources(cache: Path = CACHE) -> Path:
    """llama.cpp's source tree from the llama-cpp-python sdist on PyPI (downloaded and unpacked once)."""
    root = cache / LLAMA_CPP_PYTHON
    tree = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if (tree / "convert_hf_to_gguf.py").is_file():
        return tree
    root.mkdir(parents=True, exist_ok=True)
    download = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    _run([*download, f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(root)], root / "download.log")
    with tarfile.open(root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as archive:
        archive.extractall(root, filter="data")
    return tree


def batched_bench_binary(cache: Path = CACHE) -> Path:
    """`llama-batched-bench`, built for this CPU (GGML_NATIVE) once."""
    tree = llama_cpp_sources(cache)
    build = cache / LLAMA_CPP_PYTHON / "build"
    binary = build / "bin" / BENCH_TARGET
    if binary.is_file():
        return binary
    if shutil.which("cmake") is None:
        raise RuntimeError("cmake is not installed: apt-get install cmake g++")
    off = ("LLAMA_CURL", "LLAMA_BUILD_TESTS", "LLAMA_BUILD_EXAMPLES", "LLAMA_BUILD_SERVER")
    configure = ["cmake", "-S", str(tree), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON"]
    _run([*configure, *(f"-D{flag}=OFF" for flag in off)], build.parent / "cmake.log")
    jobs = str(os.cpu_count() or 1)
    _run(["cmake", "--build", str(build), "--target", BENCH_TARGET, "-j", jobs], build.parent / "build.log")
    return binary


def to_gguf(folder: Path, out: Path, outtype: str, cache: Path = CACHE) -> Path:
    """`folder` (a transformers folder) converted by llama.cpp's own converter; reused when already there."""
    if out.is_file() and out.stat().st_mtime >= (folder / "config.json").stat().st_mtime:
        return out
    tree = llama_cpp_sources(cache)
    env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py")}
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(folder), "--outtype", outtype]
    _run([*command, "--outfile", str(out)], out.with_suffix(".log"), env=env)
    return out


def batched_bench(
    *, gguf: Path, prompt_tokens: int, new_tokens: int, batch_sizes: tuple[int, ...], threads: int
) -> dict[str, float]:
    """Prefill and decode tokens/s per batch size (each sequence its own prompt), as the speed metrics of
    `pruning_core.speed` name them."""
    context = max(batch_sizes) * (prompt_tokens + new_tokens)
    command = [
        str(batched_bench_binary()),
        *("-m", str(gguf), "-c", str(context), "-b", "2048", "-ub", "512", "-t", str(threads)),
        *("-npp", str(prompt_tokens), "-ntg", str(new_tokens), "-npl", ",".join(map(str, batch_sizes))),
        *("--output-format", "jsonl"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{BENCH_TARGET} failed ({done.returncode}): {done.stderr.strip()[-300:]}")
    metrics = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            batch = row["pl"]
            metrics[f"prefill_tok_s.b{batch}"] = row["speed_pp"]
            metrics[f"decode_tok_s.b{batch}"] = row["speed_tg"]
            metrics[f"decode_ms_per_token.b{batch}"] = 1000.0 * row["t_tg"] / row["tg"]
    return metrics
