"""``gpcl-trt optimize --for ort`` (passes/fuse_ort.py) against real components: tiny random-init
GQA decoders (num_key_value_heads < heads) exported with past by our exporter, the optimised graph
run in real ONNX Runtime next to the original. Logits must agree under the tolerance rule on a
left-padded batch (prefill and cached steps), greedy generation must give the same tokens, GPCL
must survive the rewrite, and the repeat-KV copies must be gone from the graph ORT runs. Every
variant: ``standard`` (standard ONNX ops), ``contrib`` (also ORT's RotaryEmbedding and
SkipSimplifiedLayerNormalization) and ``contrib-gqa`` (also GroupQueryAttention)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from gpcl_trt.cli import main

TGP = "text-generation-with-past"
VARIANTS = ("standard", "contrib", "contrib-gqa")
VOCAB = 128
LAYERS = 2


def _config(name: str):
    import transformers as tf

    dec = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        max_position_embeddings=128,
    )
    if name == "llama":
        return tf.LlamaForCausalLM, tf.LlamaConfig(**dec)
    if name == "mistral":  # a window smaller than prompt + new tokens: the mask's window is crossed
        return tf.MistralForCausalLM, tf.MistralConfig(sliding_window=8, **dec)
    return tf.Qwen2ForCausalLM, tf.Qwen2Config(**dec)  # q/k/v biases


def _tokenizer(out: Path) -> None:
    """A word-level tokenizer over VOCAB words (w0 w1 ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(out)


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    """``decoders(name) -> (exported.onnx, standard.onnx, contrib.onnx, contrib-gqa.onnx)``, each
    made once per module."""
    import torch

    from gpcl_trt.exporter import export_model
    from gpcl_trt.passes.fuse_ort import optimize_file

    cache: dict = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in cache:
            d = tmp_path_factory.mktemp(f"fuse_{name}")
            model_cls, cfg = _config(name)
            torch.manual_seed(0)
            model = model_cls(cfg).eval()
            with torch.no_grad():  # random norm weights: ones would hide a norm rewrite that drops the weight
                for n, p in model.named_parameters():
                    if "norm" in n:
                        p.uniform_(0.5, 1.5)
            model.save_pretrained(d)
            _tokenizer(d)
            out = d / "onnx" / "model.onnx"
            out.parent.mkdir()
            assert export_model(d, out, task=TGP)["ok"]
            made = [out]
            for variant in VARIANTS:
                made.append(out.with_name(f"model_{variant}.onnx"))
                optimize_file(out, made[-1], variant=variant)
            cache[name] = tuple(made)
        return cache[name]

    return get


def _batch(rows: int = 3, width: int = 11):
    ids = np.random.default_rng(1).integers(2, VOCAB, size=(rows, width)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, :5] = 0  # left padding of different lengths
    mask[1, :2] = 0
    ids[mask == 0] = 0
    return ids, mask


def _logits(path: Path, steps: int = 6) -> list[np.ndarray]:
    """Prefill a left-padded batch, then ``steps`` cached steps fed with a fixed token stream
    (the same on both sides whatever each side's argmax is)."""
    from gpcl_trt.generate import OrtRuntime

    rt = OrtRuntime(path, threads=1)
    ids, mask = _batch()
    pos = np.where(mask == 1, np.cumsum(mask, axis=-1) - 1, 1)
    out = [rt.prefill(ids, mask, pos)]
    nxt = pos[:, -1:] + 1
    feed = np.random.default_rng(2).integers(2, VOCAB, size=(steps, ids.shape[0], 1)).astype(np.int64)
    for s in range(steps):
        mask = np.concatenate([mask, np.ones((ids.shape[0], 1), np.int64)], axis=1)
        out.append(rt.step(feed[s], mask, nxt))
        nxt = nxt + 1
    return out


def _assert_same_logits(ref_path: Path, cand_path: Path) -> None:
    from gpcl_trt.tolerance import defaults, failing

    atol, rtol = defaults("fp32")
    for i, (ref, cand) in enumerate(zip(_logits(ref_path), _logits(cand_path))):
        bad = failing(ref, cand, atol, rtol)
        assert not bad.any(), f"call {i}: {int(bad.sum())} logits differ, max {np.abs(ref - cand).max():.3g}"


def _ort_ops(path: Path, tmp_path: Path) -> Counter:
    """The op histogram of the graph ONNX Runtime actually runs (after its own fusions)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / f"{path.stem}.ort_opt.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(so.optimized_model_filepath, load_external_data=False).graph.node)


def _repeat_kv_count(path: Path) -> int:
    """Expand nodes fed by an Unsqueeze on axis 2: the exporter's repeat_kv."""
    from gpcl_trt.passes.fuse_ort import _repeat_kv
    from gpcl_trt.passes.graph import load_graph

    return sum(_repeat_kv(n) is not None for n in load_graph(path).graph.nodes if n.op == "Expand")


def test_llama_logits_ops_and_idempotent(decoders, tmp_path):
    from gpcl_trt.passes.fuse_ort import optimize_file

    src, opt, *_ = decoders("llama")
    _assert_same_logits(src, opt)
    assert _repeat_kv_count(src) == 2 * LAYERS  # keys and values of every layer
    assert _repeat_kv_count(opt) == 0
    before, after = _ort_ops(src, tmp_path), _ort_ops(opt, tmp_path)
    assert after["Expand"] == before["Expand"] - 2 * LAYERS
    # ORT's own fusion now fires: one kernel per norm (2 per layer + the final one)
    assert before["SimplifiedLayerNormalization"] == 0
    assert after["SimplifiedLayerNormalization"] == 2 * LAYERS + 1
    assert after["Reciprocal"] == 0
    # the softmax scale stays next to Q @ K^T, where ORT folds it (and K's transpose) into one
    # FusedMatMul, as in the export; the only Muls gone are the norms' two each
    assert after["FusedMatMul"] == before["FusedMatMul"] == LAYERS
    assert after["Mul"] == before["Mul"] - 2 * (2 * LAYERS + 1)
    assert sum(after.values()) < sum(before.values())
    # the graph's interface is unchanged
    a, b = (onnx.load(str(p), load_external_data=False).graph for p in (src, opt))
    assert [(i.name, i.type) for i in a.input] == [(i.name, i.type) for i in b.input]
    assert [(o.name, o.type) for o in a.output] == [(o.name, o.type) for o in b.output]
    # idempotent: a second run finds nothing and the graph stays as it is
    again = optimize_file(opt, tmp_path / "again.onnx")
    assert not again["changed"] and again["grouped_attention"] == [] and again["rmsnorm_div"] == []
    assert again["nodes_before"] == again["nodes_after"]
    manifest = json.loads(opt.with_name("model_standard.manifest.json").read_text())
    assert manifest["stage"] == "optimize" and len(manifest["results"]["grouped_attention"]) == 2 * LAYERS


@pytest.mark.parametrize("variant", ["contrib", "contrib-gqa"])
def test_llama_contrib_logits_ops_and_idempotent(decoders, tmp_path, variant):
    from gpcl_trt.passes.fuse_ort import optimize_file

    src, standard, contrib, gqa = decoders("llama")
    path = contrib if variant == "contrib" else gqa
    _assert_same_logits(src, path)
    after = _ort_ops(path, tmp_path)
    assert after["RotaryEmbedding"] == 2 * LAYERS and after["Neg"] == 0 and _repeat_kv_count(path) == 0
    # every norm but the first (it reads the embedding, no residual Add) takes its residual Add in
    assert after["SkipSimplifiedLayerNormalization"] == 2 * LAYERS and after["SimplifiedLayerNormalization"] == 1
    if variant == "contrib":
        assert after["GroupQueryAttention"] == 0 and after["Softmax"] == LAYERS
    else:
        assert after["GroupQueryAttention"] == LAYERS and after["Softmax"] == 0
    assert sum(after.values()) < sum(_ort_ops(standard, tmp_path).values())
    again = optimize_file(path, tmp_path / "again.onnx", variant=variant)
    assert not again["changed"] and again["nodes_before"] == again["nodes_after"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mistral", "qwen2"])
def test_families_logits_and_generate(decoders, name):
    from gpcl_trt.generate import OrtRuntime, decode

    src, *optimised = decoders(name)
    assert _repeat_kv_count(src) == 2 * LAYERS and _repeat_kv_count(optimised[0]) == 0
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22], [40, 41, 42, 43, 44]]
    ref = decode(OrtRuntime(src, threads=1), prompts, max_new_tokens=16)["tokens"]
    for cand in optimised:
        _assert_same_logits(src, cand)
        assert decode(OrtRuntime(cand, threads=1), prompts, max_new_tokens=16)["tokens"] == ref


