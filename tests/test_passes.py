"""Graph-surgery passes on real exports (MiniLM, tiny Llama, tiny GPT-2 with past) and on a
hand-built toy transformer, with real ONNX Runtime sessions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto
from onnx import helper as oh

from gpcl_trt.common import GpclError, sha256_file
from gpcl_trt.feeds import complete_feed, specs_from_session
from gpcl_trt.passes import calibrate_file, find_sites, insert_file, insert_gpcl, sites_file, strip_file, strip_gpcl
from gpcl_trt.passes.calibrate import _pad_batches, _tokenizer
from gpcl_trt.passes.graph import from_proto, load_graph
from gpcl_trt.passes.sites import find_sites_loaded
from gpcl_trt.plugins.reference import gpcl_numpy

# Sentences that are NOT in passes/data/calibration.txt (checked below): the held-out set.
HELD_OUT = [
    "The astronomer pointed her telescope at a faint galaxy near Andromeda.",
    "Our landlord finally agreed to fix the leaking roof before winter.",
    "Fermented foods like kimchi and yogurt contain beneficial bacteria.",
    "Why does the moon look larger when it is close to the horizon?",
    "The cyclist repaired a flat tyre on the side of the country road.",
    "Parliament debated the new immigration bill late into the night.",
    "I accidentally deleted the folder containing all my holiday photos.",
    "Tigers are solitary hunters that mostly stalk their prey at night.",
    "The barista drew a perfect heart in the foam of my cappuccino.",
    "Supply chain disruptions pushed the price of microchips higher.",
    "Error 0x80070005: access denied while writing C:\\Users\\admin\\temp.log",
    "def f(x): return x ** 2 + 3 * x - 7  # a quadratic",
    "Wow!!! That was AMAZING... totally unexpected :-)",
    "Die Katze schläft auf dem warmen Fensterbrett.",
    "The the the the the the the the the the the the the the the the",
    "Call 555-0199 before 5pm on 12/03/2027 to confirm reference #A-77Q.",
]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(params=["minilm", "llama", "gpt2"])
def exported(request) -> tuple[str, Path, int]:
    """(name, onnx path, number of layers) of each real export."""
    fixture, layers = {"minilm": ("minilm_onnx", 6), "llama": ("tiny_llama_onnx", 2), "gpt2": ("tiny_gpt2_onnx", 2)}[
        request.param
    ]
    return request.param, request.getfixturevalue(fixture), layers


def toy_transformer(d: int = 32, layers: int = 2, norm: str = "layer", vocab: int = 50) -> onnx.ModelProto:
    """A pre-LN decoder built by hand, without any exporter metadata: embedding Gather, per layer
    norm -> Q/K/V -> Softmax attention -> o-proj -> residual, norm -> fc1 -> Relu -> fc2 ->
    residual; final norm -> lm_head. ``norm`` "layer" uses LayerNormalization, "rms" the
    decomposed x / Sqrt(ReduceMean(x^2) + eps) * w."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def w(name, *shape, scale=0.3):
        inits.append(onnx.numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def c(name, value):
        inits.append(onnx.numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op, inputs, out, **attrs):
        nodes.append(oh.make_node(op, inputs, [out], name=f"n_{out}", **attrs))
        return out

    c("two", np.float32(2)), c("eps", np.float32(1e-6)), c("axes", np.array([-1], np.int64))

    def normalise(x, tag):
        if norm == "layer":
            return node("LayerNormalization", [x, w(f"{tag}.g", d), w(f"{tag}.b", d)], f"{tag}.out", axis=-1)
        if norm == "ln":
            x = node("Sub", [x, node("ReduceMean", [x, "axes"], f"{tag}.mu")], f"{tag}.d")
        ms = node("ReduceMean", [node("Pow", [x, "two"], f"{tag}.sq"), "axes"], f"{tag}.ms")
        den = node("Sqrt", [node("Add", [ms, "eps"], f"{tag}.mse")], f"{tag}.rms")
        y = node(
            "Mul", [node("Div", [x, den], f"{tag}.xn"), w(f"{tag}.g", d)], f"{tag}.out" if norm == "rms" else f"{tag}.y"
        )
        return y if norm == "rms" else node("Add", [y, w(f"{tag}.b", d)], f"{tag}.out")

    h = node("Gather", [w("emb", vocab, d, scale=1.0), "input_ids"], "h0")
    for i in range(layers):
        n1 = normalise(h, f"l{i}.ln1")
        q, k, v = (node("MatMul", [n1, w(f"l{i}.w{p}", d, d)], f"l{i}.{p}") for p in "qkv")
        s = node("MatMul", [q, node("Transpose", [k], f"l{i}.kt", perm=[0, 2, 1])], f"l{i}.s")
        a = node("MatMul", [node("Softmax", [s], f"l{i}.p", axis=-1), v], f"l{i}.a")
        h = node("Add", [h, node("MatMul", [a, w(f"l{i}.wo", d, d)], f"l{i}.o")], f"l{i}.h1")
        n2 = normalise(h, f"l{i}.ln2")
        f = node("Relu", [node("MatMul", [n2, w(f"l{i}.w1", d, 2 * d)], f"l{i}.f1")], f"l{i}.g")
        h = node("Add", [h, node("MatMul", [f, w(f"l{i}.w2", 2 * d, d)], f"l{i}.f2")], f"l{i}.h2")
    node("MatMul", [normalise(h, "lnf"), w("lm_head", d, vocab)], "logits")
    graph = oh.make_graph(
        nodes,
        "toy",
        [oh.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [oh.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab])],
        inits,
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="module")
def toy_onnx(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("toy") / "toy.onnx"
    onnx.save(toy_transformer(norm="rms"), p)
    return p


# ----------------------------------------------------------------------------- helpers
def random_feed(path: Path, batch: int = 2, seq: int = 11, seed: int = 0) -> dict[str, np.ndarray]:
    sess = _session(path)
    ids = np.random.default_rng(seed).integers(1, 50, (batch, seq), dtype=np.int64)  # < every vocab here
    return complete_feed(specs_from_session(sess), {"input_ids": ids})


_SESSIONS: dict[tuple, ort.InferenceSession] = {}


def _session(path: Path, outputs: tuple[str, ...] = ()) -> ort.InferenceSession:
    """A cached ORT session; ``outputs`` exposes intermediate tensors as extra graph outputs.
    The key includes mtime and size, so a rewritten file gets a new session."""
    key = (str(path), path.stat().st_mtime_ns, path.stat().st_size, outputs)
    if key not in _SESSIONS:
        model = onnx.load(str(path))
        model.graph.output.extend(oh.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs)
        _SESSIONS[key] = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return _SESSIONS[key]


def run(path: Path, feed: dict, outputs: list[str] | None = None) -> list[np.ndarray]:
    return _session(path, tuple(outputs or ())).run(outputs, feed)


def strip_metadata(path: Path, out: Path) -> Path:
    m = onnx.load(str(path))
    for n in m.graph.node:
        del n.metadata_props[:]
    onnx.save(m, str(out))
    return out


def site_keys(sites) -> list[tuple]:
    return [(s["layer"], s["kind"], s["tensor"], tuple(s["consumers"])) for s in sites]


def gpcl_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == "gpcl" and n.op_type == "GPCL"]


