"""Exporter against real models: the real MiniLM (session fixture), tiny random Llama and GPT-2
saved with save_pretrained, real ONNX Runtime sessions. Each (model, task) is exported once per
module and shared by the tests below."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from gpcl_trt.cli import main
from gpcl_trt.common import read_manifest, sha256_file
from gpcl_trt.exporter import export_model, load_model, make_dummy_inputs
from gpcl_trt.exporter.validate import greedy_decode, ort_runner, torch_runner, validate_export

TG, TGP = "text-generation", "text-generation-with-past"


@pytest.fixture(scope="module")
def exports(exports, tmp_path_factory, tiny_gpt2_dir):
    """``exports("llama", TGP) -> (path, result)``: the session's shared exports, except GPT-2
    text-generation, which no other area uses and which goes through the CLI with --json so the
    command's success path is covered too."""
    cli_key = ("gpt2", TG)
    cache: dict = {}

    def get(name: str, task: str):
        if (name, task) != cli_key:
            return exports(name, task)
        if cli_key not in cache:
            out = tmp_path_factory.mktemp("gpt2_cli") / "gpt2.onnx"
            res = CliRunner().invoke(main, ["export", str(tiny_gpt2_dir), "-o", str(out), "--task", task, "--json"])
            assert res.exit_code == 0, res.output
            cache[cli_key] = (out, json.loads(res.stdout))
        return cache[cli_key]

    return get


def _dims(vi) -> list:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


# ----------------------------------------------------------------------------- MiniLM
def test_minilm_export_validates_and_keeps_contract(minilm_onnx, minilm_dir):
    man = read_manifest(minilm_onnx)
    res = man["results"]
    assert res["architecture"] == "bert" and res["task"] == "feature-extraction"
    assert res["validation"]["passed"] and res["validation"]["max_abs_diff"] <= 1e-4
    # validated on shapes other than the trace shape, batch 1 included
    assert {(c["batch"], c["sequence"]) for c in res["validation"]["checks"]} == {(3, 11), (1, 5)}
    assert man["inputs"]["model_dir"] == str(Path(minilm_dir).resolve())
    assert len(man["inputs"]["model_dir_sha256"]) == 64
    for pkg in ("torch", "transformers", "onnx", "onnxruntime"):
        assert man["versions"][pkg]
    assert man["options"]["opset"] == 18 and man["options"]["dtype"] == "fp32"
    assert man["artifact_sha256"] == sha256_file(minilm_onnx)

    model = onnx.load(str(minilm_onnx), load_external_data=False)
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in model.graph.output] == ["last_hidden_state"]
    assert all(_dims(i) == ["batch", "sequence"] for i in model.graph.input)
    assert _dims(model.graph.output[0]) == ["batch", "sequence", 384]
    assert next(o.version for o in model.opset_import if o.domain == "") >= 18
    # the passes locate sites by the exporter's module scopes
    scopes = [p.value for n in model.graph.node for p in n.metadata_props if p.key == "pkg.torch.onnx.name_scopes"]
    assert len(scopes) > len(model.graph.node) // 2
    assert any("encoder.layer.5.attention" in s for s in scopes)


def test_minilm_loaded_module_matches_onnx_on_new_shape(minilm_onnx, minilm_dir):
    """load_model returns the very module that was exported (for the accuracy area's runner)."""
    module, arch, task = load_model(minilm_dir)
    assert task == "feature-extraction" and module.output_names == ["last_hidden_state"]
    feeds = make_dummy_inputs(arch, task, batch=4, seq=23, seed=7)
    assert feeds["attention_mask"][-1, -1] == 0  # padding is exercised
    ref = torch_runner(module)(feeds)["last_hidden_state"]
    got = ort_runner(minilm_onnx)(feeds)["last_hidden_state"]
    assert ref.shape == (4, 23, 384)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- decoders
