"""GPCL sites of encoder-decoder models: the decoder block's pre-cross-attention site (the tensor
that feeds the cross-attention's query projection; its keys and values read the encoder's states).
Tiny random-init T5 (``layer.1.layer_norm``), BART (post-LN: the site is the self-attention
sublayer's norm) and Whisper (pre-LN: ``encoder_attn_layer_norm``), each split into an encoder
graph and a decoder graph (no cache) by the dynamo exporter directly, so that the passes are
tested on real module scopes before ``gpcl-trt export`` writes encoder-decoder models."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from test_seq2seq import TINY_DIMS

from gpcl_trt.common import GpclError
from gpcl_trt.passes import insert_file, sites_file, strip_file
from gpcl_trt.passes.graph import load_graph

TINY = dict(TINY_DIMS, vocab_size=128, decoder_start_token_id=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MODELS = {
    # T5 with eager attention: the dynamo exporter's decompositions refuse its sdpa path's reshape
    "t5": (
        "t5",
        "T5ForConditionalGeneration",
        dict(
            vocab_size=128,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            attn_implementation="eager",
        ),
    ),
    "bart": ("bart", "BartForConditionalGeneration", dict(TINY, max_position_embeddings=64)),
    "whisper": (
        "whisper",
        "WhisperForConditionalGeneration",
        dict(TINY, num_mel_bins=8, max_source_positions=8, max_target_positions=32),
    ),
}
DECODER = {"pre-attention": 2, "pre-cross-attention": 2, "pre-mlp": 2}
ENCODER = {"pre-attention": 2, "pre-mlp": 2}


def _export(name: str, root):
    """(encoder.onnx, decoder.onnx, feeds of each) of a tiny checkpoint, static shapes."""
    import torch
    import transformers
    from transformers import AutoConfig

    model_type, cls, kwargs = MODELS[name]
    torch.manual_seed(0)
    model = getattr(transformers, cls)(AutoConfig.for_model(model_type, **kwargs)).eval()
    with torch.no_grad():  # norms away from their init (ones), as real checkpoints are
        for n, p in model.named_parameters():
            if p.dim() == 1 and "norm" in n:
                p.add_(torch.randn(p.shape) * 0.1)

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = model.get_encoder()

        def forward(self, x):
            return self.encoder(x).last_hidden_state

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, encoder_hidden_states):
            out = self.model(decoder_input_ids=input_ids, encoder_outputs=(encoder_hidden_states,), use_cache=False)
            return out.logits

    rng = np.random.default_rng(0)
    source = (
        rng.standard_normal((2, 8, 16)).astype(np.float32)  # log-mel features: 8 bins, 16 frames
        if name == "whisper"
        else rng.integers(3, 100, (2, 7)).astype(np.int64)
    )
    ids = rng.integers(3, 100, (2, 5)).astype(np.int64)
    enc, dec = root / "encoder_model.onnx", root / "decoder_model.onnx"
    with torch.no_grad():
        states = Encoder()(torch.from_numpy(source))
        torch.onnx.export(Encoder().eval(), (torch.from_numpy(source),), str(enc), dynamo=True, input_names=["x"])
        torch.onnx.export(
            Decoder().eval(),
            (torch.from_numpy(ids), states),
            str(dec),
            dynamo=True,
            input_names=["input_ids", "encoder_hidden_states"],
            output_names=["logits"],
        )
    return enc, dec, {"x": source}, {"input_ids": ids, "encoder_hidden_states": states.numpy()}


@pytest.fixture(scope="module")
def seq2seq(tmp_path_factory):
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = _export(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


def _run(path, feed) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _bare(path, out):
    m = onnx.load(str(path))
    for n in m.graph.node:
        del n.metadata_props[:]
    onnx.save(m, str(out))
    return out


# Each export takes ~15-30 s; CI's lane (`make test`) takes T5 through gpcl-trt export below.
SEQ2SEQ = [
    pytest.param("bart", marks=pytest.mark.slow),
    pytest.param("t5", marks=pytest.mark.slow),
    pytest.param("whisper", marks=pytest.mark.slow),
]
QUERY = ("encoder_attn.q_proj", "EncDecAttention.q")  # the cross-attention's query projection


@pytest.mark.parametrize("name", SEQ2SEQ)
def test_decoder_blocks_have_a_pre_cross_attention_site(seq2seq, name, tmp_path):
    enc, dec, _, _ = seq2seq(name)
    assert sites_file(enc)["counts"] == ENCODER
    s = sites_file(dec)
    assert s["method"] == "metadata" and s["counts"] == DECODER, s["counts"]
    kinds = [(x["layer"], x["kind"]) for x in s["sites"]]
    assert kinds == [(i, k) for i in range(2) for k in DECODER]  # self-attention, cross-attention, MLP
    # only the query projection is the site's: the keys and values read the encoder's states
    lm = load_graph(dec)
    for x in s["sites"]:
        if x["kind"] == "pre-cross-attention":
            assert len(x["projections"]) == 1
            assert any(sc.endswith(QUERY) for sc in lm.scopes[x["projections"][0]])
    kv = [n for n in lm.graph.nodes if n.op == "MatMul" and n.inputs[0].name == "encoder_hidden_states"]
    assert len(kv) == 4 and not {n.name for n in kv} & {p for x in s["sites"] for p in x["projections"]}
    # the same sites from the graph structure alone
    key = lambda d: [(x["layer"], x["kind"], x["tensor"], tuple(x["consumers"])) for x in d["sites"]]  # noqa: E731
    for path in (enc, dec):
        bare = sites_file(_bare(path, tmp_path / "bare.onnx"))
        assert bare["method"] == "structure" and key(bare) == key(sites_file(path))


@pytest.mark.parametrize("name", SEQ2SEQ)
def test_insert_strip_round_trip_on_both_graphs(seq2seq, name, tmp_path):
    enc, dec, enc_feed, dec_feed = seq2seq(name)
    for path, feed, counts in ((enc, enc_feed, ENCODER), (dec, dec_feed, DECODER)):
        base = _run(path, feed)
        g, tight, stripped = tmp_path / "g.onnx", tmp_path / "t.onnx", tmp_path / "s.onnx"
        # a generous tau (above every radius): GPCL is the identity
        ins = insert_file(path, g, tau=1e3, force=True)
        assert len(ins["inserted"]) == sum(counts.values())
        assert np.abs(_run(g, feed) - base).max() == 0.0
        insert_file(path, tight, tau=0.05, force=True)
        assert np.abs(_run(tight, feed) - base).max() > 1e-4
        assert len(strip_file(tight, stripped, force=True)["removed"]) == sum(counts.values())
        assert np.abs(_run(stripped, feed) - base).max() == 0.0


@pytest.mark.slow
def test_cross_attention_sites_alone_and_in_the_cli_default(seq2seq, tmp_path):
    from click.testing import CliRunner

    from gpcl_trt.cli import main

    _, dec, _, feed = seq2seq("bart")
    run = lambda *a: CliRunner().invoke(main, [str(x) for x in a], catch_exceptions=False)  # noqa: E731
    res = run("insert", dec, "-o", tmp_path / "x.onnx", "--sites", "pre-cross-attention", "--tau", "0.05", "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["inserted"] == ["layer0/pre-cross-attention", "layer1/pre-cross-attention"]
    # GPCL on the query path only: the keys and values still read the encoder's states directly
    lm = load_graph(tmp_path / "x.onnx")
    gpcl_out = {n.outputs[0].name for n in lm.graph.nodes if n.domain == "gpcl"}
    readers = [n for n in lm.graph.nodes if gpcl_out & {i.name for i in n.inputs}]
    assert len(readers) == 2
    assert all(any(sc.endswith(QUERY) for sc in lm.scopes[n.name]) for n in readers)
    assert np.abs(_run(tmp_path / "x.onnx", feed) - _run(dec, feed)).max() > 1e-6  # random init: a small query effect
    res = run("insert", dec, "-o", tmp_path / "all.onnx", "--tau", "1e3", "--json")  # the default: every kind
    assert res.exit_code == 0 and len(json.loads(res.stdout)["inserted"]) == sum(DECODER.values())
    with pytest.raises(GpclError, match="pre-cross-attention"):  # the kinds are listed when one is wrong
        insert_file(dec, tmp_path / "y.onnx", sites="cross", tau=1.0)
    assert not (tmp_path / "y.onnx").exists()


@pytest.mark.parametrize(
    "scope, block, kind",
    [
        ("decoder.block.1.layer.0.SelfAttention.q", "decoder.block.1", "pre-attention"),
        ("decoder.block.1.layer.1.EncDecAttention.q", "decoder.block.1", "pre-cross-attention"),
        ("decoder.block.1.layer.2.DenseReluDense.wi", "decoder.block.1", "pre-mlp"),
        ("encoder.block.0.layer.1.DenseReluDense.wo", "encoder.block.0", "pre-mlp"),
        ("model.decoder.layers.3.encoder_attn.q_proj", "model.decoder.layers.3", "pre-cross-attention"),
        ("bert.encoder.layer.2.crossattention.self.query", "bert.encoder.layer.2", "pre-cross-attention"),
        ("bert.encoder.layer.2.attention.self.query", "bert.encoder.layer.2", "pre-attention"),  # unchanged
    ],
)
def test_scopes_name_the_block_and_kind(scope, block, kind):
    """T5's sublayer list (``block.N.layer.M``) is part of block N, not a block of its own."""
    from gpcl_trt.passes.sites import _scope_site

    parts = scope.split(".")
    scopes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    assert _scope_site(scopes)[:2] == (block, kind)


