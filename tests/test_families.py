"""The family corpus: 28 checkpoints of 27 architectures built here as tiny random-init checkpoints (2 layers,
hidden 32-64, vocab 128), each exported once per module through the public API and run through
export -> sites (expected count per kind) -> insert -> strip -> diff against PyTorch, then the
pipeline's later stages (calibrate, insert, TensorRT-RTX build, diff, Triton repository; three
served by tritonserver); decoders also decode greedily with past in ONNX Runtime and match
PyTorch and HF ``generate``.

Norm weights are perturbed away from their init (ones): the exporter's optimiser merges two
LayerNorms with identical weights that read one tensor (GPT-NeoX's parallel block), which real
checkpoints never have. Everything is tiny so that the module stays well under five minutes on
a 2-core machine."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from gpcl_trt.common import GpclError

TG, TGP = "text-generation", "text-generation-with-past"
TINY_DEC = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
)
TINY_ENC = dict(TINY_DEC)  # the same tiny sizes; kept apart so either can change alone
TINY_VIT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)
TINY_TEXT_TOWER = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,  # the engine's default sequence range reaches 128
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
TINY_AUDIO = dict(  # two 16-wide convolutions of stride 4 (a frame per 16 samples), two blocks
    vocab_size=32,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    conv_dim=(16, 16),
    conv_stride=(4, 4),
    conv_kernel=(8, 4),
    num_conv_pos_embeddings=8,
    num_conv_pos_embedding_groups=4,
    do_stable_layer_norm=True,
    feat_extract_norm="layer",
)
TWO = {"pre-attention": 2, "pre-mlp": 2}  # two norms per block, two blocks
SHARED = {"pre-attention": 0, "pre-mlp": 0, "shared": 2}  # one norm read by attention and MLP

# name -> (model_type, head class, config kwargs, task picked by --task auto, site counts)
CORPUS: dict[str, tuple[str, str, dict, str, dict]] = {
    # decoder-only: RoPE, GQA, sliding window (4 < prompt + decode), hybrid sliding/full caches,
    # q/k norms, partial rotary, ALiBi, learned positions, parallel and shared-norm blocks
    "mistral": ("mistral", "MistralForCausalLM", dict(TINY_DEC, num_key_value_heads=2, sliding_window=4), TGP, TWO),
    # rms_norm_eps 1e-8: the exporter's optimizer must keep it (the padding row's embedding is zero)
    "helium": (
        "helium",
        "HeliumForCausalLM",
        dict(TINY_DEC, num_key_value_heads=2, head_dim=16, pad_token_id=3),
        TGP,
        TWO,
    ),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", dict(TINY_DEC, num_key_value_heads=2, head_dim=16), TGP, TWO),
    # multi-head latent attention (its cache: a 16-wide latent and 4-wide rotary keys), complex RoPE, experts
    "deepseek-v2": (
        "deepseek_v2",
        "DeepseekV2ForCausalLM",
        dict(
            TINY_DEC,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=4,
            v_head_dim=8,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            moe_intermediate_size=32,
            first_k_dense_replace=1,
        ),
        TGP,
        TWO,
    ),
    # complex RoPE, chunked attention, a no-RoPE layer, experts in the second layer
    "llama4-text": (
        "llama4_text",
        "Llama4ForCausalLM",
        dict(
            TINY_DEC,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size_mlp=128,
            num_local_experts=4,
            num_experts_per_tok=1,
            moe_layers=[1],
            attention_chunk_size=4,
        ),
        TGP,
        TWO,
    ),
    "gemma2": (
        "gemma2",
        "Gemma2ForCausalLM",
        dict(TINY_DEC, num_key_value_heads=2, head_dim=16, sliding_window=4),
        TGP,
        TWO,
    ),
    "gemma3_text": (
        "gemma3_text",
        "Gemma3ForCausalLM",
        dict(
            TINY_DEC,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
        ),
        TGP,
        TWO,
    ),
    "phi": ("phi", "PhiForCausalLM", dict(TINY_DEC), TGP, SHARED),
    "phi3": ("phi3", "Phi3ForCausalLM", dict(TINY_DEC, num_key_value_heads=2, pad_token_id=0), TGP, TWO),
    "gpt_neox": ("gpt_neox", "GPTNeoXForCausalLM", dict(TINY_DEC), TGP, TWO),
    "gptj": (
        "gptj",
        "GPTJForCausalLM",
        dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128, rotary_dim=8),
        TGP,
        SHARED,
    ),
    "falcon": (
        "falcon",
        "FalconForCausalLM",
        dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
        TGP,
        SHARED,
    ),
    # falcon-rw style: ALiBi (its bfloat16 product needs the Falcon override), sequential block
    "falcon_alibi": (
        "falcon",
        "FalconForCausalLM",
        dict(
            vocab_size=128,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            alibi=True,
            parallel_attn=False,
            multi_query=False,
        ),
        TGP,
        TWO,
    ),
    # mixture of experts: the router and every expert read the norm (exported as batched_mm)
    "mixtral": (
        "mixtral",
        "MixtralForCausalLM",
        dict(TINY_DEC, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
        TGP,
        TWO,
    ),
    "opt": (
        "opt",
        "OPTForCausalLM",
        dict(
            vocab_size=128,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=64,
        ),
        TGP,
        TWO,
    ),
    "bloom": ("bloom", "BloomForCausalLM", dict(vocab_size=128, hidden_size=64, n_layer=2, n_head=4), TGP, TWO),
    # text encoders, one task each (post-LN BERT-likes, pre-LN ModernBERT, ALBERT's shared layer)
    "bert": ("bert", "BertForMaskedLM", dict(TINY_ENC), "fill-mask", TWO),
    "roberta": (
        "roberta",
        "RobertaForSequenceClassification",
        dict(TINY_ENC, num_labels=3),
        "text-classification",
        TWO,
    ),
    "distilbert": (
        "distilbert",
        "DistilBertForTokenClassification",
        dict(vocab_size=128, dim=64, hidden_dim=128, n_layers=2, n_heads=4, max_position_embeddings=128, num_labels=5),
        "token-classification",
        TWO,
    ),
    "mpnet": ("mpnet", "MPNetForQuestionAnswering", dict(TINY_ENC), "question-answering", TWO),
    "modernbert": (
        "modernbert",
        "ModernBertForMaskedLM",
        dict(
            TINY_ENC,
            global_attn_every_n_layers=2,
            local_attention=8,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            cls_token_id=1,
            sep_token_id=2,
        ),
        "fill-mask",
        TWO,
    ),
    "albert": ("albert", "AlbertModel", dict(TINY_ENC, embedding_size=32), "feature-extraction", TWO),
    "deberta-v2": ("deberta-v2", "DebertaV2Model", dict(TINY_ENC), "feature-extraction", TWO),
    # DeBERTa-v3: a LayerNorm over the relative-position table, which every block's query/key
    # projections also read (not a block's input: no site, and no renumbering of the blocks)
    "deberta-v3": (
        "deberta-v2",
        "DebertaV2Model",
        dict(
            TINY_ENC,
            relative_attention=True,
            position_buckets=16,
            max_relative_positions=32,
            norm_rel_ebd="layer_norm",
            share_att_key=True,
            pos_att_type=["p2c", "c2p"],
            position_biased_input=False,
        ),
        "feature-extraction",
        TWO,
    ),
    # pre-LN with the attention's LayerNorm inside the attention submodule (ESM-2)
    "esm": ("esm", "EsmForMaskedLM", dict(TINY_ENC, pad_token_id=1), "fill-mask", TWO),
    # decoder-only with a classification / QA head instead of the LM head
    "qwen2-seq-cls": (
        "qwen2",
        "Qwen2ForSequenceClassification",
        dict(TINY_DEC, num_key_value_heads=2, num_labels=3, pad_token_id=0),
        "text-classification",
        TWO,
    ),
    "llama-qa": (
        "llama",
        "LlamaForQuestionAnswering",
        dict(TINY_DEC, num_key_value_heads=2),
        "question-answering",
        TWO,
    ),
    # vision encoders: pixel_values in
    "vit": ("vit", "ViTForImageClassification", dict(TINY_VIT, num_labels=4), "image-classification", TWO),
    "dinov2": ("dinov2", "Dinov2Model", dict(TINY_VIT), "feature-extraction", TWO),
    # convolutional and hierarchical vision, two stages each: stage-by-stage block numbering, the
    # channels-last norms are sites; ResNet's BatchNorm over NCHW gives none (GPCL reads the last axis)
    "resnet": (
        "resnet",
        "ResNetForImageClassification",
        dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3),
        "image-classification",
        {"pre-attention": 0, "pre-mlp": 0},
    ),
    "convnext": (  # one LayerNorm per block, before its pointwise MLP
        "convnext",
        "ConvNextForImageClassification",
        # layer scale 1 instead of 1e-6: GPCL at the MLP's input must be able to move the output
        dict(
            num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3, image_size=32, layer_scale_init_value=1.0
        ),
        "image-classification",
        {"pre-attention": 0, "pre-mlp": 2},
    ),
    # windowed attention (pad + permute between norm and projections), patch merging; windows of 2
    # over 8x8 and 4x4 tokens: the second block of stage 0 shifts its windows (a roll)
    "swin": (
        "swin",
        "SwinForImageClassification",
        dict(image_size=32, patch_size=4, embed_dim=8, depths=[2, 1], num_heads=[2, 2], window_size=2, num_labels=3),
        "image-classification",
        {"pre-attention": 3, "pre-mlp": 3},
    ),
    "mobilevit": (  # its three transformer stages are 2 + 4 + 3 blocks deep whatever the config
        "mobilevit",
        "MobileViTForImageClassification",
        dict(
            image_size=32,
            hidden_sizes=[16, 16, 16],
            neck_hidden_sizes=[8, 8, 16, 16, 16, 16, 32],
            num_attention_heads=2,
            num_labels=3,
            initializer_range=0.5,  # its BatchNorm scales start at N(0, this): 0.02 leaves zero logits
        ),
        "image-classification",
        {"pre-attention": 9, "pre-mlp": 9},
    ),
    # dual encoders: both towers' blocks, numbered tower by tower; either tower alone is an encoder
    "clip": (
        "clip",
        "CLIPModel",
        dict(text_config=TINY_TEXT_TOWER, vision_config=TINY_VIT, projection_dim=16),
        "zero-shot-image-classification",
        {"pre-attention": 4, "pre-mlp": 4},
    ),
    "siglip": (
        "siglip",
        "SiglipModel",
        dict(text_config=TINY_TEXT_TOWER, vision_config=TINY_VIT),
        "zero-shot-image-classification",
        {"pre-attention": 4, "pre-mlp": 4},
    ),
    "clip-text": ("clip_text_model", "CLIPTextModel", dict(TINY_TEXT_TOWER), "feature-extraction", TWO),
    "siglip-vision": ("siglip_vision_model", "SiglipVisionModel", dict(TINY_VIT), "feature-extraction", TWO),
    # wav2vec2-style speech encoders: a raw waveform in (input_values), a pre-LN (stable layer norm)
    # CTC model, a post-LN classifier, HuBERT's bare encoder
    "wav2vec2-ctc": ("wav2vec2", "Wav2Vec2ForCTC", dict(TINY_AUDIO), "automatic-speech-recognition", TWO),
    "wav2vec2-cls": (
        "wav2vec2",
        "Wav2Vec2ForSequenceClassification",
        dict(TINY_AUDIO, do_stable_layer_norm=False, feat_extract_norm="group", num_labels=3),
        "audio-classification",
        TWO,
    ),
    "hubert": ("hubert", "HubertModel", dict(TINY_AUDIO), "feature-extraction", TWO),
    # WavLM: wav2vec2's front end with gated relative position buckets in every block's attention
    "wavlm": (
        "wavlm",
        "WavLMModel",
        dict(TINY_AUDIO, num_buckets=32, max_bucket_distance=64),
        "feature-extraction",
        TWO,
    ),
}
VISION_STAGED = ["resnet", "convnext", "swin", "mobilevit"]
DUAL = [n for n, c in CORPUS.items() if c[3] == "zero-shot-image-classification"]
DECODERS = [n for n, c in CORPUS.items() if c[3] == TGP]
# CI's lane (`make test`, marker `lane`): one family of each kind through every corpus test,
# next to the tests not marked slow. Encoder-decoder models: tests/test_passes_seq2seq.py.
LANE = {"bert", "mistral", "vit", "swin", "clip", "wav2vec2-ctc"}


def lane(names) -> list:
    """``names`` as parameters, the lane's families marked ``lane``."""
    return [pytest.param(n, marks=pytest.mark.lane) if n in LANE else n for n in names]


