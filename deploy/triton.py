"""Triton model repositories for gpcl-trt artifacts.

``write_triton_repo`` writes ``REPO/NAME/config.pbtxt`` and ``REPO/NAME/1/<model file>``.
config.pbtxt is a ``inference.ModelConfig`` message of Triton's own schema (the generated
``model_config_pb2`` that tritonclient ships) printed with protobuf's text format, so what we
write is exactly what Triton parses. Inputs, outputs, dtypes and dims come from the ONNX graph
(for an engine: the ONNX model its manifest names, or ``onnx=``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sysconfig
from pathlib import Path
from typing import Any

from gpcl_trt import weightfiles
from gpcl_trt.common import GpclError, atomic_dir, load_onnx, load_onnx_graph, sha256_file, write_manifest
from gpcl_trt.manifest import Manifest

BACKENDS = ("tensorrt", "onnxruntime", "python")
VERSION = "1"
# One small table per backend instead of if-chains: platform/backend string and model file.
BACKEND_SPEC: dict[str, dict[str, str]] = {
    "tensorrt": {"platform": "tensorrt_plan", "backend": "", "file": "model.plan"},
    "onnxruntime": {"platform": "onnxruntime_onnx", "backend": "", "file": "model.onnx"},
    "python": {"platform": "", "backend": "python", "file": "model.onnx"},
}
PYTHON_MODEL_SOURCE = Path(__file__).with_name("triton_python_model.py")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# ONNX TensorProto element type -> Triton DataType name.
_ONNX_TO_TRITON = {
    1: "TYPE_FP32",
    2: "TYPE_UINT8",
    3: "TYPE_INT8",
    4: "TYPE_UINT16",
    5: "TYPE_INT16",
    6: "TYPE_INT32",
    7: "TYPE_INT64",
    8: "TYPE_STRING",
    9: "TYPE_BOOL",
    10: "TYPE_FP16",
    11: "TYPE_FP64",
    12: "TYPE_UINT32",
    13: "TYPE_UINT64",
    16: "TYPE_BF16",
}


def validate_model_name(name: str) -> str:
    """A Triton model name becomes a directory: no separators, no traversal, no hidden names."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in (".", "..") or ".." in name:
        raise GpclError(
            f"invalid model name {name!r}: use 1-128 letters, digits, '_', '-', '.', starting with a letter or digit"
        )
    return name


