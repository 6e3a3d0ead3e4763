"""Exporter defects of issue #21, each with a test that failed before its fix: ONNX Runtime
failures in validation as one honest line (3), checkpoints with more tensors than the config
uses (4), no writable mapping of a weight file (11), and a lazy binding that follows
transformers' own loading rules, checked against ``from_pretrained`` (12)."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import helper

from gpcl_trt.common import GpclError
from gpcl_trt.exporter import export_model, load_model

TG = "text-generation"


def _llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(
        vocab_size=200,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    base.update(kw)
    cfg = LlamaConfig(**base)
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def _save_llama(out: Path, dtype: str = "float32", **kw) -> Path:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(_llama_config(**kw)).eval().to(getattr(torch, dtype)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return _save_llama(tmp_path_factory.mktemp("defects") / "llama")


# ----------------------------------------------------------------------------- defect 3
def _with_bf16_matmul(src: Path, dst: Path) -> None:
    """The exported graph with its first MatMul run in bfloat16 (casts around it): a graph ONNX
    Runtime's CPU provider cannot load (NOT_IMPLEMENTED: it has no bf16 MatMul)."""
    from gpcl_trt.common import load_onnx

    model = load_onnx(src)
    nodes = list(model.graph.node)
    i = next(k for k, n in enumerate(nodes) if n.op_type == "MatMul")
    mm = nodes[i]
    bf16 = onnx.TensorProto.BFLOAT16
    casts = [
        helper.make_node("Cast", [x], [f"{x}__bf16"], to=bf16, name=f"cast_in_{j}") for j, x in enumerate(mm.input)
    ]
    new_mm = helper.make_node("MatMul", [c.output[0] for c in casts], [f"{mm.output[0]}__bf16"], name="bf16_matmul")
    back = helper.make_node("Cast", [new_mm.output[0]], [mm.output[0]], to=onnx.TensorProto.FLOAT, name="cast_out")
    for n in casts + [new_mm, back]:  # the same block as the MatMul (layers mode splits by block)
        n.metadata_props.extend(mm.metadata_props)
    del model.graph.node[:]
    model.graph.node.extend(nodes[:i] + casts + [new_mm, back] + nodes[i + 1 :])
    onnx.save(model, str(dst))


@pytest.mark.parametrize("mode", ["full", "layers"])
def test_a_graph_onnx_runtime_cannot_load_is_one_line_with_its_reason(llama_dir, tmp_path, mode):
    """Full validation created its session outside the error handling (a traceback); layers mode
    called every ONNX Runtime failure 'the trace fixed a size that must vary'."""
    from gpcl_trt.exporter.validate import validate_export

    res = export_model(llama_dir, tmp_path / "m.onnx", task=TG, validate="none", external_data=False)
    assert res["ok"]
    broken = tmp_path / "broken.onnx"
    _with_bf16_matmul(tmp_path / "m.onnx", broken)
    module, arch, task = load_model(llama_dir, TG)
    with pytest.raises(GpclError) as exc:
        validate_export(module, arch, task, broken, 1e-4, mode=mode)
    msg = str(exc.value)
    assert exc.value.exit_code == 2 and "\n" not in msg, msg
    assert "cannot load the exported graph" in msg and "NOT_IMPLEMENTED" in msg and "MatMul" in msg, msg
    assert "fixed a size" not in msg and "onnxruntime_src" not in msg, msg