# module -> the package that provides it and the extra that installs it
OPTIONAL = {
    "tensorrt_rtx": "tensorrt-rtx-cu13 (TensorRT-RTX; pip install 'gpcl-trt[rtx]')",
    "tritonclient.grpc": "tritonclient[grpc] (pip install 'gpcl-trt[triton]')",
    "pytriton": "nvidia-pytriton (tritonserver; pip install 'gpcl-trt[triton]')",
}


def needs(*modules: str) -> None:
    """Skip naming every missing package unless each module imports; called first in a test
    body, so nothing is built for a test that will skip."""
    import importlib

    missing = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(OPTIONAL[module])
    if missing:
        pytest.skip("needs " + ", ".join(missing))


def _perturb_norms(model) -> None:
    import torch

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and any(k in name.lower() for k in ("norm", "ln", "layernorm")):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def build_tiny(name: str, out: Path) -> Path:
    import torch
    import transformers
    from transformers import AutoConfig

    model_type, cls_name, kwargs, _, _ = CORPUS[name]
    cfg = AutoConfig.for_model(model_type, **kwargs)
    cfg.architectures = [cls_name]
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(cfg).eval()
    _perturb_norms(model)
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """``family(name) -> (model_dir, onnx path, export result)``, built and exported once per
    session (tests/test_generate_families.py decodes the same exports)."""
    from gpcl_trt.exporter import export_model

    cache: dict = {}

    def get(name: str):
        if name not in cache:
            root = tmp_path_factory.mktemp(name.replace("-", "_"))
            d = build_tiny(name, root / "model")
            out = root / f"{name}.onnx"
            cache[name] = (d, out, export_model(d, out))
        return cache[name]

    return get


