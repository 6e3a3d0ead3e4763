"""Writing a pass result: export the graph, attach or drop the GPCL function, check it (ONNX
checker with shape inference, an ONNX Runtime session), then write it atomically with its
manifest."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from gpcl_trt.common import GpclError, atomic_path, write_manifest
from gpcl_trt.gpcl import EXTERNAL_DATA_BYTES
from gpcl_trt.passes.graph import LoadedModel, to_proto
from gpcl_trt.plugins.onnx_function import GPCL_DOMAIN, attach_gpcl_functions, remove_gpcl_functions

def drop_gpcl_opset(model: onnx.ModelProto) -> None:
    keep = [o for o in model.opset_import if o.domain != GPCL_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def check_model(data: bytes | str, what: str) -> None:
    """The result (serialized bytes, or a path for a model with external data) must pass the full
    ONNX checker (strict shape inference) and load in ONNX Runtime."""
    import onnxruntime as ort

    try:
        onnx.checker.check_model(data, full_check=True)
        ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as exc:  # a failed check is a bug in the pass, but say it in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GpclError(f"{what}: the rewritten model does not validate: {first}") from exc


def write_external(model: onnx.ModelProto, out: Path, force: bool, check=None) -> None:
    """Write ``model`` with its weights in OUT.onnx.data; ``check(tmp_path)`` runs before the
    rename, and a failure leaves neither file behind."""
    data_file = out.with_name(f"{out.name}.data")
    if data_file.exists() and not force:
        raise GpclError(f"{data_file} exists; pass --force to overwrite it")
    try:
        with atomic_path(out, force=force) as tmp:
            onnx.save(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=data_file.name)
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
    if model.ByteSize() < EXTERNAL_DATA_BYTES:
        # Serialize once: the checker, ORT and the file take the same bytes (seconds on big models).
        data = model.SerializeToString()
        check_model(data, stage)
        with atomic_path(out, force=force) as tmp:
            tmp.write_bytes(data)
    else:
        write_external(model, out, force, lambda tmp: check_model(str(tmp), stage))
    write_manifest(out, stage, inputs=inputs, options=options, results=results, packages=("onnx", "onnx-graphsurgeon", "onnxruntime"))
    return model

