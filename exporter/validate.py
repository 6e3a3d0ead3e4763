"""Check an exported model against the PyTorch module it came from, with ONNX Runtime.

Runners share one calling convention, ``run(feeds: dict[str, np.ndarray]) -> dict[str,
np.ndarray]`` keyed by ONNX names, so the same decode loop drives PyTorch and ONNX Runtime.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gpcl_trt import tolerance
from gpcl_trt.common import GpclError, one_line
from gpcl_trt.feeds import is_past, max_abs_diff, ort_options

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


def ort_runner(
    onnx_path: str | os.PathLike, providers: tuple[str, ...] = ("CPUExecutionProvider",), bounded: bool = False
) -> Runner:
    import onnxruntime as ort

    opts = ort_options(bounded)
    opts.log_severity_level = 4  # fatal only: a failure is reported once, in our one line, not also by ORT's logger
    try:
        sess = ort.InferenceSession(str(onnx_path), opts, providers=list(providers))
    except Exception as exc:  # ONNX Runtime's own failure types (NotImplemented, Fail, ...)
        raise _LoadFailed(exc, "one session over the whole model") from exc
    names = [o.name for o in sess.get_outputs()]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, sess.run(names, feeds)))

    return run


def _compare(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, float]:
    return {n: max_abs_diff(ref[n], got[n]) for n in ref}


def _past_names(arch: Any, task: str) -> list[str]:
    return [s.name for s in arch.inputs(task) if is_past(s.name)]


def next_step_feeds(
    arch: Any, task: str, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray], next_ids: np.ndarray
) -> dict[str, np.ndarray]:
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


# ----------------------------------------------------------------------------- planning
TRANSIENT_FACTOR = 3  # the largest weight, transposed or cast to fp32 for one node, plus its source
OVERHEAD = 512 << 20  # activations of the validation shapes, runtimes, Python


def weight_sizes(onnx_path: str | os.PathLike) -> dict[str, int]:
    """Bytes of every initializer of the model, from the graph alone (external lengths)."""
    from gpcl_trt.common import load_onnx

    model = load_onnx(onnx_path, external_data=False)
    sizes = {}
    for t in model.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        if "length" in ext:
            sizes[t.name] = int(ext["length"])
        else:
            sizes[t.name] = len(t.raw_data) or int(np.prod(t.dims)) * 4
    return sizes


def plan_validation(onnx_path: str | os.PathLike, mode: str, budget: int) -> dict[str, Any]:
    """Which validation runs. Both modes keep the weights out of anonymous memory (PyTorch and
    ONNX Runtime read them from file mappings); what differs is how much of them must be resident
    at once: ``full`` runs the whole model per check (all weights mapped, plus the transient copy
    of the largest one), ``layers`` one block at a time for every check together (one block's
    weights). ``auto``: full when its estimate fits ``budget``, else layers. Returns mode, reason
    and the estimates in bytes."""
    sizes = weight_sizes(onnx_path)
    total = sum(sizes.values())
    largest = max(sizes.values(), default=0)
    estimate = {"full": total + TRANSIENT_FACTOR * largest + OVERHEAD, "weights": total, "largest_tensor": largest}
    if mode != "auto":
        return {"mode": mode, "reason": "requested", "estimate": estimate}
    if estimate["full"] <= budget:
        return {
            "mode": "full",
            "reason": f"estimate {estimate['full'] / 1e9:.2f} GB fits the {budget / 1e9:.2f} GB budget",
            "estimate": estimate,
        }
    return {
        "mode": "layers",
        "reason": f"full needs ~{estimate['full'] / 1e9:.2f} GB, over the {budget / 1e9:.2f} GB budget",
        "estimate": estimate,
    }


# ----------------------------------------------------------------------------- block by block
class SegmentedRunner:
    """ONNX Runtime over the model one block at a time: the nodes are split by the block index in
    their name scopes (``pkg.torch.onnx.name_scopes``: model.layers.3...), nodes outside any block
    go with their latest producer (embedding, masks and rotary tables before the first block; the
    final norm and the head with the last block). Each segment is its own session over the same external data,
    created, run for every pending feed, and dropped before the next, so at most one block's
    weights are resident. ``run_many(list of feeds) -> list of outputs``."""

    def __init__(self, onnx_path: str | os.PathLike):
        from gpcl_trt.common import load_onnx

        self.path = Path(onnx_path)
        self.model = load_onnx(self.path, external_data=False)
        self.segments = self._split()

    def _split(self) -> list[list[Any]]:
        from gpcl_trt.gpcl import SCOPES_KEY, layer_of, parse_scopes

        graph = self.model.graph
        producer_seg: dict[str, int] = {}
        keyed: list[tuple[int, int, Any]] = []
        for idx, node in enumerate(graph.node):
            scopes = next((parse_scopes(p.value) for p in node.metadata_props if p.key == SCOPES_KEY), [])
            layer = layer_of(*reversed(scopes)) if scopes else None
            deps = [producer_seg[x] for x in node.input if x in producer_seg]
            if layer is not None:
                key = layer + 1
                if any(d > key for d in deps):
                    raise ValueError(
                        f"node {node.name} of block {layer} reads a later block; the graph is not sequential"
                    )
            else:  # with its latest producer: masks and rotary tables first, final norm and head with the last block
                key = max(deps, default=0)
            for o in node.output:
                producer_seg[o] = key
            keyed.append((key, idx, node))
        order = sorted({k for k, _, _ in keyed})
        return [[n for k, _, n in sorted(keyed, key=lambda t: t[1]) if k == key] for key in order]

    def _segment_bytes(self, nodes: list[Any], needed_later: set[str]) -> tuple[bytes, list[str], list[str]]:
        import onnx
        from onnx import helper

        g = self.model.graph
        inits = {t.name: t for t in g.initializer}
        vinfo = {v.name: v for v in list(g.value_info) + list(g.input) + list(g.output)}
        produced = {o for n in nodes for o in n.output if o}
        consumed = [x for n in nodes for x in n.input if x]
        inputs = list(dict.fromkeys(x for x in consumed if x not in produced and x not in inits))
        outputs = [o for n in nodes for o in n.output if o and o in needed_later]

        def info(name: str) -> Any:
            if name in vinfo:
                return vinfo[name]
            return helper.make_value_info(name, onnx.TypeProto())

        seg = helper.make_graph(
            nodes,
            "segment",
            [info(x) for x in inputs],
            [info(o) for o in outputs],
            [inits[x] for x in dict.fromkeys(consumed) if x in inits],
        )
        m = helper.make_model(seg, opset_imports=list(self.model.opset_import), ir_version=self.model.ir_version)
        m.functions.extend(self.model.functions)
        return m.SerializeToString(), inputs, outputs

    def run_many(self, feeds_list: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        from gpcl_trt.exporter.lazy import byte_progress

        graph_outputs = [o.name for o in self.model.graph.output]
        later: list[set[str]] = []
        need: set[str] = set(graph_outputs)
        for nodes in reversed(self.segments):  # what each segment must hand on
            later.append(set(need))
            need |= {x for n in nodes for x in n.input if x}
        later.reverse()

        inits = {t.name: t for t in self.model.graph.initializer}

        def nbytes(nodes: list[Any]) -> int:
            names = {x for n in nodes for x in n.input if x in inits}
            return sum(
                int({e.key: e.value for e in inits[x].external_data}.get("length", len(inits[x].raw_data)))
                for x in names
            )

        sizes = [nbytes(nodes) for nodes in self.segments]
        values = [dict(f) for f in feeds_list]
        with byte_progress(
            f"ONNX Runtime block by block ({len(self.segments)} segments, {len(feeds_list)} inputs)", sum(sizes)
        ) as advance:
            for i, nodes in enumerate(self.segments):
                self._run_segment(i, nodes, later, values, feeds_list)
                advance(sizes[i])
        return [{o: v[o] for o in graph_outputs} for v in values]

    def _run_segment(
        self, i: int, nodes: list[Any], later: list[set[str]], values: list[dict], feeds_list: list[dict]
    ) -> None:
        data, inputs, outputs = self._segment_bytes(nodes, later[i])
        opts = ort_options(bounded=True)
        opts.log_severity_level = 4  # fatal only, as in ort_runner
        opts.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(self.path.parent.resolve())
        )
        sess = _session(data, opts, f"segment {i + 1} of {len(self.segments)}")
        for v in values:
            res = sess.run(outputs, {x: v[x] for x in inputs})
            v.update(zip(outputs, res))
            for x in list(v):  # drop what no later segment reads
                if x not in later[i] and x not in feeds_list[0]:
                    del v[x]
        del sess


# ----------------------------------------------------------------------------- validation
class _LoadFailed(Exception):
    """ONNX Runtime refused to create a session (the whole model, or one segment of it)."""

    def __init__(self, cause: BaseException, what: str):
        super().__init__(what)
        self.cause, self.what = cause, what


def _session(model: Any, opts: Any, what: str) -> Any:
    import onnxruntime as ort

    try:
        return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ONNX Runtime's own failure types (NotImplemented, Fail, ...)
        raise _LoadFailed(exc, what) from exc


def _ort_failure(exc: BaseException) -> str:
    """ONNX Runtime's status code, the node and the reason from its error, without its source
    location: ``NOT_IMPLEMENTED: Could not find an implementation for MatMul(13) node ...``."""
    text = one_line(exc, limit=4000)
    m = re.match(r"\[ONNXRuntimeError\] : \d+ : (\w+) : (.*)", text)
    code, text = (m.group(1), m.group(2)) if m else (type(exc).__name__, text)
    node = re.search(r"Name:'([^']*)'", text)
    if "Status Message:" in text:
        text = text.split("Status Message:", 1)[1].strip()
    if " was false. " in text:  # an ORT_ENFORCE: the condition's source location, then the reason
        text = text.rsplit(" was false. ", 1)[1]
    text = re.sub(r"^/\S+:\d+ \S+?\(.*?\) ", "", text)  # a leading source location
    where = f"node {node.group(1)}: " if node and node.group(1) else ""
    return f"{code}: {where}{text}"[:300]


_SHAPE_WORDS = re.compile(r"shape|broadcast|dimension", re.IGNORECASE)


def validate_export(
    module: Any,
    arch: Any,
    task: str,
    onnx_path: str | os.PathLike,
    atol: float,
    seed: int = 1,
    mode: str = "full",
    rtol: float = 0.0,
) -> dict[str, Any]:
    """PyTorch vs ONNX Runtime on fresh inputs of shapes other than the trace shape. With past,
    a two-step decode (prefill from an empty cache, then one token fed each side's own presents).
    PyTorch runs first and its outputs are kept as the golden reference, so the two never hold
    their working sets at once. ``mode``: ``full`` (one bounded ONNX Runtime session over the
    whole model) or ``layers`` (SegmentedRunner: block by block, all checks per block).
    Returns per-output max abs diff (worst over all checks), the checks, ``passed`` and ``mode``.
    Passes when every element of every output has |torch - onnx| <= max(atol, rtol * |onnx|)
    (``gpcl_trt.tolerance``: polygraphy's rule, ONNX Runtime the candidate); ``tolerance_used``,
    the worst share of that bound, is at most 1. An ONNX Runtime session that cannot be created or
    run is a GpclError with ONNX Runtime's own reason, in one line."""
    import gc

    from gpcl_trt.exporter.api import make_dummy_inputs

    if mode not in ("full", "layers"):
        raise ValueError(f"validation mode {mode!r}")
    ref_run = torch_runner(module)
    with_past = bool(_past_names(arch, task))
    rng = np.random.default_rng(seed)
    cases = []  # (meta, feeds, next_ids)
    for batch, seq in VALIDATE_SHAPES:
        feeds = make_dummy_inputs(arch, task, batch, seq, seed=seed, past=0 if with_past else None)
        next_ids = rng.integers(0, arch.vocab_size, size=(batch, 1), dtype=np.int64) if with_past else None
        cases.append(({"batch": batch, "sequence": seq}, feeds, next_ids))
    golden = []
    for meta, feeds, next_ids in cases:  # the reference first, every step
        ref = ref_run(feeds)
        ref2 = ref_run(next_step_feeds(arch, task, feeds, ref, next_ids)) if with_past else None
        golden.append((ref, ref2))
    gc.collect()
    shapes = ", ".join(f"{m['batch']}x{m['sequence']}" for m, _, _ in cases)
    try:
        if mode == "full":
            ort_run = ort_runner(onnx_path, bounded=True)
            many = lambda fl: [ort_run(f) for f in fl]  # noqa: E731
        else:
            seg = SegmentedRunner(onnx_path)
            many = seg.run_many
        got1 = many([feeds for _, feeds, _ in cases])
        got2 = (
            many([next_step_feeds(arch, task, feeds, g, nid) for (_, feeds, nid), g in zip(cases, got1)])
            if with_past
            else [None] * len(cases)
        )
    except GpclError:
        raise
    except _LoadFailed as exc:
        raise GpclError(
            f"validation: ONNX Runtime cannot load the exported graph ({exc.what}): {_ort_failure(exc.cause)}; "
            "nothing was written"
        ) from None
    except Exception as exc:  # ONNX Runtime's own failure types
        cause = _ort_failure(exc)
        hint = (
            " (a size the trace fixed that must vary? A forward that loops over the sequence, like a Mamba scan, "
            "is traced unrolled)"
            if _SHAPE_WORDS.search(cause)
            else ""
        )
        raise GpclError(
            f"validation: ONNX Runtime cannot run the exported graph at batch x sequence {shapes}: {cause}{hint}; "
            "nothing was written"
        ) from None
    checks: list[dict[str, Any]] = []
    used: dict[str, float] = {n: 0.0 for n in module.output_names}  # share of the tolerance, worst over checks
    for (meta, _, _), (ref, ref2), g1, g2 in zip(cases, golden, got1, got2):
        steps = [(ref, g1)] + ([(ref2, g2)] if with_past else [])
        for r, g in steps:
            for n, u in tolerance.used_by_outputs(r, g, atol, rtol).items():
                used[n] = max(used[n], u)
        checks.append({**meta, "step": "prefill" if with_past else "full", "max_abs_diff": _compare(ref, g1)})
        if with_past:
            checks.append(
                {
                    "batch": meta["batch"],
                    "sequence": 1,
                    "past_sequence": meta["sequence"],
                    "step": "decode",
                    "max_abs_diff": _compare(ref2, g2),
                }
            )
    per_output = {n: max(c["max_abs_diff"][n] for c in checks) for n in module.output_names}
    worst_used = max(used.values(), default=0.0)
    result = {
        "mode": mode,
        "passed": bool(worst_used <= 1.0),
        "atol": atol,
        "rtol": rtol,
        "rule": tolerance.RULE,
        "tolerance_used": worst_used,
        "tolerance_used_per_output": used,
        "max_abs_diff": max(per_output.values()),
        "per_output": per_output,
        "checks": checks,
        "runtime": "onnxruntime CPUExecutionProvider (weights memory-mapped, no optimizations or pre-packing)",
    }
    if mode == "layers":
        result["segments"] = len(seg.segments)
    return result
