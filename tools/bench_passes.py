"""Benchmark of the passes on an exported model (numbers for BENCHMARKS.md, not a test):

    python tools/bench_passes.py MODEL.onnx --out-dir DIR [--repeat 20]

Times sites / calibrate / insert / strip, and ONNX Runtime (CPU) latency of the model with
calibrated clamp GPCL at every site next to the original, as a ratio measured in the same run.
With a tokenizer (via the export manifest) it also reports the held-out accuracy of the
calibrated clamp on sentences that are not in the calibration corpus."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import click
import numpy as np

HELD_OUT = [
    "A thunderstorm rolled across the valley just after midnight.",
    "The accountant double-checked every invoice before the audit.",
    "Is it true that some turtles can breathe through their backsides?",
    "We missed the ferry, so we spent the night in a tiny fishing village.",
    "The firmware update bricked three of our test routers.",
    "Grandma's apple pie recipe uses cinnamon, nutmeg and a splash of lemon.",
    "Quarterly emissions fell by nine percent after the plant switched to gas.",
    "My neighbour's parrot can whistle the first bars of a famous symphony.",
]


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _latency_ratio(base, other, feed: dict, repeat: int) -> float:
    """Median time of ``other`` over median time of ``base``, runs interleaved so that load
    changes on a shared machine hit both alike."""
    times: dict[int, list[float]] = {0: [], 1: []}
    for i in range(repeat + 1):
        for k, session in ((0, base), (1, other)):
            t0 = time.perf_counter()
            session.run(None, feed)
            if i:  # the first round is warm-up
                times[k].append(time.perf_counter() - t0)
    return statistics.median(times[1]) / statistics.median(times[0])


@click.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--out-dir", required=True, type=click.Path(file_okay=False), help="Scratch directory for the outputs.")
@click.option("--repeat", default=20, show_default=True, help="Timed ORT runs per shape (median reported).")
def main(model: str, out_dir: str, repeat: int) -> None:
    from gpcl_trt.feeds import complete_feed, make_feeds, ort_session, specs_from_session
    from gpcl_trt.manifest import model_dir_of
    from gpcl_trt.passes import calibrate_file, insert_file, sites_file, strip_file
    from gpcl_trt.passes.calibrate import _pad_batches, _tokenizer

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    calib, gpcl, stripped = d / "calib.json", d / "gpcl.onnx", d / "stripped.onnx"
    res: dict = {"model": model}
    res["sites_s"], s = _timed(lambda: sites_file(model))
    res["sites"] = len(s["sites"])
    res["calibrate_64_s"], _ = _timed(lambda: calibrate_file(model, calib, force=True))
    res["insert_s"], _ = _timed(lambda: insert_file(model, gpcl, calibration=calib, force=True))
    res["strip_s"], _ = _timed(lambda: strip_file(gpcl, stripped, force=True))

    s0, s1 = ort_session(model), ort_session(gpcl)
    specs = specs_from_session(s0)
    for batch, seq in ((1, 128), (8, 128)):
        feed = make_feeds(specs, batch, seq)
        res[f"ort_cpu_ratio_b{batch}_s{seq}"] = round(_latency_ratio(s0, s1, feed, repeat), 3)

    tok = _tokenizer(model_dir_of(model))
    if tok is not None:
        worst_diff, worst_cos = 0.0, 1.0
        for b in _pad_batches([tok(t) for t in HELD_OUT]):
            m = b["attention_mask"].astype(bool)
            feed = complete_feed(specs, b)
            a, g = s0.run(None, feed)[0][m], s1.run(None, feed)[0][m]
            worst_diff = max(worst_diff, float(np.abs(a - g).max()))
            cos = (a * g).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(g, axis=-1))
            worst_cos = min(worst_cos, float(cos.min()))
        res["held_out_max_abs_diff"], res["held_out_min_cosine"] = worst_diff, worst_cos
    click.echo(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