# ----------------------------------------------------------------------------- the corpus
@pytest.mark.slow
@pytest.mark.parametrize("name", lane(CORPUS))
def test_export_sites_insert_strip_diff(family, name, tmp_path):
    from gpcl_trt.accuracy import diff
    from gpcl_trt.feeds import complete_feed, ort_run, ort_session, specs_from_session
    from gpcl_trt.passes import insert_file, sites_file, strip_file

    model_dir, path, res = family(name)
    _, _, _, task, counts = CORPUS[name]
    assert res["ok"] and res["task"] == task and res["architecture"] == CORPUS[name][0], res
    assert res["validation"]["max_abs_diff"] <= 1e-4, res["validation"]

    s = sites_file(path)
    assert s["counts"] == counts, (name, s["counts"])
    if not sum(counts.values()):  # no norm over the last axis: exported and diffed, but nothing to insert
        assert s["method"] is None and "GPCL reads quaternions along the last axis" in s["reason"]
        with pytest.raises(GpclError, match="no GPCL sites"):
            insert_file(path, tmp_path / "g.onnx", tau=1.0)
        assert diff(reference=model_dir, candidate=path, samples=1, seq=6, batch=2)["ok"]
        return
    assert s["method"] == "metadata" and s["reason"] is None
    assert [x["layer"] for x in s["sites"]] == sorted(x["layer"] for x in s["sites"])
    assert {x["layer"] for x in s["sites"]} == set(range(max(counts.values())))
    assert all(x["hidden"] % 4 == 0 and x["consumers"] for x in s["sites"])
    if counts.get("shared"):  # one norm, both projection sets rewired
        assert all(len(x["consumers"]) >= 2 for x in s["sites"])

    # Huge tau: GPCL is the identity, so the graph computes exactly what it did.
    g, tight, stripped = tmp_path / "g.onnx", tmp_path / "tight.onnx", tmp_path / "s.onnx"
    ins = insert_file(path, g, tau=1e9)
    assert len(ins["inserted"]) == sum(counts.values())
    sess = ort_session(path)
    feed = complete_feed(specs_from_session(sess), _sample(res, sess))
    base = ort_run(sess, feed)
    assert max(float(np.abs(base[k] - v).max()) for k, v in ort_run(ort_session(g), feed).items()) == 0.0
    # A tight tau acts; strip gives the original wiring back.
    insert_file(path, tight, tau=0.05)
    moved = ort_run(ort_session(tight), feed)
    assert max(float(np.abs(base[k] - v).max()) for k, v in moved.items()) > 1e-4
    assert len(strip_file(tight, stripped)["removed"]) == sum(counts.values())
    assert max(float(np.abs(base[k] - v).max()) for k, v in ort_run(ort_session(stripped), feed).items()) == 0.0

    # diff: the PyTorch model directory against the GPCL model (huge tau: within tolerance).
    d = diff(reference=model_dir, candidate=g, samples=1, seq=6, batch=2)
    assert d["ok"], d