def max_abs(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- sites
def test_sites_one_per_layer_and_kind_on_every_export(exported, tmp_path):
    name, path, layers = exported
    res = sites_file(path)
    assert res["method"] == "metadata"
    assert [(s["layer"], s["kind"]) for s in res["sites"]] == [
        (i, k) for i in range(layers) for k in ("pre-attention", "pre-mlp")
    ]
    assert all(s["hidden"] == (384 if name == "minilm" else 64) for s in res["sites"])
    # Consumers are the projection path only: Q/K/V (3; GPT-2's fused c_attn is 1) and the MLP's
    # first projection(s) (Llama gate+up).
    n_attn = {"minilm": 3, "llama": 3, "gpt2": 1}[name]
    n_mlp = {"minilm": 1, "llama": 2, "gpt2": 1}[name]
    assert [len(s["consumers"]) for s in res["sites"]] == [n_attn, n_mlp] * layers
    # The same sites without metadata, from the graph structure alone.
    bare = sites_file(strip_metadata(path, tmp_path / "bare.onnx"))
    assert bare["method"] == "structure"
    assert site_keys(bare["sites"]) == site_keys(res["sites"])


def test_minilm_sites_are_post_ln_norm_outputs(minilm_onnx):
    lm = load_graph(minilm_onnx)
    sites = find_sites_loaded(lm)
    assert len(sites) == 12 and all(s.norm == "LayerNormalization" for s in sites)
    producers = {t: n for n in lm.model.graph.node for t in n.output}
    scopes = lm.scopes
    # Layer 0 pre-attention is the embeddings LayerNorm; layer L>0 pre-attention is layer L-1's
    # output LayerNorm (post-LN); pre-MLP is the attention output LayerNorm of the same layer.
    for s in sites:
        scope = scopes[producers[s.tensor].name][-2]
        if s.kind == "pre-attention":
            want = "embeddings.LayerNorm" if s.layer == 0 else f"layer.{s.layer - 1}.output.LayerNorm"
        else:
            want = f"layer.{s.layer}.attention.output.LayerNorm"
        assert scope.endswith(want), (s.key, scope)
        # The residual path also reads the norm output: it is never a rewired consumer.
        readers = [n for n in lm.model.graph.node if s.tensor in n.input]
        assert any(n.op_type in ("Add", "Sum") for n in readers if n.name not in s.consumers)
        assert all(n.op_type == "MatMul" for n in readers if n.name in s.consumers)


def test_structural_sites_on_hand_built_models():
    for norm, label in (
        ("layer", "LayerNormalization"),
        ("rms", "RMSNorm (decomposed)"),
        ("ln", "LayerNorm (decomposed)"),
    ):
        sites = find_sites(from_proto(toy_transformer(norm=norm)).graph)
        assert [(s.layer, s.kind, s.tensor, s.norm) for s in sites] == [
            (i, k, f"l{i}.{ln}.out", label)
            for i in range(2)
            for k, ln in (("pre-attention", "ln1"), ("pre-mlp", "ln2"))
        ]  # the final norm feeding only lm_head is not a site
        assert all(s.method == "structure" for s in sites)


# ----------------------------------------------------------------------------- insert
def test_clamp_with_huge_tau_is_exactly_the_original(exported, tmp_path):
    name, path, layers = exported
    out = tmp_path / "g.onnx"
    res = insert_file(path, out, tau=1e9)
    assert len(res["inserted"]) == 2 * layers
    feed = random_feed(path)
    assert max_abs(run(path, feed), run(out, feed)) == 0.0
    manifest = json.loads(out.with_suffix(".manifest.json").read_text())
    assert manifest["stage"] == "insert"
    assert manifest["inputs"]["source_sha256"] == sha256_file(path)
    assert manifest["options"]["mode"] == "clamp" and manifest["options"]["tau_source"] == {"tau": 1e9}
    assert len(manifest["results"]["sites"]) == 2 * layers
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert {n.name for n in gpcl_nodes(model)} == {
        f"gpcl/layer{i}/{k}" for i in range(layers) for k in ("pre-attention", "pre-mlp")
    }
    # Node metadata survives the graphsurgeon round trip, so sites are still found from it.
    assert sites_file(out)["method"] == "metadata"


def test_calibrated_clamp_on_minilm_held_out_sentences(minilm_onnx, minilm_gpcl_onnx, minilm_dir):
    """The shared fixture: clamp at all 12 sites, tau calibrated on 16 corpus sentences."""
    corpus = set((Path(__file__).parents[1] / "passes" / "data" / "calibration.txt").read_text().splitlines())
    assert not corpus & set(HELD_OUT)
    manifest = json.loads(minilm_gpcl_onnx.with_suffix(".manifest.json").read_text())
    assert "calibration_sha256" in manifest["options"]["tau_source"]
    assert len(gpcl_nodes(onnx.load(str(minilm_gpcl_onnx)))) == 12
    tok = _tokenizer(str(minilm_dir))
    worst_diff, worst_cos = 0.0, 1.0
    for batch in _pad_batches([tok(s) for s in HELD_OUT]):
        mask = batch["attention_mask"].astype(bool)
        a, b = run(minilm_onnx, batch)[0][mask], run(minilm_gpcl_onnx, batch)[0][mask]
        worst_diff = max(worst_diff, float(np.abs(a - b).max()))
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        worst_cos = min(worst_cos, float(cos.min()))
    print(
        f"\nMiniLM calibrated clamp, {len(HELD_OUT)} held-out sentences: max abs diff {worst_diff:.3g}, min cosine "
        f"{worst_cos:.9f}"
    )
    assert worst_diff <= 1e-4 and worst_cos >= 0.9999


def test_strip_restores_the_original(minilm_onnx, minilm_gpcl_onnx, tmp_path):
    s = tmp_path / "s.onnx"
    assert len(strip_file(minilm_gpcl_onnx, s)["removed"]) == 12
    m0, ms = onnx.load(str(minilm_onnx)), onnx.load(str(s))
    assert sorted((n.name, n.op_type) for n in ms.graph.node) == sorted((n.name, n.op_type) for n in m0.graph.node)
    assert [o.name for o in ms.graph.output] == [o.name for o in m0.graph.output]
    assert not ms.functions and "gpcl" not in {o.domain for o in ms.opset_import}
    feed = random_feed(minilm_onnx)
    assert max_abs(run(s, feed), run(minilm_onnx, feed)) == 0.0
    assert json.loads(s.with_suffix(".manifest.json").read_text())["stage"] == "strip"


def test_insert_again_updates_in_place(tiny_gpt2_onnx, tmp_path):
    g1, g2, g3, s = (tmp_path / f"{n}.onnx" for n in ("g1", "g2", "g3", "s"))
    insert_file(tiny_gpt2_onnx, g1, tau=0.5)
    again = insert_file(g1, g2, tau=2.0, mode="soft")  # updates in place, no stacking
    assert again["inserted"] == [] and len(again["updated"]) == 4
    insert_file(tiny_gpt2_onnx, g3, tau=2.0, mode="soft")
    m2, m3 = onnx.load(str(g2)), onnx.load(str(g3))
    assert sorted(n.name for n in m2.graph.node) == sorted(n.name for n in m3.graph.node)
    for n in gpcl_nodes(m2):
        attrs = {a.name: oh.get_attribute_value(a) for a in n.attribute}
        assert attrs["mode"] == b"soft" and attrs["tau"] == 2.0
    feed = random_feed(tiny_gpt2_onnx)
    orig, soft = run(tiny_gpt2_onnx, feed), run(g2, feed)
    assert max_abs(soft, run(g3, feed)) == 0.0 and max_abs(soft, orig) > 1e-4  # soft really acts
    assert len(strip_file(g2, s)["removed"]) == 4
    assert max_abs(run(s, feed), orig) == 0.0
    # A calibration of the original export also applies to the GPCL model made from it.
    calib = tmp_path / "c.json"
    calibrate_file(tiny_gpt2_onnx, calib, samples=4)
    res = insert_file(g2, tmp_path / "g4.onnx", calibration=calib)
    assert res["inserted"] == [] and len(res["updated"]) == 4


def test_graph_passes_are_pure_and_idempotent():
    lm = from_proto(toy_transformer())
    n0 = len(lm.graph.nodes)
    g1, r1 = insert_gpcl(lm.graph, tau=1.0)
    assert len(lm.graph.nodes) == n0  # the input graph is not modified
    g2, r2 = insert_gpcl(g1, tau=3.0, mode="hopf")
    assert len(g1.nodes) == len(g2.nodes) == n0 + 4 and len(r2["updated"]) == 4
    assert {n.attrs["mode"] for n in g2.nodes if n.op == "GPCL"} == {"hopf"}
    g3, r3 = strip_gpcl(g2)
    assert len(g3.nodes) == n0 and len(r3["removed"]) == 4
    assert strip_gpcl(g3)[1]["removed"] == []


@pytest.mark.parametrize("mode", ["clamp", "soft", "hopf"])
def test_per_group_tau_and_layers_match_the_reference(toy_onnx, tmp_path, mode):
    """GPCL output at each site equals gpcl_numpy(site tensor, per-group tau, mode) and feeds the
    projections; only the requested layers/kinds get a node."""
    calib = tmp_path / "c.json"
    calibrate_file(toy_onnx, calib, samples=8, per_group=True, percentile=50, margin=0.5)  # a tau that clamps
    doc = json.loads(calib.read_text())
    assert doc["data"]["kind"] == "random-token-ids" and doc["data"]["vocab"] == 50
    assert all(len(s["tau"]) == 8 for s in doc["sites"].values())
    out = tmp_path / "g.onnx"
    res = insert_file(toy_onnx, out, calibration=calib, layers="1", sites="pre-attention,pre-mlp", mode=mode)
    assert res["inserted"] == ["layer1/pre-attention", "layer1/pre-mlp"]
    model = onnx.load(str(out))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    feed = random_feed(toy_onnx, seq=16)
    for node in gpcl_nodes(model):
        x_name, tau_name = node.input
        assert inits[tau_name].shape == (8,)
        x, y = run(out, feed, [x_name, node.output[0]])
        np.testing.assert_allclose(y, gpcl_numpy(x, inits[tau_name], mode), rtol=1e-5, atol=1e-6)
        assert not np.array_equal(x, y)
        readers = [n for n in model.graph.node if node.output[0] in n.input]
        assert readers and all(n.op_type == "MatMul" for n in readers)


# ----------------------------------------------------------------------------- calibrate
def test_calibration_ignores_non_finite_radii_and_refuses_a_site_without_any():
    """One overflowing sample must not turn tau into NaN; a site (or group) with no finite
    radius is a clear error, not a calib.json with NaN in it."""
    from gpcl_trt.passes.calibrate import site_stats

    rng = np.random.default_rng(0)
    r = rng.uniform(0.5, 2.0, size=(500, 3)).astype(np.float32)
    clean = site_stats(r, 90.0, 1.25, per_group=True)
    r_bad = r.copy()
    r_bad[7, 1] = np.inf
    r_bad[9, 2] = np.nan
    got = site_stats(r_bad, 90.0, 1.25, per_group=True)
    expect = [1.25 * np.percentile(np.delete(r[:, g], {1: 7, 2: 9}.get(g, []), axis=0), 90.0) for g in range(3)]
    np.testing.assert_allclose(got["tau"], expect, rtol=1e-6)
    assert got["stats"]["non_finite"] == 2 and clean["stats"]["non_finite"] == 0
    site = site_stats(r_bad, 90.0, 1.25, per_group=False)
    assert np.isfinite(site["tau"]) and site["tau"] == pytest.approx(
        1.25 * np.percentile(r_bad[np.isfinite(r_bad)], 90.0)
    )
    r_dead = r.copy()
    r_dead[:, 2] = np.nan
    with pytest.raises(GpclError, match="groups \\[2\\]"):
        site_stats(r_dead, 90.0, 1.25, per_group=True, site="layer0/pre-mlp")
    with pytest.raises(GpclError, match="layer0/pre-mlp: no finite"):
        site_stats(np.full((4, 3), np.nan, np.float32), 90.0, 1.25, per_group=False, site="layer0/pre-mlp")


def test_calibration_file_contents(tiny_gpt2_onnx, tmp_path):
    calib = tmp_path / "calib.json"
    res = calibrate_file(tiny_gpt2_onnx, calib, samples=12, percentile=99.0, margin=2.0)
    doc = json.loads(calib.read_text())
    assert doc["source_sha256"] == sha256_file(tiny_gpt2_onnx)
    assert doc["data"]["kind"] == "random-token-ids" and doc["samples"] == 12
    assert set(doc["sites"]) == {f"layer{i}/{k}" for i in range(2) for k in ("pre-attention", "pre-mlp")}
    for s in doc["sites"].values():
        st = s["stats"]
        assert 0 < st["p50"] <= st["p99"] <= st["p99.99"] <= st["max"]
        assert st["count"] == st["tokens"] * 16 == res["tokens"] * 16
        assert s["tau"] == pytest.approx(2.0 * st["p99"])
    assert (tmp_path / "calib.json.manifest.json").is_file()


def test_calibrate_from_npz_and_text(minilm_onnx, tiny_llama_onnx, tmp_path):
    ids = np.random.default_rng(1).integers(1, 128, (5, 9), dtype=np.int64)
    np.savez(tmp_path / "d.npz", input_ids=ids, attention_mask=np.tile([1] * 7 + [0] * 2, (5, 1)))
    res = calibrate_file(tiny_llama_onnx, tmp_path / "a.json", data=tmp_path / "d.npz")
    assert res["data"]["kind"] == "npz" and res["samples"] == 5 and res["tokens"] == 35  # padding excluded
    (tmp_path / "s.txt").write_text("One sentence here.\n\nAnother, slightly longer sentence follows.\n")
    res = calibrate_file(minilm_onnx, tmp_path / "b.json", data=tmp_path / "s.txt")
    assert res["data"]["kind"] == "text" and res["samples"] == 2


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({}, "needs model inputs by name"),
        ({"input_ids": np.zeros((0, 5), np.int64)}, "'input_ids' is empty"),
        ({"input_ids": np.zeros((2, 0), np.int64)}, "'input_ids' is empty"),
    ],
)
def test_calibrate_an_empty_npz_is_one_line(toy_onnx, tmp_path, arrays, message):
    np.savez(tmp_path / "e.npz", **arrays)
    with pytest.raises(GpclError, match=message):
        calibrate_file(toy_onnx, tmp_path / "c.json", data=tmp_path / "e.npz")
    assert not (tmp_path / "c.json").exists()
    if arrays:  # diff too: zero samples would compare nothing and pass
        from gpcl_trt.accuracy.inputs import load_inputs

        with pytest.raises(GpclError, match="is empty"):
            load_inputs(tmp_path / "e.npz")


