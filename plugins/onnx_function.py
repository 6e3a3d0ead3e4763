"""GPCL as an ONNX model-local function, built only from standard ONNX ops, so ONNX Runtime and
TensorRT-RTX's ONNX parser run a GPCL model without any plugin.

A FunctionProto body cannot branch on a string attribute and cannot test whether an optional
input is present, so :func:`attach_gpcl_functions` writes one *specialised* body per
(mode, tau source) combination that the model's GPCL nodes use. One combination (the common
case) gives one plain ``gpcl.GPCL`` function; a model that mixes them gets one overload per
combination (FunctionProto ``overload`` + node ``overload``, IR >= 10).

Two bodies compute the same function (docs/gpcl-spec.md, in the reference's operation order):
the *branching* body that models carry, tuned for ONNX Runtime's CPU hot path (measured op by
op, see tools/bench_gpcl_ort.py): channel planes, and an If whose fast branch (every radius
finite) skips the NaN rule and the overflow-safe radius; and the *flat* body that engine builds
swap in (no If: in an engine a conditional is a run-time branch on a device value, a likely
host synchronisation, and it multiplies the layers), which applies the full rule to every group.
Casts to float32 and back vanish for float32 models (ORT removes same-type casts). The `tau` and
`eps` attributes reach the body through ``ref_attr_name`` Constants.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from onnx import AttributeProto, FunctionProto, GraphProto, ModelProto, NodeProto, TensorProto
from onnx import helper as oh

from gpcl_trt.common import GpclError
from gpcl_trt.gpcl import DEFAULT_EPS, GPCL_DOMAIN, GPCL_OP, GPCL_OPSET, MODES, node_attrs
from gpcl_trt.plugins.reference import FLOAT_MIN, INV_SQRT2, RESCALE

_MIN_BODY_OPSET = 15  # CastLike


# ----------------------------------------------------------------------------- nodes
def make_gpcl_node(
    x: str,
    y: str,
    *,
    name: str | None = None,
    mode: str = "clamp",
    tau: float | None = None,
    tau_input: str | None = None,
    eps: float = DEFAULT_EPS,
) -> NodeProto:
    """A ``gpcl.GPCL`` node. Give ``tau`` (a float attribute) or ``tau_input`` (the name of a
    float32 [] or [D/4] tensor, which overrides the attribute)."""
    if mode not in MODES:
        raise GpclError(f"GPCL mode must be one of {', '.join(MODES)}, got {mode!r}")
    if tau is None and tau_input is None:
        raise GpclError("a GPCL node needs tau (attribute) or tau_input (tensor name)")
    if tau is not None and not tau > 0:
        raise GpclError(f"GPCL tau must be > 0, got {tau}")
    attrs = {"mode": mode, "eps": float(eps)}
    if tau is not None:
        attrs["tau"] = float(tau)
    inputs = [x] if tau_input is None else [x, tau_input]
    return oh.make_node(GPCL_OP, inputs, [y], name=name, domain=GPCL_DOMAIN, **attrs)


def is_gpcl_node(node: NodeProto) -> bool:
    return node.domain == GPCL_DOMAIN and node.op_type == GPCL_OP


def iter_gpcl_nodes(graph: GraphProto) -> Iterator[NodeProto]:
    """Every GPCL node of ``graph``, including nodes in subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        if is_gpcl_node(node):
            yield node
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                yield from iter_gpcl_nodes(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_gpcl_nodes(g)


def node_variant(node: NodeProto) -> tuple[str, bool]:
    """(mode, tau comes from an input) of a GPCL node, validated."""
    a = node_attrs(node)
    mode = a["mode"]
    if mode not in MODES:
        raise GpclError(f"GPCL node {node.name!r}: mode must be one of {', '.join(MODES)}, got {mode!r}")
    tau_input = a["tau_input"] is not None
    if not tau_input:
        if a["tau"] is None:
            raise GpclError(f"GPCL node {node.name!r} has neither a tau attribute nor a tau input")
        if not a["tau"] > 0:
            raise GpclError(f"GPCL node {node.name!r}: tau must be > 0, got {a['tau']}")
    if not a["eps"] > 0:
        raise GpclError(f"GPCL node {node.name!r}: eps must be > 0, got {a['eps']}")
    return mode, tau_input


# ----------------------------------------------------------------------------- bodies
BODIES = ("branching", "flat")


class _Body:
    """Tiny builder for a function body: fresh names, constants, node list, and the layout of
    the groups.

    ``planar`` (the branching body, for ORT): channel planes qt [4, M(, K)], so channels are
    contiguous slices and every per-group tensor is a [1, ...] plane whose broadcast against
    [4, ...] is a fast leading-axis one in ORT (a trailing axis of 1 sends ORT's broadcasts
    down a per-element path, and its reductions over a trailing axis of 4 pay a per-group
    overhead: together 2.5x slower). Not planar (the flat body, for engines): q [M(, K), 4] with
    per-group tensors [..., 1], the fewest layers for TensorRT, where broadcasts are free."""

    def __init__(self, opset: int, planar: bool) -> None:
        self.opset = opset
        self.planar = planar
        self.axis = 0 if planar else -1  # the channel axis
        self.nodes: list[NodeProto] = []
        self._n = 0
        self._attrs: set[str] = set()

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs) -> str | list[str]:
        names = [f"_{op_type.lower()}{self._n}_{i}" for i in range(outputs)]
        self._n += 1
        # named so that profiles of the inlined body show which nodes are GPCL
        self.nodes.append(oh.make_node(op_type, list(inputs), names, name=f"gpcl_{op_type}{self._n - 1}", **attrs))
        return names[0] if outputs == 1 else names

    def const_f(self, value: float) -> str:
        return self.op("Constant", value_float=float(value))

    def const_i(self, values: list[int]) -> str:
        return self.op("Constant", value_ints=list(values))

    def attr_f(self, attr: str) -> str:
        """A scalar float Constant whose value is the calling node's attribute ``attr`` (made
        once, in the scope where it is first asked for)."""
        out = f"_{attr}"
        if out in self._attrs:
            return out
        self._attrs.add(out)
        a = AttributeProto()
        a.name, a.ref_attr_name, a.type = "value_float", attr, AttributeProto.FLOAT
        node = oh.make_node("Constant", [], [out])
        node.attribute.append(a)
        self.nodes.append(node)
        return out

    def channels(self, v: str) -> list[str]:
        """The four channels of v, each keeping the channel axis (size 1)."""
        if self.opset >= 18:
            return self.op("Split", v, outputs=4, axis=self.axis, num_outputs=4)
        return self.op("Split", v, self.const_i([1, 1, 1, 1]), outputs=4, axis=self.axis)

    def stack4(self, *parts: str) -> str:
        """Four per-group tensors -> one with four channels."""
        return self.op("Concat", *parts, axis=self.axis)

    def sum_squares(self, q: str) -> str:
        """((q0*q0 + q1*q1) + q2*q2) + q3*q3 per group, in the reference's order (checked
        bit-exact in ORT): on planes, one Mul, a Split into contiguous planes and three Adds;
        otherwise one ReduceSumSquare over the trailing axis (one reduction layer)."""
        if self.planar:
            c0, c1, c2, c3 = self.channels(self.op("Mul", q, q))
            return self.op("Add", self.op("Add", self.op("Add", c0, c1), c2), c3)
        if self.opset >= 18:
            return self.op("ReduceSumSquare", q, self.const_i([-1]), keepdims=1)
        return self.op("ReduceSumSquare", q, axes=[-1], keepdims=1)

    def safe_radius(self, q: str, r: str) -> tuple[str, str]:
        """(r, rho) with the full rule: rho = sqrt(ss(q * 2^-66)) cannot overflow, so it is
        finite exactly when every channel is (the NaN rule keys on it); r stays sqrt(ss(q))
        except where that overflowed float32 (|q| > ~1.8e19), where it becomes rho * 2^66, the
        same radius without the overflow."""
        rho = self.op("Sqrt", self.sum_squares(self.op("Mul", q, self.const_f(RESCALE))))
        r = self.op("Where", self.op("IsInf", r), self.op("Mul", rho, self.const_f(1.0 / RESCALE)), r)
        return r, rho

    def branch(self, build) -> GraphProto:
        """A subgraph (for If) of the nodes ``build()`` adds; its one output is what it returns.
        Names stay unique across branches; outer-scope tensors are visible inside."""
        outer, self.nodes = self.nodes, []
        try:
            out = build()
            nodes = self.nodes
        finally:
            self.nodes = outer
        return oh.make_graph(
            nodes, f"gpcl_branch{self._n}", [], [oh.make_tensor_value_info(out, TensorProto.FLOAT, None)]
        )