# ----------------------------------------------------------------------------- I/O signature
def onnx_io(onnx_path: str | os.PathLike) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs of an ONNX graph: name, Triton dtype, dims (-1 for dynamic axes)."""
    model = load_onnx(onnx_path, external_data=False)
    initializers = {t.name for t in model.graph.initializer}

    def describe(values) -> list[dict[str, Any]]:
        out = []
        for v in values:
            if v.name in initializers:
                continue
            tt = v.type.tensor_type
            dtype = _ONNX_TO_TRITON.get(tt.elem_type)
            if dtype is None:
                raise GpclError(
                    f"{onnx_path}: tensor {v.name!r} has an element type Triton cannot serve ({tt.elem_type})"
                )
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
            out.append({"name": v.name, "data_type": dtype, "dims": dims})
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def _engine_source_onnx(engine: Path) -> Path | None:
    """The ONNX model an engine was built from, as its manifest records it."""
    manifest = Manifest.read(engine)
    return manifest.source if manifest is not None else None


def _engine_plugin_lib(engine: Path) -> Path | None:
    """An engine whose manifest says it holds GPCL plugin layers needs its plugin library:
    take the one recorded at build time, or refuse rather than write an unloadable model."""
    manifest = Manifest.read(engine)
    if manifest is None or not manifest.uses_plugin:
        return None
    if manifest.plugin_lib is not None and manifest.plugin_lib.is_file():
        return manifest.plugin_lib
    raise GpclError(f"{engine.name} was built with the GPCL TensorRT plugin; pass its library with --plugin-lib")


def _engine_max_batch(engine: Path) -> int:
    """The largest batch every optimisation profile of the engine accepts (its manifest's
    profiles: {input: {"max": [batch, ...]}}); Triton must not ask for more."""
    manifest = Manifest.read(engine)
    profiles = manifest.profiles if manifest is not None else []
    limits = [
        shapes["max"][0] for p in profiles for shapes in p.values() if isinstance(shapes, dict) and shapes.get("max")
    ]
    return max(1, min(limits)) if limits else 8


def artifact_io(artifact: Path, backend: str, onnx_path: str | os.PathLike | None = None) -> dict[str, Any]:
    if onnx_path is not None:
        return onnx_io(onnx_path)
    if backend != "tensorrt":
        return onnx_io(artifact)
    source = _engine_source_onnx(artifact)
    if source is None:
        raise GpclError(
            f"cannot tell the inputs and outputs of {artifact}: its manifest names no ONNX model that exists; "
            "pass the ONNX model it was built from with --onnx"
        )
    return onnx_io(source)


def guess_backend(artifact: Path) -> str:
    return "tensorrt" if artifact.suffix in (".engine", ".plan", ".trt") else "onnxruntime"


# ----------------------------------------------------------------------------- config message
def build_config(
    name: str,
    backend: str,
    io: dict[str, Any],
    max_batch_size: int = 0,
    instances: int = 1,
    dynamic_batching: bool = False,
    kind: str = "KIND_CPU",
    parameters: dict[str, str] | None = None,
):
    """The ``inference.ModelConfig`` message for one model (not yet printed)."""
    from tritonclient.grpc import model_config_pb2 as mc

    if backend not in BACKEND_SPEC:
        raise GpclError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if max_batch_size < 0 or instances < 1:
        raise GpclError("--max-batch-size must be >= 0 and --instances >= 1")
    if dynamic_batching and max_batch_size == 0:
        raise GpclError("--dynamic-batching needs --max-batch-size > 0")
    spec = BACKEND_SPEC[backend]
    cfg = mc.ModelConfig(name=name, max_batch_size=max_batch_size)
    if spec["platform"]:
        cfg.platform = spec["platform"]
    if spec["backend"]:
        cfg.backend = spec["backend"]
    for role, field in (("inputs", cfg.input), ("outputs", cfg.output)):
        for t in io[role]:
            dims = list(t["dims"])
            if max_batch_size > 0:
                # Triton's dims leave out the batch axis when the model batches.
                if not dims or dims[0] not in (-1, 0):
                    raise GpclError(
                        f"{t['name']} has no dynamic leading batch axis (dims {dims}); use --max-batch-size 0"
                    )
                dims = dims[1:]
            field.add(name=t["name"], data_type=mc.DataType.Value(t["data_type"]), dims=dims or [1])
    cfg.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.Kind.Value(kind))
    if dynamic_batching:
        cfg.dynamic_batching.SetInParent()
    for key, value in sorted((parameters or {}).items()):
        cfg.parameters[key].string_value = value
    return cfg


def config_text(cfg) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(cfg)


def parse_config(text: str):
    """Parse config.pbtxt with Triton's schema (raises GpclError on anything it rejects)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as exc:
        raise GpclError(f"config.pbtxt does not parse with Triton's ModelConfig schema: {exc}") from None


# ----------------------------------------------------------------------------- model files
def _save_onnx(src: Path, dst: Path) -> dict[str, str]:
    """Write an ONNX model into the repository with the GPCL functions attached (ONNX Runtime runs
    them without a plugin). The graph is rewritten; its external weight files are linked next to
    it under the model file's own names (``model.onnx.data``), never read into memory or copied
    where a link is possible. Returns data file name -> how it was placed."""
    from gpcl_trt import weightfiles

    model = load_onnx_graph(src)
    if any(n.domain == "gpcl" for n in model.graph.node):
        from gpcl_trt.plugins.onnx_function import attach_gpcl_functions

        model = attach_gpcl_functions(model)
    mapping = {loc: weightfiles.own_location(dst.name, loc, src.name) for loc in weightfiles.external_locations(model)}
    placed = {new: weightfiles.link_or_copy(src.parent / loc, dst.parent / new) for loc, new in mapping.items()}
    weightfiles.relocate(model, mapping)
    dst.write_bytes(model.SerializeToString())
    return placed


