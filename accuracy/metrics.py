"""Error metrics between a reference and a candidate array, the layer a tensor belongs to,
and the statistics of GPCL sites (radius distribution, groups changed)."""

from __future__ import annotations

from typing import Any

import numpy as np

from gpcl_trt import gpcl, tolerance

LOGITS_NAMES = ("logits",)


# ----------------------------------------------------------------------------- one output
def array_metrics(
    ref: np.ndarray, cand: np.ndarray, atol: float | None = None, rtol: float | None = None
) -> dict[str, Any]:
    """max/mean abs error, max rel error (relative to |ref|) and cosine similarity, in float64.
    With tolerances, also ``within_tol``: the rule of ``gpcl_trt.tolerance`` (polygraphy's
    elementwise rule: an element fails only if it exceeds both atol and rtol * |cand|; NaN fails),
    vectorised for the hundreds of tensors of a per-layer diff, where polygraphy's comparator
    formats statistics for every tensor."""
    if ref.shape != cand.shape:
        return {
            "shape_mismatch": [list(ref.shape), list(cand.shape)],
            "max_abs": float("inf"),
            "mean_abs": float("inf"),
            "max_rel": float("inf"),
            "cosine": float("nan"),
            "size": 0,
            "within_tol": False,
        }
    r = ref.astype(np.float64).ravel()
    c = cand.astype(np.float64).ravel()
    if r.size == 0:
        return {"max_abs": 0.0, "mean_abs": 0.0, "max_rel": 0.0, "cosine": 1.0, "size": 0, "within_tol": True}
    err = np.abs(r - c)
    rel = err / (np.abs(r) + 1e-12)
    nr, nc = np.linalg.norm(r), np.linalg.norm(c)
    if nr == 0 and nc == 0:
        cos = 1.0
    elif nr == 0 or nc == 0:
        cos = 0.0
    else:
        cos = float(np.dot(r, c) / (nr * nc))
    out = {
        "max_abs": float(err.max()),
        "mean_abs": float(err.mean()),
        "max_rel": float(rel.max()),
        "cosine": cos,
        "size": int(r.size),
    }
    if atol is not None and rtol is not None:
        out["within_tol"] = tolerance.within(r, c, atol, rtol)
    return out


def logits_metrics(ref: np.ndarray, cand: np.ndarray, k: int = 5) -> dict[str, Any]:
    """Top-1 agreement, top-k set overlap (|topk(ref) & topk(cand)| / k) and KL(ref || cand) of the
    softmax over the last axis, averaged over positions."""
    if ref.shape != cand.shape or ref.ndim == 0:
        return {}
    v = ref.shape[-1]
    r = ref.reshape(-1, v).astype(np.float64)
    c = cand.reshape(-1, v).astype(np.float64)
    k = min(k, v)
    top1 = float(np.mean(r.argmax(-1) == c.argmax(-1)))
    tr = np.argpartition(-r, k - 1, axis=-1)[:, :k]
    tc = np.argpartition(-c, k - 1, axis=-1)[:, :k]
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(tr, tc)])
    lr = r - _logsumexp(r)
    lc = c - _logsumexp(c)
    kl = float(np.mean(np.sum(np.exp(lr) * (lr - lc), axis=-1)))
    return {"top1": top1, f"top{k}": float(overlap), "kl": max(kl, 0.0), "rows": int(r.shape[0])}


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(-1, keepdims=True))


def output_metrics(
    name: str, ref: np.ndarray, cand: np.ndarray, atol: float | None = None, rtol: float | None = None
) -> dict[str, Any]:
    m = array_metrics(ref, cand, atol, rtol)
    if name in LOGITS_NAMES:
        m.update(logits_metrics(ref, cand))
    return m


