"""Encoder-decoder export (T5, Flan-T5, mT5, BART, mBART, Marian, Pegasus; Whisper): a directory
in Optimum's layout with two graphs, each a normal artifact with its own manifest, so every later
command (sites, insert, strip, calibrate, diff, build, triton) takes either file alone.

``encoder_model.onnx``: ``input_ids``, ``attention_mask`` (Whisper: ``input_features``) ->
``last_hidden_state`` and the cross-attention keys and values of every decoder layer,
``present.{i}.encoder.key|value`` [batch, heads, encoder_sequence, head size], computed from the
encoder's output by the decoder's own projections (onnxruntime-genai's Whisper design).

``decoder_model_merged.onnx``: ``input_ids``, ``encoder_attention_mask`` (text models),
``past_key_values.{i}.decoder.key|value`` (self-attention; ``past_sequence`` is 0 at the first
step) and ``past_key_values.{i}.encoder.key|value`` (the encoder graph's cross KV) -> ``logits``
and ``present.{i}.decoder.key|value``. One decoder serves the first and every later step without
an ONNX If (an If hides the blocks from the GPCL passes and TensorRT handles it poorly).

What differs between the families (T5's relative position bias, BART's learned positions with an
offset of 2, Marian and Pegasus's sinusoidal positions, Whisper's convolutional front end) is the
model's own code, traced as it is: the cores below call only what transformers' encoder-decoder
classes share (``get_encoder``, ``forward(encoder_outputs=..., cache=EncoderDecoderCache)``), and
the cache shapes are read from one tiny forward, never from the model's name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpcl_trt import feeds
from gpcl_trt.common import GpclError, one_line
from gpcl_trt.exporter.configs import ArchConfig, KVShape, TensorSpec
from gpcl_trt.exporter.cores import HeadCore, OnnxIOModule, _cache_arg, out_cache
from gpcl_trt.exporter.patchers import fusable_functional_gelu
from gpcl_trt.exporter.tasks import (
    AUTOMATIC_SPEECH_RECOGNITION,
    SPEECH_SEQ2SEQ_HEADS,
    TASK_HEADS,
    TEXT2TEXT_GENERATION,
    in_mapping,
)

ENCODER_FILE = "encoder_model.onnx"
DECODER_FILE = "decoder_model_merged.onnx"
GRAPHS = {"encoder": ENCODER_FILE, "decoder": DECODER_FILE}
SELF, CROSS = "decoder", "encoder"  # the cache names' middle part: self-attention, cross-attention


def cache_names(prefix: str, layers: int, which: tuple[str, ...] = (SELF, CROSS)) -> list[str]:
    """``{prefix}{i}.{which}.key|value`` of every layer, in Optimum's order (layer, then which, then key/value)."""
    return [f"{prefix}{i}.{w}.{kv}" for i in range(layers) for w in which for kv in ("key", "value")]