@pytest.mark.parametrize("variant", [1, 2, 3])
def test_greedy_generate_equal(decoders, variant):
    from gpcl_trt.generate import OrtRuntime, decode

    paths = decoders("llama")
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21], [40, 41, 42, 43]]  # a ragged (left-padded) batch
    ref = decode(OrtRuntime(paths[0], threads=1), prompts, max_new_tokens=24)
    cand = decode(OrtRuntime(paths[variant], threads=1), prompts, max_new_tokens=24)
    assert cand["tokens"] == ref["tokens"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_gpcl_survives_both_orders(decoders, tmp_path, variant):
    """insert then optimize, and optimize then insert: the same logits as the GPCL model not
    optimised, and the same sites found on the optimised graph."""
    from gpcl_trt.passes import insert_file, sites_file
    from gpcl_trt.passes.fuse_ort import optimize_file

    src, *optimised = decoders("llama")
    opt = optimised[VARIANTS.index(variant)]
    tau = 0.05  # small: GPCL clamps, so a GPCL node dropped by the rewrite would show in the logits
    gpcl = tmp_path / "gpcl.onnx"
    insert_file(src, gpcl, tau=tau)
    gpcl_opt = optimize_file(gpcl, tmp_path / "gpcl_ort.onnx", variant=variant)
    assert gpcl_opt["changed"]
    opt_gpcl = tmp_path / "ort_gpcl.onnx"
    insert_file(opt, opt_gpcl, tau=tau)

    gpcl_ops = Counter(n.op_type for n in onnx.load(str(gpcl), load_external_data=False).graph.node)
    for path in (tmp_path / "gpcl_ort.onnx", opt_gpcl):
        ops = Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
        assert ops["GPCL"] == gpcl_ops["GPCL"] > 0
        _assert_same_logits(gpcl, path)
    # GPCL changes the logits at this tau (so the comparison above could fail)
    assert not np.allclose(_logits(src)[0], _logits(gpcl)[0], atol=1e-3)

    def keys(path):
        r = sites_file(path)
        return [(s["layer"], s["kind"], s["tensor"]) for s in r["sites"]]

    assert keys(opt) == keys(src) and len(keys(src)) == 2 * LAYERS


def test_cli_optimize_and_errors(decoders, tmp_path):
    src = decoders("llama")[0]
    out = tmp_path / "o.onnx"
    r = CliRunner().invoke(main, ["optimize", str(src), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["ok"] and len(result["grouped_attention"]) == 2 * LAYERS
    assert out.is_file() and out.with_name("o.manifest.json").is_file()
    r = CliRunner().invoke(main, ["optimize", str(src), "-o", str(out)])  # exists, no --force
    assert r.exit_code == 2 and r.stderr.startswith("gpcl-trt optimize: error:") and len(r.stderr.splitlines()) == 1
    r = CliRunner().invoke(main, ["optimize", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "x.onnx")])
    assert r.exit_code == 2 and "gpcl-trt optimize: error:" in r.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_help_documents_every_option():
    import click

    cmd = main.commands["optimize"]
    assert cmd.help and all(p.help for p in cmd.params if isinstance(p, click.Option))


def test_cli_generate_reads_the_optimised_artifact(decoders):
    """``gpcl-trt generate`` takes the optimised file as it is: the tokenizer is found through its
    manifest (optimize -> export -> model directory), and the text is the export's."""
    paths = decoders("llama")
    texts = []
    for path in paths:
        r = CliRunner().invoke(
            main, ["generate", str(path), "--prompt", "w5 w6 w7", "--prompt", "w9", "--max-new-tokens", "6", "--json"]
        )
        assert r.exit_code == 0, r.output
        res = json.loads(r.stdout)
        texts.append({k: v for k, v in res.items() if k not in ("artifact", "measurements")})
    assert texts[0]["outputs"] and all(t == texts[0] for t in texts[1:])


def test_contrib_gqa_binds_one_cache_buffer(decoders, tmp_path):
    """contrib-gqa reads the past length from the mask, so every past input feeds
    GroupQueryAttention alone: the manifest says ``kv_cache: shared-buffer`` and OrtRuntime binds
    one preallocated buffer as past and present. The buffers are the same objects from the
    prefill to the last step (written in place), their written positions hold the keys, and a
    batch that outgrows its reservation keeps its cache (the logits test above reserves none)."""
    from gpcl_trt.generate import OrtRuntime, decode
    from gpcl_trt.manifest import kv_cache_of

    src, standard, contrib, gqa = decoders("llama")
    assert kv_cache_of(gqa) == "shared-buffer"
    assert kv_cache_of(standard) == kv_cache_of(contrib) == "concat" and kv_cache_of(src) is None
    graph = onnx.load(str(gqa), load_external_data=False).graph
    readers = Counter(n.op_type for n in graph.node for i in n.input if i.startswith("past_key_values."))
    assert readers == Counter({"GroupQueryAttention": 2 * LAYERS})

    rt = OrtRuntime(gqa, threads=1)
    assert rt.shared_buffer and not OrtRuntime(contrib, threads=1).shared_buffer
    ids, mask = _batch()
    pos = np.where(mask == 1, np.cumsum(mask, axis=-1) - 1, 1)
    rt.reserve(ids.shape[1] + 4)
    rt.prefill(ids, mask, pos)
    buffers = {name: pair[0] for name, pair in rt._shared.items()}
    assert all(b.shape[2] == ids.shape[1] + 4 for b in buffers.values())
    nxt = pos[:, -1:] + 1
    for _ in range(3):
        mask = np.concatenate([mask, np.ones((ids.shape[0], 1), np.int64)], axis=1)
        rt.step(np.full((ids.shape[0], 1), 7, np.int64), mask, nxt)
        nxt = nxt + 1
    assert all(rt._shared[name][0] is buf for name, buf in buffers.items())
    key = buffers["past_key_values.0.key"]
    assert np.abs(key[:, :, : mask.shape[1]]).min(axis=-1).max() > 0 and not key[:, :, mask.shape[1] :].any()

    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21], [40, 41, 42, 43]]
    ref = decode(OrtRuntime(src, threads=1), prompts, max_new_tokens=24)["tokens"]
    assert decode(rt, prompts, max_new_tokens=24)["tokens"] == ref


