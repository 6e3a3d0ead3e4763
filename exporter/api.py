"""HF model directory -> ONNX with the dynamo exporter, validated against PyTorch: the orchestrator.

Public API (see docs/architecture.md): ``export_model``, ``load_model``, ``make_dummy_inputs``,
``check_model_dir``. ``export_model`` runs the pipeline, one module per step:

  options.py      the options checked (dtype, opset, tolerances, validation mode, memory budget)
  model_dir.py    the model directory read (config.json, weights, pickle and remote-code refusals)
  families.py     config.json -> family config class (configs.py, overrides.py), tasks.py -> task
  build.py        the model built lazily on ``meta`` (lazy.py, checkpoint.py) or loaded eagerly
  tracing.py      the core (cores.py, patchers.py) traced by the dynamo exporter, replicate.py
  postprocess.py  the traced graph's rewrites
  writing.py      weights layout and files, into the staging directory (weightfiles.Staging)
  validate.py     ONNX Runtime against PyTorch
  and then the staged files are committed under their final names with OUT.manifest.json.

torch / transformers / onnx are imported inside the functions so that importing this module
(and so the CLI) stays cheap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpcl_trt import weightfiles
from gpcl_trt.common import GpclError, manifest_path, sha256_file, write_manifest
from gpcl_trt.exporter import replicate as rep
from gpcl_trt.exporter.build import load_model, prepare, quiet
from gpcl_trt.exporter.model_dir import check_model_dir, check_weights, family_class, read_model_dir
from gpcl_trt.exporter.options import check_options
from gpcl_trt.exporter.tracing import make_dummy_inputs, trace, trace_errors, trace_replicated
from gpcl_trt.exporter.writing import check_output, external_locations, extra_disk, weights_layout, write_eager

__all__ = ["check_model_dir", "export_model", "load_model", "make_dummy_inputs"]

PACKAGES = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime")


def export_model(
    model_dir: str | os.PathLike,
    output: str | os.PathLike,
    task: str = "auto",
    opset: int = 18,
    dtype: str = "auto",
    atol: float | None = None,
    rtol: float | None = None,
    validate: bool | str = True,
    force: bool = False,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    external_data: bool | None = None,
    memory_budget: str | int | None = None,
    lazy: bool | None = None,
    replicate: bool | None = None,
) -> dict[str, Any]:
    """Export a local HF model directory to ONNX (dynamo exporter, dynamic batch/sequence axes,
    node metadata kept), validate it against PyTorch with ONNX Runtime and write
    OUT.manifest.json. Returns the result dict; ``ok`` is False when validation exceeds the
    tolerance (gpcl_trt.tolerance: its rule, and its defaults by dtype), and then nothing is
    written: every output appears under its final name only after every check has passed.

    ``dtype``: ``auto`` (default) exports a safetensors checkpoint in the floating dtype it
    stores (fp32 -> fp32, fp16 -> fp16, bf16 -> fp16: ONNX Runtime's CPU provider cannot validate
    bf16, and fp16 keeps the 2-byte size) and pickle weights in fp32; or fp32, fp16, bf16. The
    result's ``dtype`` and the manifest's options say which and why.

    Safetensors checkpoints take the lazy path (exporter/lazy.py): traced on fake weights, the
    ONNX external data pointing into hard links of the checkpoint files (dtype as stored) or into
    ``OUT.onnx.data`` (converted one chunk at a time). Pickle checkpoints (``allow_pickle``), or
    checkpoints that need transformers' weight conversion ops, take the eager path (the model
    loaded in memory); ``lazy=False`` forces it, ``lazy=True`` refuses to fall back.

    ``validate``: True/"auto" (full when ONNX Runtime's estimated memory fits ``memory_budget``,
    else layers), "full", "layers", False/"none". ``memory_budget``: bytes or "8G"; default half of
    the available memory. ``external_data``: None = lazy exports always, eager above ~1.8 GB;
    True/False to force (False on the lazy path reads the weights back into one file).
    ``replicate`` (lazy path): None = a decoder of 8 or more layers that are one module is traced
    with 4 layers and grown to all of them (exporter/replicate.py), else every layer is traced and
    ``weights.layers.why_every_layer`` says why; True insists (an error if impossible); False
    traces every layer."""
    from gpcl_trt.exporter import lazy as lz

    # options and inputs, before any work
    opts = check_options(dtype, opset, atol, rtol, validate, memory_budget, lazy)
    d, raw = read_model_dir(model_dir)
    arch_cls = family_class(raw, d / "config.json", trust_remote_code)
    if arch_cls.family == "encoder-decoder":  # a directory of two graphs (exporter/seq2seq.py)
        if replicate:
            raise GpclError(
                f"{d}: layer replication is not supported for encoder-decoder models; every layer is traced"
            )
        return _export_seq2seq(d, output, opts, task, force, trust_remote_code, allow_pickle, external_data, lazy)
    out = check_output(output, force)
    if not any(d.glob("*.safetensors")):
        check_weights(d, allow_pickle)  # the pickle refusal, or "no weights"
    opts.resolve(d)
    # the model: built lazily on meta from the checkpoint's headers, or why it is loaded eagerly
    built, arch, task, eager_reason = prepare(d, arch_cls, opts.dtype, task, trust_remote_code, lazy)

    old_locations = external_locations(out) if force and out.is_file() else set()
    with weightfiles.Staging(out.parent, out.name) as stage:
        # trace, post-process and write into the staging directory
        staged = stage.file(out.name)
        if built is not None:
            done = _export_lazy(built, d, arch, task, opts.opset, opts.dtype, staged, external_data, replicate)
        else:
            done = _export_eager(
                d, task, opts.opset, opts.dtype, staged, external_data, eager_reason, trust_remote_code, allow_pickle
            )
        done.weights["data_files"] = done.data_files
        done.weights["extra_disk_bytes"] = extra_disk([staged] + [stage.file(f) for f in done.data_files])
        validation = _validate(done, staged, opts)
        ok = bool(validation.get("passed", True))

        # the manifest, and the commit
        inputs, options, results = _record(d, done, validation, opts, trust_remote_code, allow_pickle)
        onnx_sha = sha256_file(staged)
        if done.placement is not None:
            lz.drop_unused(done.placement, done.data_files)
        if ok:
            write_manifest(staged, "export", inputs, options, results, packages=PACKAGES, force=True)
            stage.commit(done.data_files + [out.name, manifest_path(out).name], force)
            # data files of the export this one replaced that it no longer uses (unless another artifact reads them)
            weightfiles.retire(out.parent, sorted(old_locations - set(done.data_files)), owner=out)
    return {
        "ok": ok,
        "written": ok,
        "output": str(out),
        "manifest": str(manifest_path(out)),
        "onnx_sha256": onnx_sha,
        **{k: results[k] for k in ("architecture", "task", "validation", "weights", "external_data")},
        "dtype": {"value": opts.dtype, "requested": opts.asked_dtype, "reason": opts.dtype_reason},
        "inputs": done.module.input_names,
        "outputs": done.module.output_names,
        "options": options,
    }


def _export_seq2seq(
    d: Path,
    output: Any,
    opts: Any,
    task: str,
    force: bool,
    trust_remote_code: bool,
    allow_pickle: bool,
    external_data: Any,
    lazy: bool | None,
) -> dict[str, Any]:
    from gpcl_trt.exporter.seq2seq import export_seq2seq

    if not any(d.glob("*.safetensors")):
        check_weights(d, allow_pickle)
    opts.resolve(d)
    return export_seq2seq(
        d, Path(output), opts, task, force, trust_remote_code, allow_pickle, external_data, packages=PACKAGES, lazy=lazy
    )


def _validate(done: "_Exported", staged: Path, opts: Any) -> dict[str, Any]:
    """ONNX Runtime over the staged file against the PyTorch module (exporter/validate.py)."""
    from gpcl_trt import progress
    from gpcl_trt.exporter import validate as val

    if opts.validate == "none":
        return {"mode": "none", "skipped": True}
    plan = val.plan_validation(staged, opts.validate, opts.memory_budget)
    with progress.step(f"validate against PyTorch ({plan['mode']}: {plan['reason']})"):
        validation = val.validate_export(
            done.module, done.arch, done.task, staged, opts.atol, mode=plan["mode"], rtol=opts.rtol
        )
    validation.update(
        {
            "requested": opts.validate,
            "reason": plan["reason"],
            "memory_budget": opts.memory_budget,
            "estimate": plan["estimate"],
        }
    )
    return validation


def manifest_inputs_options(
    d: Path, task: str, opts: Any, trust_remote_code: bool, allow_pickle: bool
) -> tuple[dict, dict]:
    """The manifest's inputs (the model directory's identity) and options sections, the same for a
    decoder's export and each graph of an encoder-decoder's (exporter/seq2seq.py)."""
    model_hash, hash_kind = weightfiles.tree_identity(d)
    inputs = {
        "model_dir": str(d),
        "model_dir_sha256": model_hash,
        "model_dir_hash": hash_kind,
        "config_sha256": sha256_file(d / "config.json"),
    }
    options = {
        "task": task,
        **opts.as_manifest(),
        "trust_remote_code": trust_remote_code,
        "allow_pickle": allow_pickle,
    }
    return inputs, options


def _record(
    d: Path, done: "_Exported", validation: dict, opts: Any, trust_remote_code: bool, allow_pickle: bool
) -> tuple[dict, dict, dict]:
    """The manifest's (inputs, options, results) sections."""
    arch, task = done.arch, done.task
    inputs, options = manifest_inputs_options(d, task, opts, trust_remote_code, allow_pickle)
    results = {
        "architecture": arch.name,
        "model_type": arch.hf_config.model_type,
        "hf_class": type(done.module.core.model).__name__,
        "task": task,
        "inputs": [s.as_dict() for s in arch.inputs(task)],
        "outputs": [s.as_dict() for s in arch.outputs(task)],
        "external_data": done.data_files,
        "weights": done.weights,
        "validation": validation,
    }
    if task.startswith("text-generation"):  # what every runtime generates by (gpcl_trt.generate.rules)
        from gpcl_trt.generate.rules import generation_section

        results["generation"] = generation_section(d)
    return inputs, options, results