# ----------------------------------------------------------------------------- family config
class Seq2Seq(ArchConfig):
    """Encoder-decoder models: text2text-generation (T5, BART, Marian, Pegasus...) from
    ``input_ids``, automatic-speech-recognition (Whisper) from ``input_features``. ``inputs`` /
    ``outputs`` describe the decoder graph; :meth:`graph` gives either graph's description."""

    family = "encoder-decoder"
    tasks = (TEXT2TEXT_GENERATION, AUTOMATIC_SPEECH_RECOGNITION)
    # load_model (the eager path, and the PyTorch side of diff) checks only the layer counts
    # against the headers: checkpoints omit tensors the model computes (Marian's sinusoidal
    # positions), which the lazy binder's precheck reports as missing (exporter/build.py).
    eager_only = True

    def __init__(self, hf_config: Any, dtype: str = "fp32"):
        super().__init__(hf_config, dtype)
        self._kv: list[KVShape] | None = None
        self._encoder_length: int | None = None  # fixed source length (Whisper's frames / 2)

    @property
    def speech(self) -> bool:
        return in_mapping(SPEECH_SEQ2SEQ_HEADS[0], self.name)

    @property
    def main_input(self) -> str:  # type: ignore[override]
        return feeds.INPUT_FEATURES if self.speech else feeds.INPUT_IDS

    def default_task(self) -> str:
        return AUTOMATIC_SPEECH_RECOGNITION if self.speech else TEXT2TEXT_GENERATION

    def check_task(self, task: str) -> None:
        if task != self.default_task():
            raise GpclError(
                f"task {task!r} is not supported for {self.name} (an encoder-decoder model); "
                f"choose --task {self.default_task()}"
            )
        if self.model_class(task) is None:
            raise GpclError(f"transformers has no {task} encoder-decoder head for model_type {self.name!r}")

    def _mapping(self) -> tuple[str, str]:
        return SPEECH_SEQ2SEQ_HEADS if self.speech else TASK_HEADS[TEXT2TEXT_GENERATION]

    def auto_class(self, task: str) -> type:
        import transformers

        return getattr(transformers, self._mapping()[1])

    def model_class(self, task: str) -> type | None:
        import transformers

        from gpcl_trt.exporter.tasks import auto_mapping

        names = auto_mapping(self._mapping()[0]).get(self.name)
        for name in names if isinstance(names, (list, tuple)) else (names,) if names else ():
            cls = getattr(transformers, name, None)
            if cls is not None:
                return cls
        return None

    def load_kwargs(self, task: str) -> dict[str, Any]:
        return {"attn_implementation": "eager"}

    # --- sizes
    @property
    def hidden_size(self) -> int:
        cfg = self.hf_config
        return int(getattr(cfg, "d_model", None) or cfg.hidden_size)

    @property
    def vocab_size(self) -> int:
        return 0 if self.speech and self._vocab is None else super().vocab_size

    @property
    def decoder_vocab(self) -> int:
        """What the decoder's input_ids index (Whisper's encoder reads no token ids)."""
        return self._vocab or int(self.hf_config.vocab_size)

    @property
    def num_layers(self) -> int:
        if self._kv is not None:
            return len(self._kv)
        cfg = self.hf_config
        for key in ("num_decoder_layers", "decoder_layers", "num_layers", "num_hidden_layers"):
            if isinstance(getattr(cfg, key, None), int):
                return int(getattr(cfg, key))
        raise GpclError(f"{self.name}: config.json says nothing of the decoder's layer count")

    def kv_shapes(self) -> list[KVShape]:
        if self._kv is not None:
            return self._kv
        cfg = self.hf_config
        heads = int(getattr(cfg, "decoder_attention_heads", None) or getattr(cfg, "num_heads", None) or 1)
        head_dim = int(getattr(cfg, "d_kv", None) or self.hidden_size // heads)
        return [KVShape(heads, head_dim)] * self.num_layers

    @property
    def encoder_axis(self) -> str | int:
        """The source length: dynamic for text, fixed for Whisper (its encoder takes 30 s)."""
        if self.speech:
            if self._encoder_length is not None:
                return self._encoder_length
            return int(getattr(self.hf_config, "max_source_positions", 1500))
        return feeds.ENCODER_SEQUENCE

    @property
    def frames(self) -> int:
        """Whisper's input frames: twice the encoder positions (a stride-2 convolution)."""
        return 2 * int(getattr(self.hf_config, "max_source_positions", 1500))

    # --- the two graphs
    def _cache(self, prefix: str, which: str, axis: str | int) -> list[TensorSpec]:
        return [
            TensorSpec(f"{prefix}{i}.{which}.{n}", "float", ("batch", kv.heads, axis, size))
            for i, kv in enumerate(self.kv_shapes())
            for n, size in (("key", kv.head_dim), ("value", kv.value_head_dim))
        ]

    def encoder_inputs(self) -> list[TensorSpec]:
        if self.speech:
            mels = int(getattr(self.hf_config, "num_mel_bins", 80))
            return [TensorSpec(feeds.INPUT_FEATURES, "float", ("batch", mels, self.frames))]
        return [
            TensorSpec(feeds.INPUT_IDS, "int64", ("batch", feeds.ENCODER_SEQUENCE)),
            TensorSpec(feeds.ATTENTION_MASK, "int64", ("batch", feeds.ENCODER_SEQUENCE)),
        ]

    def encoder_outputs(self) -> list[TensorSpec]:
        hidden = TensorSpec("last_hidden_state", "float", ("batch", self.encoder_axis, self.hidden_size))
        return [hidden, *self._cache(feeds.PRESENT_PREFIX, CROSS, self.encoder_axis)]

    def decoder_inputs(self) -> list[TensorSpec]:
        specs = [TensorSpec(feeds.INPUT_IDS, "int64", ("batch", "sequence"))]
        if not self.speech:
            specs.append(TensorSpec(feeds.ENCODER_ATTENTION_MASK, "int64", ("batch", feeds.ENCODER_SEQUENCE)))
        self_kv = self._cache(feeds.PAST_PREFIX, SELF, "past_sequence")
        cross_kv = self._cache(feeds.PAST_PREFIX, CROSS, self.encoder_axis)
        for i in range(self.num_layers):  # Optimum's order: layer by layer, self then cross
            specs += self_kv[2 * i : 2 * i + 2] + cross_kv[2 * i : 2 * i + 2]
        return specs

    def decoder_outputs(self) -> list[TensorSpec]:
        logits = TensorSpec("logits", "float", ("batch", "sequence", self._logits or self.decoder_vocab))
        return [logits, *self._cache(feeds.PRESENT_PREFIX, SELF, "total_sequence")]

    def inputs(self, task: str) -> list[TensorSpec]:
        return self.decoder_inputs()

    def outputs(self, task: str) -> list[TensorSpec]:
        return self.decoder_outputs()

    def graph(self, which: str) -> "Graph":
        return Graph(self, which)

    # --- the traced modules
    def _bind(self, model: torch.nn.Module) -> None:
        super()._bind(model)
        if self.speech:
            self._vocab = None  # the decoder's embedding: what decoder input_ids index
            emb = model.get_decoder().get_input_embeddings()
            if isinstance(emb, torch.nn.Embedding):
                self._vocab = int(emb.num_embeddings)
        self._probe(model)

    def _probe(self, model: torch.nn.Module) -> None:
        """Per-layer heads and head sizes of both caches, and the encoder's output length, from
        one forward of a short source and one decoder token."""
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None and param.device.type != "meta" else torch.device("cpu")
        dtype = param.dtype if param is not None else torch.float32
        if self.speech:
            mels = int(getattr(self.hf_config, "num_mel_bins", 80))
            src = {"input_features": torch.zeros(1, mels, self.frames, dtype=dtype, device=device)}
        else:
            src = {"input_ids": torch.tensor([[1, 2]], device=device)}
        with torch.no_grad():
            enc = model.get_encoder()(**src, return_dict=True).last_hidden_state
            dec = torch.zeros(1, 1, dtype=torch.long, device=device)
            out = model(encoder_outputs=(enc,), decoder_input_ids=dec, use_cache=True, return_dict=True)
        cache = out_cache(out)
        if cache is None or not hasattr(cache, "cross_attention_cache"):
            raise GpclError(f"{self.name}: its decoder keeps no encoder-decoder cache; it cannot be exported with past")
        shapes = []
        for layer in cache.self_attention_cache.layers:
            k, v = layer.keys, layer.values
            value_dim = None if v.shape[3] == k.shape[3] else int(v.shape[3])
            shapes.append(KVShape(int(k.shape[1]), int(k.shape[3]), value_dim))
        self._kv = shapes
        if self.speech:
            self._encoder_length = int(enc.shape[1])

    def core(self, model: torch.nn.Module, task: str) -> torch.nn.Module:
        """The decoder's core (the ArchConfig contract: ``inputs``/``outputs`` are the decoder's)."""
        self._bind(model)
        return DecoderWithPastCore(model, self)

    def cores(self, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """{"encoder": core, "decoder": core} over one loaded model."""
        if self._kv is None:
            self._bind(model)
        return {"encoder": EncoderWithCrossCore(model, self), "decoder": DecoderWithPastCore(model, self)}

    def modules(self, model: torch.nn.Module, task: str) -> dict[str, OnnxIOModule]:
        """Each graph's core wrapped to take its ONNX input names (the PyTorch reference)."""
        return {w: OnnxIOModule(c, self.graph(w), task).eval() for w, c in self.cores(model).items()}


class Graph:
    """One graph of a Seq2Seq model, described as the tracer and validation read an arch
    config (``inputs``/``outputs``/``vocab_size``/``dtype``/``name``)."""

    def __init__(self, parent: Seq2Seq, which: str):
        self.parent, self.which = parent, which
        self.hf_config, self.dtype, self.name = parent.hf_config, parent.dtype, parent.name
        self.family = parent.family

    @property
    def vocab_size(self) -> int:
        return self.parent.vocab_size if self.which == "encoder" else self.parent.decoder_vocab

    def inputs(self, task: str) -> list[TensorSpec]:
        return self.parent.encoder_inputs() if self.which == "encoder" else self.parent.decoder_inputs()

    def outputs(self, task: str) -> list[TensorSpec]:
        return self.parent.encoder_outputs() if self.which == "encoder" else self.parent.decoder_outputs()


# ----------------------------------------------------------------------------- cores
def _empty_cache() -> Any:
    """No config: a DynamicCache built from the top-level config gets its layer count from
    ``num_hidden_layers``, which T5 maps to the encoder's (Flan-T5 variants with more decoder
    layers than encoder layers then fail); without it, layers are added as the decoder fills them."""
    from transformers import DynamicCache, EncoderDecoderCache

    return EncoderDecoderCache(DynamicCache(), DynamicCache())


class EncoderWithCrossCore(HeadCore):
    """The encoder, then every decoder layer's cross-attention keys and values of its output.
    They are read from the cache of one decoder step over a dummy token: the model's own cross
    projections (T5's ``EncDecAttention.k``, BART's ``encoder_attn.k_proj``...), and nothing
    else of that step reaches an output, so the exporter drops the rest of it."""

    def __init__(self, model: torch.nn.Module, arch: Seq2Seq):
        super().__init__(model, [s.name for s in arch.encoder_outputs()])
        self.speech = arch.speech
        self.cache_arg = _cache_arg(model)

    def forward(self, input_ids=None, attention_mask=None, input_features=None):
        src = {"input_features": input_features} if self.speech else {"input_ids": input_ids}
        if attention_mask is not None:
            src["attention_mask"] = attention_mask
        with fusable_functional_gelu():  # Whisper's conv front end calls F.gelu itself
            hidden = self.model.get_encoder()(**src, return_dict=True).last_hidden_state
        dummy = torch.zeros(hidden.shape[0], 1, dtype=torch.long, device=hidden.device)
        kw = {} if attention_mask is None else {"attention_mask": attention_mask}
        kw[self.cache_arg] = _empty_cache()
        out = self._run(encoder_outputs=(hidden,), decoder_input_ids=dummy, use_cache=True, return_dict=True, **kw)
        cross = []
        for layer in out_cache(out).cross_attention_cache.layers:
            cross += [layer.keys, layer.values]
        return (hidden, *cross)


class DecoderWithPastCore(HeadCore):
    """One decoder step over both caches. The cross-attention cache is filled from the inputs,
    so the model reuses it (``is_updated``) and never projects the encoder output again; the
    encoder output it is also given is zeros of the right shape, read for its size only (the
    encoder mask's key length)."""

    def __init__(self, model: torch.nn.Module, arch: Seq2Seq):
        super().__init__(model, [s.name for s in arch.decoder_outputs()])
        self.num_layers = arch.num_layers
        self.hidden_size = arch.hidden_size
        self.speech = arch.speech
        self.cache_arg = _cache_arg(model)

    def forward(self, input_ids, encoder_attention_mask=None, past_key_values=()):
        from transformers import DynamicCache, EncoderDecoderCache

        n = self.num_layers
        self_kv = [(past_key_values[4 * i], past_key_values[4 * i + 1]) for i in range(n)]
        cross_kv = [(past_key_values[4 * i + 2], past_key_values[4 * i + 3]) for i in range(n)]
        cache = EncoderDecoderCache(DynamicCache(ddp_cache_data=self_kv), DynamicCache(ddp_cache_data=cross_kv))
        key = cross_kv[0][0]
        hidden = key.new_zeros((key.shape[0], key.shape[2], self.hidden_size))
        kw = {} if encoder_attention_mask is None else {"attention_mask": encoder_attention_mask}
        kw[self.cache_arg] = cache
        out = self._run(encoder_outputs=(hidden,), decoder_input_ids=input_ids, use_cache=True, return_dict=True, **kw)
        present = []
        for layer in out_cache(out).self_attention_cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


# ----------------------------------------------------------------------------- export
GREEDY_TOKENS = 8  # the greedy decode that validation compares with transformers' generate
VALIDATE_CASES = ((3, 11), (1, 5))  # (batch, source length), both other than the trace shape


def export_seq2seq(
    d: Path,
    out: Path,
    opts: Any,
    task: str,
    force: bool,
    trust_remote_code: bool,
    allow_pickle: bool,
    external_data: Any,
    packages: tuple[str, ...],
    lazy: bool | None = None,
) -> dict[str, Any]:
    """Export into the directory ``out``: both graphs traced from one model, validated against it
    (each graph's outputs, then a greedy decode of the two ONNX graphs against transformers'
    ``generate``), each written with its manifest; the directory appears under its final name
    only when every check has passed. A safetensors checkpoint is exported lazily as decoders
    are (exporter/lazy.py: built on ``meta``, traced on fake weights, each graph's external data
    linked from the checkpoint or converted, ``OUT/encoder_model.onnx.<file>``); where the lazy
    binder cannot place every parameter (Marian's checkpoints omit their sinusoidal positions,
    which the model computes) or for pickle weights, the model is loaded eagerly."""
    from gpcl_trt import progress
    from gpcl_trt.common import atomic_dir, check_can_write, manifest_path, sha256_file, write_manifest
    from gpcl_trt.exporter import lazy as lz
    from gpcl_trt.exporter.api import manifest_inputs_options
    from gpcl_trt.exporter.build import load_model, quiet
    from gpcl_trt.exporter.tracing import trace, trace_errors
    from gpcl_trt.exporter.writing import weights_layout, write_eager

    if out.suffix == ".onnx":
        raise GpclError(
            f"output {out}: an encoder-decoder model exports to a directory ({ENCODER_FILE}, {DECODER_FILE}); "
            "give -o DIR"
        )
    if out.is_file():
        raise GpclError(f"output {out} is a file; an encoder-decoder model exports to a directory")
    check_can_write(out, force)
    if opts.dtype == "bf16":
        raise GpclError("--dtype bf16 is not supported for encoder-decoder export yet; use fp32 or fp16")
    built, eager_reason = _lazy_build(d, opts.dtype, task, trust_remote_code, lazy)
    if built is not None:
        model, ckpt, binding, arch, task = built
        lz.fake_parameters(model)
        with quiet():
            modules = arch.modules(model, task)
        layout = weights_layout(external_data, lz.nbytes_of(binding))
    else:
        with progress.step(f"load {d.name} (eager: {eager_reason})"):
            decoder_module, arch, task = load_model(d, task, trust_remote_code, allow_pickle, opts.dtype)
        model = decoder_module.core.model
        modules = arch.modules(model, task)
        eager_layout = {None: None, "auto": None, "inline": False}.get(external_data, external_data is not False)

    class _Failed(Exception):
        pass

    result: dict[str, Any] = {}
    placements: dict[str, Any] = {}
    try:
        with atomic_dir(out, force) as tmp:
            files: dict[str, dict[str, Any]] = {}
            for which, name in GRAPHS.items():
                graph = arch.graph(which)
                bind = None
                if built is not None:
                    placement = placements[which] = lz.convert_weights(binding, ckpt, tmp, name)
                    bind = lambda m, p=placement: lz.bind_initializers(m, binding, p)  # noqa: E731
                how = "on fake weights, " if built is not None else ""
                with (
                    progress.step(f"trace {arch.name} {which} ({how}{task}, opset {opts.opset}, {opts.dtype})"),
                    trace_errors(d, arch, task),
                ):
                    proto = trace(modules[which], graph, task, opts.opset, bind=bind)
                if built is not None:
                    data = lz.finalize_proto(proto, placements[which], tmp, name, layout)
                    (tmp / name).write_bytes(proto.SerializeToString())
                    weights = {
                        "path": "lazy",
                        "layout": layout,
                        "links": placements[which].links,
                        "in_place_bytes": placements[which].in_place_bytes,
                        "converted_bytes": placements[which].converted_bytes,
                    }
                else:
                    data = write_eager(proto, tmp / name, eager_layout)
                    weights = {"path": "eager", "eager_reason": eager_reason}
                del proto
                files[which] = {"file": name, "data_files": data, "weights": weights}
            if built is not None:  # the PyTorch reference reads the checkpoint's own bytes
                lz.real_parameters(model, binding, lz.reference_tensors(binding, ckpt, placements["decoder"]))
            validation = {}
            if opts.validate != "none":
                with progress.step("validate against PyTorch (each graph, then a greedy decode)"):
                    validation = validate_seq2seq(model, arch, task, modules, tmp, opts.atol, opts.rtol, d)
            ok = validation.get("passed", True)
            result = _result(d, out, arch, task, opts, files, validation, ok)
            if not ok:
                raise _Failed()
            for which, placement in placements.items():  # data files a graph does not read
                lz.drop_unused(placement, files[which]["data_files"])
            inputs, options = manifest_inputs_options(d, task, opts, trust_remote_code, allow_pickle)
            for which, info in files.items():
                graph = arch.graph(which)
                results = {
                    "architecture": arch.name,
                    "model_type": arch.hf_config.model_type,
                    "hf_class": type(model).__name__,
                    "task": task,
                    "graph": which,
                    "seq2seq": dict(GRAPHS),
                    "inputs": [s.as_dict() for s in graph.inputs(task)],
                    "outputs": [s.as_dict() for s in graph.outputs(task)],
                    "external_data": info["data_files"],
                    "weights": info["weights"],
                    "validation": validation.get(which, {"mode": "none", "skipped": True}),
                    "greedy": validation.get("greedy"),
                }
                staged = tmp / info["file"]
                write_manifest(staged, "export", inputs, options, results, packages=packages, force=True)
                info["sha256"] = sha256_file(staged)
                info["manifest"] = manifest_path(staged).name
    except _Failed:
        return result
    result["files"] = {w: {**i, "path": str(out / i["file"])} for w, i in files.items()}
    return result


def _lazy_build(d: Path, dtype: str, task: str, trust_remote_code: bool, lazy: bool | None) -> tuple[Any, str]:
    """``((model, checkpoint, binding, arch, task), None)`` for the lazy path, else ``(None, why)``."""
    from gpcl_trt import progress
    from gpcl_trt.exporter.build import bind_config, lazy_model, quiet

    if not any(d.glob("*.safetensors")):
        if lazy is True:
            raise GpclError(f"lazy export needs safetensors weights; {d} has pickle weights")
        return None, "pickle weights"
    if lazy is False:
        return None, "lazy=False"
    with progress.step(f"read {d.name} (config and safetensors headers)"), quiet():
        hf_config, arch, task = bind_config(d, Seq2Seq, dtype, task, trust_remote_code)
        try:
            built = lazy_model(d, hf_config, arch, task, dtype, trust_remote_code)
        except GpclError as exc:  # e.g. a parameter the checkpoint omits because the model computes it
            if lazy is True:
                raise
            built = f"the lazy binder cannot place every parameter ({one_line(exc)})"
    if isinstance(built, str):
        if lazy is True:
            raise GpclError(f"lazy export impossible for {d}: {built}")
        return None, built
    return (*built, arch, task), None


def _result(d: Path, out: Path, arch: Seq2Seq, task: str, opts: Any, files: dict, validation: dict, ok: bool) -> dict:
    summary = validation.get("summary") or {"mode": "none", "skipped": True}
    return {
        "ok": bool(ok),
        "written": bool(ok),
        "output": str(out),
        "architecture": arch.name,
        "task": task,
        "family": arch.family,
        "graphs": {w: i["file"] for w, i in files.items()},
        "validation": summary | {k: validation[k] for k in ("encoder", "decoder", "greedy") if k in validation},
        "weights": {w: i["weights"] for w, i in files.items()},
        "external_data": {w: i["data_files"] for w, i in files.items()},
        "dtype": {"value": opts.dtype, "requested": opts.asked_dtype, "reason": opts.dtype_reason},
        "inputs": {w: [s.name for s in arch.graph(w).inputs(task)] for w in GRAPHS},
        "outputs": {w: [s.name for s in arch.graph(w).outputs(task)] for w in GRAPHS},
    }


# ----------------------------------------------------------------------------- validation
def _source(arch: Seq2Seq, batch: int, length: int, seed: int) -> dict[str, np.ndarray]:
    """Random encoder inputs: token ids with the last row's mask tail padded, or log-mel frames."""
    from gpcl_trt.exporter.tracing import make_dummy_inputs

    return make_dummy_inputs(arch.graph("encoder"), "", batch, length, seed=seed, encoder_sequence=length)


def validate_seq2seq(
    model: Any,
    arch: Seq2Seq,
    task: str,
    modules: dict[str, OnnxIOModule],
    folder: Path,
    atol: float,
    rtol: float,
    model_dir: Path | None = None,
) -> dict[str, Any]:
    """Each graph against PyTorch on sources of other shapes than the trace's: the encoder's
    outputs; the decoder's over two steps (a 3-token decoder prompt from an empty self-attention
    cache over the PyTorch encoder's cross KV, then one token over each side's own presents);
    then a greedy decode of ``GREEDY_TOKENS`` tokens by the ONNX graphs (generate/seq2seq.py)
    against transformers' ``generate(do_sample=False)``."""
    from gpcl_trt import tolerance
    from gpcl_trt.exporter.validate import _compare, _ort_failure, ort_runner, torch_runner

    fdtype = np.float16 if arch.dtype == "fp16" else np.float32
    rng = np.random.default_rng(1)
    out: dict[str, Any] = {}
    used: dict[str, float] = {}
    worst = 0.0
    for which in GRAPHS:
        out[which] = {"mode": "full", "checks": []}
    try:
        enc_ref, enc_ort = torch_runner(modules["encoder"]), ort_runner(folder / ENCODER_FILE, bounded=True)
        dec_ref, dec_ort = torch_runner(modules["decoder"]), ort_runner(folder / DECODER_FILE, bounded=True)
        for batch, length in VALIDATE_CASES:
            src = _source(arch, batch, length, seed=batch)
            ref, got = enc_ref(src), enc_ort(src)
            out["encoder"]["checks"].append(
                {"batch": batch, "encoder_sequence": length, "max_abs_diff": _compare(ref, got)}
            )
            for n, u in tolerance.used_by_outputs(ref, got, atol, rtol).items():
                used[f"encoder:{n}"] = max(used.get(f"encoder:{n}", 0.0), u)
            feeds = {"input_ids": rng.integers(0, arch.decoder_vocab, size=(batch, 3), dtype=np.int64)}
            if "attention_mask" in src:
                feeds["encoder_attention_mask"] = src["attention_mask"]
            for spec in arch.decoder_inputs():
                if SELF in spec.name.split("."):
                    feeds[spec.name] = np.zeros((batch, spec.axes[1], 0, spec.axes[3]), fdtype)
                elif spec.name.startswith("past_key_values."):
                    feeds[spec.name] = ref[spec.name.replace("past_key_values.", "present.", 1)]
            next_ids = rng.integers(0, arch.decoder_vocab, size=(batch, 1), dtype=np.int64)
            r1 = dec_ref(feeds)
            g1 = dec_ort(feeds)
            steps = [(r1, g1, {"step": "first", "sequence": 3, "past_sequence": 0})]
            f2r, f2g = dict(feeds, input_ids=next_ids), dict(feeds, input_ids=next_ids)
            for name in list(feeds):
                if SELF in name.split("."):
                    present = name.replace("past_key_values.", "present.", 1)
                    f2r[name], f2g[name] = r1[present], g1[present]
            steps.append((dec_ref(f2r), dec_ort(f2g), {"step": "next", "sequence": 1, "past_sequence": 3}))
            for r, g, meta in steps:
                out["decoder"]["checks"].append(
                    {"batch": batch, "encoder_sequence": length, **meta, "max_abs_diff": _compare(r, g)}
                )
                for n, u in tolerance.used_by_outputs(r, g, atol, rtol).items():
                    used[f"decoder:{n}"] = max(used.get(f"decoder:{n}", 0.0), u)
    except GpclError:
        raise
    except Exception as exc:  # ONNX Runtime's own failure types
        raise GpclError(
            f"validation: ONNX Runtime cannot run the exported graphs: {_ort_failure(exc)}; nothing was written"
        ) from None
    for which in GRAPHS:
        checks = out[which]["checks"]
        per_output = {n: max(c["max_abs_diff"][n] for c in checks) for n in checks[0]["max_abs_diff"]}
        mine = {k.split(":", 1)[1]: v for k, v in used.items() if k.startswith(which + ":")}
        out[which].update(
            {
                "per_output": per_output,
                "max_abs_diff": max(per_output.values()),
                "tolerance_used": max(mine.values()),
                "tolerance_used_per_output": mine,
                "passed": max(mine.values()) <= 1.0,
                "atol": atol,
                "rtol": rtol,
                "rule": tolerance.RULE,
            }
        )
        worst = max(worst, out[which]["tolerance_used"])
    greedy = greedy_check(model, arch, folder, model_dir)
    out["greedy"] = greedy
    passed = all(out[w]["passed"] for w in GRAPHS) and greedy["equal"]
    out["summary"] = {
        "mode": "full",
        "passed": passed,
        "atol": atol,
        "rtol": rtol,
        "tolerance_used": worst,
        "max_abs_diff": max(out[w]["max_abs_diff"] for w in GRAPHS),
        "greedy_equal": greedy["equal"],
    }
    out["passed"] = passed
    return out


def greedy_check(
    model: Any, arch: Seq2Seq, folder: Path, model_dir: Path | None, tokens: int = GREEDY_TOKENS
) -> dict[str, Any]:
    """The two ONNX graphs' greedy tokens (generate/seq2seq.py, the model's own generation
    rules) against transformers' ``generate(do_sample=False, num_beams=1)`` on a padded batch."""
    from gpcl_trt.generate.seq2seq import OrtSeq2SeqRuntime, decode_seq2seq, generation_rules

    rules = generation_rules(model_dir)
    src = _source(arch, 2, 7, seed=5)
    rt = OrtSeq2SeqRuntime(folder / ENCODER_FILE, folder / DECODER_FILE, verify=False)
    got = decode_seq2seq(rt, src, max_new_tokens=tokens, rules=rules)["array"]
    kw = {k: torch.from_numpy(v) for k, v in src.items()}
    if arch.dtype == "fp16" and "input_features" in kw:
        kw["input_features"] = kw["input_features"].half()
    speech = "input_features" in kw
    prompt = torch.tensor([rules["decoder_prompt"]] * got.shape[0], dtype=torch.long)
    if model_dir is not None and (model_dir / "generation_config.json").is_file():
        from transformers import GenerationConfig

        # a model built from its config (the lazy path) has the config's defaults, not the file's
        model.generation_config = GenerationConfig.from_pretrained(str(model_dir))
    neutral = {"no_repeat_ngram_size": 0, "repetition_penalty": 1.0, "min_length": 0, "length_penalty": 1.0}
    # Whisper's generate builds its own prompt (language detection, task, no-timestamps): ours is checked against it
    given = {} if speech else {"decoder_input_ids": prompt}
    reference = "transformers generate(do_sample=False, num_beams=1)"
    try:
        with torch.no_grad():
            ref = model.generate(
                **kw, **given, do_sample=False, num_beams=1, max_new_tokens=tokens, **neutral
            ).numpy()  # fmt: skip
    except Exception as exc:  # transformers' own failure (5.25: a T5 with more decoder than encoder layers)
        if speech:
            raise
        reference = f"PyTorch forward without a cache, step by step (transformers' generate failed: {one_line(exc)})"
        ref = _torch_greedy(model, kw, prompt, tokens, rules)
    if not speech and ref.shape[1] > prompt.shape[1] and np.array_equal(ref[:, : prompt.shape[1]], prompt.numpy()):
        ref = ref[:, prompt.shape[1] :]  # text models return the prompt too, Whisper does not
    # each row up to its first EOS (Whisper's generate drops the EOS, the others pad after it)
    eos = set(rules["eos_ids"])
    cut = lambda row: next((list(row[:i]) for i, t in enumerate(row) if t in eos), list(row))  # noqa: E731
    mine, theirs = [cut(r.tolist()) for r in got], [cut(r.tolist()) for r in ref]
    return {
        "tokens": int(got.shape[1]),
        "equal": mine == theirs,
        "onnx": mine,
        "transformers": theirs,
        "reference": reference,
        "decoder_prompt": rules["decoder_prompt"],
        "detect_language": bool(rules.get("detect_language")),
    }


def _torch_greedy(model: Any, src: dict, prompt: torch.Tensor, tokens: int, rules: dict) -> np.ndarray:
    """Greedy tokens by the PyTorch model's full forward at every step (no cache), with the same
    generation rules and padding after EOS as ``generate``."""
    from gpcl_trt.generate.seq2seq import _apply_rules

    eos, pad = set(rules.get("eos_ids") or ()), int(rules.get("pad_id") or 0)
    ids, done, rows = prompt.clone(), np.zeros(prompt.shape[0], bool), []
    mask = {"attention_mask": src["attention_mask"]} if "attention_mask" in src else {}
    with torch.no_grad():
        enc = model.get_encoder()(**src, return_dict=True).last_hidden_state
        for step in range(tokens):
            logits = model(encoder_outputs=(enc,), decoder_input_ids=ids, use_cache=False, **mask).logits[:, -1]
            x = _apply_rules(logits.float().numpy(), rules, step, step + 1 == tokens)
            nxt = np.where(done, pad, np.argmax(x, axis=-1)).astype(np.int64)
            rows.append(nxt)
            done |= np.isin(nxt, list(eos))
            if done.all():
                break
            ids = torch.cat([ids, torch.from_numpy(nxt)[:, None]], dim=1)
    return np.stack(rows, axis=1)
