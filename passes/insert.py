"""Insert GPCL at the chosen sites: a ``gpcl.GPCL`` node reads the site tensor and only the
projection consumers are rewired to its output, so the residual path (and every original tensor
name) is untouched. Inserting again updates tau/mode of the node in place."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from gpcl_trt.common import GpclError, check_can_write, sha256_file
from gpcl_trt.gpcl import KINDS, PRE_ATTENTION, PRE_MLP, SHARED
from gpcl_trt.passes.graph import LoadedModel, load_graph
from gpcl_trt.passes.sites import Site, find_sites
from gpcl_trt.plugins.reference import DEFAULT_EPS, MODES

TauValue = float | Sequence[float] | np.ndarray


# ----------------------------------------------------------------------------- options
def parse_kinds(sites: str | Iterable[str]) -> tuple[str, ...]:
    kinds = [s.strip() for s in (sites.split(",") if isinstance(sites, str) else sites) if s.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise GpclError(f"--sites must be a comma list of {', '.join(KINDS)}, got {','.join(kinds) or 'nothing'}")
    return tuple(dict.fromkeys(kinds))


def parse_layers(layers: str | Iterable[int] | None) -> list[int] | None:
    """``"0,2,5-7"`` -> [0, 2, 5, 6, 7]; an iterable of ints passes through; None means all."""
    if layers is None:
        return None
    if not isinstance(layers, str):
        return sorted({int(i) for i in layers})
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in layers.split(","))):
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise GpclError(f"--layers: {part!r} is not an index or a range like 5-7") from None
        if a < 0 or b < a:
            raise GpclError(f"--layers: {part!r} is not a valid index or range")
        out.update(range(a, b + 1))
    if not out:
        raise GpclError("--layers is empty")
    return sorted(out)


def _wanted(kind: str, kinds: tuple[str, ...]) -> bool:
    """A shared site (one norm read by attention and MLP) is GPCL in front of both: chosen by
    ``shared`` or by asking for both pre-attention and pre-mlp; never by one of them alone, which
    would also change the other's input."""
    if kind == SHARED:
        return SHARED in kinds or {PRE_ATTENTION, PRE_MLP} <= set(kinds)
    return kind in kinds


def select_sites(found: list[Site], kinds: tuple[str, ...], layers: list[int] | None) -> list[Site]:
    if not found:
        raise GpclError("no GPCL sites found: no normalisation output feeds attention or MLP projections")
    known = sorted({s.layer for s in found})
    unknown = sorted(set(layers or ()) - set(known))
    if unknown:
        raise GpclError(
            f"unknown --layers index {','.join(map(str, unknown))}; the model has layers {known[0]}-{known[-1]}"
        )
    chosen = [s for s in found if _wanted(s.kind, kinds) and (layers is None or s.layer in layers)]
    if not chosen:
        shared = any(s.kind == SHARED for s in found)
        hint = (
            "; this model's blocks read one norm for attention and MLP: pass --sites shared (or pre-attention,pre-mlp)"
            if shared
            else ""
        )
        raise GpclError(f"no {'/'.join(kinds)} sites in the chosen layers{hint}")
    for s in chosen:
        if s.hidden is None:
            raise GpclError(f"cannot tell the hidden size at {s.key} ({s.tensor})")
        if s.hidden % 4:
            raise GpclError(
                f"hidden size {s.hidden} at {s.key} ({s.tensor}) is not divisible by 4; GPCL reads channels in "
                "groups of 4"
            )
    return chosen