def aggregate(per_sample: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine per-sample metrics: worst case for max errors and cosine, weighted means else."""
    if not per_sample:
        return {}
    out: dict[str, Any] = {}
    size = sum(m.get("size", 0) for m in per_sample) or 1
    rows = sum(m.get("rows", 0) for m in per_sample) or 1
    for key in per_sample[0]:
        vals = [m[key] for m in per_sample if key in m]
        if key in ("max_abs", "max_rel"):
            out[key] = float(max(vals))
        elif key == "cosine":
            out[key] = float(min(vals))
        elif key == "mean_abs":
            out[key] = float(sum(m[key] * m.get("size", 0) for m in per_sample) / size)
        elif key in ("size", "rows"):
            out[key] = int(sum(vals))
        elif key == "shape_mismatch":
            out[key] = vals[0]
        elif key == "within_tol":
            out[key] = all(vals)
        else:  # top1 / top5 / kl are per-position means
            out[key] = float(sum(m[key] * m.get("rows", 0) for m in per_sample) / rows)
    return out


# ----------------------------------------------------------------------------- layers
def layer_of(scope: str | None, name: str = "") -> int | None:
    """The transformer block index from a node's name scope (``encoder.layer.3.attention``) or,
    failing that, from a tensor/node name (``/encoder/layer.3/...``)."""
    return gpcl.layer_of(scope or "", name)


def node_scope(node) -> str:
    """The innermost module scope the dynamo exporter recorded for ``node``."""
    for p in node.metadata_props:
        if p.key == gpcl.SCOPES_KEY:
            scopes = gpcl.parse_scopes(p.value)
            # The last entry is the op's own name; the one before is its module.
            mods = [s for s in scopes if "." in s] or scopes
            return max(mods, key=len) if mods else ""
    return ""


# ----------------------------------------------------------------------------- GPCL sites
def gpcl_sites(model) -> list[dict[str, Any]]:
    """GPCL nodes of an ONNX model: name, input and output tensors, mode and tau (scalar or
    per group, from the tau input when present, the attribute otherwise)."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    sites = []
    for node in model.graph.node:
        if node.domain != gpcl.GPCL_DOMAIN or node.op_type != gpcl.GPCL_OP:
            continue
        attrs = gpcl.node_attrs(node)
        mode, tau = attrs["mode"], attrs["tau"]
        t = attrs["tau_input"]
        if t is not None:
            if t in inits:
                tau = numpy_helper.to_array(inits[t]).astype(np.float64)
            elif t in consts:
                tau = numpy_helper.to_array(helper.get_attribute_value(consts[t].attribute[0])).astype(np.float64)
        tau_arr = np.asarray(tau if tau is not None else np.inf, dtype=np.float64)
        layer, kind = gpcl.parse_node_name(node.name)
        sites.append(
            {
                "node": node.name,
                "input": node.input[0],
                "output": node.output[0],
                "mode": mode,
                "layer": layer,
                "kind": kind,
                "tau": tau_arr,
            }
        )
    return sites


def site_stats(x: np.ndarray, y: np.ndarray | None, tau: np.ndarray) -> dict[str, Any]:
    """Radius distribution before GPCL, groups changed and max radius after."""
    r = gpcl.quaternion_radii(x)
    t = np.broadcast_to(tau, r.shape[-1:]) if tau.ndim else tau
    stats: dict[str, Any] = {
        "groups": int(r.size),
        "r_p50": float(np.percentile(r, 50)),
        "r_p99": float(np.percentile(r, 99)),
        "r_p9999": float(np.percentile(r, 99.99)),
        "r_max": float(r.max()),
        "frac_r_over_tau": float(np.mean(r > t)),
        "tau_min": float(np.min(tau)),
        "tau_max": float(np.max(tau)),
    }
    if y is not None and y.shape == x.shape:
        changed = np.any(x.reshape(*x.shape[:-1], -1, 4) != y.reshape(*y.shape[:-1], -1, 4), axis=-1)
        ry = gpcl.quaternion_radii(y)
        stats["frac_groups_changed"] = float(np.mean(changed))
        stats["max_radius_after"] = float(np.nanmax(ry))
        stats["bounded"] = bool(np.all(ry <= t * (1 + 1e-5) + 1e-6))
    return stats
