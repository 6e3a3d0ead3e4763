"""What GPCL is, in one light module (no numpy or onnx at import, so the CLI's click choices can
use it): the op's domain and name, its modes and default eps, how GPCL nodes are named and
parsed, the exporter's name-scope metadata and the layer pattern in it, quaternion radii, and
the one size above which a model's weights go to external data. Contract: docs/gpcl-spec.md."""

from __future__ import annotations

import ast
import re
from typing import Any

GPCL_DOMAIN = "gpcl"
GPCL_OP = "GPCL"
GPCL_OPSET = 1
MODES = ("clamp", "soft", "hopf")
MODE_IDS = {m: i for i, m in enumerate(MODES)}  # also the `mode` int of the C ABI
DEFAULT_EPS = 1e-6

# Site kinds: in front of a block's (self-)attention, its MLP, or one norm that feeds both; in an
# encoder-decoder's decoder block also in front of the cross-attention's query projection (its
# keys and values read the encoder's states, not the site).
PRE_ATTENTION, PRE_MLP, SHARED = "pre-attention", "pre-mlp", "shared"
PRE_CROSS_ATTENTION = "pre-cross-attention"
KINDS = (PRE_ATTENTION, PRE_CROSS_ATTENTION, PRE_MLP, SHARED)  # block order: sites sort by it

# Protobuf cannot serialise a message of 2 GiB or more: above this many bytes a model's weights
# go to external data (OUT.onnx.data), with a margin for the graph itself.
EXTERNAL_DATA_BYTES = 1_800_000_000

# Above this many bytes of external weights a model counts as large: ONNX Runtime sessions run
# bounded (weights read from their file mapping, no optimized copies) and the passes check the
# graph with the ONNX checker alone. Below it, sessions are the default ones (fastest, and bit
# for bit what a self-contained copy of the model gives).
LARGE_WEIGHT_BYTES = 512 * 2**20

# The dynamo exporter's node metadata: the module scopes a node was traced in, outermost first.
SCOPES_KEY = "pkg.torch.onnx.name_scopes"
# A block in a scope or tensor name: "<container>.<N>.<submodule>" (model.layers.3.mlp,
# transformer.h.0.attn) or "/encoder/layer.2/attention/..." in node and tensor names.
BLOCK_RE = re.compile(r"(?:^|[./])(\d+)[./]([A-Za-z_]\w*)")
# A block in a checkpoint's tensor names: only the containers transformers uses for the layer
# stack ("model.layers.3.mlp.up_proj.weight"), so that experts.7 or heads.2 never count as layers.
LAYER_STACK_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_NODE_RE = re.compile(r"^gpcl/layer(\d+)/([\w-]+)$")


def node_name(layer: int, kind: str) -> str:
    """The GPCL node at a site: ``gpcl/layer{L}/{kind}``."""
    return f"gpcl/layer{layer}/{kind}"


def output_name(site_tensor: str) -> str:
    """The GPCL output: the site tensor's name + ``/gpcl`` (the site tensor keeps its name)."""
    return f"{site_tensor}/gpcl"


def parse_node_name(name: str) -> tuple[int | None, str | None]:
    """(layer, kind) of a GPCL node named by :func:`node_name`, else (None, None)."""
    m = _NODE_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else (None, None)


def parse_scopes(value: str) -> list[str]:
    """The scopes list of a ``SCOPES_KEY`` metadata value ([] if it is not one)."""
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return []
    return [str(s) for s in parsed] if isinstance(parsed, (list, tuple)) else []


def blocks_in(text: str) -> list[tuple[int, str]]:
    """Every (block index, submodule) of a scope or tensor name, outermost first."""
    return [(int(m.group(1)), m.group(2)) for m in BLOCK_RE.finditer(text)]


def layer_of(*texts: str) -> int | None:
    """The innermost block index in the first text that names one."""
    for text in texts:
        found = blocks_in(text or "")
        if found:
            return found[-1][0]
    return None


def node_attrs(node: Any) -> dict[str, Any]:
    """mode, eps, tau (attribute or None) and tau_input (tensor name or None) of a GPCL
    NodeProto, with the spec's defaults; not validated."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    mode = attrs.get("mode", b"clamp")
    return {
        "mode": mode.decode() if isinstance(mode, bytes) else str(mode),
        "eps": float(attrs.get("eps", DEFAULT_EPS)),
        "tau": float(attrs["tau"]) if "tau" in attrs else None,
        "tau_input": node.input[1] if len(node.input) > 1 and node.input[1] else None,
    }


def quaternion_radii(x: Any, mask: Any = None) -> Any:
    """[tokens, D/4] float32 radii |q| of the groups of ``x`` [..., D]; with ``mask`` [B, S]
    and ``x`` [B, S, D], padding tokens are dropped."""
    import numpy as np

    x = np.asarray(x, dtype=np.float32)
    if mask is not None and x.ndim == 3 and x.shape[:2] == np.shape(mask):
        x = x[np.asarray(mask).astype(bool)]
    q = x.reshape(-1, x.shape[-1] // 4, 4)
    return np.sqrt(np.sum(q * q, axis=-1))
