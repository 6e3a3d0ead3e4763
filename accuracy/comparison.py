"""``diff``: run a reference and a candidate on the same inputs with polygraphy's Comparator,
judge each output with polygraphy's elementwise tolerance check, and add the metrics a user
needs to decide (max/mean abs, max rel, cosine; top-1/top-5/KL for logits), optionally per
layer and with the GPCL site statistics."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from gpcl_trt import tolerance
from gpcl_trt.accuracy import inputs as inp
from gpcl_trt.accuracy import metrics as mt
from gpcl_trt.accuracy.polyutil import quiet_polygraphy
from gpcl_trt.accuracy.runners import Side, kind_of, make_side
from gpcl_trt.common import GpclError, atomic_path, check_can_write, one_line, write_manifest
from gpcl_trt.gpcl import quaternion_radii

DEFAULT_ATOL, DEFAULT_RTOL = tolerance.DIFF_ATOL, tolerance.DIFF_RTOL


# ----------------------------------------------------------------------------- checks
def _static(d) -> bool:
    return isinstance(d, (int, np.integer)) and d > 0


def check_specs(ref: dict, cand: dict) -> None:
    """Same input names, dtypes and (static) shapes on both sides, or one clear line."""
    if set(ref) != set(cand):
        raise GpclError(f"input names differ: reference has {sorted(ref)}, candidate has {sorted(cand)}")
    for name, (rdt, rdims) in ref.items():
        cdt, cdims = cand[name]
        if np.dtype(rdt) != np.dtype(cdt):
            raise GpclError(f"input {name}: dtype {np.dtype(rdt)} (reference) vs {np.dtype(cdt)} (candidate)")
        if len(rdims) != len(cdims) or any(_static(a) and _static(b) and a != b for a, b in zip(rdims, cdims)):
            raise GpclError(f"input {name}: shape {list(rdims)} (reference) vs {list(cdims)} (candidate)")


def check_feeds(feeds: list, spec: dict, label: str) -> None:
    for i, feed in enumerate(feeds):
        if set(feed) != set(spec):
            raise GpclError(f"inputs sample {i} has {sorted(feed)}, the {label} expects {sorted(spec)}")
        for name, (_dt, dims) in spec.items():
            shape = feed[name].shape
            if len(shape) != len(dims) or any(_static(d) and d != s for d, s in zip(dims, shape)):
                raise GpclError(f"inputs sample {i}: {name} has shape {list(shape)}, the {label} expects {list(dims)}")


# ----------------------------------------------------------------------------- golden
def golden_inputs_path(golden: str | Path) -> Path:
    """The inputs recorded with a golden file sit next to it: g.json -> g.inputs.json."""
    p = Path(golden)
    return p.with_name(p.stem + ".inputs.json")


def save_golden(
    path: Path, outputs: list[dict[str, np.ndarray]], feeds: list, reference: str, options: dict, force: bool
) -> dict:
    from polygraphy.comparator import RunResults

    results = RunResults()
    results.add(outputs, runner_name="golden")
    inputs_path = golden_inputs_path(path)
    check_can_write(inputs_path, force)
    with atomic_path(path, force=force) as tmp, atomic_path(inputs_path, force=force) as tmp_in, quiet_polygraphy():
        results.save(str(tmp))
        inp.save_inputs_json(feeds, tmp_in)
    digest = inp.feeds_digest(feeds)
    write_manifest(
        path,
        "golden",
        {"reference": str(reference), "inputs_file": inputs_path.name, "inputs_sha256": digest},
        options,
        {"outputs": list(outputs[0]), "samples": len(outputs)},
        packages=("polygraphy", "torch", "onnxruntime"),
    )
    return {"golden": str(path), "golden_inputs": str(inputs_path), "inputs_sha256": digest}


def load_golden(path: str | Path) -> list[dict[str, np.ndarray]]:
    from polygraphy.comparator import RunResults

    p = Path(path)
    if not p.is_file():
        raise GpclError(f"golden file {p} does not exist")
    try:
        with quiet_polygraphy():
            results = RunResults.load(str(p))
        ((_name, iters),) = list(results.items())
    except Exception as exc:
        raise GpclError(f"{p} is not a golden RunResults JSON with one runner: {one_line(exc)}") from None
    return [OrderedDict(it.items()) for it in iters]


# ----------------------------------------------------------------------------- per layer
def shared_intermediates(ref_model, cand_model) -> list[str]:
    """Float tensors produced by nodes of both graphs under the same name, in the reference's
    node order (graph outputs, inputs, initializers and constants excluded)."""
    from onnx import TensorProto

    def produced(model) -> dict[str, Any]:
        floats = {
            vi.name
            for vi in model.graph.value_info
            if vi.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
        }
        return {o: n for n in model.graph.node if n.op_type != "Constant" for o in n.output if o in floats}

    outs = {o.name for o in ref_model.graph.output} | {o.name for o in cand_model.graph.output}
    cand = produced(cand_model)
    return [name for name in produced(ref_model) if name in cand and name not in outs]


def tensor_layers(model, names: list[str]) -> "OrderedDict[str, Any]":
    """name -> block index, or "embeddings" before the first block / "head" after the last."""
    producer = {o: n for n in model.graph.node for o in n.output}
    raw = [(name, mt.layer_of(mt.node_scope(producer[name]), producer[name].name + "/" + name)) for name in names]
    out, seen_layer = OrderedDict(), False
    for name, layer in raw:
        seen_layer = seen_layer or layer is not None
        out[name] = layer if layer is not None else ("head" if seen_layer else "embeddings")
    return out


def per_layer_summary(per_tensor: "OrderedDict[str, dict]", layers: "OrderedDict[str, Any]") -> dict[str, Any]:
    groups: "OrderedDict[Any, dict]" = OrderedDict()
    first = None
    for name, m in per_tensor.items():
        layer = layers[name]
        g = groups.setdefault(
            layer, {"layer": layer, "tensors": 0, "failing": 0, "max_abs": 0.0, "max_rel": 0.0, "min_cosine": 1.0}
        )
        g["tensors"] += 1
        g["failing"] += 0 if m["passed"] else 1
        g["max_abs"] = max(g["max_abs"], m["max_abs"])
        g["max_rel"] = max(g["max_rel"], m["max_rel"])
        g["min_cosine"] = min(g["min_cosine"], m["cosine"])
        if first is None and not m["passed"]:
            first = {"tensor": name, "layer": layer, "max_abs": m["max_abs"], "max_rel": m["max_rel"]}
    return {"compared": len(per_tensor), "first_divergence": first, "layers": list(groups.values())}


# ----------------------------------------------------------------------------- compare
def tensor_metrics(
    ref_iters: list, cand_iters: list, names: list[str], atol: float, rtol: float
) -> "OrderedDict[str, dict]":
    """Metrics per name, aggregated over samples; ``passed`` is the elementwise tolerance rule."""
    out: "OrderedDict[str, dict]" = OrderedDict()
    for name in names:
        per = [
            mt.output_metrics(name, r[name], c[name], atol, rtol)
            for r, c in zip(ref_iters, cand_iters)
            if name in r and name in c
        ]
        if len(per) != len(ref_iters):
            out[name] = {"passed": False, "missing": True}
            continue
        m = mt.aggregate(per)
        m["passed"] = m.pop("within_tol")
        out[name] = m
    return out


def compare_outputs(
    ref_iters: list, cand_iters: list, names: list[str], atol: float, rtol: float
) -> "OrderedDict[str, dict]":
    """``tensor_metrics`` for the model outputs, judged by polygraphy's Comparator (elementwise
    SimpleCompareFunc): an output passes only if polygraphy and our metrics both say so."""
    from polygraphy.comparator import Comparator, IterationResult, RunResults
    from polygraphy.comparator.compare import SimpleCompareFunc

    def only(name, _index, iter_result, _base=None):
        return [name] if name in iter_result else None

    runs = []
    for role, its in (("reference", ref_iters), ("candidate", cand_iters)):
        rr = RunResults()
        rr.append((role, [IterationResult({n: it[n] for n in names if n in it}, runner_name=role) for it in its]))
        runs.append(rr)
    func = SimpleCompareFunc(atol=atol, rtol=rtol, check_shapes=True, find_output_func=only)
    with quiet_polygraphy():
        acc = Comparator.compare_accuracy(runs, compare_func=func)
    verdicts = list(acc[0].values())[0] if len(acc) and len(acc[0]) else []
    out = tensor_metrics(ref_iters, cand_iters, names, atol, rtol)
    for name, m in out.items():
        m["polygraphy_passed"] = len(verdicts) == len(ref_iters) and all(name in v and bool(v[name]) for v in verdicts)
        m["passed"] = m["passed"] and m["polygraphy_passed"]
    return out


def _sites_of(side: Side) -> list[dict]:
    return mt.gpcl_sites(side.onnx_model) if side.kind == "onnx" else []


def _site_outputs(sites: list[dict]) -> list[str]:
    return [t for s in sites for t in (s["input"], s["output"])]


def site_report(sites: list[dict], iters: list) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Per GPCL site: radius statistics over all samples, and the radii for the histogram."""
    rows, radii = [], {}
    for s in sites:
        xs = [it[s["input"]] for it in iters if s["input"] in it]
        if not xs:
            continue
        x = np.concatenate([a.reshape(-1, a.shape[-1]) for a in xs])
        ys = [it[s["output"]] for it in iters if s["output"] in it]
        y = np.concatenate([a.reshape(-1, a.shape[-1]) for a in ys]) if len(ys) == len(xs) else None
        stats = mt.site_stats(x, y, s["tau"])
        rows.append({"node": s["node"], "layer": s["layer"], "kind": s["kind"], "mode": s["mode"], **stats})
        radii[s["node"]] = quaternion_radii(x).ravel()
    return rows, radii