def _nan_rule(b: _Body, v: str, rho: str | None) -> str:
    """``v + (rho - rho)``: unchanged where every channel is finite, NaN elsewhere (nothing on
    the fast branch, where every channel is known to be finite)."""
    return v if rho is None else b.op("Add", v, b.op("Sub", rho, rho))


def _clamp(b: _Body, q: str, r: str, rho: str | None, t: str) -> str:
    return b.op("Mul", q, _nan_rule(b, b.op("Div", t, b.op("Max", r, t)), rho))


def _soft(b: _Body, q: str, r: str, rho: str | None, t: str) -> str:
    a = b.op("Max", b.op("Div", r, t), b.const_f(FLOAT_MIN))  # never 0/0 when r/t underflows
    s = b.op("Where", b.op("Less", r, b.attr_f("eps")), b.const_f(1.0), b.op("Div", b.op("Tanh", a), a))
    return b.op("Mul", q, _nan_rule(b, s, rho))


def _hopf(b: _Body, q: str, r: str, rho: str | None, t: str) -> str:
    eps = b.attr_f("eps")
    rs = b.op("Max", r, eps)  # u stays finite for r < eps, where k is 0 anyway
    u0, u1, u2, u3 = (b.op("Div", c, rs) for c in b.channels(q))
    two = b.const_f(2.0)
    p0 = b.op("Mul", two, b.op("Add", b.op("Mul", u0, u2), b.op("Mul", u1, u3)))
    p1 = b.op("Mul", two, b.op("Sub", b.op("Mul", u1, u2), b.op("Mul", u0, u3)))
    p2 = b.op(
        "Sub",
        b.op("Add", b.op("Mul", u0, u0), b.op("Mul", u1, u1)),
        b.op("Add", b.op("Mul", u2, u2), b.op("Mul", u3, u3)),
    )
    k = b.op("Mul", b.op("Min", r, t), b.const_f(INV_SQRT2))
    k = _nan_rule(b, b.op("Where", b.op("Less", r, eps), b.const_f(0.0), k), rho)
    return b.stack4(b.op("Mul", k, p0), b.op("Mul", k, p1), b.op("Mul", k, p2), k)