# ----------------------------------------------------------------------------- gpcl-trt export's graphs
# OUT/encoder_model.onnx (which also computes every decoder layer's cross-attention keys and values,
# with the decoder's own k/v projections) and OUT/decoder_model_merged.onnx (both caches in).
EXPORTED = [
    pytest.param("t5", marks=[pytest.mark.slow, pytest.mark.lane]),
    pytest.param("bart", marks=pytest.mark.slow),
    pytest.param("whisper", marks=pytest.mark.slow),
    pytest.param("marian", marks=pytest.mark.slow),
    pytest.param("pegasus", marks=pytest.mark.slow),
]
GRAPHS = {"encoder_model.onnx": ENCODER, "decoder_model_merged.onnx": DECODER}
CROSS_KV = ("EncDecAttention.k", "EncDecAttention.v", "encoder_attn.k_proj", "encoder_attn.v_proj")


@pytest.fixture(scope="module")
def seq2seq_export(tmp_path_factory):
    """``seq2seq_export(name) -> OUT`` of ``gpcl-trt export`` on tests/test_seq2seq.py's tiny
    checkpoint (not validated here: tests/test_seq2seq.py validates the same exports)."""
    from test_seq2seq import make_checkpoint

    from gpcl_trt.exporter import export_model

    cache: dict = {}

    def get(name: str):
        if name not in cache:
            base = tmp_path_factory.mktemp(f"x_{name}")
            res = export_model(make_checkpoint(name, base / "model"), base / "onnx", validate=False)
            assert res["ok"], res
            cache[name] = base / "onnx"
        return cache[name]

    return get


