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
from gpcl_trt.exporter import export_model, load_model, make_dummy_inputs
from gpcl_trt.exporter.checkpoint import Checkpoint
from gpcl_trt.exporter.validate import ort_runner

TG, TGP = "text-generation", "text-generation-with-past"


def _save_llama(out: Path, tie: bool, shard: str | None = None, dtype: str = "float32") -> Path:
    """A 2-layer Llama whose MLP weights (64 x 160) are above the exporter's folding limit, so
    both the folded (attention) and the kept-Transpose (MLP) paths are exercised."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie)
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


def _ort_equal(a: Path, b: Path, model_dir: Path, task: str, dtype: str = "fp32") -> None:
    """Default (optimized) ONNX Runtime sessions over both files: identical outputs, bit for bit."""
    _, arch, task = load_model(model_dir, task=task, dtype=dtype)
    feeds = make_dummy_inputs(arch, task, 3, 7, seed=5)
    x, y = ort_runner(a)(feeds), ort_runner(b)(feeds)
    assert x.keys() == y.keys()
    for k in x:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ----------------------------------------------------------------------------- lazy == eager
@pytest.mark.parametrize("name, task, dtype, layout", [
    ("tied", TGP, "fp32", "link"),      # tied embedding written once, hard link, with past
    ("sharded", TG, "fp32", "link"),    # index.json + shards, each shard linked
    ("bf16", TG, "fp16", "link"),       # bf16 -> fp16 streamed into OUT.onnx.data
    ("tied", TG, "fp16", "inline"),     # fp32 -> fp16, inline (the small-model default layout)
])
def test_lazy_equals_eager(llama_dirs, tmp_path, name, task, dtype, layout):
    d = llama_dirs[name]
    lazy = export_model(d, tmp_path / "lazy.onnx", task=task, dtype=dtype, external_data=layout)
    eager = export_model(d, tmp_path / "eager.onnx", task=task, dtype=dtype, lazy=False)
    assert lazy["ok"] and eager["ok"], (lazy["validation"], eager["validation"])
    assert lazy["weights"]["path"] == "lazy" and eager["weights"]["path"] == "eager"
    _ort_equal(tmp_path / "lazy.onnx", tmp_path / "eager.onnx", d, task, dtype)

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
    d = llama_dirs["tied"]
    full = export_model(d, tmp_path / "a.onnx", task=TGP, validate="full")
    layers = export_model(d, tmp_path / "b.onnx", task=TGP, validate="layers")
    assert full["validation"]["mode"] == "full" and layers["validation"]["mode"] == "layers"
    assert layers["validation"]["segments"] == 3  # before the blocks, block 0, block 1 + head
    assert layers["validation"]["passed"] and layers["validation"]["max_abs_diff"] <= 1e-4
    # auto: full when it fits the budget, layers when not; none only when asked
    auto_big = export_model(d, tmp_path / "c.onnx", task=TG, memory_budget="64G")
    auto_small = export_model(d, tmp_path / "d.onnx", task=TG, memory_budget="1M")
    assert auto_big["validation"]["mode"] == "full" and auto_small["validation"]["mode"] == "layers"
    assert auto_small["validation"]["requested"] == "auto" and "budget" in auto_small["validation"]["reason"]
    none = export_model(d, tmp_path / "e.onnx", task=TG, validate="none")
    assert none["validation"] == {"mode": "none", "skipped": True}
    with pytest.raises(GpclError, match="memory budget"):
        export_model(d, tmp_path / "f.onnx", memory_budget="lots")


def test_failed_validation_writes_nothing(llama_dirs, tmp_path, monkeypatch):
    """An output appears under its final name only after every check passed: a validation that
    fails (atol 0 on fp16 cannot pass) leaves the directory as it was."""
    out = tmp_path / "out"
    out.mkdir()
    res = export_model(llama_dirs["bf16"], out / "m.onnx", task=TG, dtype="fp16", atol=0.0, validate="full")
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
    proc = subprocess.run([sys.executable, "-c", KILLER, str(llama_dirs["tied"]), str(out / "m.onnx")], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    left = list(out.iterdir())
    assert len(left) == 1 and left[0].name.startswith(".m.onnx.gpcl-") and left[0].is_dir()
    assert any(p.name == "m.onnx" for p in left[0].iterdir())  # it got as far as the ONNX file
    res = export_model(llama_dirs["tied"], out / "m.onnx", task=TG, validate="none")
    assert res["ok"]
    assert sorted(p.name for p in out.iterdir()) == ["m.manifest.json", "m.onnx"]


def test_force_replaces_and_removes_stale_data_files(llama_dirs, tmp_path):
    d = llama_dirs["tied"]
    out = tmp_path / "m.onnx"
    export_model(d, out, task=TG, validate="none", external_data="link")
    assert (tmp_path / "m.onnx.model.safetensors").exists()
    with pytest.raises(GpclError, match="--force"):
        export_model(d, out, task=TG, validate="none")
    res = export_model(d, out, task=TG, validate="none", external_data="inline", force=True)
    assert res["ok"] and sorted(p.name for p in tmp_path.iterdir()) == ["m.manifest.json", "m.onnx"]
    assert os.path.exists(d / "model.safetensors")  # the checkpoint itself is untouched


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