# One body builder per mode (a table, not an if-chain); each maps q, r, rho (None: all finite),
# t -> y in the body's layout.
_MODE_BODY = {"clamp": _clamp, "soft": _soft, "hopf": _hopf}


def overload_name(mode: str, tau_input: bool) -> str:
    return f"{mode}_{'input' if tau_input else 'attr'}"


def gpcl_function(
    mode: str, tau_input: bool, opset: int = 18, overload: str = "", body: str = "branching"
) -> FunctionProto:
    """The GPCL body specialised to ``mode`` and to where tau comes from, for a model whose
    default-domain opset is ``opset`` (>= 15).

    ``body="branching"`` (the one models carry, tuned for ONNX Runtime on CPU): an If picks a
    fast branch when every group radius is finite (no NaN/Inf channel, no overflow), which
    needs neither the NaN rule nor the rescaled radius, and the full rule otherwise; its cost
    is one ReduceSum of the radii. ``body="flat"`` (what engine builds parse): no If, since in
    an engine a conditional is a run-time branch on a device value (a likely host
    synchronisation) with both branches built; the full rule on every group instead. Both
    compute the same function."""
    if opset < _MIN_BODY_OPSET:
        raise GpclError(f"the GPCL ONNX function needs opset >= {_MIN_BODY_OPSET}, the model has {opset}")
    if body not in BODIES:
        raise GpclError(f"GPCL function body must be one of {', '.join(BODIES)}, got {body!r}")
    b = _Body(opset, planar=body == "branching")
    xf = b.op("Cast", "X", to=TensorProto.FLOAT)
    if not tau_input:
        t = b.attr_f("tau")
    else:
        # Per-group layout [..., K] with K = tau's size (1 for a scalar tau, G for a per-group
        # one) and t [K]; ORT folds the shape arithmetic away when tau is an initializer.
        k = b.op("Reshape", b.op("Size", "tau"), b.const_i([1]))
        t = b.op("Reshape", b.op("Cast", "tau", to=TensorProto.FLOAT), b.const_i([-1]))
    if b.planar:
        # [M, 4] -> planes [4, M] (a 2-D transpose, cheaper in ORT than moving the last axis
        # of [M, K, 4]), then a free reshape to [4, M / K, K] for a per-group tau.
        q = b.op("Transpose", b.op("Reshape", xf, b.const_i([-1, 4])), perm=[1, 0])
        if tau_input:
            q = b.op("Reshape", q, b.op("Concat", b.const_i([4, -1]), k, axis=0))
    elif tau_input:
        q = b.op("Reshape", xf, b.op("Concat", b.const_i([-1]), k, b.const_i([4]), axis=0))  # [M, K, 4]
        t = b.op("Unsqueeze", t, b.const_i([-1]))  # [K, 1], against [M, K, 1]
    else:
        q = b.op("Reshape", xf, b.const_i([-1, 4]))
    mode_body = _MODE_BODY[mode]
    r = b.op("Sqrt", b.sum_squares(q))
    if body == "flat":
        yq = mode_body(b, q, *b.safe_radius(q, r), t)
    else:
        if mode != "clamp":
            b.attr_f("eps")  # in the outer scope, where ref_attr_name resolves
        # Every radius finite <=> their sum is finite (radii are >= 0 or NaN); a sum that
        # overflows merely takes the slow branch.
        total = b.op("ReduceSum", r, keepdims=0)
        fast = b.op("Equal", b.op("Sub", total, total), b.const_f(0.0))
        yq = b.op(
            "If",
            fast,
            then_branch=b.branch(lambda: mode_body(b, q, r, None, t)),
            else_branch=b.branch(lambda: mode_body(b, q, *b.safe_radius(q, r), t)),
        )
        if tau_input:
            yq = b.op("Reshape", yq, b.const_i([4, -1]))
        yq = b.op("Transpose", yq, perm=[1, 0])
    y = b.op("Reshape", yq, b.op("Shape", "X"))
    b.nodes.append(oh.make_node("CastLike", [y, "X"], ["Y"]))
    fn = oh.make_function(
        GPCL_DOMAIN,
        GPCL_OP,
        ["X", "tau"] if tau_input else ["X"],
        ["Y"],
        b.nodes,
        opset_imports=[oh.make_opsetid("", opset)],
        attributes=["tau"],
        attribute_protos=[oh.make_attribute("mode", mode), oh.make_attribute("eps", DEFAULT_EPS)],
        doc_string=f"GPCL v{GPCL_OPSET}, mode={mode}, tau from {'input' if tau_input else 'attribute'}, "
        f"{body} body (docs/gpcl-spec.md)",
    )
    if overload:
        fn.overload = overload
    return fn


