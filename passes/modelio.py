"""Writing a pass result: export the graph, attach or drop the GPCL function, check it (ONNX
checker with shape inference, an ONNX Runtime session), then write it atomically with its
manifest. Passes never read external weights: the result references the source's weight files
(the same files, or hard links to them next to the output)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import onnx
import onnx_graphsurgeon as gs

from gpcl_trt.common import (
    GpclError,
    atomic_path,
    check_can_write,
    external_locations,
    has_large_weights,
    one_line,
    write_manifest,
)
from gpcl_trt.feeds import ort_session
from gpcl_trt.gpcl import EXTERNAL_DATA_BYTES
from gpcl_trt.passes.graph import LoadedModel, to_proto
from gpcl_trt.plugins.onnx_function import GPCL_DOMAIN, attach_gpcl_functions, remove_gpcl_functions


def drop_gpcl_opset(model: onnx.ModelProto) -> None:
    keep = [o for o in model.opset_import if o.domain != GPCL_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def weights_as_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose external weights are typed graph inputs instead: what the ONNX
    checker needs to check the graph (types, shapes, functions) without opening the weight files,
    which it refuses when they are hard links (and the exporter and the passes link weights)."""
    from onnx.external_data_helper import uses_external_data

    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep, moved = [], []
    for t in out.graph.initializer:
        (moved if uses_external_data(t) else keep).append(t)
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    out.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in moved)
    return out


def check_model(data: bytes | str | onnx.ModelProto, what: str, load_in_ort: Callable[[], Any] | None = None) -> None:
    """The result must pass the full ONNX checker (strict shape inference) and load in ONNX
    Runtime: ``data`` itself (bytes or a path), or what ``load_in_ort`` loads (a model whose
    weights are external; None skips the session)."""
    import onnxruntime as ort

    try:
        onnx.checker.check_model(data, full_check=True)
        if not isinstance(data, onnx.ModelProto):
            ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        elif load_in_ort is not None:
            load_in_ort()
    except Exception as exc:  # a failed check is a bug in the pass, but say it in one line
        raise GpclError(f"{what}: the rewritten model does not validate: {one_line(exc)}") from exc


def share_external_data(locations: list[str], src_dir: Path, out_dir: Path, force: bool) -> dict[str, str]:
    """Make the source's external weight files readable from ``out_dir`` without a copy: the very
    files when the output sits beside the source, else hard links (a copy only where the
    filesystem cannot link). Returns location -> "shared" | "hardlink" | "copy"."""
    import shutil

    how = {}
    for loc in locations:
        src, dst = src_dir / loc, out_dir / loc
        if not src.is_file():
            raise GpclError(f"{src}: the model's external weight file is missing")
        if dst.exists() and os.path.samefile(src, dst):
            how[loc] = "shared"
            continue
        with atomic_path(dst, force=force) as tmp:
            tmp.unlink()
            try:
                os.link(src, tmp)
                how[loc] = "hardlink"
            except OSError:
                shutil.copyfile(src, tmp)
                how[loc] = "copy"
    return how


def write_external(model: onnx.ModelProto, out: Path, force: bool, check=None) -> None:
    """Write ``model`` with its weights in OUT.onnx.data; ``check(tmp_path)`` runs before the
    rename, and a failure leaves neither file behind."""
    data_file = out.with_name(f"{out.name}.data")
    if data_file.exists() and not force:
        raise GpclError(f"{data_file} exists; pass --force to overwrite it")
    try:
        with atomic_path(out, force=force) as tmp:
            onnx.save(
                model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=data_file.name
            )
            if check is not None:
                check(tmp)
    except BaseException:
        data_file.unlink(missing_ok=True)
        raise


def save_model(
    graph: gs.Graph,
    like: LoadedModel,
    output: str | Path,
    *,
    force: bool,
    gpcl: bool,
    stage: str,
    inputs: dict,
    options: dict,
    results: dict,
) -> onnx.ModelProto:
    model = to_proto(graph, like)
    if gpcl:
        attach_gpcl_functions(model)
    else:
        remove_gpcl_functions(model)
        drop_gpcl_opset(model)
    out = Path(output)
    locations = external_locations(model)
    if locations:
        src_dir = like.path.parent
        # An ORT session would read every weight into memory: a large model is checked by the ONNX
        # checker alone, so that a pass stays small at any model size.
        ort_check = not has_large_weights(model, src_dir)
        load = (lambda: ort_session(model, base_dir=src_dir)) if ort_check else None  # weights read where they are
        check_model(weights_as_inputs(model), stage, load)
        check_can_write(out, force)
        results = {
            **results,
            "external_data": share_external_data(locations, src_dir, out.parent, force),
            "ort_check": ort_check,
        }
        with atomic_path(out, force=force) as tmp:
            tmp.write_bytes(model.SerializeToString())
    elif model.ByteSize() < EXTERNAL_DATA_BYTES:
        # Serialize once: the checker, ORT and the file take the same bytes (seconds on big models).
        data = model.SerializeToString()
        check_model(data, stage)
        with atomic_path(out, force=force) as tmp:
            tmp.write_bytes(data)
    else:
        write_external(model, out, force, lambda tmp: check_model(str(tmp), stage))
    write_manifest(
        out,
        stage,
        inputs=inputs,
        options=options,
        results=results,
        packages=("onnx", "onnx-graphsurgeon", "onnxruntime"),
    )
    return model
