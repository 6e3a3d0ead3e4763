"""gpcl-trt eval: generation-level accuracy with real components. The tiny Llama of
test_generate in PyTorch against its own ONNX export agrees on every greedy token and on the
teacher-forced NLL (which equals transformers' own loss); a GPCL model with a tau far below the
activations' radii changes the text, and the agreement and first divergences reported are those
of the two runs' tokens."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from test_generate import PROMPTS, SENTENCES, decoders  # noqa: F401  (module fixture)

from gpcl_trt.cli import main

N = 12


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    (d / "prompts.txt").write_text("\n".join(PROMPTS + ["the lazy dog"]) + "\n", encoding="utf-8")
    (d / "text.txt").write_text("\n".join(SENTENCES[:4]) + "\n\n", encoding="utf-8")
    return d / "prompts.txt", d / "text.txt"


def _hf_loss(model_dir, line: str) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok(line, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def test_pytorch_vs_own_export_agrees(decoders, files, tmp_path):  # noqa: F811
    from gpcl_trt.accuracy.generation import evaluate

    model_dir, onnx = decoders("llama")
    prompts, text = files
    r = evaluate(model_dir, onnx, prompts=prompts, text=text, max_new_tokens=N)
    assert r["ok"] and r["runtimes"] == {"reference": "pytorch", "candidate": "onnxruntime"}
    g = r["generation"]
    assert (g["greedy_agreement"], g["prompts_agreeing"], g["prompts"]) == (1.0, 4, 4)
    assert g["mean_first_divergence"] is None and g["first_divergence"] == [None] * 4
    n = r["nll"]
    assert n["sequences"] == 4 and n["candidate_nll"] == pytest.approx(n["reference_nll"], rel=1e-5)
    # one line: our teacher-forced NLL is transformers' own loss
    one = tmp_path / "one.txt"
    one.write_text(SENTENCES[1], encoding="utf-8")
    single = evaluate(model_dir, model_dir, text=one)
    assert single["nll"]["reference_nll"] == pytest.approx(_hf_loss(model_dir, SENTENCES[1]), rel=1e-5)


def test_gpcl_small_tau_disagrees_and_is_reported(decoders, files, tmp_path):  # noqa: F811
    from gpcl_trt.accuracy.generation import evaluate
    from gpcl_trt.generate import generate
    from gpcl_trt.passes import insert_file

    _, onnx = decoders("llama")
    prompts, text = files
    gpcl = tmp_path / "gpcl.onnx"
    assert insert_file(onnx, gpcl, sites=("pre-attention", "pre-mlp"), tau=1e-3)["ok"]
    r = evaluate(onnx, gpcl, prompts=prompts, text=text, max_new_tokens=N)
    lines = [p for p in prompts.read_text(encoding="utf-8").splitlines() if p.strip()]

    def tokens(artifact):  # each prompt alone, EOS ignored: what eval compares
        out = []
        for p in lines:
            res = generate(artifact, [p], max_new_tokens=N)
            out.append(res["outputs"][0]["tokens"])
        return out

    ref, cand = tokens(onnx), tokens(gpcl)
    same = [a == b for a, b in zip(ref, cand) if len(a) == N and len(b) == N]
    g = r["generation"]
    assert g["greedy_agreement"] < 1 and not r["ok"]
    if len(same) == len(lines):  # no EOS cut either run short: the share is directly comparable
        assert g["greedy_agreement"] == sum(same) / len(lines)
    for step, a, b in zip(g["first_divergence"], ref, cand):
        k = min(len(a), len(b))
        if step is not None and step < k:
            assert a[:step] == b[:step] and a[step] != b[step]
    assert r["nll"]["candidate_nll"] > r["nll"]["reference_nll"]


def test_cli_eval(decoders, files):  # noqa: F811
    model_dir, onnx = decoders("llama")
    prompts, text = files
    res = CliRunner().invoke(
        main,
        [
            "eval",
            str(onnx),
            "--reference",
            str(model_dir),
            "--prompts",
            str(prompts),
            "--max-new-tokens",
            "4",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["generation"]["greedy_agreement"] == 1.0 and "greedy agreement 1.000" in res.stderr
    res = CliRunner().invoke(main, ["eval", str(onnx), "--reference", str(model_dir)])
    assert res.exit_code == 2 and res.stderr.strip().splitlines() == [
        "gpcl-trt eval: error: nothing to evaluate: give --prompts FILE and/or --text FILE"
    ]


def test_pipeline_eval_for_decoders_only(decoders, tiny_llama_onnx, tmp_path):  # noqa: F811
    from gpcl_trt.accuracy.generation import PIPELINE_PROMPTS, pipeline_eval
    from gpcl_trt.deploy.summary import _generation_row
    from gpcl_trt.passes import insert_file

    _, onnx = decoders("llama")
    gpcl = tmp_path / "gpcl.onnx"
    assert insert_file(onnx, gpcl, sites=("pre-attention", "pre-mlp"), tau=1e-3)["ok"]
    g = pipeline_eval(onnx, gpcl, max_new_tokens=8)
    assert g["prompts"] == len(PIPELINE_PROMPTS) and g["greedy_agreement"] < 1
    assert g["candidate_nll"] != g["reference_nll"]
    ((label, text),) = _generation_row(g)
    assert label == "generation" and text.startswith(f"greedy agreement {g['greedy_agreement']:.4g} over 4 prompts")
    assert pipeline_eval(onnx, onnx, max_new_tokens=8)["greedy_agreement"] == 1.0
    assert pipeline_eval(tiny_llama_onnx, tiny_llama_onnx) is None  # no past: not a decoder for the loop