# ----------------------------------------------------------------------------- models
def _default_opset(model: ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise GpclError("the model imports no default-domain (ai.onnx) opset")


def _set_opset(model: ModelProto, domain: str, version: int) -> None:
    for imp in model.opset_import:
        if imp.domain == domain:
            imp.version = version
            return
    model.opset_import.append(oh.make_opsetid(domain, version))


def remove_gpcl_functions(model: ModelProto) -> ModelProto:
    """Drop the model-local GPCL function(s) and node overloads, keeping the GPCL nodes and the
    ``gpcl`` opset import (what a TensorRT build with the native plugin wants). In place;
    returns ``model``."""
    keep = [f for f in model.functions if f.domain != GPCL_DOMAIN]
    del model.functions[:]
    model.functions.extend(keep)
    for node in iter_gpcl_nodes(model.graph):
        node.overload = ""
    return model


def gpcl_variants(model: ModelProto) -> list[tuple[str, bool]]:
    """The sorted (mode, tau-from-input) combinations used by the model's GPCL nodes."""
    return sorted({node_variant(n) for n in iter_gpcl_nodes(model.graph)})


def attach_gpcl_functions(model: ModelProto, body: str = "branching") -> ModelProto:
    """Give ``model`` the model-local GPCL function(s) its GPCL nodes need and the ``gpcl``
    opset import, replacing any earlier GPCL functions (so it is idempotent and picks up changed
    modes). ``body``: see :func:`gpcl_function` (models carry the branching one; engine builds
    swap in the flat one). In place; returns ``model``. A model without GPCL nodes only loses
    stale functions."""
    remove_gpcl_functions(model)
    for node in iter_gpcl_nodes(model.graph):
        while len(node.input) > 1 and node.input[-1] == "":  # an omitted optional tau
            node.input.pop()
    variants = gpcl_variants(model)
    if not variants:
        return model
    opset = _default_opset(model)
    if len(variants) == 1:
        model.functions.append(gpcl_function(*variants[0], opset=opset, body=body))
    else:
        # Mixed combinations: one overload each (IR >= 10), and every node names its own.
        model.functions.extend(gpcl_function(m, ti, opset, overload_name(m, ti), body) for m, ti in variants)
        for node in iter_gpcl_nodes(model.graph):
            node.overload = overload_name(*node_variant(node))
        model.ir_version = max(model.ir_version, 10)
    model.ir_version = max(model.ir_version, 8)  # model-local functions need IR >= 8
    _set_opset(model, GPCL_DOMAIN, GPCL_OPSET)
    return model


def gpcl_model(
    shape: Iterable[int | str | None] | None,
    *,
    mode: str = "clamp",
    tau: float | None = 1.0,
    tau_shape: Iterable[int] | None = None,
    dtype: int = TensorProto.FLOAT,
    eps: float = DEFAULT_EPS,
    opset: int = 18,
    body: str = "branching",
) -> ModelProto:
    """A one-node model ``Y = GPCL(X[, tau])`` with the function attached: for tests, benchmarks
    and engine smoke builds. ``tau_shape`` (e.g. [] or [D/4]) makes tau a graph input."""
    shape = None if shape is None else list(shape)  # None: any rank
    inputs = [oh.make_tensor_value_info("X", dtype, shape)]
    if tau_shape is not None:
        inputs.append(oh.make_tensor_value_info("tau", TensorProto.FLOAT, list(tau_shape)))
    node = make_gpcl_node(
        "X", "Y", name="gpcl/test", mode=mode, tau=tau, tau_input="tau" if tau_shape is not None else None, eps=eps
    )
    graph = oh.make_graph([node], "gpcl", inputs, [oh.make_tensor_value_info("Y", dtype, shape)])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=10)
    return attach_gpcl_functions(model, body)


