"""gpcl_trt.weightfiles, the one owner of weight files, and the defects of issue #21 it closes:
artifacts that share weights never break each other (export --force, pass outputs, Triton, the
pipeline), a weight file changed under an artifact is one line, and filesystem errors (read-only,
full, another filesystem) are one line with nothing left behind."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from test_passes import toy_transformer  # noqa: E402  (tests/ is on sys.path under pytest)

from gpcl_trt import weightfiles
from gpcl_trt.common import GpclError
from gpcl_trt.feeds import complete_feed, specs_from_session
from gpcl_trt.passes import insert_file, sites_file


def _run(path, ids):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, complete_feed(specs_from_session(sess), {"input_ids": ids}))


def _cli(*args, cwd=None):
    return subprocess.run(
        [str(Path(sys.executable).with_name("gpcl-trt")), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def _one_line_error(proc, code=2):
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


def _ext_model(path: Path, seed_shift: float = 0.0) -> Path:
    """The toy decoder with every weight in PATH.data (weights above the small-tensor size)."""
    model = toy_transformer(d=192, norm="rms")
    if seed_shift:
        for t in model.graph.initializer:
            if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2:
                a = onnx.numpy_helper.to_array(t) + np.float32(seed_shift)
                t.CopyFrom(onnx.numpy_helper.from_array(a, t.name))
    onnx.save(
        model,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=0,
    )
    return path


@contextlib.contextmanager
def _tmpfs(where: Path, options: str):
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"needs root and mount(8) for a tmpfs ({r.stderr.strip()})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


IDS = np.random.default_rng(0).integers(1, 50, (2, 7), dtype=np.int64)


# ----------------------------------------------------------------------------- the module
def test_link_or_copy_falls_back_to_reads_and_writes(tmp_path, monkeypatch):
    """copy_file_range returns EXDEV between ext4 and tmpfs on this kernel: the copy goes on with
    plain reads and writes, and the bytes arrive whole."""
    src = tmp_path / "w.bin"
    src.write_bytes(os.urandom(3 << 20))

    def exdev(*a, **k):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", exdev)
    monkeypatch.setattr(weightfiles.fcntl, "ioctl", exdev)
    monkeypatch.setattr(weightfiles, "COPY_CHUNK", 1 << 20)
    assert weightfiles.link_or_copy(src, tmp_path / "c.bin", hardlink=False) == "copy"
    assert (tmp_path / "c.bin").read_bytes() == src.read_bytes()
    assert weightfiles.link_or_copy(src, tmp_path / "l.bin") == "hardlink"
    assert os.path.samefile(src, tmp_path / "l.bin")


def test_identity_policy_whole_hash_then_sampled(tmp_path, monkeypatch):
    f = tmp_path / "w.bin"
    f.write_bytes(os.urandom(1 << 20))
    ident = weightfiles.file_identity(f)
    assert ident["size"] == 1 << 20 and "sha256" in ident
    monkeypatch.setattr(weightfiles, "FULL_HASH_BYTES", 1000)
    big = weightfiles.file_identity(f)
    assert "sampled_sha256" in big and "sha256" not in big
    # Same size, other bytes, other inode: the sampled hash sees it.
    blob = bytearray(f.read_bytes())
    blob[0] ^= 1
    f.unlink()
    f.write_bytes(bytes(blob))
    with pytest.raises(GpclError, match="replaced since"):
        weightfiles.check_identity(f, big, tmp_path / "m.onnx")


def test_a_fifo_is_refused_before_anything_opens_it(tmp_path):
    fifo = tmp_path / "model.onnx.data"
    os.mkfifo(fifo)
    with pytest.raises(GpclError, match="is a FIFO, not a regular file"):
        weightfiles.regular_file(fifo)


# ----------------------------------------------------------------------------- verify on open
@pytest.mark.parametrize("damage", ["truncate", "empty", "replace", "delete", "fifo"])
def test_a_weight_file_changed_since_is_one_line(tmp_path, damage):
    """A pass output's weights truncated, emptied, replaced by other bytes of the same size,
    deleted, or made a FIFO after it was written: the next command says so in one line, exit 2."""
    src = _ext_model(tmp_path / "m.onnx")
    insert_file(src, tmp_path / "g.onnx", tau=0.5)
    data = tmp_path / "g.onnx.data"
    size = data.stat().st_size
    replacement = tmp_path / "new"
    if damage == "truncate":
        replacement.write_bytes(data.read_bytes()[: size // 2])
    elif damage == "empty":
        replacement.write_bytes(b"")
    elif damage == "replace":
        replacement.write_bytes(os.urandom(size))
    if replacement.exists():
        os.replace(replacement, data)  # a new inode: the source's link keeps its bytes
    elif damage == "delete":
        data.unlink()
    else:
        data.unlink()
        os.mkfifo(data)
    line = _one_line_error(_cli("sites", tmp_path / "g.onnx"))
    expected = {
        "truncate": "truncated",
        "empty": "truncated or emptied",
        "replace": "replaced since g.onnx was written",
        "delete": "is missing",
        "fifo": "is a FIFO",
    }[damage]
    assert expected in line, line
    with pytest.raises(GpclError):
        sites_file(tmp_path / "g.onnx")
    # The source never read the damaged file: it still works.
    assert sites_file(src)["sites"]


# ----------------------------------------------------------------------------- sharing
def test_pass_outputs_survive_their_source_being_replaced_or_removed(tmp_path):
    """Defect 1's shape at the pass level: an output beside its source reads a hard link under its
    own name, so replacing the source's data (new bytes at old offsets) or removing it changes
    nothing the output computes."""
    src = _ext_model(tmp_path / "m.onnx")
    insert_file(src, tmp_path / "g.onnx", tau=0.5)
    before = _run(tmp_path / "g.onnx", IDS)
    _ext_model(tmp_path / "new.onnx", seed_shift=0.5)  # other weights, same layout
    os.replace(tmp_path / "new.onnx.data", tmp_path / "m.onnx.data")
    for a, b in zip(before, _run(tmp_path / "g.onnx", IDS)):
        np.testing.assert_array_equal(a, b)
    (tmp_path / "m.onnx.data").unlink()
    for a, b in zip(before, _run(tmp_path / "g.onnx", IDS)):
        np.testing.assert_array_equal(a, b)


def test_retire_and_commit_never_break_another_artifacts_weights(tmp_path):
    """The deleting rule: a weight file another artifact's manifest in the directory references is
    neither deleted (retire) nor replaced (a --force commit)."""
    (tmp_path / "shared.data").write_bytes(b"w" * 100)
    (tmp_path / "other.onnx").write_bytes(b"x")
    (tmp_path / "other.manifest.json").write_text(
        json.dumps({"artifact": "other.onnx", "weight_files": {"shared.data": {"size": 100}}})
    )
    (tmp_path / "mine.data").write_bytes(b"m")
    assert weightfiles.retire(tmp_path, ["shared.data", "mine.data"], owner=tmp_path / "m.onnx") == ["shared.data"]
    assert (tmp_path / "shared.data").exists() and not (tmp_path / "mine.data").exists()
    with weightfiles.Staging(tmp_path, "m.onnx") as st:
        st.file("shared.data").write_bytes(b"z" * 100)
        with pytest.raises(GpclError, match="is read by other.manifest.json"):
            st.commit(["shared.data"], force=True)
    assert (tmp_path / "shared.data").read_bytes() == b"w" * 100
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the staging directory went


def test_export_force_keeps_an_insert_output_beside_it_working(tmp_path):
    """Defect 1: `export --force` over an earlier export unlinked the data files it no longer
    wrote, and an insert output beside it read them: left without weights. Now the output reads
    its own links and the re-export leaves it whole."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gpcl_trt.exporter import export_model

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    ckpt = tmp_path / "ckpt"
    LlamaForCausalLM(cfg).eval().save_pretrained(ckpt, safe_serialization=True)
    out = tmp_path / "m.onnx"
    export_model(ckpt, out, task="text-generation", external_data="link", validate="none")
    assert (tmp_path / "m.onnx.model.safetensors").is_file()
    insert_file(out, tmp_path / "g.onnx", tau=2.0)
    ids = np.random.default_rng(1).integers(1, 500, (1, 6), dtype=np.int64)
    before = _run(tmp_path / "g.onnx", ids)

    export_model(ckpt, out, task="text-generation", external_data="inline", validate="none", force=True)
    assert not (tmp_path / "m.onnx.model.safetensors").exists()  # retired: nothing else reads it
    for a, b in zip(before, _run(tmp_path / "g.onnx", ids)):
        np.testing.assert_array_equal(a, b)
    assert sites_file(tmp_path / "g.onnx")["sites"]