def _feed(path):
    from gpcl_trt import feeds
    from gpcl_trt.common import load_onnx

    specs = feeds.specs_from_onnx(load_onnx(path, external_data=False))
    return feeds.make_feeds(specs, 2, 3, past=4, vocab=64, encoder_sequence=5)


def _outputs(path, feed) -> dict:
    from gpcl_trt import feeds

    return feeds.ort_run(feeds.ort_session(path), feed)


def _max_diff(a: dict, b: dict) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.mark.parametrize("name", EXPORTED)
def test_exported_graphs_sites_insert_calibrated_and_strip(seq2seq_export, name, tmp_path):
    """Per graph: the expected sites (the encoder graph's cross-attention k/v projections read its
    final norm and make no site), the same from the structure alone, a calibrated insert whose
    outputs stay close to the original's, a tight tau that acts, and strip back to the original."""
    from gpcl_trt.passes import calibrate_file

    out = seq2seq_export(name)
    key = lambda d: [(x["layer"], x["kind"], x["tensor"], tuple(x["consumers"])) for x in d["sites"]]  # noqa: E731
    for fname, counts in GRAPHS.items():
        path = out / fname
        s = sites_file(path)
        assert s["method"] == "metadata" and s["counts"] == counts, (fname, s["counts"])
        lm = load_graph(path)
        site_projs = {p for x in s["sites"] for p in x["projections"]}
        for x in s["sites"]:
            if x["kind"] == "pre-cross-attention":
                assert len(x["projections"]) == 1 and any(sc.endswith(QUERY) for sc in lm.scopes[x["projections"][0]])
        kv = [n for n, sc in lm.scopes.items() if any(c.endswith(CROSS_KV) for c in sc)]
        assert bool(kv) == fname.startswith("encoder") and not set(kv) & site_projs
        if name != "marian":  # post-LN without an embedding norm: block 0 reads the embedding sum, no norm
            assert key(sites_file(_bare(path, tmp_path / "bare.onnx"))) == key(s)

        feed = _feed(path)
        base = _outputs(path, feed)
        calib, g, tight, stripped = (tmp_path / n for n in ("c.json", "g.onnx", "t.onnx", "s.onnx"))
        # text calibrates a graph that takes token ids; Whisper's encoder (log-mel features, a
        # tokenizer in its model directory for the decoder) calibrates from random features
        doc = calibrate_file(path, calib, samples=4, force=True)
        takes_text = name != "whisper" or fname.startswith("decoder")
        assert doc["data"]["kind"] == ("corpus" if takes_text else "random-inputs"), doc["data"]
        if not takes_text:
            (tmp_path / "t.txt").write_text("a sentence\n")
            with pytest.raises(GpclError, match="takes no input_ids"):
                calibrate_file(path, tmp_path / "no.json", data=tmp_path / "t.txt")
            assert not (tmp_path / "no.json").exists()
        assert len(insert_file(path, g, calibration=calib, force=True)["inserted"]) == sum(counts.values())
        assert _max_diff(_outputs(g, feed), base) <= 1e-3
        insert_file(path, tight, tau=0.05, force=True)
        assert _max_diff(_outputs(tight, feed), base) > 1e-4
        assert len(strip_file(tight, stripped, force=True)["removed"]) == sum(counts.values())
        assert _max_diff(_outputs(stripped, feed), base) == 0.0