# ----------------------------------------------------------------------------- bad input
def _no_output(tmp_path: Path) -> None:
    assert [p.name for p in tmp_path.iterdir() if p.suffix in (".onnx", ".json", ".tmp")] == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tau": 1.0, "calibration": "c.json"}, "exactly one of --tau and --calibration"),
        ({}, "exactly one of --tau and --calibration"),
        ({"tau": 1.0, "layers": "0,5"}, "unknown --layers index 5"),
        ({"tau": 1.0, "layers": "1-x"}, "not an index or a range"),
        ({"tau": -1.0}, "tau must be a finite number > 0"),
        ({"tau": 1.0, "sites": "pre-attention,post-mlp"}, "--sites must be a comma list"),
        ({"tau": 1.0, "mode": "round"}, "--mode must be one of"),
    ],
)
def test_insert_bad_options(toy_onnx, tmp_path, kwargs, message):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(GpclError, match=message):
        insert_file(toy_onnx, out_dir / "g.onnx", **kwargs)
    _no_output(out_dir)


def test_insert_bad_models(tmp_path, tiny_gpt2_onnx, tiny_llama_onnx):
    out = tmp_path / "out"
    out.mkdir()
    odd = tmp_path / "odd.onnx"
    onnx.save(toy_transformer(d=30), odd)
    with pytest.raises(GpclError, match="hidden size 30 .* not divisible by 4"):
        insert_file(odd, out / "g.onnx", tau=1.0)
    mlp_only = tmp_path / "mlp.onnx"
    g = oh.make_graph(
        [oh.make_node("MatMul", ["x", "w"], ["y"])],
        "mlp",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [onnx.numpy_helper.from_array(np.eye(8, dtype=np.float32), "w")],
    )
    onnx.save(oh.make_model(g, opset_imports=[oh.make_opsetid("", 18)]), mlp_only)
    with pytest.raises(GpclError, match="no GPCL sites found"):
        insert_file(mlp_only, out / "g.onnx", tau=1.0)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(GpclError, match="not a readable ONNX model"):
        sites_file(tmp_path / "junk.onnx")
    calib = tmp_path / "llama_calib.json"
    calibrate_file(tiny_llama_onnx, calib, samples=2)
    with pytest.raises(GpclError, match="calibrated on another model"):
        insert_file(tiny_gpt2_onnx, out / "g.onnx", calibration=calib)
    _no_output(out)
    insert_file(tiny_gpt2_onnx, out / "g.onnx", tau=1.0)
    before = (out / "g.onnx").read_bytes()
    with pytest.raises(GpclError, match="exists; pass --force"):
        insert_file(tiny_gpt2_onnx, out / "g.onnx", tau=2.0)
    assert (out / "g.onnx").read_bytes() == before
    insert_file(tiny_gpt2_onnx, out / "g.onnx", tau=2.0, force=True)
    assert (out / "g.onnx").read_bytes() != before


