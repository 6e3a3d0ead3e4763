"""``gpcl-trt export --quantize``: export, then quantize (streamed), as one command.

The float export is written into a hidden staging directory next to OUT.onnx (same filesystem:
a lazy export's checkpoint links stay links) and validated against PyTorch there, as a plain
export is. The quantizer reads it and writes OUT.onnx (+ OUT.onnx.data, OUT.manifest.json),
checked against the same weights dequantized in numpy. The float export then goes with the
staging directory, unless ``keep_float``: then it is committed as OUT.float.onnx (with its
export manifest), the source the quantized manifest names. Nothing is written when the export
validation or the quantized check fails, or on any error.

The quantized manifest is the one record of both stages: its inputs carry the model directory,
the float source (its path when kept, else null, and its sha256) and the export stage's options
and validation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gpcl_trt.common import manifest_path


def float_path(output: str | os.PathLike) -> Path:
    """Where ``--keep-float`` puts the float export: OUT.float.onnx."""
    out = Path(output)
    return out.with_name(f"{out.stem}.float.onnx")


def export_quantized(
    model_dir: str | os.PathLike,
    output: str | os.PathLike,
    quantize: dict[str, Any],
    keep_float: bool = False,
    force: bool = False,
    **export_options: Any,
) -> dict[str, Any]:
    """Export ``model_dir`` (``export_model``'s ``export_options``) and quantize it into
    ``output`` (``quantize_model``'s options in ``quantize``). Returns the result: ``export`` (its
    validation and what it exported), ``quantize`` (the quantizer's result and its check) and
    ``float_kept``; ``ok`` False, nothing written, when a check fails."""
    from gpcl_trt import weightfiles
    from gpcl_trt.common import read_manifest
    from gpcl_trt.exporter import export_model
    from gpcl_trt.quantize.api import _check_options, quantize_model

    out = Path(output)
    _check_options(
        quantize.get("weights", "int4"),
        quantize.get("block_size", 32),
        quantize.get("method", "rtn"),
        quantize.get("samples", 1),
    )
    from gpcl_trt.exporter.writing import check_output

    check_output(out, force)
    kept = float_path(out)
    if keep_float:
        check_output(kept, force)
    with weightfiles.Staging(out.parent, kept.name) as stage:
        staged = stage.file(kept.name)
        exported = export_model(model_dir, staged, force=False, **export_options)
        summary = {
            k: exported.get(k) for k in ("architecture", "task", "validation", "dtype", "weights", "onnx_sha256")
        }
        if not exported["ok"]:
            return {"ok": False, "written": False, "output": str(out), "export": summary, "quantize": None}
        doc = read_manifest(staged) or {}
        chain = {
            "source": str(kept) if keep_float else None,
            "source_kept": keep_float,
            "export": {
                "options": doc.get("options"),
                "validation": (doc.get("results") or {}).get("validation"),
                "artifact_sha256": doc.get("artifact_sha256"),
            },
        }
        quantized = quantize_model(staged, out, force=force, chain=chain, **quantize)
        if quantized["ok"] and keep_float:
            stage.commit(sorted(os.listdir(stage.path)), force)
    q = {k: v for k, v in quantized.items() if k not in ("layers", "output")}
    return {
        "ok": bool(quantized["ok"]),
        "written": bool(quantized["ok"]),
        "output": str(out),
        "manifest": str(manifest_path(out)),
        "export": summary,
        "quantize": q,
        "float_kept": str(kept) if keep_float and quantized["ok"] else None,
    }


def quantization_of(artifact: str | os.PathLike | None, depth: int = 5) -> dict | None:
    """The quantize options behind an artifact (its manifest, or its source's: a GPCL model or an
    engine made from a quantized model), None when there is none or no manifest to follow."""
    from gpcl_trt.common import GpclError
    from gpcl_trt.manifest import Manifest

    p = None if artifact is None else Path(artifact)
    for _ in range(depth):
        if p is None or not p.is_file():
            return None
        try:
            m = Manifest.read(p)
        except GpclError:
            return None
        if m is None:
            return None
        if m.stage == "quantize":
            return dict(m.options)
        src = m.source
        p = None if src is None or src == p else src
    return None
