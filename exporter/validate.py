"""Check an exported model against the PyTorch module it came from, with ONNX Runtime.

Runners share one calling convention, ``run(feeds: dict[str, np.ndarray]) -> dict[str,
np.ndarray]`` keyed by ONNX names, so the same decode loop drives PyTorch and ONNX Runtime.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]

# (batch, sequence) pairs, both different from the trace shape; batch 1 catches a size-1
# specialisation, the other a baked-in batch or length.
VALIDATE_SHAPES = ((3, 11), (1, 5))


def torch_runner(module: Any) -> Runner:
    import torch

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            outs = module(**feeds)
        return {n: o.detach().cpu().numpy() for n, o in zip(module.output_names, outs)}

    return run


def ort_runner(onnx_path: str | os.PathLike, providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> Runner:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), opts, providers=list(providers))
    names = [o.name for o in sess.get_outputs()]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, sess.run(names, feeds)))

    return run


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Max |a - b| in float64; inf when shapes differ or only one side is non-finite."""
    if a.shape != b.shape:
        return float("inf")
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    if not np.array_equal(np.isfinite(a64), np.isfinite(b64)):
        return float("inf")
    fin = np.isfinite(a64)
    return float(np.max(np.abs(a64[fin] - b64[fin]), initial=0.0))


def _compare(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, float]:
    return {n: max_abs_diff(ref[n], got[n]) for n in ref}


def _past_names(arch: Any, task: str) -> list[str]:
    return [s.name for s in arch.inputs(task) if s.name.startswith("past_key_values.")]


def next_step_feeds(arch: Any, task: str, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray], next_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds for the next decode step: ``next_ids`` (batch, 1) appended. With past, the step
    sees only the new token and the presents; without, the whole sequence is run again."""
    batch = next_ids.shape[0]
    past = _past_names(arch, task)
    if not past:
        new = {"input_ids": np.concatenate([feeds["input_ids"], next_ids], axis=1)}
        new["attention_mask"] = np.concatenate([feeds["attention_mask"], np.ones((batch, 1), np.int64)], axis=1)
        if "position_ids" in feeds:
            total = new["input_ids"].shape[1]
            new["position_ids"] = np.broadcast_to(np.arange(total, dtype=np.int64), (batch, total)).copy()
        return new
    total = feeds["attention_mask"].shape[1]
    new = {"input_ids": next_ids.astype(np.int64)}
    new["attention_mask"] = np.concatenate([feeds["attention_mask"], np.ones((batch, 1), np.int64)], axis=1)
    if "position_ids" in feeds:
        new["position_ids"] = np.full((batch, 1), total, dtype=np.int64)
    for name in past:
        new[name] = outputs[name.replace("past_key_values.", "present.", 1)]
    return new


def prefill_feeds(arch: Any, task: str, input_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds for the first step of a decode: the prompt, a full mask, and empty past tensors."""
    batch, seq = input_ids.shape
    fdtype = np.float16 if getattr(arch, "dtype", "fp32") == "fp16" else np.float32
    feeds: dict[str, np.ndarray] = {}
    for spec in arch.inputs(task):
        if spec.name == "input_ids":
            feeds[spec.name] = input_ids.astype(np.int64)
        elif spec.name == "attention_mask":
            feeds[spec.name] = np.ones((batch, seq), np.int64)
        elif spec.name == "position_ids":
            feeds[spec.name] = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
        elif spec.name == "token_type_ids":
            feeds[spec.name] = np.zeros((batch, seq), np.int64)
        else:  # past: zero length along the past_sequence axis
            shape = tuple(0 if a == "past_sequence" else batch if a == "batch" else a for a in spec.axes)
            feeds[spec.name] = np.zeros(shape, fdtype)
    return feeds


def greedy_decode(run: Runner, arch: Any, task: str, input_ids: np.ndarray, steps: int) -> np.ndarray:
    """Greedy tokens (batch, steps) from any runner of a text-generation(-with-past) model."""
    feeds = prefill_feeds(arch, task, input_ids)
    tokens = []
    for i in range(steps):
        outs = run(feeds)
        next_ids = np.argmax(outs["logits"][:, -1, :].astype(np.float32), axis=-1).astype(np.int64)[:, None]
        tokens.append(next_ids)
        if i + 1 < steps:
            feeds = next_step_feeds(arch, task, feeds, outs, next_ids)
    return np.concatenate(tokens, axis=1)


def validate_export(module: Any, arch: Any, task: str, onnx_path: str | os.PathLike, atol: float, seed: int = 1) -> dict[str, Any]:
    """PyTorch vs ONNX Runtime on fresh inputs of shapes other than the trace shape. With past,
    a two-step decode (prefill from an empty cache, then one token fed each side's own presents).
    Returns per-output max abs diff (worst over all checks), the checks, and ``passed``."""
    from gpcl_trt.exporter.api import make_dummy_inputs

    ref_run, ort_run = torch_runner(module), ort_runner(onnx_path)
    with_past = bool(_past_names(arch, task))
    checks: list[dict[str, Any]] = []
    rng = np.random.default_rng(seed)
    for batch, seq in VALIDATE_SHAPES:
        feeds = make_dummy_inputs(arch, task, batch, seq, seed=seed, past=0 if with_past else None)
        ref, got = ref_run(feeds), ort_run(feeds)
        checks.append({"batch": batch, "sequence": seq, "step": "prefill" if with_past else "full", "max_abs_diff": _compare(ref, got)})
        if with_past:
            next_ids = rng.integers(0, arch.vocab_size, size=(batch, 1), dtype=np.int64)
            ref2 = ref_run(next_step_feeds(arch, task, feeds, ref, next_ids))
            got2 = ort_run(next_step_feeds(arch, task, feeds, got, next_ids))
            checks.append({"batch": batch, "sequence": 1, "past_sequence": seq, "step": "decode", "max_abs_diff": _compare(ref2, got2)})
    per_output = {n: max(c["max_abs_diff"][n] for c in checks) for n in module.output_names}
    worst = max(per_output.values())
    return {
        "passed": bool(worst <= atol),
        "atol": atol,
        "max_abs_diff": worst,
        "per_output": per_output,
        "checks": checks,
        "runtime": "onnxruntime CPUExecutionProvider",
    }