def test_calibrate_bad_input(toy_onnx, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for kwargs, message in [
        ({"samples": 0}, "--samples must be a positive integer"),
        ({"percentile": 0}, r"--percentile must be in \(0, 100\]"),
        ({"margin": float("nan")}, "--margin must be a finite number > 0"),
        ({"data": tmp_path / "missing.npz"}, "no such data file"),
        ({"data": toy_onnx}, "text needs the model's tokenizer"),
    ]:
        with pytest.raises(GpclError, match=message):
            calibrate_file(toy_onnx, out / "c.json", **kwargs)
    _no_output(out)


def test_calibrate_text_that_is_not_utf8_is_one_line_exit_2(minilm_onnx, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1"))
    out = tmp_path / "out"
    out.mkdir()
    res = _cli("calibrate", minilm_onnx, "-o", out / "c.json", "--data", bad)
    assert res.exit_code == 2
    assert res.stderr.strip().count("\n") == 0 and "not UTF-8 text" in res.stderr and "Traceback" not in res.stderr
    _no_output(out)


# ----------------------------------------------------------------------------- CLI
def _cli(*args: str):
    from click.testing import CliRunner

    from gpcl_trt.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_cli_round_trip(toy_onnx, tmp_path):
    res = _cli("sites", toy_onnx, "--json")
    assert res.exit_code == 0
    doc = json.loads(res.stdout)
    assert doc["ok"] and doc["counts"] == {"pre-attention": 2, "pre-mlp": 2} and doc["method"] == "structure"
    assert "pre-attention" in res.stderr
    calib, g, s = tmp_path / "c.json", tmp_path / "g.onnx", tmp_path / "s.onnx"
    assert _cli("calibrate", toy_onnx, "-o", calib, "--samples", "4", "--per-group").exit_code == 0
    res = _cli("insert", toy_onnx, "-o", g, "--calibration", calib, "--sites", "pre-mlp", "--layers", "0-1", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["inserted"] == ["layer0/pre-mlp", "layer1/pre-mlp"]
    assert _cli("strip", g, "-o", s).exit_code == 0
    assert not gpcl_nodes(onnx.load(str(s)))


@pytest.mark.parametrize(
    "args, message",
    [
        (("insert", "{toy}", "-o", "{out}"), "give exactly one of --tau and --calibration"),
        (("insert", "{toy}", "-o", "{out}", "--tau", "1", "--layers", "3"), "unknown --layers index 3"),
        (("insert", "{missing}", "-o", "{out}", "--tau", "1"), "no such ONNX file"),
        (("calibrate", "{toy}", "-o", "{out}", "--margin", "0"), "--margin must be"),
        (("strip", "{toy}", "-o", "{toy}"), "exists; pass --force"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(toy_onnx, tmp_path, args, message):
    fill = {"toy": toy_onnx, "out": tmp_path / "o.onnx", "missing": tmp_path / "none.onnx"}
    res = _cli(*(a.format(**fill) for a in args), "--json")
    assert res.exit_code == 2
    assert (
        res.stderr.count("\n") == 1 and message in res.stderr and res.stderr.startswith(f"gpcl-trt {args[0]}: error:")
    )
    assert json.loads(res.stdout)["ok"] is False
    assert not (tmp_path / "o.onnx").exists()


def test_cli_help_and_light_imports():
    from gpcl_trt.cli import main

    for name in ("sites", "insert", "calibrate", "strip"):
        cmd = main.commands[name]
        assert cmd.help and _cli(name, "--help").exit_code == 0
        assert all(p.help for p in cmd.params if isinstance(p, __import__("click").Option)), name
    # The CLI and every area's package import nothing heavy: `gpcl-trt --help` stays instant.
    import subprocess
    import sys

    code = (
        "import sys, gpcl_trt.cli, gpcl_trt.passes, gpcl_trt.exporter, gpcl_trt.engines, gpcl_trt.accuracy, "
        "gpcl_trt.deploy, gpcl_trt.plugins, gpcl_trt.gpcl; "
        "print(sorted(m for m in ('numpy', 'onnx', 'onnx_graphsurgeon', 'torch', 'onnxruntime') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_external_data_path(toy_onnx, tmp_path, monkeypatch):
    """Models past the protobuf limit are written and run with their weights in OUT.onnx.data;
    the limit is lowered so that the toy model takes that path."""
    import gpcl_trt.passes.modelio as modelio

    small = tmp_path / "small.onnx"
    insert_file(toy_onnx, small, tau=0.5)
    monkeypatch.setattr(modelio, "EXTERNAL_DATA_BYTES", 1000)
    big = tmp_path / "big.onnx"
    insert_file(toy_onnx, big, tau=0.5)
    assert (tmp_path / "big.onnx.data").stat().st_size > big.stat().st_size
    feed = random_feed(toy_onnx)
    assert max_abs(run(big, feed), run(small, feed)) == 0.0
    res = calibrate_file(big, tmp_path / "c.json", samples=2)
    assert res["sites"]["layer0/pre-attention"]["tau"] > 0
    with pytest.raises(GpclError, match="exists; pass --force"):
        insert_file(toy_onnx, big, tau=0.5)


def test_calibration_matches_radii_recomputed_from_ort_site_tensors(minilm_onnx, tmp_path):
    """tau and the statistics in calib.json equal what an independent computation gives: the
    site tensors read straight from an ORT session of the plain model (as extra outputs), the
    padding tokens dropped, radii from float32 groups of four, numpy's percentile x margin."""
    import onnxruntime as ort

    rng = np.random.default_rng(3)
    ids = rng.integers(1000, 5000, (4, 11), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0  # padding: not calibration data
    mask[3, 4:] = 0
    np.savez(tmp_path / "d.npz", input_ids=ids, attention_mask=mask, token_type_ids=np.zeros_like(ids))
    calibrate_file(minilm_onnx, tmp_path / "calib.json", data=tmp_path / "d.npz", percentile=99.5, margin=1.5)
    doc = json.loads((tmp_path / "calib.json").read_text())
    assert len(doc["sites"]) == 12

    model = onnx.load(str(minilm_onnx))
    tensors = [s["tensor"] for s in doc["sites"].values()]
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in tensors)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    radii: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    for i in range(ids.shape[0]):
        feeds = {
            "input_ids": ids[i : i + 1],
            "attention_mask": mask[i : i + 1],
            "token_type_ids": np.zeros_like(ids[i : i + 1]),
        }
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        for t in tensors:
            q = outs[t][0][mask[i] == 1].astype(np.float32).reshape(-1, 4)
            radii[t].append(np.sqrt(((q[:, 0] * q[:, 0] + q[:, 1] * q[:, 1]) + q[:, 2] * q[:, 2]) + q[:, 3] * q[:, 3]))
    tokens = int(mask.sum())
    for site in doc["sites"].values():
        r = np.concatenate(radii[site["tensor"]])
        assert site["stats"]["tokens"] == tokens and site["stats"]["count"] == r.size == tokens * site["hidden"] // 4
        assert site["stats"]["max"] == pytest.approx(float(r.max()), rel=1e-6)
        assert site["tau"] == pytest.approx(1.5 * float(np.percentile(r, 99.5)), rel=1e-5)
