"""Generation for encoder-decoder exports (exporter/seq2seq.py: a directory with
``encoder_model.onnx`` and ``decoder_model_merged.onnx``): the encoder runs once per request and
gives the cross-attention keys and values, which are bound to the decoder once
(``OrtSeq2SeqRuntime``: ONNX Runtime IOBinding; the self-attention cache moves from one step's
outputs to the next step's inputs as OrtValues, never copied through numpy); then one token per
row per step (``decode_seq2seq``), greedy or sampled with the decoder loop's own ``pick``, until
EOS or the token budget. The model's generation rules that change the greedy choice
(``suppress_tokens``, ``begin_suppress_tokens``, one-token ``bad_words_ids``,
``forced_bos_token_id``, ``forced_eos_token_id``) are applied as transformers applies them."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from gpcl_trt.common import GpclError
from gpcl_trt.generate.loop import Sampling, pick

ENCODER_FILE = "encoder_model.onnx"
DECODER_FILE = "decoder_model_merged.onnx"
SELF_PAST = ".decoder."  # past_key_values.{i}.decoder.key: the self-attention cache

OnToken = Callable[[int, int], bool]


def export_files(artifact: str | os.PathLike) -> tuple[Path, Path] | None:
    """(encoder, decoder) of an encoder-decoder export: ARTIFACT is its directory or either
    file in it; None when ARTIFACT is not one."""
    p = Path(artifact)
    d = p if p.is_dir() else p.parent if p.name in (ENCODER_FILE, DECODER_FILE) else None
    if d is None or not (d / ENCODER_FILE).is_file() or not (d / DECODER_FILE).is_file():
        return None
    return d / ENCODER_FILE, d / DECODER_FILE


def generation_rules(model_dir: Path | None) -> dict[str, Any]:
    """The decoder prompt and the rules of generation_config.json (else config.json) that
    greedy decoding applies."""

    def read(name: str) -> dict:
        f = model_dir / name if model_dir else None
        try:
            data = json.loads(f.read_text()) if f is not None and f.is_file() else {}
        except (OSError, ValueError) as exc:
            raise GpclError(f"cannot read {f}: {exc}") from None
        return data if isinstance(data, dict) else {}

    cfg, gen = read("config.json"), read("generation_config.json")
    get = lambda k: gen.get(k, cfg.get(k))  # noqa: E731
    start = get("decoder_start_token_id")
    if start is None:
        start = get("bos_token_id") or 0
    eos = get("eos_token_id")
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else [])]
    pad = get("pad_token_id")
    forced = sorted((int(p), int(t)) for p, t in (get("forced_decoder_ids") or []) if t is not None)
    bad = [int(w[0]) for w in (get("bad_words_ids") or []) if isinstance(w, list) and len(w) == 1]
    # rules of beam search or of sampling transformers would also apply: reported, not applied
    neutral = {"no_repeat_ngram_size": 0, "repetition_penalty": 1.0, "min_length": 0, "min_new_tokens": None,
               "encoder_no_repeat_ngram_size": 0, "num_beams": 1}  # fmt: skip
    ignored = sorted(k for k, v in neutral.items() if get(k) not in (None, v))
    prompt, detect = [int(start)] + [t for _, t in forced], None
    if gen.get("lang_to_id") or gen.get("no_timestamps_token_id") is not None:
        prompt, detect = _whisper_prompt(gen, cfg, int(start))
    return {
        "not_applied": ignored,
        "decoder_prompt": prompt,
        "detect_language": detect,
        "eos_ids": eos_ids,
        "pad_id": int(pad) if isinstance(pad, int) else (eos_ids[0] if eos_ids else 0),
        "suppress": sorted(set(int(t) for t in (get("suppress_tokens") or [])) | set(bad)),
        "begin_suppress": [int(t) for t in (get("begin_suppress_tokens") or [])],
        "forced_bos": get("forced_bos_token_id"),
        "forced_eos": get("forced_eos_token_id"),
        "max_positions": get("max_target_positions") or cfg.get("max_position_embeddings"),
    }


def _whisper_prompt(gen: dict, cfg: dict, start: int) -> tuple[list[int], list[int] | None]:
    """Whisper's decoder prompt as transformers' WhisperGenerationMixin builds it without
    ``language``/``task`` arguments: the start token, the forced ids from index 1 on (a None
    language among them, or none at all, with ``lang_to_id``: the language is detected, one
    decoder step over the language tokens), the task id where the config names ``task`` or
    ``language``, then ``<|notimestamps|>``. Returns the prompt (-1 where the detected language
    goes) and the language ids to detect among (None: no detection)."""
    forced = sorted((int(p), t) for p, t in (gen.get("forced_decoder_ids") or cfg.get("forced_decoder_ids") or []))
    tokens: list[int | None] = [start]
    task, language = gen.get("task"), gen.get("language")
    if task is None and language is None and forced and forced[0][0] == 1:
        for i, (pos, tok) in enumerate(forced, start=1):
            if pos != i:
                break
            tokens.append(tok)
    lang_to_id, task_to_id = gen.get("lang_to_id") or {}, gen.get("task_to_id") or {}
    detect = None
    if language is not None:
        code = language if language in lang_to_id else f"<|{language}|>"
        if code not in lang_to_id:
            raise GpclError(f"generation_config.json: language {language!r} is not in lang_to_id")
        lang = lang_to_id[code]
        tokens[1:2] = [lang]
    elif lang_to_id and (len(tokens) <= 1 or tokens[1] is None):
        detect = sorted(int(v) for v in lang_to_id.values())
        tokens[1:2] = [-1]
    if task is not None:
        task_id = task_to_id[task]
        known = set(task_to_id.values())
        at = next((i for i, t in enumerate(tokens) if t in known), None)
        tokens[at if at is not None else len(tokens) : (at + 1) if at is not None else len(tokens)] = [task_id]
    elif language is not None and task_to_id and not any(t in task_to_id.values() for t in tokens):
        tokens.append(task_to_id["transcribe"])
    no_ts = gen.get("no_timestamps_token_id")
    if not gen.get("return_timestamps") and no_ts is not None and tokens[-1] != no_ts:
        tokens.append(int(no_ts))
    return [int(t) for t in tokens if t is not None], detect


class OrtSeq2SeqRuntime:
    """The two graphs in ONNX Runtime (CPU). ``encode(source)`` -> the cross KV as OrtValues;
    ``start(cross, encoder_attention_mask, batch)`` binds them to a fresh IOBinding;
    ``step(state, ids)`` -> last-position logits [batch, vocab], the self-attention cache kept
    in ``state``."""

    name = "onnxruntime (encoder-decoder)"

    def __init__(
        self, encoder: str | os.PathLike, decoder: str | os.PathLike, threads: int | None = None, verify: bool = True
    ):
        from gpcl_trt.feeds import ort_session

        if verify:
            from gpcl_trt.weightfiles import verify_onnx

            for p in (encoder, decoder):
                verify_onnx(p)
        self.encoder = ort_session(str(encoder), threads=threads)
        self.decoder = ort_session(str(decoder), threads=threads)
        self.encoder_inputs = [i.name for i in self.encoder.get_inputs()]
        self.cross_outputs = [o.name for o in self.encoder.get_outputs() if o.name.startswith("present.")]
        ins = self.decoder.get_inputs()
        self.self_past = [i for i in ins if SELF_PAST in i.name]
        self.takes_mask = any(i.name == "encoder_attention_mask" for i in ins)
        self.outputs = [o.name for o in self.decoder.get_outputs()]
        self.float_dtype = np.float16 if "float16" in self.self_past[0].type else np.float32
        self.speech = "input_features" in self.encoder_inputs

    def encode(self, source: dict[str, np.ndarray]) -> dict[str, Any]:
        import onnxruntime as ort

        feed = {n: source[n] for n in self.encoder_inputs}
        outs = self.encoder.run(self.cross_outputs, feed)
        return {
            n.replace("present.", "past_key_values.", 1): ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v))
            for n, v in zip(self.cross_outputs, outs)
        }

    def start(self, cross: dict[str, Any], encoder_attention_mask: np.ndarray | None, batch: int) -> dict[str, Any]:
        import onnxruntime as ort

        binding = self.decoder.io_binding()
        for name, value in cross.items():  # once per request
            binding.bind_ortvalue_input(name, value)
        mask = None
        if self.takes_mask:
            mask = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(encoder_attention_mask, dtype=np.int64))
            binding.bind_ortvalue_input("encoder_attention_mask", mask)
        past = {
            i.name: ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, i.shape[1], 0, i.shape[3]), self.float_dtype))
            for i in self.self_past
        }
        return {"binding": binding, "past": past, "keep": (cross, mask)}

    def step(self, state: dict[str, Any], ids: np.ndarray) -> np.ndarray:
        binding = state["binding"]
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        for name, value in state["past"].items():
            binding.bind_ortvalue_input(name, value)
        for name in self.outputs:
            binding.bind_output(name, "cpu")
        self.decoder.run_with_iobinding(binding)
        outs = dict(zip(self.outputs, binding.get_outputs()))
        state["past"] = {i.name: outs[i.name.replace("past_key_values.", "present.", 1)] for i in self.self_past}
        return outs["logits"].numpy()[:, -1, :]


def _apply_rules(logits: np.ndarray, rules: dict[str, Any], step: int, last: bool) -> np.ndarray:
    """transformers' logits processors for the rules the model's generation config sets."""
    x = np.asarray(logits, np.float32).copy()
    vocab = x.shape[-1]
    if rules.get("suppress"):
        x[:, [t for t in rules["suppress"] if t < vocab]] = -np.inf
    if step == 0 and rules.get("begin_suppress"):
        x[:, [t for t in rules["begin_suppress"] if t < vocab]] = -np.inf
    forced = rules.get("forced_bos") if step == 0 else rules.get("forced_eos") if last else None
    if forced is not None:
        x[:, :] = -np.inf
        x[:, int(forced)] = 0.0
    return x


def detect_language(
    runtime: OrtSeq2SeqRuntime, state: dict[str, Any], rules: dict[str, Any], ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Whisper without a set language (``rules["detect_language"]``, -1 in the decoder prompt
    ``ids`` [batch, n]): one decoder step over the tokens before the -1, the language the argmax
    among the language tokens. Returns (each row's decoder prompt, the language filled in; the
    tokens still to feed, those before it being in the cache now); ``(ids, ids)`` otherwise."""
    if not rules.get("detect_language") or -1 not in ids[0]:
        return ids, ids
    at = int(np.flatnonzero(ids[0] == -1)[0])
    langs = np.asarray(rules["detect_language"], np.int64)
    logits = np.asarray(runtime.step(state, ids[:, :at]), np.float32)
    full = ids.copy()
    full[:, at] = langs[np.argmax(logits[:, langs], axis=-1)]
    return full, full[:, at:]