@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("task", [TG, TGP])
def test_decoder_exports_validate(exports, name, task):
    path, result = exports(name, task)
    assert result["ok"] and result["task"] == task and result["architecture"] == name
    v = result["validation"]
    assert v["passed"] and v["max_abs_diff"] <= 1e-4
    if task == TGP:  # two-step decode: prefill from an empty cache, then one token
        assert [c["step"] for c in v["checks"]] == ["prefill", "decode"] * 2
    model = onnx.load(str(path))
    ins = {i.name: _dims(i) for i in model.graph.input}
    outs = {o.name: _dims(o) for o in model.graph.output}
    assert ins["input_ids"] == ["batch", "sequence"]
    assert ("position_ids" in ins) == (name == "llama")
    assert outs["logits"] == ["batch", "sequence", 128]
    if task == TGP:
        kv = 2 if name == "llama" else 4
        assert sorted(n for n in ins if n.startswith("past_key_values.")) == [
            f"past_key_values.{i}.{k}" for i in range(2) for k in ("key", "value")
        ]
        assert ins["attention_mask"] == ["batch", "total_sequence"]
        assert ins["past_key_values.1.value"] == ["batch", kv, "past_sequence", 16]
        assert outs["present.0.key"] == ["batch", kv, "total_sequence", 16]
    else:
        assert not any(n.startswith("past") for n in ins) and list(outs) == ["logits"]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_greedy_decode_ort_matches_pytorch(exports, name, tiny_llama_dir, tiny_gpt2_dir):
    """3 greedy tokens: ORT with past == our PyTorch module == HF generate == ORT without past."""
    import torch

    model_dir = {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir}[name]
    path, _ = exports(name, TGP)
    module, arch, task = load_model(model_dir, task=TGP)
    prompt = np.random.default_rng(3).integers(0, arch.vocab_size, size=(2, 6), dtype=np.int64)
    ort_tokens = greedy_decode(ort_runner(path), arch, task, prompt, steps=3)
    torch_tokens = greedy_decode(torch_runner(module), arch, task, prompt, steps=3)
    np.testing.assert_array_equal(ort_tokens, torch_tokens)

    hf = module.core.model
    with torch.no_grad():
        gen = hf.generate(
            torch.from_numpy(prompt),
            attention_mask=torch.ones(2, 6, dtype=torch.long),
            max_new_tokens=3,
            do_sample=False,
            min_new_tokens=3,
            pad_token_id=0,
        )
    np.testing.assert_array_equal(gen[:, 6:].numpy(), ort_tokens)

    no_past_path, _ = exports(name, TG)
    np.testing.assert_array_equal(greedy_decode(ort_runner(no_past_path), arch, TG, prompt, steps=3), ort_tokens)


def test_validation_catches_a_wrong_model(exports, tiny_llama_dir):
    """The check can fail: the same ONNX against a module with one perturbed weight."""
    import torch

    path, _ = exports("llama", TG)
    module, arch, task = load_model(tiny_llama_dir, task=TG)
    assert validate_export(module, arch, task, path, atol=1e-4)["passed"]
    with torch.no_grad():
        module.core.model.model.layers[1].mlp.down_proj.weight.add_(0.05)
    v = validate_export(module, arch, task, path, atol=1e-4)
    assert not v["passed"] and v["max_abs_diff"] > 1e-3


def test_fp16_with_external_data(tiny_gpt2_dir, tmp_path):
    """fp16 export, forced external data (the >2 GB path, exercised on a tiny model)."""
    from gpcl_trt.tolerance import defaults

    out = tmp_path / "g16.onnx"
    res = export_model(tiny_gpt2_dir, out, task=TG, dtype="fp16", external_data=True)
    assert res["ok"] and (res["validation"]["atol"], res["validation"]["rtol"]) == defaults("fp16"), res["validation"]
    inits = onnx.load(str(out), load_external_data=False).graph.initializer
    big = [t for t in inits if np.prod(t.dims) * 2 > 1024]
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g16.manifest.json", "g16.onnx", "g16.onnx.data"]
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert read_manifest(out)["results"]["external_data"] == ["g16.onnx.data"]


def test_pickle_weights_load_only_when_allowed(tiny_gpt2_dir, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    from gpcl_trt.common import GpclError

    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(tiny_gpt2_dir / "config.json", d / "config.json")
    torch.save(load_file(tiny_gpt2_dir / "model.safetensors"), d / "pytorch_model.bin")
    with pytest.raises(GpclError, match="--allow-pickle"):
        load_model(d)
    module, arch, task = load_model(d, allow_pickle=True)
    ref, _, _ = load_model(tiny_gpt2_dir)
    feeds = make_dummy_inputs(arch, task, 2, 5, seed=0)
    np.testing.assert_array_equal(torch_runner(module)(feeds)["logits"], torch_runner(ref)(feeds)["logits"])


@pytest.mark.parametrize("model_type", ["roberta", "xlm-roberta"])
def test_other_bert_family_encoders_without_pooler(model_type, tmp_path):
    """One-layer random RoBERTa / XLM-R saved without pooler weights (as sentence-embedding
    checkpoints often are) export and validate; re-exporting gives byte-identical ONNX."""
    import torch
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
        type_vocab_size=1,
    )
    torch.manual_seed(0)
    AutoModel.from_config(cfg, add_pooling_layer=False).eval().save_pretrained(tmp_path / "m")
    res = export_model(tmp_path / "m", tmp_path / "m.onnx")
    assert res["ok"] and res["architecture"] == model_type and res["task"] == "feature-extraction"
    assert res["validation"]["max_abs_diff"] <= 1e-4
    assert res["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    if model_type == "roberta":  # determinism, checked once on the cheapest model
        again = export_model(tmp_path / "m", tmp_path / "again.onnx", validate=False)
        assert again["validation"] == {"mode": "none", "skipped": True}  # the result names the mode that ran
        assert (tmp_path / "m.onnx").read_bytes() == (tmp_path / "again.onnx").read_bytes()
        assert again["onnx_sha256"] == res["onnx_sha256"]


def test_remote_code_not_run_unless_trusted(tiny_gpt2_dir, tmp_path):
    """config.json pointing at code in the directory: without --trust-remote-code that code is
    never imported and the built-in class is used."""
    import shutil

    d = tmp_path / "remote"
    shutil.copytree(tiny_gpt2_dir, d)
    (d / "evil.py").write_text("raise RuntimeError('remote code ran')\n")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(cfg))
    module, _, _ = load_model(d)
    assert type(module.core.model).__module__ == "transformers.models.gpt2.modeling_gpt2"