# Served by a real tritonserver in the test below (a server start each): a decoder with past and
# a sliding window, a decoder with a classification head, a vision encoder. The rest stop at the
# Triton repository.
SERVED = {"mistral", "qwen2-seq-cls", "vit"}
# The pipeline inserts GPCL: models without a site stop after export (see the test above).
WITH_SITES = [n for n, c in CORPUS.items() if sum(c[4].values())]


@pytest.mark.slow
@pytest.mark.parametrize("name", lane(WITH_SITES))
def test_pipeline_calibrates_builds_and_deploys(family, name, tmp_path):
    """The stages after export on each family: calibrate, insert, a real TensorRT-RTX engine
    build, diff, the Triton repository, and (SERVED) a served-model check."""
    needs("tensorrt_rtx", "tritonclient.grpc", *(["pytriton"] if name in SERVED else []))
    from gpcl_trt.deploy.pipeline import run_pipeline

    _, path, _ = family(name)
    cfg = tmp_path / "pipeline.toml"
    skip = "" if name in SERVED else 'skip = ["serve"]'
    cfg.write_text(f"[pipeline]\n{skip}\n[calibrate]\nsamples = 2\n")
    summary = run_pipeline(path, tmp_path / "out", config=cfg)
    assert summary["ok"], summary["stages"]
    done = {k for k, v in summary["stages"].items() if v["status"] == "done"}
    served_stage = {"serve"} if name in SERVED else set()
    assert done == {"export", "calibrate", "insert", "build", "diff", "triton"} | served_stage
    assert summary["engine"]["backend"] == "tensorrt-rtx" and Path(summary["engine"]["path"]).stat().st_size > 0
    assert len(summary["sites"]["inserted"]) == sum(CORPUS[name][4].values())
    assert summary["accuracy"]["passed"], summary["accuracy"]
    assert set(summary["triton"]["entries"]) == {"gpcl_model", "gpcl_model_ort", "gpcl_model_trt"}
    if name in SERVED:
        served = summary["served"]
        assert served["ok"] and served["errors"] == 0 and served["completed"] == served["requests"], served
        assert served["http_max_abs_diff"] == 0.0 and served["grpc_max_abs_diff"] == 0.0