def _sides(reference, candidate, per_layer: bool, want_sites: bool, task: str, threads):
    """Both sides, each exposing the extra tensors it must (shared intermediates for per-layer,
    GPCL site inputs/outputs for the report); each .onnx is read (and typed) once."""
    from gpcl_trt.accuracy.runners import infer_types
    from gpcl_trt.common import load_onnx_graph
    from gpcl_trt.manifest import graph_of

    paths = {"reference": reference, "candidate": candidate}
    models = {role: load_onnx_graph(Path(p)) for role, p in paths.items() if p is not None and kind_of(p) == "onnx"}
    shared: list[str] = []
    if per_layer:
        models = {role: infer_types(m) for role, m in models.items()}
        shared = shared_intermediates(models["reference"], models["candidate"])
    # A model directory against one graph of an encoder-decoder export runs that graph in PyTorch.
    graph = next((g for p in paths.values() if p is not None and (g := graph_of(p)) is not None), None)
    sides = {}
    for role, path in paths.items():
        if path is None:
            continue
        sites = mt.gpcl_sites(models[role]) if want_sites and role in models else []
        extra = shared + _site_outputs(sites)
        sides[role] = make_side(
            path, role, task=task, extra_outputs=extra, threads=threads, onnx_model=models.get(role), graph=graph
        )
    return sides.get("reference"), sides.get("candidate"), shared