def decode_seq2seq(
    runtime: OrtSeq2SeqRuntime,
    source: dict[str, np.ndarray],
    *,
    max_new_tokens: int,
    rules: dict[str, Any],
    sampling: Sampling = Sampling(),
    on_token: OnToken | None = None,
) -> dict[str, Any]:
    """Generate for one batch of sources (the encoder's inputs, [batch, ...]). Returns
    ``tokens`` (per row, EOS included, nothing after it), ``finish`` (``eos``, ``stop``,
    ``length``) and ``measurements``; ``array``: [batch, steps] with ``pad_id`` after a row's
    end, as transformers' generate returns it (without the decoder prompt)."""
    if max_new_tokens < 1:
        raise GpclError(f"max new tokens must be >= 1, got {max_new_tokens}")
    sampling = sampling.check()
    rng = np.random.default_rng(sampling.seed)
    first = next(iter(source.values()))
    batch = int(first.shape[0])
    t0 = time.perf_counter()
    cross = runtime.encode(source)
    mask = source.get("attention_mask")
    state = runtime.start(cross, mask, batch)
    ids = np.tile(np.asarray(rules["decoder_prompt"], np.int64), (batch, 1))
    full, ids = detect_language(runtime, state, rules, ids)
    eos = set(rules.get("eos_ids") or ())
    pad = int(rules.get("pad_id") or 0)
    tokens: list[list[int]] = [[] for _ in range(batch)]
    finish = [""] * batch
    rows = []
    ttft = None
    for step in range(max_new_tokens):
        logits = _apply_rules(runtime.step(state, ids), rules, step, step + 1 == max_new_tokens)
        nxt = pick(logits, sampling, rng)
        if ttft is None:
            ttft = time.perf_counter() - t0
        nxt = np.where([bool(f) for f in finish], pad, nxt).astype(np.int64)
        rows.append(nxt)
        for r in range(batch):
            if finish[r]:
                continue
            tok = int(nxt[r])
            tokens[r].append(tok)
            if tok in eos:
                finish[r] = "eos"
            elif on_token is not None and on_token(r, tok):
                finish[r] = "stop"
        if all(finish):
            break
        ids = nxt[:, None]
    finish = [f or "length" for f in finish]
    total = time.perf_counter() - t0
    new = sum(len(t) for t in tokens)
    later = new - batch
    decode_s = total - (ttft or 0.0)
    return {
        "tokens": tokens,
        "finish": finish,
        "array": np.stack(rows, axis=1),
        "prompts": full.tolist(),  # the decoder prompt of each row (a detected language filled in)
        "measurements": {
            "prompts": batch,
            "new_tokens": new,
            "time_to_first_token_s": ttft or 0.0,
            "decode_tokens_per_s": later / decode_s if later > 0 and decode_s > 0 else None,
        },
    }


