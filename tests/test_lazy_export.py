"""Lazy export (exporter/lazy.py, exporter/checkpoint.py): traced on fake weights, weights from the
checkpoint. Small real models, real ONNX Runtime sessions: lazy equals eager bit for bit, sharded
checkpoints, tied weights, dtype conversion, hard links, each checkpoint error, the validation
modes, and the save path (nothing under a final name before every check passed; stale temporaries
of a killed export removed)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from gpcl_trt.cli import main
from gpcl_trt.common import GpclError
from gpcl_trt.exporter import export_model, load_model
from gpcl_trt.exporter.checkpoint import Checkpoint
from gpcl_trt.exporter.validate import ort_runner

TG, TGP = "text-generation", "text-generation-with-past"


def _save_llama(out: Path, tie: bool, shard: str | None = None, dtype: str = "float32") -> Path:
    """A 2-layer Llama whose MLP weights (64 x 160) are above the exporter's folding limit, so
    both the folded (attention) and the kept-Transpose (MLP) paths are exercised."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=200,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval().to(getattr(torch, dtype))
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(out, safe_serialization=True, **kw)
    return out


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("lazy_models")
    return {
        "tied": _save_llama(base / "tied", tie=True),
        "sharded": _save_llama(base / "sharded", tie=False, shard="60KB"),
        "bf16": _save_llama(base / "bf16", tie=False, dtype="bfloat16"),
    }


def _ort_equal(a: Path, b: Path) -> None:
    """Default (optimized) ONNX Runtime sessions over both files: identical outputs, bit for bit,
    on random inputs of a shape other than the trace shape (batch 3, 7 new tokens, 4 cached)."""
    import onnxruntime as ort

    rng = np.random.default_rng(5)
    sizes = {"batch": 3, "sequence": 7, "past_sequence": 4, "total_sequence": 11}
    feeds = {}
    for i in ort.InferenceSession(str(a)).get_inputs():
        shape = [sizes[d] if isinstance(d, str) else d for d in i.shape]
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(0, 200, size=shape, dtype=np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.broadcast_to(
                np.arange(shape[1]) + (4 if "past_key_values.0.key" in str(a) else 0), shape
            ).astype(np.int64)
        elif "int64" in i.type:
            feeds[i.name] = np.ones(shape, np.int64)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float16 if "float16" in i.type else np.float32)
    x, y = ort_runner(a)(feeds), ort_runner(b)(feeds)
    assert x.keys() == y.keys()
    for k in x:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ----------------------------------------------------------------------------- lazy == eager
