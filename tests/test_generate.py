"""Generation against real components: tiny random-init decoders built here, each exported once
per module with past by our exporter, run by the one generation loop in real ONNX Runtime
sessions and compared with transformers' own ``generate``. The tokenizer is a byte-level BPE
trained here on a few sentences (multi-byte characters included), saved into each model folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gpcl_trt.cli import main

TGP = "text-generation-with-past"
VOCAB = 320  # >= the tokenizer's 300
PROMPTS = ["the quick brown fox", "héllo wörld, naïve café, once upon a time", "日本語"]
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "héllo wörld, naïve café",
    "日本語のテキスト 😀 emoji",
    "once upon a time there was a model",
] * 5


def _tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES, trainer)
    assert tok.get_vocab_size() <= VOCAB
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(out)


def _config(name: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    dec = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, **common)
    if name == "llama":
        return tf.LlamaForCausalLM, tf.LlamaConfig(num_key_value_heads=2, max_position_embeddings=64, **dec)
    if name == "mistral":  # a window smaller than prompt + 32 new tokens: generation crosses it
        cfg = tf.MistralConfig(num_key_value_heads=2, max_position_embeddings=128, sliding_window=8, **dec)
        return tf.MistralForCausalLM, cfg
    return tf.GPT2LMHeadModel, tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **common)


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    """``decoders(name) -> (model_dir, onnx)``: built, tokenizer saved, exported with past once."""
    import torch

    from gpcl_trt.exporter import export_model

    cache: dict = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in cache:
            d = tmp_path_factory.mktemp(f"gen_{name}")
            model_cls, cfg = _config(name)
            torch.manual_seed(0)
            model_cls(cfg).eval().save_pretrained(d)
            _tokenizer(d)
            out = d.parent / f"{d.name}_onnx" / f"{name}.onnx"
            out.parent.mkdir()
            result = export_model(d, out, task=TGP)
            assert result["ok"], result
            cache[name] = (d, out)
        return cache[name]

    return get


def _hf_generate(model_dir: Path, prompt: str, n: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=n, pad_token_id=0)
    return out[0, enc["input_ids"].shape[1] :].tolist()


def _tokens(result: dict) -> list[list[int]]:
    return [o["tokens"] for o in result["outputs"]]


# ----------------------------------------------------------------------------- greedy = HF
@pytest.mark.parametrize("name", ["llama", "mistral", "gpt2"])
def test_greedy_onnx_equals_hf_generate(decoders, name):
    from gpcl_trt.generate import generate

    model_dir, onnx_path = decoders(name)
    prompt = PROMPTS[1]  # 20+ tokens: past Mistral's window of 8 already in the prefill
    result = generate(onnx_path, [prompt], max_new_tokens=32)
    assert result["runtime"] == "onnxruntime" and result["model_dir"] == str(model_dir.resolve())
    out = result["outputs"][0]
    assert out["tokens"] == _hf_generate(model_dir, prompt, 32)
    assert len(out["tokens"]) == 32 or out["finish"] == "eos"
    m = result["measurements"]
    assert m["prompt_tokens"] == out["prompt_tokens"] > 8 and m["new_tokens"] == len(out["tokens"])
    if name == "llama":  # the PyTorch runtime (the reference) runs the same loop
        ref = generate(model_dir, PROMPTS, max_new_tokens=32)
        assert ref["runtime"] == "pytorch"
        assert _tokens(ref) == _tokens(generate(onnx_path, PROMPTS, max_new_tokens=32))


@pytest.mark.parametrize("name, runtime", [("llama", "onnx"), ("gpt2", "onnx"), ("gpt2", "pytorch")])
def test_ragged_batch_equals_each_prompt_alone(decoders, name, runtime):
    """Left padding through the mask and positions. GPT-2's export takes no positions, so its
    prompts are batched by length; GPT-2 in PyTorch does take them, and its learned absolute
    positions show any shift (rotary ones are blind to a shift shared by a row's tokens)."""
    from gpcl_trt.generate import generate, open_runtime

    model_dir, onnx_path = decoders(name)
    artifact = onnx_path if runtime == "onnx" else model_dir
    rt = open_runtime(artifact)
    batch = generate(artifact, PROMPTS, max_new_tokens=32, runtime=rt)
    assert len({o["prompt_tokens"] for o in batch["outputs"]}) == 3
    assert _tokens(batch) == [_tokens(generate(artifact, [p], max_new_tokens=32, runtime=rt))[0] for p in PROMPTS]


# ----------------------------------------------------------------------------- sampling
def test_sampling_reproducible_by_seed(decoders):
    from gpcl_trt.generate import generate

    _, onnx_path = decoders("llama")

    def run(**kw):
        return _tokens(generate(onnx_path, PROMPTS, max_new_tokens=32, **kw))

    greedy = run()
    a, b, c = run(temperature=1.0, seed=1), run(temperature=1.0, seed=1), run(temperature=1.0, seed=2)
    assert a == b and a != c and a != greedy
    assert run(temperature=0.7, top_k=40, top_p=0.9, seed=5) == run(temperature=0.7, top_k=40, top_p=0.9, seed=5)
    # top-k 1 and a tiny top-p leave only the most likely token: greedy, whatever the seed
    assert run(temperature=2.0, top_k=1, seed=3) == greedy
    assert run(temperature=2.0, top_p=1e-9, seed=4) == greedy


def test_pick_top_k_and_top_p_keep_the_right_tokens():
    from gpcl_trt.generate.loop import Sampling, pick

    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    rng = np.random.default_rng(0)
    assert set(pick(logits, Sampling(1.0, top_k=2), rng)) == {0, 1}
    assert set(pick(logits, Sampling(1.0, top_p=0.8), rng)) == {0, 1}  # 0.5 + 0.3 reaches 0.8
    assert set(pick(logits, Sampling(1.0, top_p=0.81), rng)) == {0, 1, 2}
    assert set(pick(logits, Sampling(1.0), rng)) == {0, 1, 2, 3}


# ----------------------------------------------------------------------------- text
def test_streaming_equals_non_streaming(decoders):
    from transformers import AutoTokenizer

    from gpcl_trt.generate import generate

    model_dir, onnx_path = decoders("llama")
    pieces: dict[int, list[str]] = {}
    kw = dict(max_new_tokens=32, temperature=1.0, seed=7)
    streamed = generate(onnx_path, PROMPTS, on_text=lambda i, t: pieces.setdefault(i, []).append(t), **kw)
    plain = generate(onnx_path, PROMPTS, **kw)
    tok = AutoTokenizer.from_pretrained(model_dir)
    for i, (s, p) in enumerate(zip(streamed["outputs"], plain["outputs"])):
        assert "".join(pieces[i]) == s["text"] == p["text"] == tok.decode(p["tokens"], skip_special_tokens=True)
        assert len(pieces[i]) > 1


def test_stream_decoder_never_splits_a_character(decoders):
    from transformers import AutoTokenizer

    from gpcl_trt.generate import StreamDecoder

    tok = AutoTokenizer.from_pretrained(decoders("llama")[0])
    text = "naïve ß€ 日本語のテキスト 😀 and 🦀"
    ids = tok(text)["input_ids"]
    assert any("\ufffd" in tok.decode([t]) for t in ids)  # some tokens are parts of a character
    dec = StreamDecoder(tok)
    pieces = [dec.add(t) for t in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stop_string_is_cut_and_never_streamed(decoders):
    from gpcl_trt.generate import generate

    _, onnx_path = decoders("llama")
    full = generate(onnx_path, [PROMPTS[0]], max_new_tokens=32)["outputs"][0]
    text = full["text"]
    stop = text[6:9]
    assert len(stop) == 3 and "\ufffd" not in stop
    pieces: list[str] = []
    got = generate(
        onnx_path, [PROMPTS[0]], max_new_tokens=32, stop=["never there", stop], on_text=lambda i, t: pieces.append(t)
    )
    out = got["outputs"][0]
    assert out["finish"] == "stop" and out["text"] == text[: text.find(stop)]
    assert "".join(pieces) == out["text"]
    assert full["tokens"][: len(out["tokens"])] == out["tokens"] and len(out["tokens"]) < len(full["tokens"])


# ----------------------------------------------------------------------------- stopping
def test_eos_and_position_limit_stop_generation(decoders):
    from gpcl_trt.generate import OrtRuntime, decode

    _, onnx_path = decoders("llama")
    rt = OrtRuntime(onnx_path)
    prompt = [[5, 6, 7, 8]]
    free = decode(rt, prompt, max_new_tokens=12)
    eos = free["tokens"][0][4]
    first = free["tokens"][0].index(eos)
    stopped = decode(rt, prompt, max_new_tokens=12, eos_ids=[eos])
    assert stopped["tokens"][0] == free["tokens"][0][: first + 1] and stopped["finish"] == ["eos"]
    # 64 positions: a 60-token prompt leaves room for 4 new tokens
    long = decode(rt, [list(range(2, 62))], max_new_tokens=12, max_positions=64)
    assert len(long["tokens"][0]) == 4 and long["finish"] == ["length"]


def test_eos_ids_from_generation_config_then_config(tmp_path):
    from gpcl_trt.generate.api import model_settings

    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2, "n_positions": 99}))
    keys = ("eos_ids", "pad_id", "max_positions", "reprefill_at")
    got = model_settings(tmp_path, None)
    assert [got[k] for k in keys] == [[2], 2, 99, None] and got["from"] == "config.json"
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 4], "pad_token_id": 0}))
    assert [model_settings(tmp_path, None)[k] for k in keys] == [[3, 4], 0, 99, None]


