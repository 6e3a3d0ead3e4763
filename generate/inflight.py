"""In-flight batching over one ONNX Runtime decoder, for a server: requests arrive at any time,
each is prefilled alone and joins the running batch at the next step; a finished or cancelled
request leaves it; requests beyond ``capacity`` wait in a queue (none is dropped).

One background thread owns the batch: the KV cache (``present.*`` OrtValues bound back as the
next step's ``past_key_values.*``, as ``OrtRuntime`` does), the attention mask and each row's
next position. Rows are left-padded to the batch's longest sequence: a row that joins shorter
gets masked columns in front of its cache, a longer one pads every other row the same way, and
columns no row uses any more are trimmed when rows leave. Joining and leaving copy the cache
once through numpy (concatenate / take); an ordinary step does not.

Each row picks its tokens exactly as the generation loop does for a batch of one (``pick`` with
its own seeded Generator), and the runtime-independent rules follow ``loop.decode``: EOS ids,
stop strings (``TextStream``), the token budget, the model's last position, and the re-prefill
rule (a row whose sequence first passes ``reprefill_at`` is prefilled again, alone, and rejoins).
Needs a model that reads ``position_ids`` (left padding shifts positions otherwise) and has no
re-prefill rule (Phi-3's LongRoPE switches factors for the whole batch); otherwise the capacity
is 1 (requests are served one at a time, the rule followed per request).

``Seq2SeqQueue`` serves an encoder-decoder export (``generate.seq2seq.OrtSeq2SeqRuntime``) through the
same ``submit`` / ``emit`` contract, one request at a time in arrival order (the others wait): its
decoder graph takes no decoder attention mask, so rows that joined at different steps cannot be
left-padded into one self-attention cache, and the cross KV would need padding over the source
length too. Each request: the encoder once, then the decoder prompt and one token per step, the
model's generation rules applied as ``decode_seq2seq`` applies them.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from gpcl_trt.common import GpclError, one_line
from gpcl_trt.feeds import ATTENTION_MASK, INPUT_IDS, POSITION_IDS
from gpcl_trt.generate.detok import TextStream
from gpcl_trt.generate.loop import Sampling, pick
from gpcl_trt.generate.runtimes import LOGITS

# emit(piece, final, finish, error): a stable text piece ('' allowed); final once per request with
# finish in eos / stop / length / cancelled, or error (a one-line message) instead. A request
# submitted with ``details`` also gets ``tokens=`` (the ids picked since its previous emit) and,
# with ``log_probs``, ``log_probs=`` (each one's log-probability under the model's logits).
Emit = Callable[..., None]


@dataclass
class _Row:
    prompt: list[int]
    budget: int
    sampling: Sampling
    eos: set[int]
    stream: TextStream
    emit: Emit
    cancelled: Callable[[], bool]
    bad: list[list[int]] = field(default_factory=list)  # banned token sequences (bad_words)
    details: bool = False
    log_probs: bool = False
    rng: np.random.Generator = field(init=False)
    tokens: list[int] = field(default_factory=list)
    token_log_probs: list[float] = field(default_factory=list)
    emitted: int = 0  # tokens already handed to emit (details)
    source: Any = None  # Seq2SeqQueue: the encoder's inputs
    state: Any = None  # Seq2SeqQueue: the decoder's binding and self-attention cache

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.sampling.seed)

    @property
    def ids(self) -> list[int]:
        return self.prompt + self.tokens


class InflightBatcher:
    """``submit`` a prompt from any thread; its text comes back through ``emit`` from the
    batcher's thread. ``settings``: ``generate.api.model_settings`` (EOS ids, positions, rule)."""

    def __init__(self, runtime: Any, tokenizer: Any, settings: dict, capacity: int = 8):
        if capacity < 1:
            raise GpclError(f"capacity must be >= 1, got {capacity}")
        self.rt = runtime
        self.tok = tokenizer
        self.settings = settings
        # One row at a time where rows cannot share a step: without position_ids, and under a
        # re-prefill rule (LongRoPE picks its factors from the batch's longest position, so a short
        # row next to a long one would get the long factors: measured on Phi-3)
        self.capacity = capacity if runtime.takes_positions and settings.get("reprefill_at") is None else 1
        self.pending: collections.deque[_Row] = collections.deque()
        self.rows: list[_Row] = []
        self.cache: dict[str, Any] | None = None
        self.mask: np.ndarray | None = None  # [rows, cached columns]
        self._seq_axis = {s.name: self._sequence_axis(s) for s in runtime.past}
        self.stats = {"steps": 0, "row_steps": 0, "max_rows": 0, "admitted": 0, "cancelled": 0}
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="gpcl-inflight", daemon=True)
        self._thread.start()

    @staticmethod
    def _sequence_axis(spec: Any) -> int:
        named = [i for i, d in enumerate(spec.dims) if i > 0 and not isinstance(d, int)]
        return named[0] if named else 2

    # ------------------------------------------------------------------ requests
    def submit(
        self,
        text: str,
        emit: Emit,
        *,
        max_tokens: int,
        sampling: Sampling = Sampling(),
        stop: Sequence[str] = (),
        eos_ids: Sequence[int] | None = None,
        cancelled: Callable[[], bool] = lambda: False,
        bad_words: Sequence[str] = (),
        details: bool = False,
        log_probs: bool = False,
    ) -> None:
        """Queue one request; bad input raises GpclError here, before anything is queued.
        ``bad_words``: texts whose token sequences are never completed (TensorRT-LLM's rule: the
        last token of a word is banned where the tokens before it were just generated)."""
        if not isinstance(text, str) or not text:
            raise GpclError("text_input must be a non-empty string")
        if int(max_tokens) < 1:
            raise GpclError(f"max_tokens must be >= 1, got {max_tokens}")
        sampling = sampling.check()
        prompt = [int(t) for t in self.tok(text)["input_ids"]]
        if not prompt:
            raise GpclError("text_input encodes to no token")
        limit = self.settings.get("max_positions")
        if limit is not None and len(prompt) >= limit:
            raise GpclError(f"text_input has {len(prompt)} tokens: the model has {limit} positions")
        budget = min(int(max_tokens), limit - len(prompt)) if limit is not None else int(max_tokens)
        eos = set(self.settings.get("eos_ids", ())) if eos_ids is None else {int(e) for e in eos_ids}
        bad = self._bad_words(bad_words)
        row = _Row(prompt, budget, sampling, eos, TextStream(self.tok, stop), emit, cancelled, bad, details, log_probs)
        self._enqueue(row)

    def _bad_words(self, words: Sequence[str]) -> list[list[int]]:
        bad = [[int(t) for t in self.tok(w, add_special_tokens=False)["input_ids"]] for w in words if w]
        if any(not ids for ids in bad):
            raise GpclError("a bad word encodes to no token")
        return bad

    def _enqueue(self, row: _Row) -> None:
        with self._cond:
            if self._closed:
                raise GpclError("the batcher is closed")
            self.pending.append(row)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ the batch thread
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self.pending and not self.rows:
                    self._cond.wait()
                if self._closed:
                    break
            try:
                self._drop_cancelled()
                self._admit()
                if self.rows:
                    self._step()
            except Exception as exc:  # a runtime failure ends the running requests, not the thread
                message = one_line(exc)
                for row in self.rows:
                    self._send(row, "", True, None, message)
                self.rows, self.cache, self.mask = [], None, None
        for row in [*self.rows, *self.pending]:
            self._send(row, "", True, None, "the server is shutting down")

    @staticmethod
    def _send(row: _Row, piece: str, final: bool, finish: str | None, error: str | None = None) -> None:
        extra: dict[str, Any] = {}
        if row.details and error is None:
            extra["tokens"] = row.tokens[row.emitted :]
            if row.log_probs:
                extra["log_probs"] = row.token_log_probs[row.emitted :]
            row.emitted = len(row.tokens)
        try:
            row.emit(piece, final, finish, error, **extra)
        except Exception:  # a client that is gone: its row is dropped at the next check
            row.cancelled = lambda: True

    def _is_cancelled(self, row: _Row) -> bool:
        try:
            return bool(row.cancelled())
        except Exception:
            return True

    def _drop_cancelled(self) -> None:
        gone = [i for i, row in enumerate(self.rows) if self._is_cancelled(row)]
        if gone:
            self.stats["cancelled"] += len(gone)
            self._leave(gone)
        with self._cond:
            waiting = [r for r in self.pending if self._is_cancelled(r)]
            for r in waiting:
                self.pending.remove(r)
            self.stats["cancelled"] += len(waiting)

    def _admit(self) -> None:
        while len(self.rows) < self.capacity:
            with self._cond:
                if not self.pending:
                    return
                row = self.pending.popleft()
            self.stats["admitted"] += 1
            self._join(row, row.ids)

    def _join(self, row: _Row, ids: list[int]) -> None:
        """Prefill ``ids`` alone, take the row's next token and, unless it is done, merge its cache
        into the batch."""
        n = len(ids)
        logits, cache = self._run(
            np.array([ids], np.int64), np.ones((1, n), np.int64), np.arange(n, dtype=np.int64)[None], None
        )
        if self._take(row, logits[0]):
            return
        if not self.rows:
            self.rows, self.cache, self.mask = [row], cache, np.ones((1, n), np.int64)
            return
        width = max(n, self.mask.shape[1])
        merged = {}
        for name, axis in self._seq_axis.items():
            a = self._left_pad(self.cache[name].numpy(), width, axis)
            b = self._left_pad(cache[name].numpy(), width, axis)
            merged[name] = self._ortvalue(np.concatenate([a, b], axis=0))
        mask = np.concatenate(
            [self._left_pad(self.mask, width, 1), self._left_pad(np.ones((1, n), np.int64), width, 1)], axis=0
        )
        self.rows, self.cache, self.mask = [*self.rows, row], merged, mask

    def _leave(self, gone: Sequence[int]) -> None:
        keep = [i for i in range(len(self.rows)) if i not in set(gone)]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache, self.mask = None, None
            return
        mask = self.mask[keep]
        start = int(np.argmax(mask.any(axis=0)))  # columns every remaining row masks: dropped
        cache = {}
        for name, axis in self._seq_axis.items():
            arr = np.take(self.cache[name].numpy(), keep, axis=0)
            cache[name] = self._ortvalue(np.take(arr, range(start, arr.shape[axis]), axis=axis))
        self.cache, self.mask = cache, np.ascontiguousarray(mask[:, start:])

    def _step(self) -> None:
        rule = self.settings.get("reprefill_at")
        if rule is not None:
            again = [i for i, row in enumerate(self.rows) if len(row.ids) == rule + 1]
            if again:  # the model's rule: these rows are prefilled again, alone, and rejoin
                rows = [self.rows[i] for i in again]
                self._leave(again)
                for row in rows:
                    self._join(row, row.ids[:-1] + [row.tokens[-1]])
                if not self.rows:
                    return
        rows = len(self.rows)
        ids = np.array([[row.tokens[-1]] for row in self.rows], np.int64)
        pos = np.array([[len(row.ids) - 1] for row in self.rows], np.int64)
        mask = np.concatenate([self.mask, np.ones((rows, 1), np.int64)], axis=1)
        logits, self.cache = self._run(ids, mask, pos, self.cache)
        self.mask = mask
        self.stats["steps"] += 1
        self.stats["row_steps"] += rows
        self.stats["max_rows"] = max(self.stats["max_rows"], rows)
        done = [r for r, row in enumerate(self.rows) if self._take(row, logits[r])]
        if done:
            self._leave(done)

    def _take(self, row: _Row, logits: np.ndarray) -> bool:
        """Pick the row's next token and send its text; True when the row is done."""
        if row.bad:
            ids = row.ids
            n = len(ids)
            banned = [w[-1] for w in row.bad if len(w) == 1 or (n >= len(w) - 1 and ids[n - len(w) + 1 :] == w[:-1])]
            if banned:
                logits = logits.copy()
                logits[banned] = -np.inf
        t = int(pick(logits[None], row.sampling, row.rng)[0])
        row.tokens.append(t)
        if row.log_probs:
            x = np.asarray(logits, np.float64)
            m = x[np.isfinite(x)].max()
            row.token_log_probs.append(float(x[t] - m - np.log(np.exp(x - m).sum())))
        finish = None
        if t in row.eos:
            finish = "eos"
        elif row.stream.add(t):
            finish = "stop"
        elif len(row.tokens) >= row.budget:
            finish = "length"
        if finish is None:
            piece = row.stream.pending()
            if piece:
                self._send(row, piece, False, None)
            return False
        row.stream.finish()
        self._send(row, row.stream.pending(), True, finish)
        return True

    # ------------------------------------------------------------------ ONNX Runtime
    @staticmethod
    def _left_pad(arr: np.ndarray, width: int, axis: int) -> np.ndarray:
        extra = width - arr.shape[axis]
        if extra <= 0:
            return arr
        pad = [(0, 0)] * arr.ndim
        pad[axis] = (extra, 0)
        return np.pad(arr, pad)

    @staticmethod
    def _ortvalue(arr: np.ndarray) -> Any:
        import onnxruntime as ort

        # the OrtValue wrapper keeps a reference to the numpy buffer it reads
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr))

    def _run(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, cache: dict | None) -> tuple[np.ndarray, dict]:
        rt = self.rt
        binding = rt.session.io_binding()
        keep = []
        for name, value in ((INPUT_IDS, ids), (ATTENTION_MASK, mask), (POSITION_IDS, pos)):
            if name in rt.inputs:
                arr = np.ascontiguousarray(value, rt.inputs[name].dtype)
                keep.append(arr)
                binding.bind_cpu_input(name, arr)
        for spec in rt.past:
            if cache is None:
                arr = rt._empty_past(spec, ids.shape[0])
                keep.append(arr)
                binding.bind_cpu_input(spec.name, arr)
            else:
                binding.bind_ortvalue_input(spec.name, cache[spec.name])
        for name in rt.outputs:
            binding.bind_output(name, "cpu")
        rt.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        assert rt.outputs[0] == LOGITS
        new_cache = {spec.name: values[1 + i] for i, spec in enumerate(rt.past)}
        return np.asarray(values[0].numpy()[:, -1, :], np.float32), new_cache