def test_last_logits(decoders, tmp_path):
    """--logits last: the prefill's logits are the last position's ([B, 1, V]), equal to the
    export's there; generation is unchanged; eval's teacher-forced NLL refuses the graph in one
    line; a second run changes nothing."""
    from gpcl_trt.accuracy.generation import all_logits
    from gpcl_trt.common import GpclError
    from gpcl_trt.generate import OrtRuntime, decode
    from gpcl_trt.passes.fuse_ort import optimize_file
    from gpcl_trt.tolerance import defaults, failing

    src = decoders("llama")[0]
    for variant in ("standard", "contrib-gqa"):
        out = tmp_path / f"last_{variant}.onnx"
        res = optimize_file(src, out, variant=variant, logits="last")
        assert res["logits"] == "last" and len(res["last_logits"]) == 1
        ids, mask = _batch()
        pos = np.where(mask == 1, np.cumsum(mask, axis=-1) - 1, 1)
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        rt, ref_rt = OrtRuntime(out, threads=1), OrtRuntime(src, threads=1)
        for spec in rt.past:
            feeds[spec.name] = rt._empty_past(spec, ids.shape[0])
        (logits,) = rt.session.run(["logits"], feeds)
        (full,) = ref_rt.session.run(["logits"], feeds)
        assert logits.shape == (ids.shape[0], 1, VOCAB) and full.shape[1] == ids.shape[1]
        assert not failing(full[:, -1:], logits, *defaults("fp32")).any()
        prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21]]
        assert decode(rt, prompts, max_new_tokens=12)["tokens"] == decode(ref_rt, prompts, max_new_tokens=12)["tokens"]
        with pytest.raises(GpclError, match="last position's logits only"):
            all_logits(rt, np.array([[5, 6, 7]], np.int64))
        again = optimize_file(out, tmp_path / f"again_{variant}.onnx", variant=variant, logits="last")
        assert not again["changed"] and again["logits"] == "last"


