"""Text data specs and calibration sampling.

Specs: a text file (one row per line), `jsonl:PATH:FIELD` (json lines, optionally .gz), or
`hf://dataset[/config]:split:field` (a Hugging Face dataset; needs the `datasets` package).
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import torch

# WikiExtractor-style document tags (as in exllamav2's calibration files) are markup, not text.
_DOC_TAG = re.compile(r"^</?doc\b[^>]*>\s*$")


class DataSpecError(ValueError):
    pass


def local_path(spec: str) -> Path | None:
    """The file a data spec reads, or None for a hub dataset."""
    if spec.startswith("hf://"):
        return None
    return Path(spec.removeprefix("jsonl:").rpartition(":")[0] if spec.startswith("jsonl:") else spec)


def check_data_spec(spec: str) -> str:
    """Fail early (before any work) on a local data file that is not there."""
    path = local_path(spec)
    if path is not None and not path.is_file():
        raise DataSpecError(f"data file not found: {path}")
    return spec


def read_rows(spec: str) -> list[str]:
    """The rows of a data spec, each as a string (text-file rows keep their newline)."""
    if spec.startswith("hf://"):
        return _hf_rows(spec)
    if spec.startswith("jsonl:"):
        path, sep, field = spec.removeprefix("jsonl:").rpartition(":")
        if not sep or not path:
            raise DataSpecError(f"jsonl spec must be jsonl:PATH:FIELD, got {spec!r}")
        return _jsonl_rows(Path(path), field)
    path = Path(spec)
    if not path.is_file():
        raise DataSpecError(f"data file not found: {spec}")
    lines = _read_text(path).splitlines(keepends=True)
    return [line for line in lines if not _DOC_TAG.match(line)]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataSpecError(f"{path}: not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise DataSpecError(f"{path}: cannot read ({error.strerror or error})") from None


def _jsonl_rows(path: Path, field: str) -> list[str]:
    if not path.is_file():
        raise DataSpecError(f"data file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    number = 0
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict) or field not in record:
                    raise DataSpecError(f"{path}:{number}: no field {field!r}")
                rows.append(str(record[field]))
    except json.JSONDecodeError as error:
        raise DataSpecError(f"{path}:{number}: not a JSON object ({error.msg})") from None
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as error:
        raise DataSpecError(f"{path}: unreadable after line {number} ({type(error).__name__})") from None
    except OSError as error:
        raise DataSpecError(f"{path}: cannot read ({error.strerror or error})") from None
    return rows


def _hf_rows(spec: str) -> list[str]:
    parts = spec.removeprefix("hf://").split(":")
    if len(parts) != 3:
        raise DataSpecError(f"hf spec must be hf://dataset[/config]:split:field, got {spec!r}")
    name, split, field = parts
    try:
        import datasets
    except ImportError:
        raise DataSpecError("hf:// data specs need the 'datasets' package (pip install datasets)") from None
    dataset = None
    errors = []
    # "a/b" is either the dataset a/b or dataset a with config b; "a/b/c" is dataset a/b, config c.
    for path, config in _hf_candidates(name):
        try:
            dataset = datasets.load_dataset(path, config, split=split)
            break
        except Exception as error:  # noqa: BLE001 - report every reading tried
            errors.append(f"{path}{'/' + config if config else ''}: {error}")
    if dataset is None:
        raise DataSpecError(f"cannot load {spec}: " + " | ".join(errors))
    return [str(text) for text in dataset[field]]


def _hf_candidates(name: str) -> list[tuple[str, str | None]]:
    parts = name.split("/")
    if len(parts) == 1:
        return [(name, None)]
    if len(parts) == 2:
        return [(name, None), (parts[0], parts[1])]
    return [("/".join(parts[:-1]), parts[-1])]


def join_rows(rows: list[str]) -> str:
    """The standard WikiText-2 protocol: rows joined with blank lines, tokenized once."""
    return "\n\n".join(rows)


def tokenize_text(tokenizer, rows: list[str]) -> torch.Tensor:
    """One long 1-D tensor of token ids."""
    return torch.tensor(tokenizer(join_rows(rows))["input_ids"], dtype=torch.long)


def calibration_windows(token_ids: torch.Tensor, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`samples` random windows of `seq_len` tokens (samples x seq_len), reproducible from `seed`."""
    if token_ids.numel() <= seq_len:
        raise DataSpecError(f"calibration text has {token_ids.numel()} tokens, need more than seq_len={seq_len}")
    from pruning_core.memory import MemoryEstimate, check_memory

    # Wherever it runs (a pool worker, a script), the windows are sized against the RAM before they are drawn.
    windows = {f"{samples:,} x {seq_len:,} token ids": samples * seq_len * torch.long.itemsize}
    check_memory(MemoryEstimate("calibration", host=windows))
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, token_ids.numel() - seq_len, (samples,), generator=generator)
    return torch.stack([token_ids[s : s + seq_len] for s in starts.tolist()])