def _sample(res: dict, sess) -> dict:
    inputs = {i.name: i for i in sess.get_inputs()}
    rng = np.random.default_rng(0)
    out = {}
    if "pixel_values" in inputs:
        shape = [2 if isinstance(d, str) else d for d in inputs["pixel_values"].shape]
        out["pixel_values"] = rng.standard_normal(shape).astype(np.float32)
    if "input_ids" in inputs:  # a dual encoder's texts: 3 labels against 2 images
        out["input_ids"] = rng.integers(0, 100, (3 if out else 2, 7), dtype=np.int64)
    if "input_values" in inputs:  # 0.1 s of 16 kHz audio
        out["input_values"] = rng.standard_normal((2, 1600)).astype(np.float32)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", lane(CORPUS))
def test_structural_sites_match_metadata(family, name, tmp_path):
    """The same sites with the exporter's metadata stripped (ONNX from elsewhere): dual encoders'
    towers interleave in graph order and are told apart by what each block is computed from;
    wav2vec2's post-LN classifier projector reads the last block's norm and is a head, no MLP."""
    from gpcl_trt.passes import sites_file

    _, path, _ = family(name)
    m = onnx.load(str(path))
    for n in m.graph.node:
        del n.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(m, str(bare))
    key = lambda s: [(x["layer"], x["kind"], x["tensor"], tuple(x["consumers"])) for x in s["sites"]]  # noqa: E731
    got = sites_file(bare)
    assert got["method"] == ("structure" if got["sites"] else None) and key(got) == key(sites_file(path))


@pytest.mark.slow
@pytest.mark.lane
def test_swin_shifted_windows_sites_are_the_norms(family, tmp_path):
    """A shifted block rolls its tokens between the norm and the window partition (Concat of two
    Slices per axis): the site is the norm output, not the roll, with and without metadata."""
    import transformers

    from gpcl_trt.passes import sites_file

    model_dir, path, _ = family("swin")
    model = transformers.SwinForImageClassification.from_pretrained(model_dir)
    shifts = [b.shift_size for stage in model.swin.encoder.layers for b in stage.blocks]
    assert shifts[1] > 0 and shifts[0] == 0, shifts
    m = onnx.load(str(path))
    rolls = {n.output[0] for n in m.graph.node if n.op_type == "Concat" and "roll" in n.name}
    assert rolls, "the shifted block exports its roll as a Concat"
    for n in m.graph.node:
        del n.metadata_props[:]
    onnx.save(m, str(tmp_path / "bare.onnx"))
    for s in (sites_file(path), sites_file(tmp_path / "bare.onnx")):
        assert s["counts"] == {"pre-attention": 3, "pre-mlp": 3}, s["counts"]
        assert all(x["norm"] == "LayerNormalization" and x["tensor"] not in rolls for x in s["sites"]), s["sites"]