# ----------------------------------------------------------------------------- model rules
class _Recording:
    """A runtime that keeps the logits it returns."""

    def __init__(self, runtime):
        self.runtime, self.takes_positions, self.logits = runtime, runtime.takes_positions, []

    def prefill(self, *args):
        self.logits.append(self.runtime.prefill(*args))
        return self.logits[-1]

    def step(self, *args):
        self.logits.append(self.runtime.step(*args))
        return self.logits[-1]


def tiny_phi3_longrope(d: Path) -> Path:
    """A tiny Phi-3 with LongRoPE (original_max_position_embeddings 16) and our tokenizer."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        original_max_position_embeddings=16,
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.5 + i for i in range(8)]},
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    Phi3ForCausalLM(cfg).eval().save_pretrained(d)
    _tokenizer(d)
    return d


def test_phi3_longrope_reprefills_like_transformers(tmp_path):
    """Phi-3 with LongRoPE: once the sequence passes original_max_position_embeddings (16), the
    cache is dropped and the sequence prefilled again with the long factors, as transformers'
    Phi3ForCausalLM does; every step's logits then match transformers' generate, and without the
    re-prefill they drift."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gpcl_trt.exporter import export_model
    from gpcl_trt.generate import OrtRuntime, decode, generate

    d = tiny_phi3_longrope(tmp_path / "phi3")
    onnx_path = tmp_path / "phi3.onnx"
    assert export_model(d, onnx_path, task=TGP)["ok"]
    ids = AutoTokenizer.from_pretrained(d)(PROMPTS[0])["input_ids"]
    assert len(ids) < 16 < len(ids) + 24

    model = AutoModelForCausalLM.from_pretrained(d).eval()
    with torch.no_grad():
        hf = model.generate(
            torch.tensor([ids]), do_sample=False, max_new_tokens=24, output_logits=True, return_dict_in_generate=True
        )
    hf_tokens = hf.sequences[0, len(ids) :].tolist()
    hf_logits = np.concatenate([x.numpy() for x in hf.logits])

    def run(reprefill_at):
        rec = _Recording(OrtRuntime(onnx_path))
        out = decode(rec, [ids], max_new_tokens=24, reprefill_at=reprefill_at)
        return out["tokens"][0], np.abs(np.concatenate(rec.logits) - hf_logits).max()

    tokens, diff = run(16)
    assert tokens == hf_tokens and diff < 1e-4
    assert run(None)[1] > 1e-3
    result = generate(onnx_path, [PROMPTS[0]], max_new_tokens=24)
    assert result["rules"] == {"reprefill_at": 16} and _tokens(result) == [hf_tokens]


