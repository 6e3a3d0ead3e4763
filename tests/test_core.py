"""The core every area shares: temporary outputs and their clean-up after a killed process, the
manifest reader, the feed rules of docs/architecture.md, the GPCL naming conventions."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from onnx import TensorProto, helper

from gpcl_trt import feeds, gpcl
from gpcl_trt.common import GpclError, atomic_path, remove_stale_temps, temp_sibling, write_json_atomic, write_manifest
from gpcl_trt.manifest import Manifest, engine_inputs, file_ref


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporaries_of_a_killed_process_are_removed_by_the_next_write(tmp_path):
    dead = tmp_path / f".big.onnx.gpcl-{_dead_pid()}-0123abcd.tmp"
    dead.write_bytes(b"half of a 140 GB file")
    dead_dir = tmp_path / f".repo.gpcl-{_dead_pid()}-89abcdef.tmp"
    dead_dir.mkdir()
    alive = temp_sibling(tmp_path / "other.onnx")  # this process: still writing
    alive.write_bytes(b"in progress")
    foreign = tmp_path / ".user.file.tmp"  # not our naming scheme: never touched
    foreign.write_bytes(b"keep")
    write_json_atomic(tmp_path / "out.json", {"a": 1})
    assert not dead.exists() and not dead_dir.exists()
    assert alive.exists() and foreign.exists()
    assert json.loads((tmp_path / "out.json").read_text()) == {"a": 1}
    assert remove_stale_temps(tmp_path) == []


def test_a_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
    out = tmp_path / "x.bin"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(out, force=True) as tmp:
            tmp.write_bytes(b"new, half written")
            raise RuntimeError("killed")
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_manifest_accessors_read_what_the_writers_wrote(tmp_path):
    onnx_file, lib, engine = tmp_path / "m.onnx", tmp_path / "libp.so", tmp_path / "m.engine"
    for p in (onnx_file, lib, engine):
        p.write_bytes(b"x")
    write_manifest(
        engine,
        "build",
        engine_inputs(file_ref(onnx_file, "0" * 64), file_ref(lib, "1" * 64)),
        {},
        {"gpcl": {"plugin_layers": 3}, "profiles": [{"input_ids": {"max": [4, 8]}}]},
    )
    m = Manifest.read(engine)
    assert (m.stage, m.source, m.plugin_lib, m.uses_plugin) == ("build", onnx_file, lib, True)
    assert m.profiles == [{"input_ids": {"max": [4, 8]}}]
    (tmp_path / "m.engine.manifest.json").write_text("{not json")
    with pytest.raises(GpclError, match="is not a gpcl-trt manifest"):
        Manifest.read(engine)
    assert Manifest.read(tmp_path / "none.engine") is None


def test_feeds_follow_the_naming_convention():
    specs = [
        feeds.InputSpec("input_ids", np.dtype(np.int64), ("batch", "sequence")),
        feeds.InputSpec("attention_mask", np.dtype(np.int64), ("batch", "total_sequence")),
        feeds.InputSpec("position_ids", np.dtype(np.int64), ("batch", "sequence")),
        feeds.InputSpec("past_key_values.0.key", np.dtype(np.float16), ("batch", 2, "past_sequence", 8)),
        feeds.InputSpec("pixel_values", np.dtype(np.float32), (None, 3, 4, 4)),
    ]
    f = feeds.make_feeds(specs, 3, 5, past=4, vocab=7, pad_last_row=True)
    assert f["input_ids"].shape == (3, 5) and f["input_ids"].max() < 7
    assert f["attention_mask"].shape == (3, 9) and f["attention_mask"][:2].all() and not f["attention_mask"][2, -1]
    assert (f["position_ids"] == np.arange(4, 9)).all()
    assert f["past_key_values.0.key"].shape == (3, 2, 4, 8) and f["past_key_values.0.key"].dtype == np.float16
    assert f["pixel_values"].shape == (3, 3, 4, 4)
    # Text sets the shape; positions follow its mask (right padding).
    text = {"input_ids": np.array([[5, 6, 7], [5, 6, 0]]), "attention_mask": np.array([[1, 1, 1], [1, 1, 0]])}
    t = feeds.make_feeds(specs[:3], 0, 0, text=text)
    assert (t["position_ids"] == [[0, 1, 2], [0, 1, 1]]).all() and (t["input_ids"] == text["input_ids"]).all()
    with pytest.raises(GpclError, match="no rule to make data for model input 'segment'"):
        feeds.make_feeds([feeds.InputSpec("segment", np.dtype(np.int32), ("batch",))], 1, 1)


def test_vocab_size_through_view_ops_and_max_abs_diff():
    emb = helper.make_tensor("emb", TensorProto.FLOAT, [11, 4], np.zeros(44, np.float32))
    shape = helper.make_tensor("shape", TensorProto.INT64, [1], [-1])
    nodes = [
        helper.make_node("Reshape", ["input_ids", "shape"], ["flat"]),
        helper.make_node("Gather", ["emb", "flat"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [emb, shape],
    )
    assert feeds.vocab_size(helper.make_model(graph)) == 11
    a = np.array([1.0, np.inf, np.nan])
    assert feeds.max_abs_diff(a, a.copy()) == 0.0
    assert feeds.max_abs_diff(a, np.array([1.5, np.inf, np.nan])) == 0.5
    assert feeds.max_abs_diff(a, np.array([1.0, -np.inf, np.nan])) == float("inf")
    assert feeds.max_abs_diff(a, np.array([1.0, 2.0, np.nan])) == float("inf")
    assert feeds.max_abs_diff(a, a[:2]) == float("inf")


@pytest.mark.parametrize(
    "text,layer",
    [
        ("model.layers.11.mlp", 11),
        ("transformer.h.0.attn", 0),
        ("/encoder/layer.2/attention/MatMul", 2),
        ("model.embeddings.LayerNorm", None),
        ("gpt_neox.layers.3.attention.query_key_value", 3),
    ],
)
def test_layer_pattern(text, layer):
    assert gpcl.layer_of(text) == layer


def test_gpcl_node_names_round_trip():
    for kind in gpcl.KINDS:
        assert gpcl.parse_node_name(gpcl.node_name(7, kind)) == (7, kind)
    assert gpcl.parse_node_name("MatMul_3") == (None, None)


def test_bounded_session_transposes_each_weight_next_to_its_matmul(tmp_path):
    """Bounded validation sessions (no folding) compute Transpose(W) at run time; they must run
    each one next to its MatMul, not all of them before the first block (which holds a second
    copy of every weight at once: 2.7 GB RssAnon on a 4.4 GB Llama). Read from ORT's profile."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(4):
        w = helper.make_tensor(f"w{i}", TensorProto.FLOAT, [8, 8], rng.standard_normal(64).astype(np.float32))
        inits.append(w)
        nodes.append(helper.make_node("Transpose", [f"w{i}"], [f"wt{i}"], name=f"t{i}", perm=[1, 0]))
        nodes.append(helper.make_node("MatMul", [x, f"wt{i}"], [f"h{i}"], name=f"m{i}"))
        x = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [2, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    opts = feeds.ort_options(bounded=True, profile=True)
    opts.profile_file_prefix = str(tmp_path / "prof")
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    sess.run(None, {"x": np.ones((2, 8), np.float32)})
    events = json.loads(open(sess.end_profiling()).read())
    order = [e["name"][: -len("_kernel_time")] for e in events if e["name"].endswith("_kernel_time")]
    assert order == [n.name for n in nodes], order
