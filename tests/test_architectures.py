"""The contract every model family (streamrom/model/families/) passes, on a tiny random-weight model of it
built by transformers (shapes and exactness, not accuracy): a new family is tested here without a line
of test code; its file's `tiny` config is the model.

1. our block and model reproduce transformers' logits (float32);
2. full-rank compression reproduces the dense model's logits;
3. the streamed evaluation equals an in-memory computation on the same windows;
4. a compressed checkpoint loads in transformers through the remote code and matches streamrom.load.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import streamrom
from streamrom import CalibrationConfig, CompressConfig
from streamrom.model.families import FAMILIES

from conftest import make_tiny

KINDS = sorted(FAMILIES)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    return {kind: make_tiny(root / kind, kind) for kind in KINDS}


def ids(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(seed))


def transformers_model(folder: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()


def compressed(source: Path, output: Path, tiny_tokens: Path, **settings) -> Path:
    streamrom.compress(source, output, CompressConfig(
        calibration=CalibrationConfig(token_file=tiny_tokens, sequences=8, seqlen=64), **settings))
    return output


@pytest.mark.parametrize("kind", KINDS)
def test_entry_names_what_exists(kind):
    import transformers

    from streamrom.model.hf import modeling_streamrom
    from streamrom.model.modeling import BLOCKS

    entry = FAMILIES[kind]
    assert entry.model_type == kind and hasattr(transformers, entry.transformers_class)
    assert hasattr(transformers, entry.transformers_config)
    remote = getattr(modeling_streamrom, entry.remote_class)
    assert remote.__mro__[1] is getattr(transformers, entry.transformers_class)

    assert entry.block in BLOCKS


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_model_matches_transformers(tiny, kind):
    tokens = ids(0)
    expected = transformers_model(tiny[kind])(tokens).logits
    assert (streamrom.load(tiny[kind])(tokens) - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_full_rank_reproduces_the_logits(tiny, tiny_tokens, tmp_path, kind):
    output = compressed(tiny[kind], tmp_path / kind, tiny_tokens, rank=10**6)
    tokens = ids(1)
    assert (streamrom.load(output)(tokens) - streamrom.load(tiny[kind])(tokens)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_streamed_evaluation_equals_in_memory(tiny, tiny_tokens, tmp_path, kind):
    output = compressed(tiny[kind], tmp_path / kind, tiny_tokens, ratio=0.5)
    windows = ids(2).numpy()
    streamed = streamrom.evaluate(output, (), windows=windows, chunk_tokens=48).perplexity
    logits = streamrom.load(output)(torch.from_numpy(windows))
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), torch.from_numpy(windows[:, 1:]).reshape(-1))
    assert streamed == pytest.approx(math.exp(nll.item()), rel=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_compressed_checkpoint_loads_in_transformers(tiny, tiny_tokens, tmp_path, kind):
    output = compressed(tiny[kind], tmp_path / kind, tiny_tokens, ratio=0.5, method="rom-centered")
    tokens = ids(3)
    theirs = transformers_model(output, trust_remote_code=True)(tokens).logits
    torch.testing.assert_close(theirs, streamrom.load(output)(tokens), atol=1e-4, rtol=1e-4)


GGUF_KINDS = [kind for kind in KINDS if FAMILIES[kind].gguf_architecture
              and FAMILIES[kind].gguf_writes_as == FAMILIES[kind].gguf_architecture]


@pytest.mark.parametrize("kind", GGUF_KINDS)
@torch.no_grad()
def test_gguf_export_and_import_keep_the_model(tmp_path, kind):
    """Every family llama.cpp reads and writes under one architecture: export-gguf (f32) then
    import-gguf gives back a model with the same logits (names, norm offsets, q/k permutation and the
    config's settings all make the trip), for the tiny model with the family's `tiny_gguf` changes."""
    from streamrom.gguf.importer import import_gguf
    from streamrom.gguf.exporter import export_gguf

    from helpers import byte_level_tokenizer

    source = make_tiny(tmp_path / "source", kind, **FAMILIES[kind].tiny_gguf)
    byte_level_tokenizer(source)
    export_gguf(source, tmp_path / "model.gguf", "f32")
    import_gguf(str(tmp_path / "model.gguf"), tmp_path / "back")
    tokens = ids(4)
    torch.testing.assert_close(streamrom.load(tmp_path / "back")(tokens), streamrom.load(source)(tokens),
                               atol=1e-4, rtol=1e-4)