@pytest.mark.slow
@pytest.mark.parametrize("name", lane(VISION_STAGED))
def test_staged_vision_feature_extraction(family, name, tmp_path):
    """feature-extraction of the convolutional and hierarchical vision models: Swin's tokens,
    the others' [batch, channels, height, width] map; validated, the same sites as the head."""
    from gpcl_trt.exporter import export_model
    from gpcl_trt.passes import sites_file

    model_dir, _, _ = family(name)
    res = export_model(model_dir, tmp_path / "fe.onnx", task="feature-extraction")
    assert res["ok"] and res["outputs"] == ["last_hidden_state"], res
    assert res["validation"]["max_abs_diff"] <= 1e-4, res["validation"]
    m = onnx.load(str(tmp_path / "fe.onnx"), load_external_data=False)
    rank = len(m.graph.output[0].type.tensor_type.shape.dim)
    assert rank == (3 if name == "swin" else 4)
    assert sites_file(tmp_path / "fe.onnx")["counts"] == CORPUS[name][4]


@pytest.mark.slow
@pytest.mark.parametrize("name", lane(DECODERS))
def test_greedy_decode_with_past_matches_pytorch(family, name):
    """4 greedy tokens from a 6-token prompt (past the sliding windows of 4): ORT with past ==
    our PyTorch module == HF generate with its own cache classes."""
    import torch

    from gpcl_trt.exporter import load_model
    from gpcl_trt.exporter.validate import greedy_decode, ort_runner, torch_runner

    model_dir, path, res = family(name)
    assert any(i.startswith("past_key_values.") for i in res["inputs"])
    module, arch, task = load_model(model_dir, task=TGP)
    prompt = np.random.default_rng(3).integers(3, 120, size=(2, 6), dtype=np.int64)
    ort_tokens = greedy_decode(ort_runner(path), arch, task, prompt, steps=4)
    np.testing.assert_array_equal(ort_tokens, greedy_decode(torch_runner(module), arch, task, prompt, steps=4))
    hf = module.core.model
    gc = copy.deepcopy(hf.generation_config)
    gc.eos_token_id = None  # exactly 4 tokens, an end-of-sequence id among them included
    gc.update(max_new_tokens=4, min_new_tokens=None, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        gen = hf.generate(
            torch.from_numpy(prompt), attention_mask=torch.ones(2, 6, dtype=torch.long), generation_config=gc
        )
    np.testing.assert_array_equal(gen[:, 6:].numpy(), ort_tokens)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deepseek-v2", "llama4-text"])
def test_real_rotary_equals_the_complex_one(family, name):
    """The real-arithmetic RoPE swapped in for tracing computes what the model's complex one does."""
    import torch

    from gpcl_trt.exporter import load_model

    model_dir, _, _ = family(name)
    module, _, _ = load_model(model_dir, task="text-generation")
    ids = torch.from_numpy(np.random.default_rng(0).integers(3, 120, (2, 9)))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        plain = module.core.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        kw = {"position_ids": torch.arange(9).expand(2, 9)} if "position_ids" in module.input_names else {}
        swapped = module.core(ids, mask, **kw)[0]
    assert module.core.patches and torch.allclose(plain, swapped, atol=1e-5, rtol=0), (plain - swapped).abs().max()


@pytest.mark.slow
def test_per_layer_cache_shapes_come_from_the_model(family):
    """Gemma 3's KV head count/size per layer are read from a real cache, and every decoder's
    past/present axes name batch, past_sequence/total_sequence."""
    _, path, res = family("gemma3_text")
    m = onnx.load(str(path), load_external_data=False)
    dims = {vi.name: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in m.graph.input}
    assert dims["past_key_values.1.key"] == ["batch", 2, "past_sequence", 16]
    outs = {vi.name: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in m.graph.output}
    assert outs["present.0.value"] == ["batch", 2, "total_sequence", 16]
    assert "position_ids" in dims  # rotary: positions are an input


@pytest.mark.slow
def test_vision_calibration_random_and_npz(family, tmp_path):
    """Calibration and insert on a ViT: random pixel_values, or pixel_values from an .npz."""
    from gpcl_trt.passes import calibrate_file, insert_file

    _, path, res = family("vit")
    assert res["inputs"] == ["pixel_values"]
    rnd = calibrate_file(path, tmp_path / "r.json", samples=3)
    assert len(rnd["sites"]) == 4
    np.savez(
        tmp_path / "px.npz", pixel_values=np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)
    )
    npz = calibrate_file(path, tmp_path / "n.json", data=tmp_path / "px.npz")
    assert npz["data"]["kind"] == "npz" and npz["samples"] == 5
    assert insert_file(path, tmp_path / "g.onnx", calibration=tmp_path / "n.json")["inserted"]


