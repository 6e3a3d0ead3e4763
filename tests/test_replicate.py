"""Replicated layers (exporter/replicate.py): a deep decoder traced with four layers and grown to
all of them equals the export that traces every layer, on real ONNX Runtime sessions, with each
copy reading its own weights; models whose layers differ are traced whole, and say why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_lazy_export import _ort_equal

from gpcl_trt.common import GpclError
from gpcl_trt.exporter import export_model
from gpcl_trt.passes.graph import load_graph
from gpcl_trt.passes.sites import find_sites_loaded

TG, TGP = "text-generation", "text-generation-with-past"


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory) -> Path:
    """10 layers; the norms of layers 0-3 are all ones (equal tensors the exporter's optimizer
    keeps once), those of layers 4-9 differ, so a copy that read another layer's norm is wrong."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=200,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=10,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers[4:]:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    out = tmp_path_factory.mktemp("deep") / "llama10"
    model.save_pretrained(out, safe_serialization=True)
    return out


def _each_copy_reads_its_own_weights(path: Path) -> None:
    """Copies say their own layer in the name-scope metadata and read their own parameters."""
    import onnx

    from gpcl_trt.gpcl import SCOPES_KEY, parse_scopes

    model = onnx.load(str(path), load_external_data=False)
    weights_by_layer: dict[int, set[str]] = {}
    for n in model.graph.node:
        scopes = next((parse_scopes(p.value) for p in n.metadata_props if p.key == SCOPES_KEY), [])
        layer = next((int(s.rsplit(".", 1)[1]) for s in scopes if s.startswith("model.model.layers.")), None)
        if layer is None:
            continue
        for name in n.input:
            if name.startswith("model.model.layers."):
                weights_by_layer.setdefault(layer, set()).add(name)
    assert sorted(weights_by_layer) == list(range(10))
    for layer, names in weights_by_layer.items():
        assert names and all(n.startswith(f"model.model.layers.{layer}.") for n in names), (layer, names)
    assert np.unique([len(v) for v in weights_by_layer.values()]).size == 1


@pytest.mark.parametrize("task, dtype", [(TGP, "fp32"), (TG, "fp16")])
def test_replicated_equals_traced(deep_llama, tmp_path, task, dtype):
    rep = export_model(deep_llama, tmp_path / "rep.onnx", task=task, dtype=dtype, external_data="link")
    full = export_model(
        deep_llama, tmp_path / "full.onnx", task=task, dtype=dtype, external_data="link", replicate=False
    )
    assert rep["weights"]["layers"] == {"traced": 4, "replicated": 6}
    assert full["weights"]["layers"]["why_every_layer"] == "not asked (replicate=False)"
    # validated against PyTorch with all 10 layers: every copy reads its own (distinct) norms
    assert rep["validation"]["passed"] and rep["validation"]["mode"] == "full", rep["validation"]
    assert rep["inputs"] == full["inputs"] and rep["outputs"] == full["outputs"]
    _ort_equal(tmp_path / "rep.onnx", tmp_path / "full.onnx")
    _each_copy_reads_its_own_weights(tmp_path / "rep.onnx")
    sites = find_sites_loaded(load_graph(tmp_path / "rep.onnx"))
    assert sorted((s.layer, s.kind) for s in sites) == sorted(
        (i, k) for i in range(10) for k in ("pre-attention", "pre-mlp")
    )
    # no intermediate declares a shape: the hidden size is read through each weight's Transpose
    assert {s.hidden for s in sites} == {64}


def test_layers_that_differ_are_traced_whole(tmp_path):
    """Gemma 2 alternates sliding-window and full attention: one traced layer cannot stand for
    the others. Auto traces every layer and says why; asking for replication is one clear error."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        vocab_size=200,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=4,
    )
    torch.manual_seed(0)
    d = tmp_path / "gemma2"
    Gemma2ForCausalLM(cfg).eval().save_pretrained(d, safe_serialization=True)
    res = export_model(d, tmp_path / "g.onnx", task=TG, validate="none")
    assert res["weights"]["layers"]["traced"] == 8
    assert "layer_types differs between layers" in res["weights"]["layers"]["why_every_layer"]
    with pytest.raises(GpclError, match="cannot replicate the layers .*layer_types differs"):
        export_model(d, tmp_path / "g2.onnx", task=TG, validate="none", replicate=True)
    assert not (tmp_path / "g2.onnx").exists()


def test_nodes_without_scopes_join_the_layer_they_read(tmp_path):
    """GPT-NeoX's fused QKV is split by a node the exporter's optimizer makes (no name scopes)
    inside each layer; it belongs to the layer it reads, so the layers still line up and are
    replicated, and every copy is validated against PyTorch (norms differ per layer)."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4
    )
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.uniform_(0.5, 1.5)
    d = tmp_path / "neox"
    model.save_pretrained(d, safe_serialization=True)
    res = export_model(d, tmp_path / "n.onnx", task=TGP)
    assert res["weights"]["layers"] == {"traced": 4, "replicated": 4}
    assert res["validation"]["passed"], res["validation"]