def _ort_ops(model, tmp_path) -> set[str]:
    """The op types left after ONNX Runtime's CPU graph optimizations."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(tmp_path / "ort.onnx")
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(opts.optimized_model_filepath, load_external_data=False).graph.node}


def test_minilm_residual_adds_stay_adds_and_ort_keeps_them_apart(minilm_onnx, tmp_path):
    """MiniLM as exported: ONNX Runtime cannot know the residual Adds' shapes (they follow the
    attention's Reshape), so they stay Adds and it does not fuse SkipLayerNormalization (slower on
    CPU than the two ops it replaces)."""
    model = onnx.load(str(minilm_onnx), load_external_data=False)
    producers = {o: n for n in model.graph.node for o in n.output}
    norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert norms and all(producers[n.input[0]].op_type == "Add" for n in norms)
    onnx.load_external_data_for_model(model, str(minilm_onnx.parent))
    ops = _ort_ops(model, tmp_path)
    assert "SkipLayerNormalization" not in ops and "LayerNormalization" in ops


def test_residual_add_with_known_shapes_becomes_sum(tmp_path):
    """Where ONNX Runtime will know both shapes, the residual Add would be fused (checked here
    with ORT itself); as Sum it is not, with the same numbers."""
    import onnxruntime as ort
    from onnx import TensorProto
    from onnx import helper as oh

    from gpcl_trt.exporter.postprocess import residual_adds_as_sum as _residual_adds_as_sum

    rng = np.random.default_rng(0)
    init = lambda name, *shape: onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)  # noqa: E731
    nodes = [
        oh.make_node("MatMul", ["x", "w"], ["h"]),
        oh.make_node("Add", ["h", "x"], ["r"]),
        oh.make_node("LayerNormalization", ["r", "g", "b"], ["y"], axis=-1),
    ]
    graph = oh.make_graph(
        nodes,
        "residual",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 8])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 8])],
        [init("w", 8, 8), init("g", 8), init("b", 8)],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)])
    assert "SkipLayerNormalization" in _ort_ops(model, tmp_path)  # what the Sum avoids
    x = {"x": rng.standard_normal((2, 3, 8)).astype(np.float32)}
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    run = lambda m, o=None: ort.InferenceSession(m.SerializeToString(), o, ["CPUExecutionProvider"]).run(None, x)  # noqa: E731
    before = run(model, plain)  # Add and LayerNormalization, unfused
    assert _residual_adds_as_sum(model) == 1 and model.graph.node[1].op_type == "Sum"
    assert "SkipLayerNormalization" not in _ort_ops(model, tmp_path)
    np.testing.assert_array_equal(run(model)[0], before[0])


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.export's own (LeafSpec deprecation)
def test_optimizer_keeps_a_tiny_epsilon_and_a_near_one_scale():
    """onnxscript's no-op rules take ``x + 1e-8`` for ``x + 0`` (and ``x * 1.000001`` for
    ``x * 1``); an RMSNorm with eps 1e-8 then gives NaN for an all-zero row. Our optimizer pass
    keeps both constants."""
    import onnxruntime as ort
    import torch

    from gpcl_trt.exporter.tracing import optimize_keeping as _optimize_keeping

    class Norm(torch.nn.Module):
        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-8) * 1.000001

    program = torch.onnx.export(Norm().eval(), (torch.randn(2, 8),), dynamo=True, optimize=False, verbose=False)
    _optimize_keeping(program.model, set())
    model = program.model_proto
    assert [n.op_type for n in model.graph.node].count("Add") == 1
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.zeros((2, 8), np.float32)
    x[1] = np.arange(8)
    y = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert np.isfinite(y).all() and not y[0].any()
    ref = x[1] / np.sqrt((x[1] ** 2).mean() + 1e-8) * np.float32(1.000001)
    np.testing.assert_allclose(y[1], ref, rtol=1e-6)


def test_intermediates_declare_types_not_shapes(minilm_onnx):
    """Intermediate tensors keep their element type (per-layer validation and diff read it) but
    declare no shape (ONNX Runtime's planner reuses buffers by declared shape, measured slower);
    graph inputs and outputs keep their shapes, and the sites still know their hidden size."""
    from gpcl_trt.passes.graph import load_graph
    from gpcl_trt.passes.sites import find_sites_loaded

    model = onnx.load(str(minilm_onnx), load_external_data=False)
    infos = list(model.graph.value_info)
    assert infos and all(vi.type.tensor_type.elem_type for vi in infos)
    assert not any(vi.type.tensor_type.HasField("shape") for vi in infos)
    dims = lambda vi: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]  # noqa: E731
    assert dims(model.graph.input[0]) == ["batch", "sequence"]
    assert dims(model.graph.output[0]) == ["batch", "sequence", 384]
    sites = find_sites_loaded(load_graph(minilm_onnx))
    assert len(sites) == 12 and {s.hidden for s in sites} == {384}