# ----------------------------------------------------------------------------- defect 2
def test_a_failed_rewrite_keeps_the_previous_output_and_its_data(tmp_path, monkeypatch):
    """Defect 2: the passes wrote OUT.onnx.data under its final name (onnx appends to an existing
    one) and on failure unlinked it, deleting the previous good output's data. Now it is staged."""
    import gpcl_trt.passes.modelio as modelio

    src = tmp_path / "m.onnx"
    onnx.save(toy_transformer(d=192, norm="rms"), src)
    monkeypatch.setattr(modelio, "EXTERNAL_DATA_BYTES", 1000)  # the big-model path: weights into OUT.onnx.data
    insert_file(src, tmp_path / "g.onnx", tau=0.5)
    data = tmp_path / "g.onnx.data"
    good, before = data.read_bytes(), _run(tmp_path / "g.onnx", IDS)

    insert_file(src, tmp_path / "g.onnx", tau=0.5, force=True)  # again: replaced, not appended to
    assert data.read_bytes() == good

    def broken(*a, **k):
        raise GpclError("insert: the rewritten model does not validate: injected")

    monkeypatch.setattr(modelio, "check_model", broken)
    with pytest.raises(GpclError, match="injected"):
        insert_file(src, tmp_path / "g.onnx", tau=0.7, force=True)
    assert data.read_bytes() == good
    for a, b in zip(before, _run(tmp_path / "g.onnx", IDS)):
        np.testing.assert_array_equal(a, b)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------- triton (defects 7, 8)
