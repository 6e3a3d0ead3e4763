"""Greedy ``generate`` equals transformers' ``generate(do_sample=False)`` for every with-past
decoder family of the corpus (tests/test_families.py): each tiny checkpoint exported with past by
our exporter (test_families' session fixture: the same exports), two ragged prompts (6 and 9
tokens, past the sliding windows and the chunked attention of 4) decoded together, left-padded,
32 new tokens by the one generation loop in ONNX Runtime with the rules and EOS ids its manifest
records, each row compared with HF's own generate of that prompt alone. Mistral (rotary, sliding
window) and Bloom (ALiBi, no position_ids) run in `make test-fast`; the rest are slow."""

from __future__ import annotations

import numpy as np
import pytest
from test_families import CORPUS, DECODERS, family  # noqa: F401  (session fixture: the corpus' exports, shared)

FAST = {"mistral", "bloom"}  # a rotary decoder with a sliding window; ALiBi without position_ids
NEW = 32


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in DECODERS])
def test_greedy_generate_equals_hf(family, name):  # noqa: F811
    import torch
    from transformers import AutoModelForCausalLM

    from gpcl_trt.generate import OrtRuntime, decode
    from gpcl_trt.generate.rules import model_settings

    d, out, res = family(name)
    assert res["ok"] and res["task"] == CORPUS[name][3] == "text-generation-with-past", res
    settings = model_settings(None, None, artifact=out)
    assert settings["from"] == "manifest", settings
    prompts = [list(map(int, np.random.default_rng(i).integers(3, 120, size=n))) for i, n in ((3, 6), (4, 9))]
    got = decode(
        OrtRuntime(out),
        prompts,
        max_new_tokens=NEW,
        eos_ids=settings["eos_ids"],  # the manifest's, as transformers takes the model's generation config
        pad_id=settings["pad_id"],
        max_positions=settings["max_positions"],
        reprefill_at=settings["reprefill_at"],
    )

    hf = AutoModelForCausalLM.from_pretrained(d).eval()
    eos = hf.generation_config.eos_token_id
    assert set(settings["eos_ids"]) == set(np.atleast_1d(eos).tolist() if eos is not None else ()), settings
    for prompt, tokens in zip(prompts, got["tokens"]):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            want = hf.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW, pad_token_id=0
            )[0, len(prompt) :]
        assert tokens == want.tolist(), (name, prompt)
