"""The GPCL ONNX function run by real ONNX Runtime sessions (and parsed + built by TensorRT-RTX)
against the reference."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

from gpcl_trt.common import GpclError
from gpcl_trt.plugins.onnx_function import (
    BODIES,
    GPCL_DOMAIN,
    GPCL_OP,
    attach_gpcl_functions,
    gpcl_model,
    inline_gpcl_functions,
    make_gpcl_node,
    remove_gpcl_functions,
)
from gpcl_trt.plugins.reference import MODES, gpcl_numpy

DTYPES = {"float32": (TensorProto.FLOAT, np.float32), "float16": (TensorProto.FLOAT16, np.float16)}
G = 6


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    if all(i.type.tensor_type.HasField("shape") for i in model.graph.input):  # the checker wants ranks
        onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def sample(shape, dtype, seed=0):
    """Random groups spanning inside/outside the ball, plus zero, tiny, NaN and Inf groups."""
    rng = np.random.default_rng(seed)
    scale = rng.choice([0.05, 1, 8], size=(*shape[:-1], shape[-1] // 4, 1)).repeat(4, -1).reshape(shape)
    x = rng.standard_normal(shape) * scale
    flat = x.reshape(-1, 4)
    flat[0] = 0
    if flat.shape[0] > 4:
        flat[1] = [3e-7, 0, -2e-7, 0]
        flat[2, 1] = np.nan
        flat[3, 3] = np.inf
        flat[4, 0] = -np.inf
    if flat.shape[0] > 6 and dtype == np.float32:
        flat[5] = [3e19, 0, -1e19, 0]  # the float32 sum of squares overflows: still finite out
        flat[6] = [3e38, 3e38, 0, 0]  # radius > FLT_MAX
    return x.astype(dtype)


def assert_matches(y, ref, dtype):
    assert y.dtype == ref.dtype and y.shape == ref.shape
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    tol = 2e-6 if dtype == np.float32 else 1e-3  # one float32 ulp can flip a float16 rounding
    np.testing.assert_allclose(y.astype(np.float32), ref.astype(np.float32), rtol=tol, atol=tol)


TAU_KINDS = {  # tau source -> (tau_shape for gpcl_model or None, tau value)
    "attribute": (None, 1.3),
    "scalar-input": ([], np.float32(0.9)),
    "per-group-input": ([G], np.linspace(0.25, 4, G).astype(np.float32)),
}


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("tau_kind", TAU_KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_ort_matches_reference(mode, dtype, tau_kind, body):
    """Both bodies (the branching one models carry, the flat one engine builds parse)."""
    onnx_dtype, np_dtype = DTYPES[dtype]
    tau_shape, tau = TAU_KINDS[tau_kind]
    # Rank unknown in the graph: the same session serves leading ranks 0..3 (X rank 1..4).
    model = gpcl_model(None, mode=mode, tau=1.3, tau_shape=tau_shape, dtype=onnx_dtype, body=body)
    sess = session(model)
    for shape in [(4 * G,), (5, 4 * G), (2, 3, 4 * G), (2, 1, 3, 4 * G)]:
        x = sample(shape, np_dtype, seed=len(shape))
        feeds = {"X": x} if tau_shape is None else {"X": x, "tau": np.asarray(tau, np.float32)}
        (y,) = sess.run(None, feeds)
        ref = gpcl_numpy(x, tau, mode)
        assert_matches(y, ref, np_dtype)
        if mode == "clamp":  # bit-exact identity inside the ball, through ORT too
            inside = np.linalg.norm(x.astype(np.float64).reshape(-1, 4), axis=1) <= np.broadcast_to(
                np.asarray(tau, np.float32).reshape(-1), (x.size // (4 * G), G)
            ).reshape(-1)
            assert np.array_equal(y.reshape(-1, 4)[inside], x.reshape(-1, 4)[inside])


def test_initializer_tau_and_eps_default():
    """tau as an initializer (the calibrated case); eps falls back to the declared default."""
    tau = numpy_helper.from_array(np.full(2, 0.5, np.float32), "tau")
    no_eps = oh.make_node(GPCL_OP, ["X", "tau"], ["Y"], domain=GPCL_DOMAIN, mode="hopf")
    graph = oh.make_graph(
        [no_eps],
        "g",
        [oh.make_tensor_value_info("X", TensorProto.FLOAT, [2, 8])],
        [oh.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 8])],
        initializer=[tau],
    )
    model = attach_gpcl_functions(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)]))
    x = np.array([[5e-7, 0, 0, 0, 1, 2, 3, 4], [1e-3, 0, 0, 0, 0, 0, 0, 0]], np.float32)
    (y,) = session(model).run(None, {"X": x})
    np.testing.assert_allclose(y, gpcl_numpy(x, np.full(2, 0.5, np.float32), "hopf"), rtol=2e-6, atol=1e-9)
    assert np.all(y[0, :4] == 0) and y[1, 3] > 0  # r < 1e-6 -> 0; r = 1e-3 -> projected


def test_omitted_optional_tau_input_uses_the_attribute():
    node = oh.make_node(GPCL_OP, ["X", ""], ["Y"], domain=GPCL_DOMAIN, tau=0.5)
    graph = oh.make_graph(
        [node],
        "g",
        [oh.make_tensor_value_info("X", TensorProto.FLOAT, [3, 8])],
        [oh.make_tensor_value_info("Y", TensorProto.FLOAT, [3, 8])],
    )
    model = attach_gpcl_functions(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)]))
    x = sample((3, 8), np.float32)
    (y,) = session(model).run(None, {"X": x})
    assert_matches(y, gpcl_numpy(x, 0.5), np.float32)


def test_explicit_eps_reaches_the_body():
    x = np.array([[5e-7, 0, 0, 0]], np.float32)
    (y,) = session(gpcl_model([1, 4], mode="hopf", tau=1.0, eps=1e-8)).run(None, {"X": x})
    np.testing.assert_allclose(y, gpcl_numpy(x, 1.0, "hopf", eps=1e-8), rtol=2e-6)
    assert y[0, 3] > 0


def chain_model(opset=18, ir=9):
    """clamp (attribute tau) -> soft (initializer tau) -> hopf: three combinations in one model."""
    nodes = [
        make_gpcl_node("X", "A", name="gpcl/layer0/pre-attention", tau=1.0),
        make_gpcl_node("A", "B", name="gpcl/layer0/pre-mlp", mode="soft", tau_input="tau"),
        make_gpcl_node("B", "Y", name="gpcl/layer1/pre-attention", mode="hopf", tau=0.7, eps=1e-3),
    ]
    graph = oh.make_graph(
        nodes,
        "chain",
        [oh.make_tensor_value_info("X", TensorProto.FLOAT, ["n", 8])],
        [oh.make_tensor_value_info("Y", TensorProto.FLOAT, ["n", 8])],
        initializer=[numpy_helper.from_array(np.array([0.5, 2.0], np.float32), "tau")],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=ir)


def chain_reference(x):
    return gpcl_numpy(gpcl_numpy(gpcl_numpy(x, 1.0), np.array([0.5, 2.0], np.float32), "soft"), 0.7, "hopf", 1e-3)


@pytest.mark.parametrize("opset", [15, 17, 18, 20])
def test_mixed_modes_use_overloads(opset):
    model = attach_gpcl_functions(chain_model(opset))
    assert sorted(f.overload for f in model.functions) == ["clamp_attr", "hopf_attr", "soft_input"]
    assert model.ir_version >= 10 and {i.domain: i.version for i in model.opset_import}[GPCL_DOMAIN] == 1
    x = sample((7, 8), np.float32)
    (y,) = session(model).run(None, {"X": x})
    assert_matches(y, chain_reference(x), np.float32)


def test_attach_is_idempotent_and_refreshes_modes():
    model = attach_gpcl_functions(chain_model())
    once = model.SerializeToString()
    assert attach_gpcl_functions(model).SerializeToString() == once
    for node in model.graph.node:  # every node -> clamp with attribute tau: one plain function
        del node.input[1:]
        for a in node.attribute:
            if a.name == "mode":
                a.s = b"clamp"
        if not any(a.name == "tau" for a in node.attribute):
            node.attribute.append(oh.make_attribute("tau", 2.0))
    attach_gpcl_functions(model)
    attach_gpcl_functions(model)
    assert [(f.name, f.overload) for f in model.functions] == [(GPCL_OP, "")]
    assert all(n.overload == "" for n in model.graph.node)
    x = sample((7, 8), np.float32)
    (y,) = session(model).run(None, {"X": x})
    assert_matches(y, gpcl_numpy(gpcl_numpy(gpcl_numpy(x, 1.0), 2.0), 0.7), np.float32)


def test_remove_keeps_nodes_and_domain():
    model = remove_gpcl_functions(attach_gpcl_functions(chain_model()))
    assert len(model.functions) == 0 and len(model.graph.node) == 3
    assert all(n.domain == GPCL_DOMAIN and n.overload == "" for n in model.graph.node)
    assert GPCL_DOMAIN in {i.domain for i in model.opset_import}
    with pytest.raises(Exception, match="GPCL"):  # ORT has no kernel without the function
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_model_without_gpcl_is_unchanged():
    graph = oh.make_graph(
        [oh.make_node("Relu", ["X"], ["Y"])],
        "g",
        [oh.make_tensor_value_info("X", TensorProto.FLOAT, [2])],
        [oh.make_tensor_value_info("Y", TensorProto.FLOAT, [2])],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)])
    before = model.SerializeToString()
    assert attach_gpcl_functions(model).SerializeToString() == before


@pytest.mark.parametrize(
    "node, match",
    [
        (oh.make_node(GPCL_OP, ["X"], ["Y"], domain=GPCL_DOMAIN, mode="clamp"), "neither a tau"),
        (oh.make_node(GPCL_OP, ["X"], ["Y"], domain=GPCL_DOMAIN, mode="tanh", tau=1.0), "mode"),
        (oh.make_node(GPCL_OP, ["X"], ["Y"], domain=GPCL_DOMAIN, tau=-1.0), "tau must be > 0"),
        (oh.make_node(GPCL_OP, ["X"], ["Y"], domain=GPCL_DOMAIN, tau=1.0, eps=0.0), "eps must be > 0"),
    ],
)
def test_bad_nodes_are_refused(node, match):
    graph = oh.make_graph(
        [node],
        "g",
        [oh.make_tensor_value_info("X", TensorProto.FLOAT, [8])],
        [oh.make_tensor_value_info("Y", TensorProto.FLOAT, [8])],
    )
    with pytest.raises(GpclError, match=match):
        attach_gpcl_functions(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)]))


def test_old_opset_is_refused():
    with pytest.raises(GpclError, match="opset >= 15"):
        attach_gpcl_functions(chain_model(opset=14))


def test_make_gpcl_node_checks():
    with pytest.raises(GpclError, match="tau"):
        make_gpcl_node("X", "Y")
    with pytest.raises(GpclError, match="mode"):
        make_gpcl_node("X", "Y", tau=1.0, mode="bad")


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_tensorrt_rtx_parses_and_builds(mode, dtype, body):
    """TensorRT-RTX's ONNX parser imports either body and builds an engine (no GPU needed to
    build; running it needs one)."""
    trt = pytest.importorskip("tensorrt_rtx", reason="needs TensorRT-RTX (tensorrt-rtx-cu13)")
    model = gpcl_model([-1, 4 * G], mode=mode, tau=1.3, tau_shape=[G], dtype=DTYPES[dtype][0], body=body)
    # tau as an initializer, as the calibrated insertion writes it
    model.graph.input.pop()
    model.graph.initializer.append(numpy_helper.from_array(np.linspace(0.5, 2, G).astype(np.float32), "tau"))
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(model.SerializeToString()), [parser.get_error(i).desc() for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("X", (1, 4 * G), (8, 4 * G), (64, 4 * G))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    assert engine is not None and engine.nbytes > 0


def test_inlined_mixed_model_runs_in_ort_and_tensorrt_rtx():
    """TensorRT-RTX ignores FunctionProto overloads (it refuses the mixed model as is);
    inline_gpcl_functions makes the same model parse, and ORT gives the same numbers."""
    trt = pytest.importorskip("tensorrt_rtx", reason="needs TensorRT-RTX (tensorrt-rtx-cu13)")
    model = attach_gpcl_functions(chain_model())
    inlined = inline_gpcl_functions(model)
    assert not inlined.functions and not any(n.domain == GPCL_DOMAIN for n in inlined.graph.node)
    assert len(model.functions) == 3  # the input model is left alone
    x = sample((7, 8), np.float32)
    (y,) = session(inlined).run(None, {"X": x})
    assert_matches(y, chain_reference(x), np.float32)
    logger = trt.Logger(trt.Logger.ERROR)
    for m, ok in [(model, False), (inlined, True)]:
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # must outlive the parser
        parser = trt.OnnxParser(network, logger)
        assert parser.parse(m.SerializeToString()) == ok


@pytest.mark.parametrize("mode", MODES)
def test_inlining_applies_attribute_defaults(mode):
    """A node that leaves eps at its default must inline to the same function: the inliner does
    not fill in a function's attribute defaults by itself (soft and hopf read eps)."""
    node = oh.make_node("GPCL", ["X"], ["Y"], domain=GPCL_DOMAIN, tau=0.5, mode=mode)
    graph = oh.make_graph(
        [node],
        "g",
        [oh.make_tensor_value_info("X", TensorProto.FLOAT, [None, 8])],
        [oh.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 8])],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18), oh.make_opsetid(GPCL_DOMAIN, 1)])
    inlined = inline_gpcl_functions(model)
    onnx.checker.check_model(inlined, full_check=True)
    x = sample((5, 8), np.float32)
    (y,) = session(inlined).run(None, {"X": x})
    assert_matches(y, gpcl_numpy(x, 0.5, mode), np.float32)


