"""Text -> model inputs with a model folder's own tokenizer: the one tokenizer loader that
calibration (unpadded sentences) and the accuracy tools (fixed-length batches) share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)
_KEYS = ("input_ids", "attention_mask", "token_type_ids")

Encoder = Callable[[list[str]], dict[str, np.ndarray]]


def text_encoder(model_dir: str | Path, length: int | None = None, max_tokens: int = 128) -> Encoder | None:
    """texts -> {input_ids, attention_mask, token_type_ids} as int64 [len(texts), S], or None
    when ``model_dir`` has no usable tokenizer.

    ``length``: pad (with the tokenizer's pad token, else EOS or UNK) and truncate every text
    to exactly this many tokens. None: truncate to ``max_tokens`` and do not pad, so a call
    with one text gives its own length. The fast `tokenizers` path on tokenizer.json avoids
    importing transformers (and torch): seconds saved; AutoTokenizer otherwise."""
    model_dir = Path(model_dir)
    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        return None  # transformers would build an empty tokenizer (and cost a torch import)
    if (model_dir / "tokenizer.json").is_file():
        return _fast_encoder(model_dir, length, max_tokens)
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception:  # no usable tokenizer files
        return None
    if length is not None and hf.pad_token is None:  # decoder tokenizers often have none
        hf.pad_token = hf.eos_token or hf.unk_token
    kwargs = {"padding": "max_length", "max_length": length} if length is not None else {"max_length": max_tokens}

    def encode_hf(texts: list[str]) -> dict[str, np.ndarray]:
        enc = hf(texts, truncation=True, return_tensors="np", **kwargs)
        return {k: np.asarray(v, np.int64) for k, v in enc.items() if k in _KEYS}

    return encode_hf


def _fast_encoder(model_dir: Path, length: int | None, max_tokens: int) -> Encoder:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    if length is None:
        tok.no_padding()
        tok.enable_truncation(max_tokens)
    else:
        pad = next(
            (
                t
                for t in (_special_token(model_dir, k) for k in ("pad_token", "eos_token", "unk_token"))
                if t is not None and tok.token_to_id(t) is not None
            ),
            None,
        )
        tok.enable_truncation(length)
        tok.enable_padding(length=length, pad_id=tok.token_to_id(pad) if pad else 0, pad_token=pad or "[PAD]")

    def encode(texts: list[str]) -> dict[str, np.ndarray]:
        enc = tok.encode_batch(texts)
        return {
            "input_ids": np.array([e.ids for e in enc], np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
            "token_type_ids": np.array([e.type_ids for e in enc], np.int64),
        }

    return encode


def _special_token(model_dir: Path, key: str) -> str | None:
    """A special token's text from special_tokens_map.json or tokenizer_config.json."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        f = model_dir / name
        if f.exists():
            v = json.loads(f.read_text()).get(key)
            v = v.get("content") if isinstance(v, dict) else v
            if isinstance(v, str):
                return v
    return None