def _feeds(ref_side, cand_side, golden, inputs, samples: int, batch: int, seq: int, seed: int):
    """The inputs both sides get: recorded with the golden file, loaded from --inputs, or
    generated from the reference's spec; checked against each side's input spec."""
    if golden is not None:
        source = str(inputs) if inputs is not None else str(golden_inputs_path(golden))
        if inputs is None and not golden_inputs_path(golden).exists():
            raise GpclError(
                f"golden {golden} has no recorded inputs ({golden_inputs_path(golden).name}); pass --inputs"
            )
        feeds, spec_side = inp.load_inputs(source), cand_side
    else:
        if ref_side is not None and cand_side is not None:
            check_specs(ref_side.spec, cand_side.spec)
        if inputs is not None:
            feeds, source = inp.load_inputs(inputs), str(inputs)
        else:
            feeds, source = ref_side.generate(samples, batch, seq, seed), f"generated (seed {seed})"
        spec_side = ref_side
    check_feeds(feeds, spec_side.spec, spec_side.path.name)
    if cand_side is not None and cand_side is not spec_side:
        check_feeds(feeds, cand_side.spec, "candidate")
    return feeds, source


# ----------------------------------------------------------------------------- entry point
def diff(
    reference: str | Path | None = None,
    candidate: str | Path | None = None,
    inputs: str | Path | None = None,
    samples: int = 4,
    seq: int = 32,
    batch: int = 1,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    save_golden_path: str | Path | None = None,
    golden: str | Path | None = None,
    per_layer: bool = False,
    report: str | Path | None = None,
    task: str = "auto",
    threads: int | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Compare ``candidate`` against ``reference`` (or a golden RunResults file) on the same
    inputs. Returns a result dict with ``ok`` False when any output is out of tolerance."""
    if (reference is None) == (golden is None):
        raise GpclError("give exactly one of --reference and --golden")
    if candidate is None and save_golden_path is None:
        raise GpclError("nothing to do: give --candidate (and/or --save-golden with --reference)")
    if golden is not None and (per_layer or save_golden_path):
        raise GpclError("--golden replaces --reference: it cannot be combined with --per-layer or --save-golden")
    if samples < 1 or seq < 1 or batch < 1:
        raise GpclError("--samples, --seq and --batch must be >= 1")
    rule = "given"
    if atol is None or rtol is None:  # defaults by what the candidate is (tolerance.diff_defaults)
        from gpcl_trt.quantize.chain import quantization_of

        quant = quantization_of(candidate), quantization_of(reference)
        d_atol, d_rtol, rule = tolerance.diff_defaults(*quant)
        atol, rtol = (d_atol if atol is None else atol), (d_rtol if rtol is None else rtol)
    if not (atol >= 0 and rtol >= 0):
        raise GpclError(f"--atol and --rtol must be >= 0, got {atol} and {rtol}")
    for out in (save_golden_path, report):
        if out is not None:
            check_can_write(out, force)

    if per_layer and (candidate is None or kind_of(reference) != "onnx" or kind_of(candidate) != "onnx"):
        raise GpclError("--per-layer needs an .onnx model on both sides")

    ref_side, cand_side, shared = _sides(reference, candidate, per_layer, report is not None, task, threads)
    golden_iters = load_golden(golden) if golden is not None else None  # fail fast on a bad file
    feeds, source = _feeds(ref_side, cand_side, golden, inputs, samples, batch, seq, seed)

    from polygraphy.comparator import Comparator

    runners = [s.runner for s in (ref_side, cand_side) if s is not None]
    with quiet_polygraphy():
        run = Comparator.run(runners, data_loader=feeds)
    iters = {name: [OrderedDict(it.items()) for it in its] for name, its in run.items()}

    result: dict[str, Any] = {
        "reference": str(reference if reference is not None else golden),
        "reference_kind": ref_side.kind if ref_side else "golden",
        "candidate": str(candidate) if candidate is not None else None,
        "candidate_kind": cand_side.kind if cand_side else None,
        "inputs": {"source": source, **inp.describe_feeds(feeds)},
        "tolerances": {"atol": atol, "rtol": rtol, "rule": rule},
    }
    ref_iters = iters.get("reference") or golden_iters
    ref_outputs = (_real_outputs(ref_side) if ref_side else None) or list(ref_iters[0])
    if save_golden_path is not None:
        opts = {"samples": len(feeds), "seq": seq, "batch": batch, "seed": seed, "inputs": source}
        result.update(
            save_golden(
                Path(save_golden_path),
                [{n: it[n] for n in ref_outputs} for it in ref_iters],
                feeds,
                str(reference),
                opts,
                force,
            )
        )
    if cand_side is None:
        result["ok"] = True
        result["summary"] = f"recorded golden outputs of {reference} on {len(feeds)} samples"
        return result

    cand_iters = iters["candidate"]
    if len(ref_iters) != len(cand_iters):
        raise GpclError(f"golden holds {len(ref_iters)} samples but the inputs have {len(cand_iters)}")
    outputs = compare_outputs(ref_iters, cand_iters, ref_outputs, atol, rtol)
    result["outputs"] = outputs
    extras: dict[str, Any] = {}
    if per_layer:
        per_tensor = tensor_metrics(ref_iters, cand_iters, shared, atol, rtol)
        layers = tensor_layers(ref_side.onnx_model, shared)
        result["per_layer"] = per_layer_summary(per_tensor, layers)
    if report is not None:
        for role, side, its in (("reference", ref_side, ref_iters), ("candidate", cand_side, cand_iters)):
            if side is not None and _sites_of(side):
                rows, radii = site_report(_sites_of(side), its)
                result.setdefault("gpcl_sites", {})[role] = rows
                extras.setdefault("radii", {})[role] = (radii, {s["node"]: s["tau"] for s in _sites_of(side)})
    result["ok"] = bool(outputs) and all(o["passed"] for o in outputs.values())
    result["summary"] = _summary(result)
    if report is not None:
        from gpcl_trt.accuracy.report import write_diff_report

        result["report"] = str(write_diff_report(result, extras, Path(report), force=force))
    return result


def _real_outputs(side: Side) -> list[str]:
    if side.kind == "onnx":
        return [o.name for o in side.onnx_model.graph.output]
    if side.kind == "torch":
        return list(side.runner.output_names)
    return []  # engines: the names come from the first result


def _summary(result: dict) -> str:
    worst = max((o.get("max_abs", float("inf")) for o in result["outputs"].values()), default=0.0)
    verdict = "PASS" if result["ok"] else "FAIL"
    tol = result["tolerances"]
    line = (
        f"{verdict}: {result['candidate']} vs {result['reference']}: max abs error {worst:.3g} "
        f"(atol {tol['atol']:g}, rtol {tol['rtol']:g}: {tol.get('rule', 'given')})"
    )
    first = result.get("per_layer", {}).get("first_divergence")
    if first:
        line += f"; first divergence at layer {first['layer']} ({first['tensor']})"
    return line