def _python_path() -> str:
    """Where this interpreter finds onnxruntime and numpy, for the python-backend stub (which
    runs with the server's own Python)."""
    paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    return os.pathsep.join(paths)


def _readme(name: str, backend: str, plugin: str | None) -> str:
    lines = [f"# Triton model `{name}` ({backend})", "", "Written by `gpcl-trt triton`.", ""]
    if backend == "tensorrt" and plugin:
        lines += [
            "The engine (`1/model.plan`) uses the GPCL TensorRT plugin; the server must load the plugin",
            "library before it deserialises the engine. Either:",
            "",
            f'    tritonserver --model-repository REPO --backend-config=tensorrt,plugins="$PWD/REPO/{name}/1/{plugin}"',
            "",
            "or preload it:",
            "",
            f"    LD_PRELOAD=$PWD/REPO/{name}/1/{plugin} tritonserver --model-repository REPO",
            "",
            "The config parameter `gpcl_plugin_library` records the file name; Triton itself ignores it.",
        ]
    elif backend == "tensorrt":
        lines += [
            "The engine (`1/model.plan`) was given without a plugin library: its GPCL nodes were built as",
            "native layers (or it has none), so no plugin is loaded. An engine built with `--gpcl plugin`",
            "needs `gpcl-trt triton ... --plugin-lib libgpcl_trt_plugin.so`.",
        ]
    elif backend == "onnxruntime":
        lines += ["The GPCL nodes carry their ONNX function body, so ONNX Runtime runs them without a plugin."]
    else:
        lines += [
            "`1/model.py` serves `1/model.onnx` with ONNX Runtime. The stub runs with the server's Python;",
            "the config parameter `gpcl_python_path` lists where onnxruntime and numpy (< 2) are found:",
            "edit it for another machine.",
        ]
    return "\n".join(lines) + "\n"


def _populate(tmp: Path, artifact: Path, backend: str, plugin_lib: Path | None) -> tuple[dict[str, str], str | None]:
    vdir = tmp / VERSION
    vdir.mkdir()
    model_file = vdir / BACKEND_SPEC[backend]["file"]
    params: dict[str, str] = {}
    plugin_name = None
    if backend == "tensorrt":
        weightfiles.link_or_copy(artifact, model_file)
        if plugin_lib is not None:
            plugin_name = plugin_lib.name
            shutil.copyfile(plugin_lib, vdir / plugin_name)
            params["gpcl_plugin_library"] = f"{VERSION}/{plugin_name}"
    else:
        _save_onnx(artifact, model_file)
    if backend == "python":
        shutil.copyfile(PYTHON_MODEL_SOURCE, vdir / "model.py")
        params.update({"onnx_file": model_file.name, "gpcl_python_path": _python_path()})
    return params, plugin_name