# ----------------------------------------------------------------------------- inputs
def read_audio(path: str | os.PathLike, sampling_rate: int) -> np.ndarray:
    """A PCM WAV file (8, 16, 24 or 32-bit integer samples: the stdlib ``wave`` module) as mono
    float32 in [-1, 1] at ``sampling_rate``, resampled linearly when its rate differs."""
    import wave

    try:
        with wave.open(str(path), "rb") as w:
            width, channels, rate, n = w.getsampwidth(), w.getnchannels(), w.getframerate(), w.getnframes()
            raw = w.readframes(n)
    except (OSError, EOFError, wave.Error) as exc:
        raise GpclError(f"cannot read --audio {path}: {exc} (a PCM WAV file is expected)") from None
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 3:  # little-endian 24-bit: widened to 32 bits
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        x = (b[:, 0].astype(np.int32) << 8 | b[:, 1].astype(np.int32) << 16 | b[:, 2].astype(np.int32) << 24) / 2.0**31
    else:
        x = np.frombuffer(raw, {2: "<i2", 4: "<i4"}[width]).astype(np.float32) / float(2 ** (8 * width - 1))
    x = np.asarray(x, np.float32).reshape(-1, channels).mean(axis=1)
    if x.size == 0:
        raise GpclError(f"--audio {path} holds no samples")
    if rate != sampling_rate:
        size = max(1, int(round(x.size * sampling_rate / rate)))
        x = np.interp(np.linspace(0, x.size - 1, size), np.arange(x.size), x).astype(np.float32)
    return x