@pytest.mark.slow
def test_deberta_v3_layers_are_the_blocks_not_the_position_table(family, tmp_path):
    """--layers 0 puts GPCL in front of block 0's projections of the hidden state (not on the
    relative-position table's norm, which no site reads), and --layers 1 is block 1."""
    from gpcl_trt.passes import insert_file, sites_file

    _, path, _ = family("deberta-v3")
    m = onnx.load(str(path), load_external_data=False)
    scope = lambda n: "".join(p.value for p in n.metadata_props)  # noqa: E731
    table_norm = next(n.output[0] for n in m.graph.node if "model.encoder.LayerNorm" in scope(n))
    sites = sites_file(path)["sites"]
    assert table_norm not in {x["tensor"] for x in sites}
    for layer in (0, 1):
        ins = insert_file(path, tmp_path / f"l{layer}.onnx", tau=1.0, sites="pre-attention", layers=[layer])
        assert ins["inserted"] == [f"layer{layer}/pre-attention"]


@pytest.mark.slow
def test_pairs_and_waveforms_calibrate_from_npz(family, tmp_path):
    """Calibration from files: CLIP on image+text pairs (one leading sample axis), wav2vec2 on
    waveforms; random waveforms are long enough for the feature encoder (320 samples a step)."""
    from gpcl_trt.passes import calibrate_file, insert_file

    rng = np.random.default_rng(0)
    _, clip, _ = family("clip")
    pairs = tmp_path / "pairs.npz"
    np.savez(
        pairs,
        input_ids=rng.integers(3, 100, (4, 7)),
        pixel_values=rng.standard_normal((4, 3, 32, 32)).astype(np.float32),
    )
    cal = calibrate_file(clip, tmp_path / "clip.json", data=pairs)
    assert cal["data"]["kind"] == "npz" and cal["samples"] == 4 and len(cal["sites"]) == 8
    assert len(insert_file(clip, tmp_path / "clip_g.onnx", calibration=tmp_path / "clip.json")["inserted"]) == 8

    _, w2v, _ = family("wav2vec2-ctc")
    wav = tmp_path / "wav.npz"
    np.savez(wav, input_values=rng.standard_normal((3, 1600)).astype(np.float32))
    assert calibrate_file(w2v, tmp_path / "w.json", data=wav)["samples"] == 3
    assert calibrate_file(w2v, tmp_path / "r.json", samples=2)["data"]["kind"] == "random-inputs"


# ----------------------------------------------------------------------------- shared sites
@pytest.mark.slow
def test_shared_sites_are_chosen_by_shared_or_both_kinds(family, tmp_path):
    from gpcl_trt.passes import insert_file

    _, path, _ = family("phi")
    assert len(insert_file(path, tmp_path / "a.onnx", tau=1.0, sites="shared")["inserted"]) == 2
    both = insert_file(path, tmp_path / "b.onnx", tau=1.0, sites="pre-attention,pre-mlp")
    assert both["inserted"] == ["layer0/shared", "layer1/shared"]
    with pytest.raises(GpclError, match="pass --sites shared"):
        insert_file(path, tmp_path / "c.onnx", tau=1.0, sites="pre-attention")


# ----------------------------------------------------------------------------- refusals
def _config_dir(tmp_path: Path, cfg: dict) -> Path:
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize(
    "cfg, message",
    [
        # encoder-decoder models without their generation head (tests/test_seq2seq.py exports those)
        ({"model_type": "t5", "architectures": ["T5Model"]}, r"encoder-decoder model \(task text2text-generation\)"),
        (
            {"model_type": "bart", "architectures": ["BartForSequenceClassification"]},
            r"encoder-decoder model \(task text2text-generation\) without its generation head",
        ),
        (
            {"model_type": "wav2vec2", "architectures": ["Wav2Vec2ForAudioFrameClassification"]},
            r"audio model \(task audio-frame-classification\)",
        ),
        (
            {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]},
            r"multimodal .*image-text-to-text",
        ),
        ({"model_type": "my_custom_lm", "auto_map": {"AutoModelForCausalLM": "m.M"}}, "pass --trust-remote-code"),
        ({"model_type": "no_such_thing"}, "does not know model_type 'no_such_thing'"),
    ],
)
def test_out_of_scope_models_are_refused_in_one_line(tmp_path, cfg, message):
    from gpcl_trt.exporter import check_model_dir, load_model

    d = _config_dir(tmp_path, cfg)
    (d / "model.safetensors").write_bytes(b"")  # never read: refused first
    with pytest.raises(GpclError, match=message) as exc:
        check_model_dir(d)
    assert "\n" not in str(exc.value)
    with pytest.raises(GpclError, match=message):
        load_model(d)