@pytest.fixture(scope="module")
def per_group_sessions():
    """One session per (mode, body): X of any rank with D = 4*G, per-group tau as an input."""
    return {(m, b): session(gpcl_model(None, mode=m, tau=1.0, tau_shape=[G], body=b)) for m in MODES for b in BODIES}


def test_ort_matches_reference_on_random_tensors(per_group_sessions):
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp

    finite = st.floats(-1e3, 1e3, width=32)
    big = [float(np.float32(v)) for v in (3e19, -2e25, 3e38)]  # the float32 sum of squares overflows
    specials = st.sampled_from([0.0, -0.0, float(np.float32(1e-30)), *big, np.nan, np.inf, -np.inf])

    @settings(max_examples=80, deadline=None)
    @given(st.lists(st.integers(1, 3), max_size=3), st.sampled_from(MODES), st.sampled_from(BODIES), st.data())
    def check(lead, mode, body, data):
        x = data.draw(hnp.arrays(np.float32, (*lead, 4 * G), elements=st.one_of(finite, specials)))
        tau = data.draw(hnp.arrays(np.float32, (G,), elements=st.floats(0.0625, 100, width=32)))
        (y,) = per_group_sessions[mode, body].run(None, {"X": x, "tau": tau})
        assert_matches(y, gpcl_numpy(x, tau, mode), np.float32)

    check()