@dataclass
class _Exported:
    """What the trace-and-write step leaves in the staging directory."""

    module: Any  # the PyTorch reference (OnnxIOModule over every layer)
    arch: Any
    task: str
    data_files: list[str]
    weights: dict[str, Any]  # the result's "weights" section
    placement: Any = None  # lazy path: where each weight went (exporter/lazy.py)


def _export_lazy(
    built: tuple,
    d: Path,
    arch: Any,
    task: str,
    opset: int,
    dtype: str,
    staged: Path,
    external_data: Any,
    replicate: Any,
) -> _Exported:
    """The lazy path into ``staged`` (an ONNX file in the staging directory): the weights placed
    (linked or converted) first, then the trace on fake weights (4 layers replicated where the
    layers line up, else every layer), the file written over the placed weights, and the model's
    parameters made real again for validation."""
    from gpcl_trt import progress
    from gpcl_trt.exporter import lazy as lz
    from gpcl_trt.exporter.cores import OnnxIOModule

    model, ckpt, binding = built
    stage_dir, out_name = staged.parent, staged.name
    lz.fake_parameters(model)
    layout = weights_layout(external_data, lz.nbytes_of(binding))
    with progress.step(f"weights: {lz.nbytes_of(binding) / 1e9:.2f} GB in {len(binding.entries)} tensors"):
        placement = lz.convert_weights(binding, ckpt, stage_dir, out_name)
    stack = rep.find_stack(model, arch.hf_config.get_text_config())
    layers = {"traced": stack.count if stack else None, "replicated": 0}
    why = "not asked (replicate=False)"
    if replicate is not False:
        why = rep.why_not(stack, rep.TRACED_LAYERS + 1 if replicate else 2 * rep.TRACED_LAYERS)
    if why is None:
        try:
            with (
                progress.step(
                    f"trace {arch.name} on fake weights, {rep.TRACED_LAYERS} of {stack.count} layers "
                    f"({task}, opset {opset}, {dtype})"
                ),
                trace_errors(d, arch, task),
            ):
                proto, module = trace_replicated(model, arch, task, opset, stack, binding, placement)
            layers = {"traced": rep.TRACED_LAYERS, "replicated": stack.count - rep.TRACED_LAYERS}
        except rep.NotReplicable as exc:
            why = f"layers do not line up ({exc})"
    if why is not None and replicate:
        raise GpclError(f"cannot replicate the layers of {d}: {why}")
    if why is not None:
        layers["why_every_layer"] = why
        with quiet():
            module = OnnxIOModule(arch.core(model, task), arch, task).eval()
        with (
            progress.step(f"trace {arch.name} on fake weights ({task}, opset {opset}, {dtype})"),
            trace_errors(d, arch, task),
        ):
            proto = trace(module, arch, task, opset, bind=lambda m: lz.bind_initializers(m, binding, placement))
    with progress.step(f"write {out_name} ({layout})"):
        data_files = lz.finalize_proto(proto, placement, stage_dir, out_name, layout)
        staged.write_bytes(proto.SerializeToString())
        del proto
    lz.real_parameters(model, binding, lz.reference_tensors(binding, ckpt, placement))
    weights = {
        "path": "lazy",
        "layers": layers,
        "layout": layout,
        "links": placement.links,
        "in_place_bytes": placement.in_place_bytes,
        "converted_bytes": placement.converted_bytes,
        # Checkpoint tensors nothing reads (e.g. multi-token-prediction layers past the config's
        # count) and tie targets that keep a tensor of their own, as transformers loads them.
        "unused_tensors": binding.unused_report(),
        "untied": sorted(binding.untied),
    }
    return _Exported(module, arch, task, data_files, weights, placement)


def _export_eager(
    d: Path,
    task: str,
    opset: int,
    dtype: str,
    staged: Path,
    external_data: Any,
    eager_reason: str | None,
    trust_remote_code: bool,
    allow_pickle: bool,
) -> _Exported:
    """The eager path into ``staged``: the model loaded by transformers, traced, and written with
    its weights inline or in ``OUT.onnx.data``."""
    from gpcl_trt import progress

    with progress.step(f"load {d.name} (eager: {eager_reason})"):
        module, arch, task = load_model(d, task, trust_remote_code, allow_pickle, dtype)
    with progress.step(f"trace {arch.name} ({task}, opset {opset}, {dtype})"), trace_errors(d, arch, task):
        proto = trace(module, arch, task, opset)
    data_files = write_eager(
        proto, staged, {None: None, "auto": None, "inline": False}.get(external_data, external_data is not False)
    )
    del proto
    return _Exported(module, arch, task, data_files, {"path": "eager", "eager_reason": eager_reason})