def inline_gpcl_functions(model: ModelProto, body: str = "branching") -> ModelProto:
    """A copy of ``model`` with every GPCL call replaced by its ``body`` (standard ops only).

    TensorRT(-RTX)'s ONNX parser looks local functions up by name and ignores ``overload``, so a
    model that mixes GPCL modes or tau sources must be inlined before it reaches the parser; a
    single-variant model parses either way. The GPCL nodes' ``gpcl`` opset import is dropped."""
    import onnx.inliner

    attached = attach_gpcl_functions(ModelProto.FromString(model.SerializeToString()), body)
    # The inliner does not apply a function's attribute defaults: spell them out on each node,
    # or an attribute left at its default inlines to an empty Constant.
    for node in iter_gpcl_nodes(attached.graph):
        present = {a.name for a in node.attribute}
        if "mode" not in present:
            node.attribute.append(oh.make_attribute("mode", "clamp"))
        if "eps" not in present:
            node.attribute.append(oh.make_attribute("eps", DEFAULT_EPS))
    out = onnx.inliner.inline_selected_functions(attached, [(GPCL_DOMAIN, GPCL_OP)])
    keep = [i for i in out.opset_import if i.domain != GPCL_DOMAIN]
    del out.opset_import[:]
    out.opset_import.extend(keep)
    return out
