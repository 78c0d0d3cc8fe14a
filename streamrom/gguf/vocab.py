"""The tokenizer of a GGUF file, rebuilt from its vocabulary (`tokenizer.ggml.*`).

Byte-level BPE vocabularies are rebuilt with the `tokenizers` library, with llama.cpp's pre-tokenizer
rules for the named `tokenizer.ggml.pre`; other vocabularies (SentencePiece "llama") use transformers'
GGUF tokenizer converter when transformers is installed.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..errors import InputError

if TYPE_CHECKING:
    from .importer import GGUFModel

log = logging.getLogger(__name__)

# llama.cpp's pre-tokenizer rules by `tokenizer.ggml.pre` (llama-vocab.cpp): which byte-level BPE
# vocabularies split every digit apart before the GPT-2 regex.
DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
GPT2_PRE = {"default", "gpt2", "mpt", "olmo", "jais"}
# Llama-3-style ("llama-bpe") and Qwen2 regexes, applied by a Split before a regex-free ByteLevel.
SPLIT_PRE = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)",
}
TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 3, 4


def gguf_tokenizer(model: GGUFModel) -> tuple[Any, dict[str, Any]]:
    """A `tokenizers.Tokenizer` and the tokenizer_config.json for the GGUF's vocabulary."""
    kind = model.value("tokenizer.ggml.model", None, "string")
    if kind is None:
        raise InputError(f"{model.path}: GGUF carries no tokenizer (tokenizer.ggml.model)")
    tokens = model.value("tokenizer.ggml.tokens", kind="list of strings")
    types = model.value("tokenizer.ggml.token_type", [1] * len(tokens), "list of integers")
    if len(types) != len(tokens):
        raise InputError(f"{model.path}: GGUF has {len(types)} token types for {len(tokens)} tokens")
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(model, tokens, types)
    else:
        tokenizer = _transformers_tokenizer(model, kind)

    def token(name: str) -> str | None:
        index = model.value(f"tokenizer.ggml.{name}_token_id", None, "token id")
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    settings: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
        "model_max_length": model.value(f"{model.arch}.context_length", kind="positive integer"),
        "add_bos_token": bool(model.value("tokenizer.ggml.add_bos_token", False, "flag")),
    }
    for key, name in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                      ("pad_token", "padding")):
        if token(name) is not None:
            settings[key] = token(name)
    template = model.value("tokenizer.chat_template", None, "string")
    if template:
        settings["chat_template"] = template
    return tokenizer, settings


def _byte_level_bpe(model: GGUFModel, tokens: list[str], types: list[int]) -> Any:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    merges = [tuple(merge.split(" ", 1)) for merge in model.value("tokenizer.ggml.merges", [], "list of strings")]
    if any(len(merge) != 2 for merge in merges):
        raise InputError(f"{model.path}: GGUF tokenizer.ggml.merges holds an entry that is not two tokens and a space")
    tokenizer = Tokenizer(models.BPE(vocab={text: i for i, text in enumerate(tokens)}, merges=merges,
                                     fuse_unk=False, byte_fallback=False))
    pre = model.value("tokenizer.ggml.pre", "default", "string")
    if pre in DIGIT_SPLIT_PRE:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre in GPT2_PRE:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre in SPLIT_PRE:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PRE[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        raise InputError(f"{model.path}: pre-tokenizer {pre!r} is not known to streamrom "
                         f"(known: {', '.join(sorted(DIGIT_SPLIT_PRE | GPT2_PRE | set(SPLIT_PRE)))})")
    tokenizer.decoder = decoders.ByteLevel()
    bos = model.value("tokenizer.ggml.bos_token_id", None, "token id")
    if bos is not None and bos >= len(tokens):
        raise InputError(f"{model.path}: GGUF bos_token_id {bos} is not one of its {len(tokens)} tokens")
    if model.value("tokenizer.ggml.add_bos_token", False, "flag") and bos is not None:
        bos_text = tokens[int(bos)]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_text} $A", pair=f"{bos_text} $A {bos_text} $B", special_tokens=[(bos_text, int(bos))])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types)
               if t == TOKEN_TYPE_CONTROL]
    added = [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types)
             if t == TOKEN_TYPE_USER_DEFINED]
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(added)
    return tokenizer


def _transformers_tokenizer(model: GGUFModel, kind: str) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise InputError(f"{model.path}: a {kind!r} GGUF vocabulary needs transformers to convert "
                         "(pip install transformers)") from None
    log.info("tokenizer: %r vocabulary converted by transformers", kind)
    try:
        loaded = AutoTokenizer.from_pretrained(str(model.path.parent), gguf_file=model.path.name)
    except Exception as exc:
        raise InputError(f"transformers cannot convert the tokenizer of {model.path}: {exc}") from None
    return loaded.backend_tokenizer