# ----------------------------------------------------------------------------- GPCL
def test_gpcl_model_generates(decoders, tmp_path):
    """A GPCL-inserted export runs in the loop; with a tau far above every radius, GPCL is the
    identity and the tokens are the plain model's."""
    from gpcl_trt.generate import generate
    from gpcl_trt.passes import insert_file

    model_dir, onnx_path = decoders("llama")
    gpcl = tmp_path / "gpcl.onnx"
    assert insert_file(onnx_path, gpcl, sites=("pre-attention", "pre-mlp"), tau=1e6)["ok"]
    got = generate(gpcl, PROMPTS, max_new_tokens=16)
    assert got["model_dir"] == str(model_dir.resolve())  # tokenizer found through the manifest chain
    assert _tokens(got) == _tokens(generate(onnx_path, PROMPTS, max_new_tokens=16))


def test_fp16_export_generates(decoders, tmp_path):
    """An fp16 export: fp16 caches bound as they come, fp16 logits picked in float32."""
    from gpcl_trt.exporter import export_model
    from gpcl_trt.generate import OrtRuntime, generate

    model_dir, onnx_path = decoders("llama")
    half = tmp_path / "half.onnx"
    assert export_model(model_dir, half, task=TGP, dtype="fp16")["ok"]
    assert OrtRuntime(half).float_dtype == np.float16
    got = generate(half, PROMPTS, max_new_tokens=8)
    assert [t[:4] for t in _tokens(got)] == [t[:4] for t in _tokens(generate(onnx_path, PROMPTS, max_new_tokens=8))]