@pytest.mark.parametrize("tau_kind", TAU_KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_branching_body_fast_and_slow_branches_agree(mode, tau_kind):
    """The branching body takes its fast branch only when every radius is finite; one NaN
    group sends the whole call down the full rule. Both must give the other groups the same
    bits, and both must equal the flat body."""
    tau_shape, tau = TAU_KINDS[tau_kind]
    feeds_tau = {} if tau_shape is None else {"tau": np.asarray(tau, np.float32)}
    branching, flat = (session(gpcl_model(None, mode=mode, tau=1.3, tau_shape=tau_shape, body=b)) for b in BODIES)
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((9, 4 * G)) * rng.choice([0.01, 1, 30], (9, 1))).astype(np.float32)
    (fast,) = branching.run(None, {"X": x, **feeds_tau})
    assert_matches(fast, gpcl_numpy(x, tau, mode), np.float32)
    poisoned = x.copy()
    poisoned[4, 5] = np.nan
    (slow,) = branching.run(None, {"X": poisoned, **feeds_tau})
    (flat_y,) = flat.run(None, {"X": poisoned, **feeds_tau})
    assert np.isnan(slow[4, 4:8]).all()
    others = np.ones(x.shape, bool)
    others[4, 4:8] = False
    np.testing.assert_array_equal(slow[others], fast[others])
    np.testing.assert_array_equal(slow, flat_y)


def test_unknown_body_is_refused():
    with pytest.raises(GpclError, match="body"):
        gpcl_model([1, 4], body="fast")
