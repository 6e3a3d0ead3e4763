"""gpcl-trt export --quantize (export then quantize, one manifest, the float export removed or
kept as OUT.float.onnx, nothing partial on failure) and diff's tolerance for a quantized
candidate (read from its manifest chain; a wrong scale still fails)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from gpcl_trt.cli import main


def _cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def _names(d):
    return sorted(p.name for p in d.iterdir())


@pytest.mark.slow  # two exports (~25 s)
def test_export_quantize(tiny_llama_dir, tmp_path):
    out = tmp_path / "q.onnx"
    code, stdout, err = _cli(
        "export", tiny_llama_dir, "-o", out, "--task", "text-generation", "--quantize", "int8", "--json"
    )
    assert code == 0, err
    # no float export left behind, no temporary
    assert _names(tmp_path) == ["q.manifest.json", "q.onnx"], _names(tmp_path)
    res = json.loads(stdout)
    assert res["ok"] and res["export"]["validation"]["passed"] and res["quantize"]["check"]["passed"]
    assert res["quantize"]["quantized"] == 14 and res["float_kept"] is None
    assert "validation (full) passed" in err and "vs the same weights dequantized" in err
    doc = json.loads((tmp_path / "q.manifest.json").read_text())
    assert doc["stage"] == "quantize" and doc["options"]["weights"] == "int8"
    assert doc["inputs"]["source"] is None and doc["inputs"]["source_kept"] is False
    assert doc["inputs"]["model_dir"] == str(tiny_llama_dir)
    assert doc["inputs"]["export"]["validation"]["passed"] and doc["inputs"]["export"]["options"]["opset"] == 18
    assert any(n.op_type == "DequantizeLinear" for n in onnx.load(out).graph.node)

    # --keep-float: the float export next to it, named by the quantized manifest
    out2 = tmp_path / "k" / "m.onnx"
    out2.parent.mkdir()
    code, stdout, err = _cli(
        "export", tiny_llama_dir, "-o", out2, "--task", "text-generation", "--quantize", "int4", "--block-size", "64",
        "--keep-float", "--json",
    )  # fmt: skip
    assert code == 0, err
    assert _names(out2.parent) == ["m.float.manifest.json", "m.float.onnx", "m.manifest.json", "m.onnx"]
    doc = json.loads((out2.parent / "m.manifest.json").read_text())
    assert doc["inputs"]["source"] == str(out2.parent / "m.float.onnx") and doc["options"]["block_size"] == 64
    assert json.loads((out2.parent / "m.float.manifest.json").read_text())["stage"] == "export"


def test_export_quantize_nothing_partial(tiny_llama_dir, tmp_path, monkeypatch):
    """Bad quantize options fail before the export; a failure in the quantizer after the export
    leaves nothing (neither the float export nor a temporary); quantize-only flags need --quantize."""
    from gpcl_trt.common import GpclError
    from gpcl_trt.quantize import api as qapi

    base = ["export", tiny_llama_dir, "-o", tmp_path / "q.onnx", "--task", "text-generation"]
    for args, needle in (
        (["--quantize", "int4", "--block-size", "48"], "--block-size"),
        (["--quantize", "int4", "--method", "hqq"], "--method"),
        (["--block-size", "64"], "only apply with --quantize"),
        (["--keep-float"], "only apply with --quantize"),
    ):
        code, _, err = _cli(*base, *args)
        assert code == 2 and needle in err and err.count("\n") == 1, err
    assert _names(tmp_path) == []

    def boom(*a, **k):
        raise GpclError("injected after the export")

    monkeypatch.setattr(qapi, "_rewrite", boom)
    code, _, err = _cli(*base, "--quantize", "int8", "--keep-float")
    assert code == 2 and "injected after the export" in err, err
    assert _names(tmp_path) == []


@pytest.fixture(scope="module")
def int8_pair(tiny_llama_dir, tmp_path_factory):
    from gpcl_trt.exporter import export_model
    from gpcl_trt.quantize import quantize_model

    d = tmp_path_factory.mktemp("pair")
    src = d / "f.onnx"
    export_model(tiny_llama_dir, src, task="text-generation")
    quantize_model(src, d / "q8.onnx", weights="int8")
    return src, d / "q8.onnx"


def test_diff_quantized_default_tolerance(int8_pair, tmp_path):
    """int8 against its float source passes by default, the rule named; the float default would
    fail it (what diff did before); a scale x100 on one weight fails under the quantized rule."""
    src, q8 = int8_pair
    code, stdout, err = _cli("diff", "--reference", src, "--candidate", q8, "--json")
    res = json.loads(stdout)
    assert code == 0 and res["ok"], err
    assert res["tolerances"]["rule"].startswith("quantized weights (int8, block 32") and "quantized weights" in err
    code, _, err = _cli("diff", "--reference", src, "--candidate", q8, "--atol", "1e-4", "--rtol", "1e-3")
    assert code == 1, err  # the float default does not hold for int8 weights
    # reversed (the float model as the candidate): the float rule
    code, stdout, _ = _cli("diff", "--reference", q8, "--candidate", src, "--json")
    assert json.loads(stdout)["tolerances"]["rule"] == "float default"

    m = onnx.load(q8)
    scales = [t for t in m.graph.initializer if t.name.endswith("_scale")]
    t = scales[len(scales) // 2]
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(100), t.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(m, broken)
    (tmp_path / "broken.manifest.json").write_text((q8.parent / "q8.manifest.json").read_text())
    code, stdout, err = _cli("diff", "--reference", src, "--candidate", broken, "--json")
    res = json.loads(stdout)
    assert code == 1 and not res["ok"] and res["tolerances"]["rule"].startswith("quantized weights"), err


def test_diff_gpcl_over_quantized_follows_the_chain(int8_pair, tmp_path):
    """A GPCL model inserted into the quantized model: diff reads the quantize stage through the
    insert manifest."""
    from gpcl_trt.passes import insert_file
    from gpcl_trt.quantize.chain import quantization_of

    src, q8 = int8_pair
    g = tmp_path / "g.onnx"
    insert_file(q8, g, tau=100.0)
    assert quantization_of(g)["weights"] == "int8"
    assert quantization_of(src) is None and quantization_of(tmp_path) is None