def test_triton_links_weights_and_leaves_nothing_when_it_refuses(tmp_path):
    from gpcl_trt.deploy import write_triton_repo

    src = _ext_model(tmp_path / "m.onnx")
    insert_file(src, tmp_path / "g.onnx", tau=0.5)
    res = write_triton_repo(tmp_path / "g.onnx", tmp_path / "repo", "g", backend="onnxruntime")
    vdir = Path(res["model_dir"]) / "1"
    assert os.path.samefile(vdir / "model.onnx.data", tmp_path / "m.onnx.data")  # a link, not a copy
    assert (vdir / "model.onnx").stat().st_size < (tmp_path / "m.onnx.data").stat().st_size / 10
    for a, b in zip(_run(tmp_path / "g.onnx", IDS), _run(vdir / "model.onnx", IDS)):
        np.testing.assert_array_equal(a, b)

    (tmp_path / "g.onnx.data").write_bytes(b"")  # the artifact is now unusable
    with pytest.raises(GpclError):
        write_triton_repo(tmp_path / "g.onnx", tmp_path / "repo2", "g", backend="onnxruntime")
    assert not (tmp_path / "repo2").exists()


# ----------------------------------------------------------------------------- filesystem errors
def test_read_only_output_is_one_line_before_any_work(tmp_path):
    src = _ext_model(tmp_path / "m.onnx")
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        line = _one_line_error(_cli("insert", src, "-o", ro / "g.onnx", "--tau", "0.5"))
        assert "not writable" in line
        line = _one_line_error(_cli("export", tmp_path / "nowhere", "-o", ro / "m.onnx"))
        assert "not writable" in line or "nowhere" in line


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(toy_transformer(d=192, norm="rms"), src)  # inline weights, about 2 MB
    with _tmpfs(tmp_path / "small", "size=256k") as small:
        line = _one_line_error(_cli("insert", src, "-o", small / "g.onnx", "--tau", "0.5"))
        assert "No space left on device" in line
        assert os.listdir(small) == []


def test_output_on_another_filesystem_copies_the_weights(tmp_path):
    """Hard links cannot cross filesystems: the pass output on a tmpfs gets a copy (streamed, with
    the read/write fallback where copy_file_range says EXDEV) that computes the same."""
    src = _ext_model(tmp_path / "m.onnx")
    with _tmpfs(tmp_path / "other", "size=64m") as other:
        res = insert_file(src, other / "g.onnx", tau=0.5)
        assert json.loads((other / "g.manifest.json").read_text())["results"]["external_data"] == {
            "g.onnx.data": "copy"
        }
        assert res["ok"]
        insert_file(src, tmp_path / "g.onnx", tau=0.5)
        for a, b in zip(_run(tmp_path / "g.onnx", IDS), _run(other / "g.onnx", IDS)):
            np.testing.assert_array_equal(a, b)
        assert (other / "g.onnx.data").read_bytes() == (tmp_path / "m.onnx.data").read_bytes()


def test_a_fifo_in_the_model_directory_is_refused_not_waited_on(tiny_llama_dir, tmp_path):
    """A FIFO where the checkpoint should be made export hang on its first read."""
    d = tmp_path / "ckpt"
    d.mkdir()
    for f in tiny_llama_dir.iterdir():
        if f.suffix != ".safetensors":
            os.link(f, d / f.name)
    os.mkfifo(d / "model.safetensors")
    line = _one_line_error(_cli("export", d, "-o", tmp_path / "m.onnx"))
    assert "is a FIFO, not a regular file" in line
    assert not (tmp_path / "m.onnx").exists()
