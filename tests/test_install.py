"""The install path: wheel and sdist built from this checkout, deploy/install.sh into a fresh venv, and the installed
`secateur` (no checkout on its path, no inherited settings) pruning a tiny model and running a tiny batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import SHARED_DATA, WIKITEXT_VALID, batch_mapping, build_tiny_tokenizer, save_tiny

# pip installs every dependency into a new venv (from its cache once warm): minutes, so make test-long.
pytestmark = [pytest.mark.slow, pytest.mark.long]

ROOT = Path(__file__).resolve().parents[1]
# Every file the packages read at runtime that is not Python code.
DATA_FILES = ["pruning_core/zero_shot/local_task.yaml"]


def _run(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    print(f"[{time.monotonic() - started:6.1f} s] {' '.join(command[:4])} ...: exit {done.returncode}")
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def _clean_env(**extra: str) -> dict[str, str]:
    """The parent's environment without anything that points at the checkout or its settings."""
    prefixes = ("SECATEUR_", "PREFECT_", "MLFLOW_", "AWS_ENDPOINT")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    for name in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
        env.pop(name, None)
    return env | extra


def test_wheel_installs_into_a_fresh_venv_and_the_installed_cli_prunes_and_runs_a_batch(tmp_path):
    assert not tmp_path.resolve().is_relative_to(ROOT)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], timeout=600, cwd=tmp_path)
    (sdist,) = dist.glob("secateur-*.tar.gz")
    (wheel,) = dist.glob("secateur-*-py3-none-any.whl")
    with tarfile.open(sdist) as archive:
        in_sdist = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    with zipfile.ZipFile(wheel) as archive:
        in_wheel = set(archive.namelist())
    for name in DATA_FILES:
        assert name in in_sdist and name in in_wheel, name
    assert not any(name.startswith(("tests/", ".venv/", ".secateur/")) for name in in_sdist | in_wheel)

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    python = venv / "bin" / "python"
    install = _run(
        ["bash", str(ROOT / "deploy" / "install.sh"), str(wheel)],
        timeout=1500,
        env=_clean_env(PYTHON=str(python)),
        cwd=tmp_path,
    )
    assert "secateur installed; torch 2.13.0" in install.stdout
    downloads = [line.strip() for line in install.stdout.splitlines() if line.strip().startswith("Downloading ")]
    print(f"pip downloaded {len(downloads)} files" + "".join(f"\n  {line}" for line in downloads))

    work = tmp_path / "work"  # cwd of the installed CLI: neither the checkout nor anything under it
    work.mkdir()
    env = _clean_env(
        SECATEUR_HOME=str(tmp_path / "home"),
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )

    where = _run(
        [
            str(python),
            "-c",
            "import json, flows, tasks, infra, pruning_core, pruning_core.zero_shot as z, torch;"
            "print(json.dumps({'modules': [m.__file__ for m in (flows, tasks, infra, pruning_core)],"
            " 'template': str(z.TEMPLATE), 'template_exists': z.TEMPLATE.is_file(), 'torch': torch.__version__}))",
        ],
        timeout=300,
        env=env,
        cwd=work,
    )
    found = json.loads(where.stdout.strip().splitlines()[-1])
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    for path in [*found["modules"], found["template"]]:
        assert Path(path).is_relative_to(site), f"{path} is not from the venv's site-packages"
    assert found["template_exists"] and found["torch"].startswith("2.13.0")

    secateur = str(venv / "bin" / "secateur")
    help_text = _run([secateur, "--help"], timeout=300, env=env, cwd=work).stdout
    assert "usage: secateur" in help_text and "prune" in help_text and "worker" in help_text

    model = save_tiny(tmp_path / "tiny", build_tiny_tokenizer())
    pruned = tmp_path / "pruned"
    prune = _run(
        [
            *(secateur, "prune", str(model), "--method", "wanda", "--sparsity", "0.5"),
            *("--calibration", str(WIKITEXT_VALID), "--samples", "4", "--seq-len", "32"),
            *("--out", str(pruned), "--json"),
        ],
        timeout=600,
        env=env,
        cwd=work,
    )
    result = json.loads(prune.stdout.strip().splitlines()[-1])
    assert result["out"] == str(pruned) and result["method"] == "wanda" and result["sparsity"] == 0.5
    report = json.loads((pruned / "sparsity.json").read_text())
    assert report["total"] == 0.5 and len(report["layers"]) == 3 * 7
    assert (pruned / "model.safetensors").is_file() and (pruned / "tokenizer.json").is_file()

    # A batch through the installed flows: Prefect's ephemeral API, MLflow on SQLite, the folder store under
    # SECATEUR_HOME, and a zero-shot task, which reads the shipped local_task.yaml from site-packages.
    config = batch_mapping([str(model)], [{"name": "mag50", "method": "magnitude", "sparsity": 0.5}], "install")
    config["evaluation"] |= {"tasks": ["piqa"], "task_data": str(SHARED_DATA), "limit": 4}
    batch = tmp_path / "batch.yaml"
    batch.write_text(yaml.safe_dump(config))
    run = _run([secateur, "run", str(batch), "--json"], timeout=900, env=env, cwd=work)
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    ((pair),) = summary["results"]
    assert pair["recipe_name"] == "mag50" and pair["status"] == "completed", pair
    assert pair["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert all(1 < value < 1000 for value in pair["perplexity"].values()) and pair["perplexity"]
    assert pair["model_uri"].startswith((tmp_path / "home" / "artifacts").as_uri())

    rows = json.loads(
        _run([secateur, "report", "install", "--json"], timeout=300, env=env, cwd=work).stdout.strip().splitlines()[-1]
    )["rows"]
    assert [row["recipe"] for row in rows] == ["dense", "mag50"]
    for row in rows:
        assert 0 <= row["accuracy"]["acc.piqa"] <= 1, row
    assert rows[1]["sparsity"] == pytest.approx(0.5, abs=1e-3)