# ----------------------------------------------------------------------------- public API
def write_triton_repo(
    artifact: str | os.PathLike,
    repo: str | os.PathLike,
    name: str,
    backend: str | None = None,
    max_batch_size: int | None = None,
    instances: int = 1,
    dynamic_batching: bool = False,
    plugin_lib: str | os.PathLike | None = None,
    onnx: str | os.PathLike | None = None,
    kind: str | None = None,
    force: bool = False,
    generate: bool | None = None,
    tokenizer: str | os.PathLike | None = None,
    generate_slots: int = 8,
    encoder: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Write ``repo/name`` as a Triton model; returns the paths, the config text and the I/O.

    An encoder-decoder export (``artifact`` its directory, or its decoder with ``encoder``, e.g.
    GPCL-inserted copies of the two graphs) is written as two tensor models, ``name_encoder`` and
    ``name_decoder``, plus ``name_generate`` (text or, for Whisper, audio in; text out).

    ``max_batch_size=None`` picks 8 when every input and output has a dynamic leading axis,
    else 0. The model directory is built in a temporary sibling and renamed into place.
    For a decoder exported with past, ``repo/name_generate`` is written too (``generate=None``:
    when a tokenizer is found, else the result says why not; True: required; False: never):
    the text generation model (deploy/triton_generate.py).
    """
    artifact = Path(artifact)
    pair = _seq2seq_pair(artifact, encoder)
    if pair is not None:
        return _write_seq2seq(
            pair,
            repo,
            name,
            backend=backend,
            max_batch_size=max_batch_size,
            instances=instances,
            dynamic_batching=dynamic_batching,
            plugin_lib=plugin_lib,
            onnx=onnx,
            kind=kind,
            force=force,
            generate=generate,
            tokenizer=tokenizer,
        )
    if not artifact.is_file():
        raise GpclError(f"artifact {artifact} does not exist")
    validate_model_name(name)
    backend = backend or guess_backend(artifact)
    if backend not in BACKENDS:
        raise GpclError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "tensorrt" and artifact.suffix == ".onnx":
        raise GpclError(f"{artifact} is an ONNX model; the tensorrt backend serves a built engine (gpcl-trt build)")
    if backend != "tensorrt" and artifact.suffix != ".onnx":
        raise GpclError(f"the {backend} backend serves an ONNX model, not {artifact.name}")
    if plugin_lib is not None:
        plugin_lib = Path(plugin_lib)
        if backend != "tensorrt":
            raise GpclError("--plugin-lib only applies to --backend tensorrt")
        if not plugin_lib.is_file():
            raise GpclError(f"plugin library {plugin_lib} does not exist")
    if backend == "tensorrt":
        manifest = Manifest.read(artifact)
        if manifest is not None and manifest.weights_stripped:
            # Triton's TensorRT backend deserialises model.plan as it is: it has no refit step.
            raise GpclError(
                f"{artifact.name} is a weight-stripped plan (built with --strip-weights): Triton's "
                "TensorRT backend cannot refit it; build the served engine without --strip-weights"
            )
    if backend == "tensorrt" and plugin_lib is None:
        plugin_lib = _engine_plugin_lib(artifact)
    repo = Path(repo)
    if not repo.parent.exists():
        raise GpclError(f"parent directory {repo.parent} of the repository does not exist")
    final = repo / name
    if final.exists() and not force:
        raise GpclError(f"{final} exists; pass --force to overwrite it")

    io = artifact_io(artifact, backend, onnx)
    gen = _generate_plan(artifact, repo, name, backend, io, generate, tokenizer, force)
    if max_batch_size is None:
        batchable = all(t["dims"] and t["dims"][0] == -1 for t in io["inputs"] + io["outputs"])
        max_batch_size = min(8, _engine_max_batch(artifact) if backend == "tensorrt" else 8) if batchable else 0
    kind = kind or ("KIND_GPU" if backend == "tensorrt" else "KIND_CPU")
    # Validate everything that can fail cheaply before touching the repository.
    build_config(name, backend, io, max_batch_size, instances, dynamic_batching, kind)

    made_repo = not repo.exists()
    repo.mkdir(exist_ok=True)
    try:
        result = _write_entry(
            artifact,
            repo,
            final,
            name,
            backend,
            io,
            max_batch_size,
            instances,
            dynamic_batching,
            kind,
            plugin_lib,
            force,
        )
        if gen.get("reason") is None:
            from gpcl_trt.deploy.triton_generate import write_generate_model

            gen = write_generate_model(
                artifact, repo, gen["name"], gen["tokenizer"], gen["config_dir"], generate_slots, force=force
            )
        result["generate_model"] = {k: str(v) if isinstance(v, Path) else v for k, v in gen.items()}
        return result
    except BaseException:
        if made_repo:  # a refusal or a failure leaves no empty repository behind
            with contextlib.suppress(OSError):
                repo.rmdir()
        raise


def _generate_plan(
    artifact: Path, repo: Path, name: str, backend: str, io: dict, generate: bool | None, tokenizer: Any, force: bool
) -> dict[str, Any]:
    """Whether and from what the generation model is written: its name, tokenizer and config
    directories, or a reason (an error when ``generate`` is True)."""
    from gpcl_trt.deploy.triton_generate import generate_name, why_not
    from gpcl_trt.manifest import model_dir_of

    gen_name = validate_model_name(generate_name(name))
    if generate is False:
        return {"name": gen_name, "reason": "not asked for (--no-generate)"}
    model_dir = model_dir_of(artifact) if artifact.suffix == ".onnx" else None
    tok_dir = Path(tokenizer) if tokenizer is not None else model_dir
    reason = why_not(artifact, backend, io, tok_dir)
    if reason is not None and generate:
        raise GpclError(f"cannot write the generation model: {reason}")
    if reason is None and (repo / gen_name).exists() and not force:
        raise GpclError(f"{repo / gen_name} exists; pass --force to overwrite it")
    return {"name": gen_name, "reason": reason, "tokenizer": tok_dir, "config_dir": model_dir}


def _write_entry(
    artifact: Path,
    repo: Path,
    final: Path,
    name: str,
    backend: str,
    io: dict,
    max_batch_size: int,
    instances: int,
    dynamic_batching: bool,
    kind: str,
    plugin_lib: Path | None,
    force: bool,
) -> dict[str, Any]:
    with atomic_dir(final, force=force) as tmp:
        params, plugin_name = _populate(tmp, artifact, backend, plugin_lib)
        cfg = build_config(name, backend, io, max_batch_size, instances, dynamic_batching, kind, params)
        text = config_text(cfg)
        parse_config(text)  # what we wrote must round-trip through Triton's schema
        (tmp / "config.pbtxt").write_text(text)
        (tmp / "README.md").write_text(_readme(name, backend, plugin_name))
        write_manifest(
            tmp / "config.pbtxt",
            stage="triton",
            inputs={"artifact": {"path": str(artifact), "sha256": sha256_file(artifact)}},
            options={
                "backend": backend,
                "max_batch_size": max_batch_size,
                "instances": instances,
                "dynamic_batching": dynamic_batching,
                "plugin_lib": str(plugin_lib) if plugin_lib else None,
                "kind": kind,
            },
            results={"io": io},
            packages=("tritonclient", "onnx"),
            weight_files={
                f"{VERSION}/{f.name}": weightfiles.file_identity(f)
                for f in sorted((tmp / VERSION).iterdir())
                if f.name not in ("model.py", plugin_name)
            },
        )
    model_file = final / VERSION / BACKEND_SPEC[backend]["file"]
    return {
        "ok": True,
        "repo": str(repo),
        "name": name,
        "model_dir": str(final),
        "backend": backend,
        "model_file": str(model_file),
        "config": str(final / "config.pbtxt"),
        "config_text": text,
        "max_batch_size": max_batch_size,
        "io": io,
        "plugin_lib": str(final / VERSION / plugin_name) if plugin_name else None,
    }


# ----------------------------------------------------------------------------- encoder-decoder
def _seq2seq_pair(artifact: Path, encoder: str | os.PathLike | None) -> tuple[Path, Path] | None:
    """(encoder, decoder) when ``artifact`` is an encoder-decoder export directory or, with
    ``encoder``, a decoder file; None for any other single artifact."""
    from gpcl_trt.generate.seq2seq import DECODER_FILE, ENCODER_FILE, export_files

    if encoder is None:
        if not artifact.is_dir():
            return None
        pair = export_files(artifact)
        if pair is None:
            raise GpclError(
                f"{artifact} is a directory but not an encoder-decoder export ({ENCODER_FILE} and {DECODER_FILE}); "
                "give a model file"
            )
        return pair
    encoder = Path(encoder)
    for p, role in ((encoder, "--encoder"), (artifact, "the decoder")):
        if not p.is_file():
            raise GpclError(f"{role} {p} does not exist")
    enc_io, dec_io = onnx_io(encoder) if encoder.suffix == ".onnx" else None, None
    if artifact.suffix == ".onnx":
        dec_io = onnx_io(artifact)
        if not any(t["name"].startswith("past_key_values.") and ".encoder." in t["name"] for t in dec_io["inputs"]):
            raise GpclError(f"--encoder: {artifact.name} is not an encoder-decoder's decoder (no cross-attention KV)")
    if enc_io is not None and not any(".encoder." in t["name"] for t in enc_io["outputs"]):
        raise GpclError(f"--encoder {encoder.name} is not an encoder-decoder's encoder (no present.*.encoder outputs)")
    return encoder, artifact


def _write_seq2seq(pair: tuple[Path, Path], repo: Any, name: str, **kw: Any) -> dict[str, Any]:
    """NAME_encoder and NAME_decoder (tensor models, written as any single graph is) and
    NAME_generate from the two ONNX graphs (deploy/triton_generate.py)."""
    from gpcl_trt.deploy.triton_generate import generate_name, write_seq2seq_generate_model
    from gpcl_trt.manifest import model_dir_of

    encoder, decoder = pair
    if kw.get("onnx") is not None:
        raise GpclError(
            "--onnx names one graph's ONNX model; an encoder-decoder's engines name theirs in their manifests"
        )
    validate_model_name(name)
    names = {"encoder": validate_model_name(name + "_encoder"), "decoder": validate_model_name(name + "_decoder")}
    gen_name = validate_model_name(generate_name(name))
    generate, tokenizer = kw.pop("generate"), kw.pop("tokenizer")
    force = kw["force"]
    repo = Path(repo)
    backend = kw.get("backend") or guess_backend(decoder)
    reason = None
    model_dir = model_dir_of(decoder) if decoder.suffix == ".onnx" else None
    tok_dir = Path(tokenizer) if tokenizer is not None else model_dir
    if generate is False:
        reason = "not asked for (--no-generate)"
    elif backend == "tensorrt" or decoder.suffix != ".onnx" or encoder.suffix != ".onnx":
        reason = "the generation loop has no TensorRT runtime yet (engines serve the tensor models only)"
    elif tok_dir is None:
        reason = "no model directory in the manifest chain to take the tokenizer from (pass --tokenizer DIR)"
    if reason is not None and generate:
        raise GpclError(f"cannot write the generation model: {reason}")
    targets = list(names.values()) + ([gen_name] if reason is None else [])
    for t in targets:  # refused before anything is written
        if (repo / t).exists() and not force:
            raise GpclError(f"{repo / t} exists; pass --force to overwrite it")
    entries = {
        role: write_triton_repo(path, repo, names[role], generate=False, **kw)
        for role, path in (("encoder", encoder), ("decoder", decoder))
    }
    gen: dict[str, Any] = {"name": gen_name, "reason": reason}
    if reason is None:
        gen = write_seq2seq_generate_model(encoder, decoder, repo, gen_name, tok_dir, model_dir, force=force)
    result = dict(entries["decoder"])
    result.update(
        name=name,
        artifacts={"encoder": str(encoder), "decoder": str(decoder)},
        seq2seq={
            role: {k: e[k] for k in ("name", "model_dir", "backend", "max_batch_size")} for role, e in entries.items()
        },
        generate_model={k: str(v) if isinstance(v, Path) else v for k, v in gen.items()},
    )
    return result
