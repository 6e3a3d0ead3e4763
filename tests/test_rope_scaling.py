"""Rope-scaling config variants of supported decoders: Llama with dynamic NTK scaling
(``rope_type: dynamic``), whose frequencies change once the length outgrows
``max_position_embeddings``. The export (a select in the graph, exporter/patchers.py) is checked
against a fresh transformers model on both sides of that length, and by a greedy decode that
crosses it; without the patch torch.export stops, and the one-line refusal keeps torch's cause."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gpcl_trt.common import GpclError

MAX_POS = 8  # the threshold: prompts of 6 decode past it


def _build(root: Path) -> Path:
    import torch
    import transformers

    cfg = transformers.AutoConfig.for_model(
        "llama",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POS,
        rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0},
    )
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def ntk(tmp_path_factory):
    from gpcl_trt.exporter import export_model

    root = tmp_path_factory.mktemp("ntk")
    d = _build(root)
    res = export_model(d, root / "m.onnx")
    return d, root / "m.onnx", res


def _fresh_logits(model_dir: Path, ids: np.ndarray) -> np.ndarray:
    """transformers' own model, freshly loaded (its rotary frequencies are state that a longer
    call leaves behind)."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return hf(
            input_ids=torch.from_numpy(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long)
        ).logits.numpy()


@pytest.mark.slow
@pytest.mark.parametrize("length", [5, MAX_POS, 13])
def test_dynamic_ntk_matches_transformers_on_both_sides_of_the_threshold(ntk, length):
    from gpcl_trt.exporter import load_model
    from gpcl_trt.exporter.validate import ort_runner, prefill_feeds

    model_dir, path, res = ntk
    assert res["ok"] and res["task"] == "text-generation-with-past", res
    _, arch, task = load_model(model_dir)
    ids = np.random.default_rng(length).integers(3, 120, size=(2, length), dtype=np.int64)
    got = ort_runner(path)(prefill_feeds(arch, task, ids))["logits"]
    want = _fresh_logits(model_dir, ids)
    assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()


@pytest.mark.slow
def test_dynamic_ntk_greedy_decode_across_the_threshold_equals_generate(ntk):
    import torch
    from transformers import AutoModelForCausalLM

    from gpcl_trt.exporter import load_model
    from gpcl_trt.exporter.validate import greedy_decode, ort_runner

    model_dir, path, _ = ntk
    _, arch, task = load_model(model_dir)
    prompt = np.random.default_rng(3).integers(3, 120, size=(2, 6), dtype=np.int64)
    tokens = greedy_decode(ort_runner(path), arch, task, prompt, steps=6)  # lengths 6 .. 11
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        gen = hf.generate(
            torch.from_numpy(prompt),
            attention_mask=torch.ones(2, 6, dtype=torch.long),
            max_new_tokens=6,
            min_new_tokens=None,
            do_sample=False,
            pad_token_id=0,
        )
    np.testing.assert_array_equal(gen[:, 6:].numpy(), tokens)


@pytest.mark.slow
def test_without_the_select_the_refusal_keeps_torchs_cause(tmp_path, monkeypatch):
    """The patch is what makes it export: without it torch.export stops at the data-dependent
    branch, and the one line says so (torch's own cause, no terminal colour codes)."""
    from gpcl_trt.exporter import configs, export_model

    monkeypatch.setattr(configs, "dynamic_rope_patches", lambda model: [])
    d = _build(tmp_path)
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    with pytest.raises(GpclError, match=r"Failed to export the model with torch\.export: .*data-dependent") as exc:
        export_model(d, out, task="text-generation")
    msg = str(exc.value)
    assert "\n" not in msg and "\x1b" not in msg and not any(out.parent.iterdir())


def test_the_cause_of_a_chained_error_is_in_the_one_line():
    from gpcl_trt.exporter.tracing import _with_cause

    try:
        try:
            raise RuntimeError("Could not guard on data-dependent expression u0 > 8\nmore")
        except RuntimeError as inner:
            raise ValueError("Failed to export. \x1b[96mThis is step 1/3\x1b[0m of it.\nNext steps") from inner
    except ValueError as exc:
        line = _with_cause(exc)
    assert line == "Failed to export: Could not guard on data-dependent expression u0 > 8"
    assert _with_cause(RuntimeError("plain \x1b[1mbold\x1b[0m")) == "plain bold"
