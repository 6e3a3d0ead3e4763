"""The model's generation rules recorded in the export's manifest (results.generation) and read by
every runtime through the manifest chain: a Phi-3 LongRoPE export carries its re-prefill rule, a
GPCL model inserted from it keeps it through the chain, ``generate`` / ``eval`` / the Triton
generation model follow the manifest (not config.json, which is only the fallback for exports
made before the section existed), and a rule this version does not know is refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_generate import PROMPTS, TGP, _Recording, tiny_phi3_longrope

from gpcl_trt.common import GpclError, manifest_path


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    """(model dir, export, GPCL model over it, HF tokens and logits for PROMPTS[0] + 24 tokens)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gpcl_trt.exporter import export_model
    from gpcl_trt.passes import insert_file

    root = tmp_path_factory.mktemp("rules")
    d = tiny_phi3_longrope(root / "phi3")
    onnx = root / "phi3.onnx"
    assert export_model(d, onnx, task=TGP)["ok"]
    gpcl = root / "phi3_gpcl.onnx"
    assert insert_file(onnx, gpcl, sites=("pre-attention", "pre-mlp"), tau=1e6)["ok"]  # tau far out: identity
    ids = AutoTokenizer.from_pretrained(d)(PROMPTS[0])["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    with torch.no_grad():
        hf = model.generate(
            torch.tensor([ids]), do_sample=False, max_new_tokens=24, output_logits=True, return_dict_in_generate=True
        )
    return d, onnx, gpcl, ids, hf.sequences[0, len(ids) :].tolist(), np.concatenate([x.numpy() for x in hf.logits])


def _set_original(d, value):
    cfg = json.loads((d / "config.json").read_text())
    cfg["original_max_position_embeddings"] = value
    (d / "config.json").write_text(json.dumps(cfg))


def test_manifest_carries_the_rule_through_the_chain_and_generate_follows_it(phi3):
    """The rule is read from the manifest chain: config.json then says 40 (a config-reading
    runtime would re-prefill at 40 and drift from transformers), the GPCL model still re-prefills at
    16 and every step's logits match transformers' generate of the original checkpoint."""
    from gpcl_trt.generate import OrtRuntime, decode, generate
    from gpcl_trt.generate.rules import model_settings
    from gpcl_trt.manifest import Manifest, generation_of

    d, onnx, gpcl, ids, hf_tokens, hf_logits = phi3
    section = Manifest.read(onnx).generation
    assert [(r["kind"], r["length"]) for r in section["rules"]] == [("reprefill_at", 16)]
    assert section["eos_ids"] == [1] and section["pad_id"] == 0 and section["max_positions"] == 64
    assert Manifest.read(gpcl).generation is None and generation_of(gpcl) == section  # through the chain

    _set_original(d, 40)
    try:
        settings = model_settings(d, None, artifact=gpcl)
        assert settings["from"] == "manifest" and settings["reprefill_at"] == 16
        assert model_settings(d, None)["reprefill_at"] == 40  # what config.json alone says now
        rec = _Recording(OrtRuntime(gpcl))
        out = decode(rec, [ids], max_new_tokens=24, reprefill_at=settings["reprefill_at"])
        assert out["tokens"][0] == hf_tokens
        assert np.abs(np.concatenate(rec.logits) - hf_logits).max() < 1e-4
        result = generate(gpcl, [PROMPTS[0]], max_new_tokens=24)
        assert result["rules"] == {"reprefill_at": 16} and result["outputs"][0]["tokens"] == hf_tokens
    finally:
        _set_original(d, 16)


def test_eval_and_the_triton_generation_model_read_the_manifest(phi3, tmp_path):
    from gpcl_trt.accuracy.generation import evaluate
    from gpcl_trt.deploy import write_triton_repo
    from gpcl_trt.generate.rules import model_settings

    d, onnx, gpcl, *_ = phi3
    r = evaluate(onnx, gpcl, prompt_lines=[PROMPTS[0]], max_new_tokens=20)
    assert r["generation_rules"]["from"] == "manifest" and r["generation"]["greedy_agreement"] == 1.0
    assert [x["length"] for x in r["generation_rules"]["rules"]] == [16]

    _set_original(d, 40)  # the repository takes the manifest's rule, not the config file's
    try:
        res = write_triton_repo(gpcl, tmp_path / "repo", "phi3", backend="python")
    finally:
        _set_original(d, 16)
    gen = res["generate_model"]
    assert gen["rules_from"] == "manifest" and [x["length"] for x in gen["rules"]] == [16]
    vdir = tmp_path / "repo" / "phi3_generate" / "1"
    section = json.loads((vdir / "gpcl_generation.json").read_text())
    # what the served model.py computes from it (the version directory's config.json says 40 no more)
    assert model_settings(vdir, None, section=section)["reprefill_at"] == 16


def test_old_exports_fall_back_to_config_and_unknown_rules_are_refused(phi3, tmp_path):
    import shutil

    from gpcl_trt.generate import generate
    from gpcl_trt.generate.rules import model_settings

    d, onnx, *_ = phi3
    old = tmp_path / "old.onnx"  # an export made before the section: its manifest has none
    shutil.copyfile(onnx, old)
    doc = json.loads(manifest_path(onnx).read_text())
    del doc["results"]["generation"]
    manifest_path(old).write_text(json.dumps(doc))
    settings = model_settings(d, None, artifact=old)
    assert settings["from"] == "config.json" and settings["reprefill_at"] == 16

    doc["results"]["generation"] = {"eos_ids": [1], "pad_id": 0, "max_positions": 64, "rules": [{"kind": "yarn_x"}]}
    manifest_path(old).write_text(json.dumps(doc))
    with pytest.raises(GpclError, match="include yarn_x, which this gpcl-trt does not follow"):
        generate(old, ["the"], max_new_tokens=2)
    doc["results"]["generation"] = {"eos_ids": "one", "rules": []}
    manifest_path(old).write_text(json.dumps(doc))
    with pytest.raises(GpclError, match="results.generation is malformed"):
        model_settings(d, None, artifact=old)