@pytest.mark.parametrize(
    "name, task, dtype, layout",
    [
        ("tied", TGP, "fp32", "link"),  # tied embedding written once, hard link, with past
        ("sharded", TG, "fp16", "inline"),  # index.json + shards, fp32 -> fp16, inline (small-model default)
        ("bf16", TG, "fp16", "link"),  # bf16 -> fp16 streamed into OUT.onnx.data
    ],
)
def test_lazy_equals_eager(llama_dirs, tmp_path, name, task, dtype, layout):
    d = llama_dirs[name]
    lazy = export_model(d, tmp_path / "lazy.onnx", task=task, dtype=dtype, external_data=layout)
    eager = export_model(d, tmp_path / "eager.onnx", task=task, dtype=dtype, lazy=False, validate="none")
    assert lazy["ok"] and lazy["validation"]["passed"], lazy["validation"]
    assert lazy["weights"]["path"] == "lazy" and eager["weights"]["path"] == "eager"
    _ort_equal(tmp_path / "lazy.onnx", tmp_path / "eager.onnx")

    model = onnx.load(str(tmp_path / "lazy.onnx"), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == set(lazy["external_data"])
    ckpt = Checkpoint.open(d)
    if layout == "link" and dtype == "fp32":
        # every checkpoint file the model reads is hard-linked (ext4 has no reflink), nothing copied
        assert set(lazy["weights"]["links"].values()) == {"hardlink"}
        for f in ckpt.files:
            linked = tmp_path / f"lazy.onnx.{f.name}"
            if linked.exists():
                assert os.path.samefile(linked, f)
        # initializers point at the checkpoint's own byte ranges, under the parameter names
        by_offset = {(f"lazy.onnx.{e.file.name}", e.offset, e.nbytes): n for n, e in ckpt.tensors.items()}
        named = {}
        for t in model.graph.initializer:
            ext = {e.key: e.value for e in t.external_data}
            key = (ext.get("location"), int(ext.get("offset", -1)), int(ext.get("length", -1)))
            if key in by_offset:
                named[t.name] = by_offset[key]
        tied = lambda i, p: name == "tied" and "lm_head" in i and "embed_tokens" in p  # noqa: E731  (one tensor, two names)
        assert named and all(i.endswith(p) or tied(i, p) for i, p in named.items()), named
        if name == "tied":  # one initializer for embed_tokens and lm_head
            assert sum("embed_tokens" in t.name or "lm_head" in t.name for t in model.graph.initializer) == 1
        assert lazy["weights"]["extra_disk_bytes"] < 0.5 * ckpt.total_bytes + 700_000  # the graph, not the weights
    if dtype == "fp16" and name == "bf16":
        assert lazy["weights"]["converted_bytes"] > 0 and not lazy["weights"]["links"]


def test_sharded_index_maps_every_tensor(llama_dirs):
    d = llama_dirs["sharded"]
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    ckpt = Checkpoint.open(d)
    assert len(ckpt.files) > 1 and set(ckpt.tensors) == set(index)
    for name, shard in index.items():
        e = ckpt.tensors[name]
        assert e.file.name == shard
        from safetensors import safe_open

        with safe_open(str(e.file), framework="pt") as f:
            assert np.array_equal(ckpt.tensor(name).numpy(), f.get_tensor(name).numpy())


# ----------------------------------------------------------------------------- checkpoint errors
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _assert_refused(d: Path, out_dir: Path, needle: str, *args: str) -> str:
    out_dir.mkdir(exist_ok=True)
    res = CliRunner().invoke(main, ["export", str(d), "-o", str(out_dir / "m.onnx"), "--task", TG, *args])
    assert res.exit_code == 2, res.output
    line = res.stderr.strip().splitlines()
    assert len(line) == 1 and needle in line[0], res.stderr
    assert list(out_dir.iterdir()) == []  # nothing written, no temporary left
    return line[0]


def test_missing_shard_names_file_and_tensor(llama_dirs, tmp_path):
    d = _copy(llama_dirs["sharded"], tmp_path / "m")
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    victim = sorted(set(index.values()))[-1]
    (d / victim).unlink()
    line = _assert_refused(d, tmp_path / "out", "missing shard")
    assert victim in line and any(t in line for t, s in index.items() if s == victim)


def test_truncated_file_names_file_and_tensor(llama_dirs, tmp_path):
    d = _copy(llama_dirs["tied"], tmp_path / "m")
    f = d / "model.safetensors"
    size = f.stat().st_size
    os.truncate(f, size - 100)
    line = _assert_refused(d, tmp_path / "out", "truncated")
    assert str(f) in line and "tensor " in line


def test_shape_mismatch_names_file_and_tensor(llama_dirs, tmp_path):
    d = _copy(llama_dirs["tied"], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 176
    (d / "config.json").write_text(json.dumps(cfg))
    line = _assert_refused(d, tmp_path / "out", "do not match config.json")
    assert "mlp" in line and "model.safetensors" in line and "[160, 64]" in line.replace("F32", "")


def test_huge_layer_count_refused_before_allocating(llama_dirs, tmp_path):
    """Defect 6: num_hidden_layers 100000 next to a 2-layer file is refused from the headers,
    before the model is built (the eager loader would allocate until killed; a meta build of
    100000 layers would take minutes)."""
    d = _copy(llama_dirs["tied"], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 100000
    (d / "config.json").write_text(json.dumps(cfg))
    line = _assert_refused(d, tmp_path / "out", "num_hidden_layers=100000")
    assert "2 (last: model.layers.1." in line
    with pytest.raises(GpclError, match="num_hidden_layers=100000"):
        load_model(d, task=TG)  # the eager loader checks the headers first too


def test_not_safetensors_and_bad_index(llama_dirs, tmp_path):
    d = _copy(llama_dirs["sharded"], tmp_path / "m")
    (d / "model.safetensors.index.json").write_text("{nope")
    _assert_refused(d, tmp_path / "out", "model.safetensors.index.json: not JSON")
    d2 = _copy(llama_dirs["tied"], tmp_path / "m2")
    (d2 / "model.safetensors").write_bytes(struct.pack("<Q", 20) + b"not json at all....." + b"\0" * 64)
    _assert_refused(d2, tmp_path / "out2", "header is not JSON")


# ----------------------------------------------------------------------------- validation modes
def test_validation_modes_and_budget(llama_dirs, tmp_path):
    from gpcl_trt.exporter.validate import plan_validation

    d = llama_dirs["tied"]
    res = export_model(d, tmp_path / "a.onnx", task=TGP, validate="layers", external_data="link")
    v = res["validation"]
    assert v["mode"] == "layers" and v["requested"] == "layers"
    assert v["segments"] == 3  # before the blocks, block 0, block 1 + head
    assert v["passed"] and v["max_abs_diff"] <= 1e-4
    assert {c["step"] for c in v["checks"]} == {"prefill", "decode"}
    # auto: full when its estimate fits the budget, layers when not (none only when asked)
    assert plan_validation(tmp_path / "a.onnx", "auto", 64 << 30)["mode"] == "full"
    small = plan_validation(tmp_path / "a.onnx", "auto", 1 << 20)
    assert small["mode"] == "layers" and "budget" in small["reason"]
    assert small["estimate"]["weights"] >= 0.9 * Checkpoint.open(d).total_bytes  # every weight counted
    with pytest.raises(GpclError, match="memory budget"):
        export_model(d, tmp_path / "f.onnx", memory_budget="lots")


def test_failed_validation_writes_nothing(llama_dirs, tmp_path, monkeypatch):
    """An output appears under its final name only after every check passed: a validation that
    fails (a zero tolerance on fp16 cannot pass) leaves the directory as it was."""
    out = tmp_path / "out"
    out.mkdir()
    res = export_model(llama_dirs["bf16"], out / "m.onnx", task=TG, dtype="fp16", atol=0.0, rtol=0.0, validate="full")
    assert not res["ok"] and not res["written"] and res["validation"]["max_abs_diff"] > 0
    assert list(out.iterdir()) == []


# ----------------------------------------------------------------------------- save path
KILLER = r"""
import os, signal, sys
import gpcl_trt.exporter.validate as v
def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
v.validate_export = die
from gpcl_trt.exporter import export_model
export_model(sys.argv[1], sys.argv[2], task="text-generation", validate="full", external_data="link")
"""


def test_sigkill_leaves_no_final_output_and_next_export_cleans_up(llama_dirs, tmp_path):
    """Defects 4 and 5: killed (SIGKILL) during validation, after the ONNX file and its linked
    weights were written: nothing has its final name; the staging directory carries the dead
    pid, and the next export into that directory removes it."""
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(llama_dirs["tied"]), str(out / "m.onnx")], capture_output=True
    )
    assert proc.returncode == -signal.SIGKILL
    left = list(out.iterdir())
    assert len(left) == 1 and left[0].name.startswith(".m.onnx.gpcl-") and left[0].is_dir()
    assert any(p.name == "m.onnx" for p in left[0].iterdir())  # it got as far as the ONNX file
    d = llama_dirs["tied"]
    res = export_model(d, out / "m.onnx", task=TG, validate="none", external_data="link")
    assert res["ok"] and res["validation"] == {"mode": "none", "skipped": True}
    assert sorted(p.name for p in out.iterdir()) == [
        "m.manifest.json",
        "m.onnx",
        "m.onnx.data",
        "m.onnx.model.safetensors",
    ]
    # never over an existing output without force; with it, the data files it no longer uses go
    with pytest.raises(GpclError, match="--force"):
        export_model(d, out / "m.onnx", task=TG, validate="none")
    res = export_model(d, out / "m.onnx", task=TG, validate="none", external_data="inline", force=True)
    assert res["ok"] and sorted(p.name for p in out.iterdir()) == ["m.manifest.json", "m.onnx"]
    assert (d / "model.safetensors").is_file()  # the checkpoint itself is untouched (the link was removed)


def test_pickle_takes_the_eager_path(llama_dirs, tmp_path):
    import torch
    from safetensors.torch import load_file

    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(llama_dirs["tied"] / "config.json", d / "config.json")
    torch.save(load_file(llama_dirs["tied"] / "model.safetensors"), d / "pytorch_model.bin")
    res = export_model(d, tmp_path / "p.onnx", task=TG, allow_pickle=True)
    assert res["ok"] and res["weights"] == {**res["weights"], "path": "eager", "eager_reason": "pickle weights"}
    with pytest.raises(GpclError, match="safetensors"):
        export_model(d, tmp_path / "q.onnx", task=TG, allow_pickle=True, lazy=True)


def test_cli_help_documents_the_new_options():
    res = CliRunner().invoke(main, ["export", "--help"])
    assert res.exit_code == 0
    for opt in ("--validate", "[auto|full|layers|none]", "--no-validate", "--memory-budget", "--external-data"):
        assert opt in res.output, opt


def test_bf16_checkpoint_exported_as_bf16_is_linked_not_converted(llama_dirs, tmp_path):
    d = llama_dirs["bf16"]
    with pytest.raises(GpclError, match="--validate none"):
        export_model(d, tmp_path / "a.onnx", task=TG, dtype="bf16")
    res = export_model(d, tmp_path / "b.onnx", task=TG, dtype="bf16", validate="none", external_data="link")
    assert (
        res["ok"]
        and res["weights"]["converted_bytes"] == 0
        and res["weights"]["links"] == {"b.onnx.model.safetensors": "hardlink"}
    )
    model = onnx.load(str(tmp_path / "b.onnx"), load_external_data=False)
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