def audio_source(model_dir: Path, paths: Sequence[str | os.PathLike]) -> dict[str, np.ndarray]:
    """``input_features`` of WAV files by the model's own feature extractor (preprocessor_config.json)."""
    from transformers import AutoFeatureExtractor

    try:
        fx = AutoFeatureExtractor.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:
        raise GpclError(f"no feature extractor in {model_dir} (preprocessor_config.json): {exc}") from None
    waves = [read_audio(p, int(fx.sampling_rate)) for p in paths]
    feats = fx(waves, sampling_rate=fx.sampling_rate, return_tensors="np")["input_features"]
    return {"input_features": np.asarray(feats, np.float32)}


def text_source(tokenizer: Any, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    enc = tokenizer(list(prompts), padding=True, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


# ----------------------------------------------------------------------------- text in, text out
def generate_seq2seq(
    artifact: str | os.PathLike,
    prompts: Sequence[str] = (),
    *,
    audio: Sequence[str | os.PathLike] = (),
    tokenizer: str | os.PathLike | None = None,
    max_new_tokens: int = 64,
    sampling: Sampling = Sampling(),
    stop: Sequence[str] = (),
    on_text: Callable[[int, str], None] | None = None,
    batch_size: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """``generate`` for an encoder-decoder export: text prompts (text2text-generation) or WAV
    files (``audio``: Whisper, features by the model's own feature extractor). The tokenizer,
    feature extractor and generation rules come from the model directory in the manifest chain."""
    from gpcl_trt.generate.detok import TextStream, load_tokenizer
    from gpcl_trt.manifest import model_dir_of

    files = export_files(artifact)
    if files is None:
        raise GpclError(f"{artifact} is not an encoder-decoder export ({ENCODER_FILE} and {DECODER_FILE})")
    if max_new_tokens < 1:
        raise GpclError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    sampling = sampling.check()
    model_dir = model_dir_of(files[0])
    tok_dir = Path(tokenizer) if tokenizer is not None else model_dir
    if tok_dir is None:
        raise GpclError(f"{files[0]} has no model directory in its manifest chain: pass --tokenizer DIR")
    speech = _takes_features(files[0])
    if speech and not audio:
        raise GpclError(f"{Path(artifact).name} is a speech model (input_features): give --audio FILE.wav")
    if audio and not speech:
        raise GpclError(f"--audio: {Path(artifact).name} is a text encoder-decoder (input_ids); give --prompt TEXT")
    if audio and prompts:
        raise GpclError("give --audio or --prompt, not both")
    items = [str(a) for a in audio] if speech else list(prompts)
    if not items:
        raise GpclError("no prompt: give --prompt TEXT or --prompts FILE")
    tok = load_tokenizer(tok_dir)
    rules = generation_rules(model_dir)
    sources = [audio_source(model_dir, [a]) for a in items] if speech else None
    rt = OrtSeq2SeqRuntime(*files, threads=threads)
    size = batch_size or len(items)
    outputs: list[dict[str, Any]] = []
    totals = {"prompts": 0, "prompt_tokens": 0, "new_tokens": 0, "ttft": None, "decode_tokens": 0, "decode_s": 0.0}
    for start in range(0, len(items), size):
        chunk = list(range(start, min(start + size, len(items))))
        if speech:
            source = {"input_features": np.concatenate([sources[i]["input_features"] for i in chunk])}
        else:
            source = text_source(tok, [items[i] for i in chunk])
        streams = [TextStream(tok, stop) for _ in chunk]

        def on_token(r: int, token: int, streams: list = streams, chunk: list = chunk) -> bool:
            stopped = streams[r].add(token)
            if on_text is not None:
                piece = streams[r].pending()
                if piece:
                    on_text(chunk[r], piece)
            return stopped

        out = decode_seq2seq(
            rt, source, max_new_tokens=max_new_tokens, rules=rules, sampling=sampling, on_token=on_token
        )
        for r, i in enumerate(chunk):
            s = streams[r]
            s.finish()
            if on_text is not None:
                piece = s.pending()
                if piece:
                    on_text(i, piece)
            n_in = int(source["attention_mask"][r].sum()) if "attention_mask" in source else 0
            outputs.append(
                {
                    "decoder_prompt": out["prompts"][r],
                    "prompt": items[i],
                    "text": s.text,
                    "tokens": out["tokens"][r],
                    "prompt_tokens": n_in,
                    "finish": out["finish"][r],
                }
            )
            totals["prompt_tokens"] += n_in
        m = out["measurements"]
        totals["prompts"] += len(chunk)
        totals["new_tokens"] += m["new_tokens"]
        totals["ttft"] = m["time_to_first_token_s"] if totals["ttft"] is None else totals["ttft"]
        if m["decode_tokens_per_s"]:
            totals["decode_tokens"] += m["new_tokens"] - len(chunk)
            totals["decode_s"] += (m["new_tokens"] - len(chunk)) / m["decode_tokens_per_s"]
    return {
        "artifact": str(artifact),
        "runtime": rt.name,
        "model_dir": str(model_dir) if model_dir else None,
        "tokenizer": str(tok_dir),
        "graphs": {"encoder": str(files[0]), "decoder": str(files[1])},
        "sampling": {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p}
        | ({"seed": sampling.seed} if not sampling.greedy else {}),
        "max_new_tokens": max_new_tokens,
        "eos_ids": rules["eos_ids"],
        "decoder_prompt": rules["decoder_prompt"],
        "rules_not_applied": rules["not_applied"],
        "stop": list(stop),
        "outputs": outputs,
        "measurements": {
            "prompts": totals["prompts"],
            "prompt_tokens": totals["prompt_tokens"],
            "new_tokens": totals["new_tokens"],
            "time_to_first_token_s": totals["ttft"] or 0.0,
            "decode_tokens_per_s": totals["decode_tokens"] / totals["decode_s"] if totals["decode_s"] > 0 else None,
        },
    }


def _takes_features(encoder: Path) -> bool:
    from gpcl_trt.common import load_onnx

    model = load_onnx(encoder, external_data=False)
    return any(i.name == "input_features" for i in model.graph.input)
