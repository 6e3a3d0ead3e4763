"""Encoder-decoder export (exporter/seq2seq.py) and generation (generate/seq2seq.py) on tiny
random-init checkpoints built here: T5, BART, Marian, Pegasus, Whisper. Each export writes
OUT/encoder_model.onnx and OUT/decoder_model_merged.onnx with their manifests, validates each
graph against PyTorch and a greedy decode of the ONNX graphs against transformers' generate;
`gpcl-trt generate` runs on the directory with --prompt (text) or --audio (a WAV written here)."""

from __future__ import annotations

import json
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

VOCAB = 300
SENTENCES = ["translate english to german: the house is wonderful", "summarize: a tiny model of words"] * 4
# the dimensions of every tiny BART-like and Whisper config here and in test_passes_seq2seq.py
TINY_DIMS = dict(
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
)


def _tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<pad>", "</s>", "<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>").save_pretrained(
        out
    )


def _config(name: str):
    import transformers as tf

    ids = dict(vocab_size=VOCAB, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    bart_like = dict(TINY_DIMS, max_position_embeddings=64, **ids)
    if name == "t5":
        cfg = tf.T5Config(
            d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
            relative_attention_num_buckets=8, **ids,
        )  # fmt: skip
        return tf.T5ForConditionalGeneration, cfg
    if name in ("mt5", "flan-t5"):  # gated-GELU, untied head; Flan-T5 here with more decoder than encoder layers
        cls, config = (
            (tf.MT5ForConditionalGeneration, tf.MT5Config)
            if name == "mt5"
            else (tf.T5ForConditionalGeneration, tf.T5Config)
        )
        cfg = config(
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2 if name == "mt5" else 3,
            num_heads=4,
            relative_attention_num_buckets=8,
            tie_word_embeddings=False,
            feed_forward_proj="gated-gelu",
            **ids,
        )
        return cls, cfg
    if name == "mbart":  # pre-LN, scaled embeddings, a forced first token (the target language)
        return tf.MBartForConditionalGeneration, tf.MBartConfig(scale_embedding=True, **bart_like)
    if name == "bart":
        return tf.BartForConditionalGeneration, tf.BartConfig(bos_token_id=2, forced_eos_token_id=None, **bart_like)
    if name == "marian":
        return tf.MarianMTModel, tf.MarianConfig(**bart_like)
    if name == "pegasus":
        return tf.PegasusForConditionalGeneration, tf.PegasusConfig(**bart_like)
    if name == "whisper":
        cfg = tf.WhisperConfig(
            vocab_size=VOCAB, **TINY_DIMS, num_mel_bins=16, max_source_positions=20, max_target_positions=32,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=2, bos_token_id=2, suppress_tokens=None,
            begin_suppress_tokens=None,
        )  # fmt: skip
        return tf.WhisperForConditionalGeneration, cfg
    raise ValueError(name)


def make_checkpoint(name: str, out: Path) -> Path:
    """A tiny random checkpoint (safetensors) with a tokenizer; Whisper also gets its feature
    extractor (16 mel bins, 40 frames = 1 s at a 400-sample hop). Matrices are drawn wider than
    transformers' init so that greedy decoding does not pick one token throughout."""
    import torch

    model_cls, cfg = _config(name)
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    if name == "mbart":  # the target language token, as mBART-50's generation_config.json sets it
        model.generation_config.forced_bos_token_id = 5
    if name == "whisper":  # multilingual: the language is detected, then <|notimestamps|> (openai/whisper-*'s config)
        gen = model.generation_config
        gen.lang_to_id, gen.task_to_id = {"<|en|>": 10, "<|de|>": 11, "<|fr|>": 12}, {"transcribe": 13, "translate": 14}
        gen.no_timestamps_token_id, gen.is_multilingual = 15, True
        gen._from_model_config = False  # else transformers rebuilds it from config.json on load
    model.save_pretrained(out)
    _tokenizer(out)
    if name == "whisper":
        from transformers import WhisperFeatureExtractor

        WhisperFeatureExtractor(feature_size=16, sampling_rate=16000, hop_length=400, chunk_length=1).save_pretrained(
            out
        )
    return out


def write_wav(path: Path, seconds: float = 0.6, rate: int = 8000) -> Path:
    """A chirp as 16-bit PCM at 8 kHz (the feature extractor wants 16 kHz: it is resampled)."""
    t = np.arange(int(seconds * rate)) / rate
    x = 0.5 * np.sin(2 * np.pi * (200 + 800 * t) * t)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((x * 32767).astype("<i2").tobytes())
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(name) -> (model_dir, out_dir, result)``, each built and exported once."""
    from gpcl_trt.exporter import export_model

    cache: dict = {}

    def get(name: str):
        if name not in cache:
            base = tmp_path_factory.mktemp(f"s2s_{name}")
            d = make_checkpoint(name, base / "model")
            result = export_model(d, base / "onnx")
            cache[name] = (d, base / "onnx", result)
        return cache[name]

    return get


def _cli(*args: str) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    exe = Path(sys.executable).with_name("gpcl-trt")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=600, check=False)


def _check_export(name: str, exported) -> dict:
    from gpcl_trt.manifest import model_dir_of

    d, out, result = exported(name)
    assert result["ok"] and result["written"], result["validation"]
    for which, fname in (("encoder", "encoder_model.onnx"), ("decoder", "decoder_model_merged.onnx")):
        assert (out / fname).is_file()
        manifest = json.loads((out / fname.replace(".onnx", ".manifest.json")).read_text())
        assert manifest["results"]["graph"] == which
        assert manifest["results"]["validation"]["passed"]
        assert model_dir_of(out / fname) == d
    v = result["validation"]
    assert v["encoder"]["passed"] and v["decoder"]["passed"]
    greedy = v["greedy"]
    assert greedy["equal"] and greedy["onnx"] == greedy["transformers"]
    # the tiny checkpoint decodes more than one token, so equality says something
    assert len({t for row in greedy["onnx"] for t in row}) > 1, greedy
    return result


def test_t5_export_graphs_and_greedy_equal_to_generate(exported):
    result = _check_export("t5", exported)
    n = 2
    assert result["inputs"]["encoder"] == ["input_ids", "attention_mask"]
    assert result["outputs"]["encoder"] == ["last_hidden_state"] + [
        f"present.{i}.encoder.{kv}" for i in range(n) for kv in ("key", "value")
    ]
    assert result["inputs"]["decoder"] == ["input_ids", "encoder_attention_mask"] + [
        f"past_key_values.{i}.{w}.{kv}" for i in range(n) for w in ("decoder", "encoder") for kv in ("key", "value")
    ]
    assert result["outputs"]["decoder"] == ["logits"] + [
        f"present.{i}.decoder.{kv}" for i in range(n) for kv in ("key", "value")
    ]


def test_seq2seq_graphs_run_on_generated_feeds(exported):
    """gpcl_trt.feeds makes data for both graphs from their own inputs (what calibrate, diff and
    the benchmarks use): encoder_sequence, encoder_attention_mask and both caches."""
    from gpcl_trt import feeds
    from gpcl_trt.common import load_onnx

    _, out, _ = exported("t5")
    for fname in ("encoder_model.onnx", "decoder_model_merged.onnx"):
        model = load_onnx(out / fname, external_data=False)
        specs = feeds.specs_from_onnx(model)
        feed = feeds.make_feeds(specs, 2, 3, past=4, vocab=VOCAB, encoder_sequence=5)
        got = feeds.ort_run(feeds.ort_session(out / fname), feed)
        if fname.startswith("decoder"):
            assert feed["past_key_values.0.encoder.key"].shape[2] == 5
            assert got["present.0.decoder.key"].shape[2] == 4 + 3
        assert all(np.isfinite(v).all() for v in got.values())


def test_t5_generate_cli_matches_transformers(exported):
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    d, out, _ = exported("t5")
    prompt = "translate english to german: the house"
    r = _cli("generate", str(out), "--prompt", prompt, "--max-new-tokens", "6", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["outputs"][0]
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForSeq2SeqLM.from_pretrained(d).eval()
    enc = tok([prompt], return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**enc, do_sample=False, num_beams=1, max_new_tokens=6)[0, 1:].tolist()
    ref = ref[: ref.index(1) + 1] if 1 in ref else ref
    assert got["tokens"] == ref
    assert got["text"] == tok.decode(ref, skip_special_tokens=True)


def test_load_model_gives_either_graph(exported):
    """The PyTorch side of each graph (what `diff --reference MODEL_DIR` runs) equals the ONNX file."""
    from gpcl_trt import feeds
    from gpcl_trt.exporter import load_model, make_dummy_inputs

    d, out, _ = exported("t5")
    for which, fname in (("encoder", "encoder_model.onnx"), ("decoder", "decoder_model_merged.onnx")):
        module, arch, task = load_model(d, graph=which)
        assert module.input_names == [i.name for i in feeds.ort_session(out / fname).get_inputs()]
        feed = make_dummy_inputs(arch, task, 2, 4, seed=3, past=2, encoder_sequence=6)
        ref = dict(zip(module.output_names, (t.detach().numpy() for t in module(**feed))))
        got = feeds.ort_run(feeds.ort_session(out / fname), feed)
        assert max(feeds.max_abs_diff(ref[n], got[n]) for n in ref) < 1e-4


def test_diff_model_dir_against_each_graph(exported):
    """`diff MODEL_DIR GRAPH.onnx` runs the graph the export's manifest names in PyTorch (the
    encoder used to be refused: the directory's default is the decoder's inputs)."""
    from gpcl_trt.accuracy import diff

    d, out, _ = exported("t5")
    for fname in ("encoder_model.onnx", "decoder_model_merged.onnx"):
        result = diff(d, out / fname, samples=2, seq=8)
        assert result["ok"], (fname, result)
        assert result["outputs"], result


def test_audio_on_a_text_model_is_one_line(exported, tmp_path):
    _, out, _ = exported("t5")
    r = _cli("generate", str(out), "--audio", str(write_wav(tmp_path / "a.wav")))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpcl-trt generate: error: --audio"), r.stderr


def test_whisper_export_and_generate_from_wav(exported, tmp_path):
    import torch
    from transformers import AutoModelForSpeechSeq2Seq, WhisperFeatureExtractor

    result = _check_export("whisper", exported)
    assert result["inputs"]["encoder"] == ["input_features"]
    assert "encoder_attention_mask" not in result["inputs"]["decoder"]
    d, out, _ = exported("whisper")
    wav = write_wav(tmp_path / "clip.wav")
    r = _cli("generate", str(out), "--prompt", "hello")  # a speech model takes --audio
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "give --audio" in r.stderr, r.stderr
    r = _cli("generate", str(out / "decoder_model_merged.onnx"), "--audio", str(wav), "--max-new-tokens", "5", "--json")
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout)["outputs"][0]
    got = first["tokens"]
    assert (
        first["decoder_prompt"][0] == 2
        and first["decoder_prompt"][1] in (10, 11, 12)
        and first["decoder_prompt"][2] == 15
    )
    # the reference: the same WAV read and resampled independently, transformers' own generate
    from gpcl_trt.generate.seq2seq import read_audio

    x = read_audio(wav, 16000)
    assert x.shape == (int(0.6 * 16000),)
    fx = WhisperFeatureExtractor.from_pretrained(d)
    feats = fx([x], sampling_rate=16000, return_tensors="pt")["input_features"]
    model = AutoModelForSpeechSeq2Seq.from_pretrained(d).eval()
    with torch.no_grad():
        ref = model.generate(input_features=feats, do_sample=False, num_beams=1, max_new_tokens=5)[0].tolist()
    cut = lambda row: row[: row.index(1)] if 1 in row else row  # noqa: E731  (Whisper's generate drops the EOS)
    assert cut(got) == cut(ref)
    greedy = result["validation"]["greedy"]
    assert greedy["detect_language"] and greedy["decoder_prompt"] == [2, -1, 15]


def test_whisper_encoder_gelus_all_fuse_in_onnx_runtime(exported, tmp_path):
    """Whisper's conv front end calls F.gelu itself (no module to swap): written as the exporter's
    fusable GELU while traced, ONNX Runtime's CPU optimizer leaves no Erf of an unfused GELU
    (BENCHMARKS, encoder-decoder vs Optimum: two unfused conv GELUs cost a few ms per 30 s)."""
    import onnx
    import onnxruntime as ort

    _, out, _ = exported("whisper")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(tmp_path / "ort.onnx")
    ort.InferenceSession(str(out / "encoder_model.onnx"), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(opts.optimized_model_filepath, load_external_data=False).graph.node]
    assert "Erf" not in ops, sorted(set(ops))
    assert ops.count("Gelu") + ops.count("BiasGelu") >= 2 + 2  # two convs, two blocks' MLPs


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bart", "marian", "pegasus", "mbart", "mt5", "flan-t5"])
def test_more_families_export_graphs_and_greedy(name, exported):
    result = _check_export(name, exported)
    # safetensors: the lazy path, but Marian's checkpoints omit the sinusoidal positions its model computes
    paths = {w["path"] for w in result["weights"].values()}
    assert paths == ({"eager"} if name == "marian" else {"lazy"}), result["weights"]
    if name == "mbart":  # the forced first token, in both decodes
        assert all(row[0] == 5 for row in result["validation"]["greedy"]["onnx"])
    if name == "flan-t5":  # transformers 5.25's generate cannot run it: the reference is its own forward
        assert result["validation"]["greedy"]["reference"].startswith("PyTorch forward without a cache")
        assert len(result["inputs"]["decoder"]) == 2 + 4 * 3


def test_onnx_output_name_is_refused(tmp_path):
    from gpcl_trt.common import GpclError
    from gpcl_trt.exporter import export_model

    d = make_checkpoint("t5", tmp_path / "m")
    with pytest.raises(GpclError, match="exports to a directory"):
        export_model(d, tmp_path / "t5.onnx")
    with pytest.raises(GpclError, match="replication is not supported"):
        export_model(d, tmp_path / "t5", replicate=True)
    assert not (tmp_path / "t5").exists()
    assert not (tmp_path / "t5.onnx").exists()


@pytest.mark.slow
def test_t5_lazy_export_links_the_checkpoint(tmp_path):
    """external_data=link: each graph's weights are hard links of the checkpoint under its own name."""
    from gpcl_trt.exporter import export_model

    d = make_checkpoint("t5", tmp_path / "m")
    result = export_model(d, tmp_path / "o", external_data="link")
    assert result["ok"] and result["validation"]["greedy"]["equal"]
    for which in ("encoder", "decoder"):
        w = result["weights"][which]
        assert w["path"] == "lazy" and w["layout"] == "link", w
        linked = [f for f in result["external_data"][which] if f.endswith(".safetensors")]
        assert linked == [f"{result['graphs'][which]}.model.safetensors"]
        assert (tmp_path / "o" / linked[0]).stat().st_ino == (d / "model.safetensors").stat().st_ino