def _tau_for(site: Site, tau: TauValue | Mapping[str, TauValue]) -> float | np.ndarray:
    """A validated scalar tau or float32[D/4] array for ``site``."""
    value = tau[site.key] if isinstance(tau, Mapping) and site.key in tau else tau
    if isinstance(value, Mapping):
        raise GpclError(f"no tau for site {site.key} in the calibration")
    arr = np.asarray(value, dtype=np.float32)
    if arr.ndim == 0 or arr.size == 1:
        t = float(arr.reshape(()))
        if not (math.isfinite(t) and t > 0):
            raise GpclError(f"tau must be a finite number > 0, got {t} for {site.key}")
        return t
    if arr.shape != (site.hidden // 4,):
        raise GpclError(f"per-group tau for {site.key} has shape {list(arr.shape)}, expected [{site.hidden // 4}]")
    if not (np.all(np.isfinite(arr)) and np.all(arr > 0)):
        raise GpclError(f"per-group tau for {site.key} must be finite and > 0")
    return arr


# ----------------------------------------------------------------------------- graph pass
def _set_tau(node: gs.Node, site: Site, t: float | np.ndarray) -> None:
    while len(node.inputs) > 1:  # SynchronizedList: pop keeps the tensor's consumer list right
        node.inputs.pop()
    if isinstance(t, float):
        node.attrs["tau"] = t
    else:
        node.attrs.pop("tau", None)  # the tau input overrides the attribute
        node.inputs.append(gs.Constant(f"{site.node_name}/tau", np.ascontiguousarray(t, dtype=np.float32)))


def _describe_tau(t: float | np.ndarray) -> float | dict:
    if isinstance(t, float):
        return t
    return {"per_group": int(t.size), "min": float(t.min()), "max": float(t.max())}


def insert_gpcl(
    graph: gs.Graph,
    sites: str | Iterable[str] = KINDS,
    layers: str | Iterable[int] | None = None,
    mode: str = "clamp",
    tau: TauValue | Mapping[str, TauValue] | None = None,
    scopes: dict[str, list[str]] | None = None,
) -> tuple[gs.Graph, dict]:
    """Return a copy of ``graph`` with GPCL at the chosen sites, and a report.

    ``tau`` is one scalar for every site, or a mapping ``site key -> scalar | float32[D/4]``
    (what calib.json holds). A site that already has GPCL gets its mode/tau updated in place."""
    if mode not in MODES:
        raise GpclError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if tau is None:
        raise GpclError("GPCL needs a tau: pass --tau or --calibration")
    graph = graph.copy()
    chosen = select_sites(find_sites(graph, scopes), parse_kinds(sites), parse_layers(layers))
    taus = {s.key: _tau_for(s, tau) for s in chosen}  # validate everything before changing anything
    nodes = {n.name: n for n in graph.nodes}
    tensors = graph.tensors()
    report = {"inserted": [], "updated": [], "sites": []}
    for s in chosen:
        x = tensors[s.tensor]
        node = nodes.get(s.gpcl) if s.gpcl else None
        if node is None:
            y = gs.Variable(s.output_name, dtype=x.dtype, shape=x.shape)
            node = gs.Node(
                "GPCL", s.node_name, attrs={"mode": mode, "eps": DEFAULT_EPS}, inputs=[x], outputs=[y], domain="gpcl"
            )
            graph.nodes.append(node)
            report["inserted"].append(s.key)
        else:
            report["updated"].append(s.key)
        node.attrs["mode"] = mode
        _set_tau(node, s, taus[s.key])
        y = node.outputs[0]
        for name in s.consumers:  # only the projection path; the residual keeps reading x
            c = nodes[name]
            for i, inp in enumerate(c.inputs):
                if inp is x:
                    c.inputs[i] = y
        report["sites"].append(
            {**s.to_dict(), "gpcl": node.name, "output": y.name, "mode": mode, "tau": _describe_tau(taus[s.key])}
        )
    graph.toposort()
    return graph, report


# ----------------------------------------------------------------------------- calibration
def origin_sha256(source: str | Path, source_sha256: str) -> str:
    """sha256 of the model without GPCL that ``source`` was made from: ``source`` itself, or,
    for an insert output whose manifest still matches it, the origin that manifest records."""
    from gpcl_trt.manifest import Manifest

    manifest = Manifest.read(source)
    if manifest is not None and manifest.stage == "insert" and manifest.artifact_sha256 == source_sha256:
        return manifest.inputs.get("origin_sha256") or source_sha256
    return source_sha256


def load_calibration(path: str | Path, source: str | Path, source_sha256: str) -> tuple[dict, str]:
    """Read calib.json, check it was made from this model, return (site key -> tau, its sha256).

    A calibration of the original export is also accepted for a model that is that export with
    GPCL already inserted (its manifest names the original), so re-inserting works."""
    p = Path(path)
    try:
        calib = json.loads(p.read_text())
        site_taus = {k: v["tau"] for k, v in calib["sites"].items()}
        made_from = calib["source_sha256"]
    except FileNotFoundError:
        raise GpclError(f"{p}: no such calibration file") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise GpclError(f"{p}: not a GPCL calibration file (calib.json from gpcl-trt calibrate)") from None
    if made_from not in {source_sha256, origin_sha256(source, source_sha256)}:
        raise GpclError(
            f"{p} was calibrated on another model (source_sha256 {made_from[:12]}..., {Path(source).name} is "
            f"{source_sha256[:12]}...)"
        )
    return site_taus, sha256_file(p)


# ----------------------------------------------------------------------------- file level
def insert_file(
    input: str | Path,
    output: str | Path,
    sites: str | Iterable[str] = KINDS,
    layers: str | Iterable[int] | None = None,
    mode: str = "clamp",
    tau: float | None = None,
    calibration: str | Path | None = None,
    force: bool = False,
) -> dict:
    """Insert GPCL into the ONNX model ``input`` and write ``output`` (+ OUT.manifest.json)."""
    from gpcl_trt.manifest import model_dir_of, pass_inputs
    from gpcl_trt.passes.modelio import save_model

    if (tau is None) == (calibration is None):
        raise GpclError("give exactly one of --tau and --calibration")
    if tau is not None and not (math.isfinite(tau) and tau > 0):
        raise GpclError(f"--tau must be a finite number > 0, got {tau}")
    check_can_write(output, force)
    lm: LoadedModel = load_graph(input)
    src_sha = sha256_file(input)
    if calibration is not None:
        tau_value, calib_sha = load_calibration(calibration, input, src_sha)
        tau_source = {"calibration": str(calibration), "calibration_sha256": calib_sha}
    else:
        tau_value, tau_source = float(tau), {"tau": float(tau)}
    graph, report = insert_gpcl(lm.graph, sites=sites, layers=layers, mode=mode, tau=tau_value, scopes=lm.scopes)
    model_dir = model_dir_of(input)
    inputs = pass_inputs(
        input, src_sha, str(model_dir) if model_dir else None, origin_sha256=origin_sha256(input, src_sha), **tau_source
    )
    options = {
        "sites": list(parse_kinds(sites)),
        "layers": parse_layers(layers),
        "mode": mode,
        "tau_source": tau_source,
    }
    summary = [{k: s[k] for k in ("key", "layer", "kind", "tensor", "gpcl", "output", "tau")} for s in report["sites"]]
    save_model(
        graph,
        lm,
        output,
        force=force,
        gpcl=True,
        stage_name="insert",
        inputs=inputs,
        options=options,
        results={"inserted": report["inserted"], "updated": report["updated"], "sites": summary},
    )
    return {
        "ok": True,
        "output": str(output),
        "mode": mode,
        "tau_source": tau_source,
        "inserted": report["inserted"],
        "updated": report["updated"],
        "sites": summary,
    }
