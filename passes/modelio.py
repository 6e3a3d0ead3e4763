"""Writing a pass result: export the graph, attach or drop the GPCL function, check it (ONNX
checker with shape inference, an ONNX Runtime session), then write it atomically with its
manifest. Passes never read external weights: the result references hard links of the source's
weight files under its own names (gpcl_trt.weightfiles owns that)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import onnx
import onnx_graphsurgeon as gs

from gpcl_trt import weightfiles
from gpcl_trt.common import GpclError, check_can_write, has_large_weights, manifest_path, one_line, write_manifest
from gpcl_trt.feeds import ort_session
from gpcl_trt.gpcl import EXTERNAL_DATA_BYTES
from gpcl_trt.passes.graph import LoadedModel, to_proto
from gpcl_trt.plugins.onnx_function import GPCL_DOMAIN, attach_gpcl_functions, remove_gpcl_functions
from gpcl_trt.weightfiles import Staging, external_locations, own_location


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


def link_external_data(
    model: onnx.ModelProto, src: Path, out: Path, stage: Staging
) -> tuple[dict[str, str], dict[str, dict]]:
    """Make the source's external weight files readable by ``out`` without a copy, under names of
    its own (``m.onnx.data`` -> ``OUT.onnx.data``, hard links staged in ``stage``), so that
    replacing or removing the source never changes what ``out`` reads. Where the filesystem
    cannot link and ``out`` sits beside the source, the source's very files are shared instead
    (the manifest records them, so nothing deletes or replaces them under ``out``); elsewhere
    they are copied. Points ``model`` at the new names. Returns (name -> "hardlink" | "reflink" |
    "shared" | "copy", the manifest's weight_files)."""
    src_dir = src.parent
    beside = src_dir.resolve() == out.parent.resolve()
    how: dict[str, str] = {}
    idents: dict[str, dict] = {}
    mapping: dict[str, str] = {}
    for loc in external_locations(model):
        name = loc if (beside and src.name == out.name) else own_location(out.name, loc, src.name)
        if name == loc and beside:
            how[name], idents[name] = "shared", weightfiles.file_identity(src_dir / loc)
            continue
        done = weightfiles.link_or_copy(src_dir / loc, stage.file(name), hardlink=True)
        if done == "copy" and beside:  # no link possible: share rather than duplicate the weights
            stage.file(name).unlink()
            name, done = loc, "shared"
        mapping[loc] = name
        how[name] = done
        idents[name] = weightfiles.file_identity(stage.file(name) if done != "shared" else src_dir / loc)
    weightfiles.relocate(model, {k: v for k, v in mapping.items() if k != v})
    return how, idents


def write_external(model: onnx.ModelProto, out: Path, stage: Staging, check=None) -> list[str]:
    """Write ``model`` into ``stage`` with its weights in OUT.onnx.data (never onto an existing
    file: onnx appends to one); ``check(staged_path)`` runs on the staged files. Returns the
    staged file names."""
    data_name = f"{out.name}.data"
    staged = stage.file(out.name)
    onnx.save(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name)
    if check is not None:
        check(staged)
    return [data_name]


def save_model(
    graph: gs.Graph,
    like: LoadedModel,
    output: str | Path,
    *,
    force: bool,
    gpcl: bool,
    stage_name: str,
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
    check_can_write(out, force)
    src_dir = like.path.parent
    with Staging(out.parent, out.name) as stage:
        staged = stage.file(out.name)
        data_files: list[str] = []
        weight_files = None
        if external_locations(model):
            # An ORT session would read every weight into memory: a large model is checked by the ONNX
            # checker alone, so that a pass stays small at any model size.
            ort_check = not has_large_weights(model, src_dir)
            load = (lambda: ort_session(model, base_dir=src_dir)) if ort_check else None  # weights read where they are
            check_model(weights_as_inputs(model), stage_name, load)
            how, weight_files = link_external_data(model, like.path, out, stage)
            data_files = [n for n, h in how.items() if h != "shared"]
            results = {**results, "external_data": how, "ort_check": ort_check}
            staged.write_bytes(model.SerializeToString())
        elif model.ByteSize() < EXTERNAL_DATA_BYTES:
            # Serialize once: the checker, ORT and the file take the same bytes (seconds on big models).
            data = model.SerializeToString()
            check_model(data, stage_name)
            staged.write_bytes(data)
        else:
            data_files = write_external(model, out, stage, lambda tmp: check_model(str(tmp), stage_name))
        write_manifest(
            staged,
            stage_name,
            inputs=inputs,
            options=options,
            results=results,
            packages=("onnx", "onnx-graphsurgeon", "onnxruntime"),
            weight_files=weight_files,
        )
        stage.commit(sorted(data_files) + [out.name, manifest_path(out).name], force)
    return model
