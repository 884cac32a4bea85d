"""Shared fixtures: tiny models built from configs, a tiny tokenizer trained on real text, data paths."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from infra import assets

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WIKITEXT_TEST = SHARED_DATA / "wikitext2" / "wiki.test.raw"
WIKITEXT_VALID = SHARED_DATA / "wikitext2" / "wiki.valid.tokens.txt"


_ATTENTION = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
TINY_CONFIGS = {
    "llama": ("LlamaConfig", {**_ATTENTION, "num_hidden_layers": 3}),
    "mistral": ("MistralConfig", {**_ATTENTION, "num_hidden_layers": 2}),
    "qwen2": ("Qwen2Config", {**_ATTENTION, "num_hidden_layers": 2}),
    "opt": (
        "OPTConfig",
        {
            "hidden_size": 64,
            "ffn_dim": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "word_embed_proj_dim": 64,
            "max_position_embeddings": 256,
        },
    ),
    "mamba": (
        "MambaConfig",
        {"hidden_size": 64, "state_size": 8, "num_hidden_layers": 2, "expand": 2, "time_step_rank": 8},
    ),
}
# Every decoder family a nightly batch holds (tests/test_families.py). Windows of 16 tokens: the tests run 48,
# so sliding and full attention layers see different masks.
_WINDOW = 16
FAMILY_CONFIGS = {
    **TINY_CONFIGS,
    "llama-rope-scaled": (
        "LlamaConfig",
        {
            **_ATTENTION,
            "num_hidden_layers": 2,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        },
    ),
    "mistral-sliding": ("MistralConfig", {**_ATTENTION, "num_hidden_layers": 2, "sliding_window": _WINDOW}),
    "qwen2-sliding": (
        "Qwen2Config",
        {
            **_ATTENTION,
            "num_hidden_layers": 3,
            "use_sliding_window": True,
            "sliding_window": _WINDOW,
            "max_window_layers": 1,
        },
    ),
    "qwen3": ("Qwen3Config", {**_ATTENTION, "num_hidden_layers": 2, "head_dim": 16}),
    "gemma2": ("Gemma2Config", {**_ATTENTION, "num_hidden_layers": 2, "head_dim": 16, "sliding_window": _WINDOW}),
    "gemma3_text": (
        "Gemma3TextConfig",
        {
            **_ATTENTION,
            "num_hidden_layers": 4,
            "head_dim": 16,
            "sliding_window": _WINDOW,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        },
    ),
    "phi3": ("Phi3Config", {**_ATTENTION, "num_hidden_layers": 2, "pad_token_id": 0}),
    "olmo2": ("Olmo2Config", {**_ATTENTION, "num_hidden_layers": 2}),
    "mixtral": (
        "MixtralConfig",
        {**_ATTENTION, "num_hidden_layers": 2, "num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {
            **_ATTENTION,
            "num_hidden_layers": 2,
            "head_dim": 16,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
        },
    ),
}


def tiny_config(family: str):
    import transformers

    config_class, fields = FAMILY_CONFIGS[family]
    return getattr(transformers, config_class)(vocab_size=256, **fields)


def tiny_model(family: str = "llama", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family)).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return build_tiny_tokenizer()


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer with 256 tokens, trained on real WikiText rows."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["<eos>"], show_progress=False)
    lines = WIKITEXT_VALID.read_text(encoding="utf-8").splitlines()[:400]
    tokenizer.train_from_iterator(lines, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")
    return fast


@pytest.fixture(scope="session")
def trained_tiny_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny Llama trained briefly on WikiText: unlike a random one, its perplexity rises with sparsity,
    so quality budgets and sparsity searches have something to measure."""
    from pruning_core.data import read_rows, tokenize_text

    torch.manual_seed(0)
    model = tiny_model("llama").train()
    ids = tokenize_text(tiny_tokenizer, read_rows(str(WIKITEXT_VALID)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ops this small only lose to thread start-up (and to a busy second core)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(TRAIN_STEPS):
        starts = torch.randint(0, ids.numel() - 65, (16,), generator=generator).tolist()
        batch = torch.stack([ids[start : start + 64] for start in starts])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    folder = tmp_path_factory.mktemp("trained") / "trained-tiny"
    model.eval().save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


TRAIN_STEPS = 150


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer):
    """A tiny Llama saved in Hugging Face format with the tiny tokenizer."""
    model = tiny_model("llama")
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return assets.smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_loaded(smollm2_gguf):
    """The real SmolLM2 and its tokenizer, dequantized once per session (25 s here): tests that change it copy it."""
    from pruning_core.modeling import load_model

    return load_model(str(smollm2_gguf))


def correlated_layer(rows: int = 96, cols: int = 128, tokens: int = 1024, seed: int = 0):
    """A weight and inputs with correlated, unevenly scaled columns, like real activations."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=generator) / cols**0.5 + torch.eye(cols)
    scales = torch.rand(cols, generator=generator) * 3 + 0.1
    inputs = (torch.randn(tokens, cols, generator=generator) @ mixing) * scales
    weight = torch.randn(rows, cols, generator=generator)
    return weight, inputs


# --- pipeline fixtures: real Prefect API (test harness), MLflow on SQLite, artifact store in a temp dir ---

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="secateur-prefect-home-"))


def save_tiny(folder: Path, tokenizer, family: str = "llama", seed: int = 0, **overrides) -> Path:
    """A tiny model of `family` saved with the tiny tokenizer; `overrides` change its config."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture
def pipeline_home(tmp_path, monkeypatch):
    """SECATEUR_HOME, artifact store and MLflow store of one test, all under its temp dir."""
    home = tmp_path / "home"
    monkeypatch.setenv("SECATEUR_HOME", str(home))
    monkeypatch.setenv("SECATEUR_ARTIFACTS", str(tmp_path / "store"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("SECATEUR_MIRROR_CHECKPOINTS", raising=False)
    return home


def batch_mapping(models: list[str], recipes: list[dict], name: str = "test-batch") -> dict:
    return {
        "name": name,
        "models": models,
        "recipes": recipes,
        "calibration": {"data": str(WIKITEXT_VALID), "samples": 8, "seq_len": 64, "seed": 0},
        "evaluation": {"perplexity": [str(WIKITEXT_TEST)], "seq_len": 64, "max_tokens": 1024},
    }


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint on localhost (moto's threaded server), shared by the session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch, request):
    """A fresh bucket on the local endpoint, reached through the standard AWS variables."""
    import boto3

    for key, value in {
        "AWS_ACCESS_KEY_ID": "secateur-test-key",
        "AWS_SECRET_ACCESS_KEY": "secateur-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_server,
    }.items():
        monkeypatch.setenv(key, value)
    bucket = "bkt-" + request.node.name.lower().replace("_", "-")[:40]
    boto3.client("s3").create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture(scope="session")
def trained_tiny(tiny_tokenizer):
    """A tiny Llama trained briefly on real WikiText so that pruning hurts and recovery can help."""
    from pruning_core.data import calibration_windows, read_rows, tokenize_text

    torch.manual_seed(0)
    model = tiny_model("llama").train()
    tokens = tokenize_text(tiny_tokenizer, read_rows(str(WIKITEXT_VALID))[:3000])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(150):
        batch = calibration_windows(tokens, 8, 64, seed=step)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), tokens


@pytest.fixture(scope="session")
def postgres_stack(tmp_path_factory):
    """The production stack on this machine, once per session: `secateur stack up --postgres` (PostgreSQL, a
    Prefect server and an MLflow server on it) in a state dir of its own. Yields what its clients export
    (PREFECT_API_URL, MLFLOW_TRACKING_URI), with `home`, `urls` and `env` (the CLI's, this stack's state dir);
    `stack down --purge` at the end, after which `stack status` shows nothing running and no process of the
    stack (a service, its process group, its descendants: server workers, database backends) is left."""
    import json
    import subprocess
    import sys

    from tests.services import free_port

    home = tmp_path_factory.mktemp("stack")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SECATEUR_", "MLFLOW_", "PREFECT_"))}
    env |= {
        "SECATEUR_HOME": str(home),
        "SECATEUR_ARTIFACTS": str(home / "store"),
        "SECATEUR_PREFECT_PORT": str(free_port()),
        "SECATEUR_MLFLOW_PORT": str(free_port()),
        "SECATEUR_POSTGRES_PORT": str(free_port()),
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONPATH": str(root),
    }

    def stack(*argv: str) -> dict:
        command = [sys.executable, "-m", "flows.cli", "stack", *argv, "--json"]
        done = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    urls = stack("up", "--postgres")
    try:
        yield {"home": home, "env": env, "urls": urls, **urls["env"]}
    finally:
        processes = _stack_processes(stack("status"))
        stack("down", "--purge")
        assert not [name for name, entry in stack("status").items() if entry["running"]]
        left = [process for process in processes if _alive(process)]
        assert not left, f"stack down left {left}"


def _stack_processes(status: dict) -> list:
    """Every process of a running stack: each service `stack status` names, its process group, its descendants."""
    import contextlib

    import psutil

    pids = {entry["pid"] for entry in status.values() if entry.get("pid")}
    found = {}
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if process.pid in pids or os.getpgid(process.pid) in pids:
                found[process.pid] = process
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(pid).children(recursive=True):
                found[child.pid] = child
    return list(found.values())


def _alive(process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