def test_quantize_after_optimize_keeps_the_shared_buffer(decoders, tmp_path):
    """export -> optimize (contrib-gqa, last logits) -> quantize int4: the quantized graph keeps
    GroupQueryAttention and the shared cache buffer (read through its manifest chain), and its
    greedy tokens equal those of the export quantized the same way (the same RTN weights)."""
    from gpcl_trt.generate import OrtRuntime, decode
    from gpcl_trt.passes.fuse_ort import optimize_file
    from gpcl_trt.quantize import quantize_model

    src = decoders("llama")[0]
    opt = tmp_path / "opt.onnx"
    optimize_file(src, opt, variant="contrib-gqa", logits="last")
    q_opt, q_src = tmp_path / "opt_q4.onnx", tmp_path / "src_q4.onnx"
    for a, b in ((opt, q_opt), (src, q_src)):
        assert quantize_model(a, b, weights="int4", block_size=32, lm_head=True)["ok"]
    ops = Counter(n.op_type for n in onnx.load(str(q_opt), load_external_data=False).graph.node)
    assert ops["GroupQueryAttention"] == LAYERS and ops["DequantizeLinear"] > 0
    rt = OrtRuntime(q_opt, threads=1)
    assert rt.shared_buffer
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21], [40, 41, 42, 43]]
    ref = decode(OrtRuntime(q_src, threads=1), prompts, max_new_tokens=16)["tokens"]
    assert decode(rt, prompts, max_new_tokens=16)["tokens"] == ref