def test_family_and_task_come_from_the_checkpoint():
    from transformers import AutoConfig

    from gpcl_trt.exporter.configs import DecoderOnly, TextEncoder, VisionEncoder
    from gpcl_trt.exporter.families import resolve_family

    assert resolve_family({"model_type": "llama"}, "c") is DecoderOnly
    assert resolve_family({"model_type": "bert", "architectures": ["BertForTokenClassification"]}, "c") is TextEncoder
    assert resolve_family({"model_type": "vit"}, "c") is VisionEncoder
    cfg = AutoConfig.for_model("bert", architectures=["BertForQuestionAnswering"])
    assert TextEncoder(cfg).default_task() == "question-answering"
    cfg = AutoConfig.for_model("llama", architectures=["LlamaForSequenceClassification"])
    assert DecoderOnly(cfg).default_task() == "text-classification"
    # the head reads each row's last non-padding token: without pad_token_id, one clear line
    with pytest.raises(GpclError, match="needs pad_token_id in config.json"):
        DecoderOnly(cfg).check_task("text-classification")
    DecoderOnly(AutoConfig.for_model("llama", pad_token_id=0)).check_task("text-classification")
    cfg = AutoConfig.for_model("llama", architectures=["LlamaForCausalLM"], use_cache=False)
    assert DecoderOnly(cfg).default_task() == "text-generation"
    # layers that keep a recurrent state, not key/value tensors: no with-past export by default
    cfg = AutoConfig.for_model("jamba", architectures=["JambaForCausalLM"])
    assert "linear_attention" in cfg.layer_types and DecoderOnly(cfg).default_task() == "text-generation"
    cfg = AutoConfig.for_model("openai-gpt", architectures=["OpenAIGPTLMHeadModel"])  # no cache at all
    assert DecoderOnly(cfg).default_task() == "text-generation"
    cfg = AutoConfig.for_model("electra", architectures=["ElectraForCausalLM"])  # an encoder's causal LM head
    assert DecoderOnly(cfg).default_task() == "text-generation"


def test_cache_shapes_fall_back_to_the_config_when_the_probe_cannot_run():
    """A forward that cannot run on a lazy export's fake weights (JetMoE's routing reads tensor
    values) gives no cache probe; the shapes then come from the config (validation checks them)."""
    import torch
    from transformers import AutoConfig

    from gpcl_trt.exporter.configs import DecoderOnly, KVShape, probe_kv_cache

    class ReadsValues(torch.nn.Module):
        def forward(self, **_):
            raise RuntimeError("aten._local_scalar_dense.default")

    assert probe_kv_cache(ReadsValues(), "x") is None
    cfg = AutoConfig.for_model("llama", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    assert DecoderOnly(cfg).kv_shapes() == [KVShape(2, 16)] * 2


@pytest.mark.slow  # a whole export, refused at validation
def test_a_graph_that_cannot_run_at_other_shapes_is_refused_in_one_line(tmp_path):
    """Mamba's scan loops over the sequence: traced, it is unrolled for the trace's length, and
    validation at other lengths fails in ONNX Runtime. One line, nothing written."""
    import torch
    from transformers import MambaConfig, MambaForCausalLM

    from gpcl_trt.exporter import export_model

    cfg = MambaConfig(vocab_size=128, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=2)
    cfg.architectures = ["MambaForCausalLM"]
    torch.manual_seed(0)
    MambaForCausalLM(cfg).save_pretrained(tmp_path / "mamba")
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    with pytest.raises(GpclError, match="cannot run the exported graph at batch x sequence") as exc:
        export_model(tmp_path / "mamba", out)
    assert "\n" not in str(exc.value) and not any(out.parent.iterdir())


def test_hierarchical_stages_count_as_config_layers():
    """ConvNeXt's num_hidden_layers is its number of stages: stages.N.layers.M counts stage N."""
    from gpcl_trt.exporter.checkpoint import checkpoint_layers

    names = [f"convnext.encoder.stages.{s}.layers.0.dwconv.weight" for s in (0, 1)]
    assert checkpoint_layers(names) == 2
    assert checkpoint_layers(["swin.encoder.layers.1.blocks.0.attention.self.query.weight"]) == 2
    assert checkpoint_layers(["model.layers.3.mlp.experts.7.up_proj.weight"]) == 4


def test_cli_offers_every_task():
    from gpcl_trt.exporter.cli import TASK_CHOICES
    from gpcl_trt.exporter.tasks import TASKS

    assert TASK_CHOICES == ("auto", *TASKS)
