"""The model's generation settings and rules, recorded once at export and read by every runtime
(the ``generate`` CLI, ``eval``, the Triton generation model):

- ``generation_section(model_dir)``: what the export writes into its manifest
  (``results.generation``, schema in ``gpcl_trt.manifest.generation``), from config.json and
  generation_config.json: EOS ids, padding id, number of positions, sliding window and the rules
  of transformers' class (Phi-3 / PhiMoE LongRoPE's re-prefill).
- ``model_settings(config_dir, tokenizer, artifact=...)``: what the loop runs with, from the
  artifact's manifest chain (an export, a GPCL model or an engine over it), else (exports made
  before the section existed, a model directory) from the config files; the tokenizer fills in
  EOS and padding ids the config lacks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gpcl_trt.common import GpclError
from gpcl_trt.manifest import GENERATION_RULE_KINDS, generation, generation_of

# config.json keys that hold the number of positions, in the order transformers' configs use them
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
# Causal LM classes whose prepare_inputs_for_generation drops the cache once the sequence passes
# original_max_position_embeddings (LongRoPE's switch to its long factors)
REPREFILL_MODEL_TYPES = ("phi3", "phimoe", "phi4_multimodal")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise GpclError(f"cannot read {path}: {exc}") from None
    return data if isinstance(data, dict) else {}


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _first_int(*values: Any) -> int | None:
    return next((int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)), None)


def generation_section(model_dir: str | os.PathLike | None) -> dict[str, Any]:
    """The manifest's ``results.generation`` for a model directory (its config files)."""
    d = Path(model_dir) if model_dir is not None else None
    cfg = _read_json(d / "config.json") if d else {}
    gen = _read_json(d / "generation_config.json") if d else {}
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    eos = _ids(gen.get("eos_token_id", cfg.get("eos_token_id", text.get("eos_token_id"))))
    positions = next((int(c[k]) for c in (cfg, text) for k in POSITION_KEYS if isinstance(c.get(k), int)), None)
    rules = []
    if cfg.get("model_type") in REPREFILL_MODEL_TYPES:
        rope = [r for r in (cfg.get("rope_parameters"), cfg.get("rope_scaling")) if isinstance(r, dict)]
        original = _first_int(*(c.get("original_max_position_embeddings") for c in (cfg, *rope)))
        # transformers' rule fires whenever the config has the key; beyond the last position it cannot
        if original is not None and (positions is None or original < positions):
            rules.append(
                {
                    "kind": "reprefill_at",
                    "length": original,
                    "why": f"{cfg['model_type']}: the cache is dropped and the sequence prefilled again once it "
                    "first passes original_max_position_embeddings (LongRoPE's long factors)",
                }
            )
    return generation(
        eos,
        _first_int(gen.get("pad_token_id"), cfg.get("pad_token_id"), text.get("pad_token_id")),
        positions,
        rules,
        bos_id=_first_int(gen.get("bos_token_id"), cfg.get("bos_token_id"), text.get("bos_token_id")),
        sliding_window=_first_int(cfg.get("sliding_window"), text.get("sliding_window")),
        vocab_size=_first_int(cfg.get("vocab_size"), text.get("vocab_size")),
        model_type=cfg.get("model_type"),
    )


def settings_from(section: dict[str, Any], tokenizer: Any = None, source: str | None = None) -> dict[str, Any]:
    """The loop's settings from a generation section: ``eos_ids`` (else the tokenizer's),
    ``pad_id`` (the first of the section's, the tokenizer's, the EOS ids and 0 that the vocabulary
    has), ``max_positions``,
    ``reprefill_at`` (the rule's length, None without it), ``rules`` and ``from`` (where they
    were read). A rule this version does not know is refused in one line."""
    unknown = sorted({r["kind"] for r in section["rules"]} - set(GENERATION_RULE_KINDS))
    if unknown:
        raise GpclError(
            f"the model's generation rules include {', '.join(unknown)}, which this gpcl-trt does not follow "
            f"(known: {', '.join(GENERATION_RULE_KINDS)}); upgrade gpcl-trt"
        )
    eos = list(section["eos_ids"])
    if not eos and getattr(tokenizer, "eos_token_id", None) is not None:
        eos = [int(tokenizer.eos_token_id)]
    # the padding id fills masked slots, so it only has to be a row of the embedding: the config's
    # may lie outside a vocabulary that was cut (GPT-J's 50256 over a 128-token tiny model)
    vocab = section.get("vocab_size")
    candidates = (section.get("pad_id"), getattr(tokenizer, "pad_token_id", None), *eos, 0)
    pad = next(v for v in candidates if _first_int(v) is not None and 0 <= v and (vocab is None or v < vocab))
    reprefill = next((int(r["length"]) for r in section["rules"] if r["kind"] == "reprefill_at"), None)
    return {
        "eos_ids": eos,
        "pad_id": int(pad),
        "max_positions": section.get("max_positions"),
        "reprefill_at": reprefill,
        "rules": list(section["rules"]),
        "from": source,
    }


def model_settings(
    config_dir: Path | None,
    tokenizer: Any = None,
    artifact: str | os.PathLike | None = None,
    section: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Settings for generating from ``artifact``: an explicit ``section`` (the Triton model's
    copy), else the manifest chain's (``from`` = ``manifest``), else ``config_dir``'s config files
    (``config.json``; exports made before the section was recorded, model directories)."""
    source = "given" if section is not None else None
    if section is None and artifact is not None and Path(artifact).is_file():
        section = generation_of(artifact)
        source = "manifest" if section is not None else None
    if section is None:
        section = generation_section(config_dir)
        source = "config.json" if config_dir is not None else None
    return settings_from(section, tokenizer, source)