class Seq2SeqQueue(InflightBatcher):
    """Encoder-decoder generation behind ``InflightBatcher``'s interface: ``submit(text, emit, ...)``
    or, for a speech model, ``submit(None, emit, audio=samples, ...)`` (float32 mono samples at the
    feature extractor's rate). Capacity 1: requests are decoded one after the other."""

    def __init__(self, runtime: Any, tokenizer: Any, rules: dict, feature_extractor: Any = None):
        self.rt = runtime
        self.tok = tokenizer
        self.rules = rules
        self.fx = feature_extractor
        self.settings = {"eos_ids": rules.get("eos_ids") or [], "max_positions": rules.get("max_positions")}
        self.capacity = 1
        self.pending = collections.deque()
        self.rows = []
        self.cache, self.mask = None, None
        self.stats = {"steps": 0, "row_steps": 0, "max_rows": 0, "admitted": 0, "cancelled": 0}
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="gpcl-seq2seq", daemon=True)
        self._thread.start()

    def submit(
        self,
        text: str | None,
        emit: Emit,
        *,
        max_tokens: int,
        sampling: Sampling = Sampling(),
        stop: Sequence[str] = (),
        eos_ids: Sequence[int] | None = None,
        cancelled: Callable[[], bool] = lambda: False,
        bad_words: Sequence[str] = (),
        details: bool = False,
        log_probs: bool = False,
        audio: np.ndarray | None = None,
    ) -> None:
        if int(max_tokens) < 1:
            raise GpclError(f"max_tokens must be >= 1, got {max_tokens}")
        sampling = sampling.check()
        if self.rt.speech:
            if text:
                raise GpclError("a speech model takes audio (float32 samples), not text_input")
            samples = np.asarray(audio if audio is not None else [], np.float32).reshape(-1)
            if samples.size == 0:
                raise GpclError("audio must hold at least one sample (float32, mono, at the model's sampling rate)")
            if not np.isfinite(samples).all():
                raise GpclError("audio holds a value that is not finite")
            rate = int(self.fx.sampling_rate)
            feats = self.fx([samples], sampling_rate=rate, return_tensors="np")["input_features"]
            source = {"input_features": np.asarray(feats, np.float32)}
        else:
            if audio is not None:
                raise GpclError("audio: this is a text encoder-decoder; give text_input")
            if not isinstance(text, str) or not text:
                raise GpclError("text_input must be a non-empty string")
            enc = self.tok([text], return_tensors="np")
            ids = enc["input_ids"].astype(np.int64)
            if ids.shape[1] == 0:
                raise GpclError("text_input encodes to no token")
            source = {"input_ids": ids, "attention_mask": enc["attention_mask"].astype(np.int64)}
        prompt = [int(t) for t in self.rules["decoder_prompt"]]
        limit = self.settings.get("max_positions")
        budget = min(int(max_tokens), limit - len(prompt)) if limit else int(max_tokens)
        if budget < 1:
            raise GpclError(f"the model has {limit} decoder positions")
        eos = set(self.settings["eos_ids"]) if eos_ids is None else {int(e) for e in eos_ids}
        bad = self._bad_words(bad_words)
        row = _Row(prompt, budget, sampling, eos, TextStream(self.tok, stop), emit, cancelled, bad, details, log_probs)
        row.source = source
        self._enqueue(row)

    def _logits(self, row: _Row, ids: list[int]) -> np.ndarray:
        from gpcl_trt.generate.seq2seq import _apply_rules

        step = len(row.tokens)
        logits = self.rt.step(row.state, np.array([ids], np.int64))
        return _apply_rules(logits, self.rules, step, step + 1 == row.budget)[0]

    def _join(self, row: _Row, ids: list[int]) -> None:
        cross = self.rt.encode(row.source)
        row.state = self.rt.start(cross, row.source.get("attention_mask"), 1)
        if self.rules.get("detect_language") and -1 in ids:  # Whisper without a set language
            from gpcl_trt.generate.seq2seq import detect_language

            full, rest = detect_language(self.rt, row.state, self.rules, np.array([ids], np.int64))
            row.prompt, ids = full[0].tolist(), rest[0].tolist()
        if not self._take(row, self._logits(row, ids)):
            self.rows = [row]

    def _leave(self, gone: Sequence[int]) -> None:
        self.rows = [r for i, r in enumerate(self.rows) if i not in set(gone)]

    def _step(self) -> None:
        row = self.rows[0]
        logits = self._logits(row, [row.tokens[-1]])
        self.stats["steps"] += 1
        self.stats["row_steps"] += 1
        self.stats["max_rows"] = 1
        if self._take(row, logits):
            self._leave([0])