# ----------------------------------------------------------------------------- CLI
def _cli(*args: str):
    return CliRunner().invoke(main, ["generate", *args])


def test_cli_generates_and_streams(decoders):
    _, onnx_path = decoders("llama")
    res = _cli(str(onnx_path), "--prompt", PROMPTS[0], "--max-new-tokens", "8", "--json")
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["ok"] and len(result["outputs"][0]["tokens"]) <= 8
    streamed = _cli(str(onnx_path), "--prompt", PROMPTS[0], "--max-new-tokens", "8", "--stream")
    assert streamed.exit_code == 0 and streamed.stdout == result["outputs"][0]["text"] + "\n"


def test_cli_prompts_file_in_batches(decoders, tmp_path):
    from gpcl_trt.generate import generate

    _, onnx_path = decoders("llama")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n", encoding="utf-8")  # blank lines are not prompts
    res = _cli(str(onnx_path), "--prompts", str(prompts), "--batch-size", "2", "--max-new-tokens", "6", "--json")
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert [o["prompt"] for o in got["outputs"]] == PROMPTS
    assert _tokens(got) == _tokens(generate(onnx_path, PROMPTS, max_new_tokens=6))


def test_cli_chat_uses_the_template(decoders, tmp_path):
    model_dir, onnx_path = decoders("llama")
    tok_dir = tmp_path / "tok"
    shutil.copytree(model_dir, tok_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}the"
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    res = _cli(
        str(onnx_path), "--prompt", "hi", "--chat", "--tokenizer", str(tok_dir), "--max-new-tokens", "2", "--json"
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["outputs"][0]["prompt_tokens"] == 5  # <s> h i </s> the


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "the " * 70], "tokens: the model has 64 positions"),
        (["--prompt", "x", "--chat"], "the tokenizer has no chat template"),
        (["--prompt", "x", "--top-k", "5"], "need a temperature > 0"),
        (["--prompt", "x", "--top-p", "1.5"], "--top-p"),
        (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
        ([], "no prompt"),
        (["--prompt", "x", "--no-such-flag"], "No such option"),
    ],
)
def test_cli_bad_input_is_one_line(decoders, args, message):
    _, onnx_path = decoders("llama")
    res = _cli(str(onnx_path), *args)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpcl-trt generate: error:") and message in lines[0]
    assert res.stdout == ""


def test_cli_refuses_what_it_cannot_run(decoders, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    model_dir, _ = decoders("llama")
    no_past = tmp_path / "no_past.onnx"  # logits from input_ids alone: a model without a cache
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT)],
        "no_past",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence"])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), no_past)
    for artifact, extra, message in [
        (no_past, ["--tokenizer", str(model_dir)], "not a decoder exported with past"),
        (no_past, [], "no model directory in its manifest chain: pass --tokenizer DIR"),
        (tmp_path / "missing.onnx", [], "does not exist"),
        (tmp_path, [], "not a Hugging Face model directory"),
    ]:
        res = _cli(str(artifact), "--prompt", "x", *extra)
        assert res.exit_code == 2 and message in res.stderr, res.output


def test_cli_refuses_weights_replaced_since_export(decoders, tmp_path):
    """generate opens an artifact like every command: a weight file replaced since the artifact's
    manifest recorded it is one line, not text from other weights."""
    import os

    import onnx

    from gpcl_trt.common import write_manifest

    model_dir, onnx_path = decoders("llama")
    ext = tmp_path / "ext.onnx"
    onnx.save(
        onnx.load(str(onnx_path)), str(ext), save_as_external_data=True, location="ext.onnx.data", size_threshold=1024
    )
    write_manifest(ext, "export", inputs={"model_dir": str(model_dir)}, options={})
    assert _cli(str(ext), "--prompt", "hi", "--max-new-tokens", "2").exit_code == 0
    data = tmp_path / "ext.onnx.data"
    fresh = tmp_path / "fresh"
    fresh.write_bytes(os.urandom(data.stat().st_size))
    os.replace(fresh, data)
    res = _cli(str(ext), "--prompt", "hi", "--max-new-tokens", "2")
    assert res.exit_code == 2 and "weight file replaced since ext.onnx was written" in res.stderr, res.output
