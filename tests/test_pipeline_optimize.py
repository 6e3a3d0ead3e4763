"""``gpcl-trt pipeline`` with ``[optimize]``: a tiny random Llama with a tokenizer, exported with past
and int8-quantized, gets model_gpcl_ort.onnx (the GPCL decoder rewritten for ONNX Runtime) after
insert; the engine still builds from model_gpcl.onnx; diff reports the optimised graph's greedy
agreement with the GPCL graph; NAME_generate serves the optimised graph and writes what local
greedy ``generate`` writes over model_gpcl.onnx. Bad values and inputs the pass cannot rewrite
(no past, an encoder-decoder) are refused in one line before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_generate import _config, _tokenizer

from gpcl_trt.cli import main
from gpcl_trt.common import GpclError, read_manifest
from gpcl_trt.deploy.pipeline import run_pipeline

BASE = """
[export]
task = "text-generation-with-past"
[quantize]
weights = "int8"
[calibrate]
samples = 8
[diff]
samples = 2
seq = 8
atol = 0.05
[serve]
requests = 32
concurrency = 4
seq = 8
"""


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    import torch

    d = tmp_path_factory.mktemp("opt_llama")
    model_cls, cfg = _config("llama")
    torch.manual_seed(0)
    model_cls(cfg).eval().save_pretrained(d)
    _tokenizer(d)
    return d


def _cfg(tmp_path: Path, text: str, name: str = "pipeline.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _one_error_line(args: list[str]) -> str:
    res = CliRunner().invoke(main, ["pipeline", *args])
    assert res.exit_code == 2 and res.stdout == "", res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("gpcl-trt pipeline: error: ")
    return lines[0]


@pytest.mark.parametrize(
    "table, message",
    [
        ('variant = "fastest"', "[optimize] variant must be one of standard, contrib, contrib-gqa, got 'fastest'"),
        ('logits = "first"', "[optimize] logits must be one of all, last, got 'first'"),
        ("level = 3", "[optimize] unknown option 'level'"),
        ('target = "ort"', "[optimize] target is set by the pipeline itself"),
    ],
)
def test_bad_optimize_options_are_one_line(llama_dir, tmp_path, table, message):
    cfg = _cfg(tmp_path, BASE + f"[optimize]\n{table}\n")
    line = _one_error_line([str(llama_dir), "-o", str(tmp_path / "out"), "--config", str(cfg)])
    assert message in line
    assert not (tmp_path / "out").exists()


def test_refused_without_past(llama_dir, tiny_gpt2_dir, tmp_path):
    # the model directory exported without past, and an ONNX decoder without past inputs
    cfg = _cfg(tmp_path, '[export]\ntask = "text-generation"\n[optimize]\n')
    line = _one_error_line([str(llama_dir), "-o", str(tmp_path / "out"), "--config", str(cfg)])
    assert "exports as text-generation; the optimize pass needs a decoder exported with past" in line
    assert not (tmp_path / "out").exists()

    from gpcl_trt.exporter import export_model

    onnx = tmp_path / "nopast" / "gpt2.onnx"
    onnx.parent.mkdir()
    assert export_model(tiny_gpt2_dir, onnx, task="text-generation", validate=False)["ok"]
    with pytest.raises(GpclError, match=r"^\[optimize\]: gpt2.onnx is not a decoder exported with past"):
        run_pipeline(onnx, tmp_path / "out2", config=_cfg(tmp_path, "[optimize]\n", "o.toml"))
    assert not (tmp_path / "out2").exists()


def test_refused_for_an_encoder_decoder(tmp_path):
    from test_seq2seq import make_checkpoint

    model = make_checkpoint("t5", tmp_path / "t5")
    with pytest.raises(GpclError, match=r"^\[optimize\]: the pipeline does not optimize an encoder-decoder"):
        run_pipeline(model, tmp_path / "out", config=_cfg(tmp_path, '[optimize]\nvariant = "standard"\n'))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # export, quantize, a TensorRT-RTX build, two live tritonservers
def test_quantize_optimize_and_serve(llama_dir, tmp_path):
    pytest.importorskip("pytriton", reason="needs tritonserver (nvidia-pytriton)")
    import onnx

    out = tmp_path / "out"
    cfg = _cfg(tmp_path, BASE + "[optimize]\n")
    s = run_pipeline(llama_dir, out, config=cfg)
    assert s["ok"], s
    assert list(s["stages"]) == [
        "export",
        "quantize",
        "calibrate",
        "insert",
        "optimize",
        "build",
        "diff",
        "triton",
        "serve",
    ]
    assert all(v["status"] == "done" for v in s["stages"].values()), s["stages"]

    # the optimised graph: from model_gpcl.onnx, with ORT's contrib ops; the engine's graph keeps standard ops
    ort = out / "model_gpcl_ort.onnx"
    m = read_manifest(ort)
    assert Path(m["inputs"]["source"]).resolve() == (out / "model_gpcl.onnx").resolve()
    assert m["options"] == {"for": "ort", "variant": "contrib-gqa", "logits": "last"}
    ops = {n.op_type for n in onnx.load(ort, load_external_data=False).graph.node}
    assert "GroupQueryAttention" in ops and "DequantizeLinear" in ops  # still the quantized GPCL model
    gpcl_ops = {(n.domain, n.op_type) for n in onnx.load(out / "model_gpcl.onnx", load_external_data=False).graph.node}
    assert not any(d == "com.microsoft" for d, _ in gpcl_ops)
    engine_src = read_manifest(out / "model_gpcl.engine")["inputs"]["onnx"]["path"]
    assert Path(engine_src).resolve() == (out / "model_gpcl.onnx").resolve()
    o = s["optimize"]
    assert o["variant"] == "contrib-gqa" and o["logits"] == "last" and o["kv_cache"] == "shared-buffer"
    assert o["nodes_after"] < o["nodes_before"]
    # diff: the rewrite changes no greedy token of the GPCL graph
    agreement = json.loads((out / "accuracy.json").read_text())["optimized"]
    assert agreement["greedy_agreement"] == 1.0 and agreement["first_divergence"] == [None] * 4
    assert o["generation"] == agreement
    report = (out / "report.md").read_text()
    assert "| optimized for ORT | contrib-gqa, logits last: " in report
    assert "greedy agreement 1 with the GPCL graph over 4 prompts" in report

    # Triton: NAME_generate runs the optimised graph, the tensor entries the GPCL graph
    repo = out / "triton_repo"
    entries = s["triton"]["entries"]
    assert entries["gpcl_model_generate"]["onnx"] == "model_gpcl_ort.onnx"
    gen_manifest = read_manifest(repo / "gpcl_model_generate" / "config.pbtxt")
    assert Path(gen_manifest["inputs"]["artifact"]["path"]).resolve() == ort.resolve()
    for entry in ("gpcl_model", "gpcl_model_ort"):
        src = read_manifest(repo / entry / "config.pbtxt")["inputs"]["artifact"]["path"]
        assert Path(src).resolve() == (out / "model_gpcl.onnx").resolve(), entry
    assert s["served"]["ok"]

    # served text equals local greedy generate over model_gpcl.onnx
    import http.client

    from gpcl_trt.deploy.server import TritonServer
    from gpcl_trt.generate import generate

    prompts = [("the quick brown fox", 12), ("once upon a time", 7), ("日本語", 10)]
    server = TritonServer(repo, models=["gpcl_model_generate"])
    served = []
    try:
        server.start()
        for prompt, n in prompts:
            conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=120)
            body = json.dumps({"text_input": prompt, "max_tokens": n})
            conn.request("POST", "/v2/models/gpcl_model_generate/generate", body=body)
            resp = conn.getresponse()
            served.append((resp.status, resp.read().decode()))
            conn.close()
    finally:
        server.stop()
    for (prompt, n), (status, body) in zip(prompts, served):
        assert status == 200, body
        local = generate(out / "model_gpcl.onnx", [prompt], max_new_tokens=n)["outputs"][0]["text"]
        assert json.loads(body)["text_output"] == local, prompt

    # a second run is cached; another variant reruns optimize and what reads it, not the GPCL stages
    again = run_pipeline(llama_dir, out, config=cfg)
    assert {v["status"] for v in again["stages"].values()} == {"cached"}, again["stages"]
    assert again["optimize"] == s["optimize"]
    standard = run_pipeline(
        llama_dir, out, config=_cfg(tmp_path, BASE + '[optimize]\nvariant = "standard"\n', "s.toml")
    )
    assert {k: v["status"] for k, v in standard["stages"].items()} == {
        **dict.fromkeys(["export", "quantize", "calibrate", "insert", "build"], "cached"),
        **dict.fromkeys(["optimize", "diff", "triton", "serve"], "done"),
    }
    assert (
        read_manifest(ort)["options"]["variant"] == "standard" and standard["optimize"]["kv_cache"] != "shared-buffer"
    )
