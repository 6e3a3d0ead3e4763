"""The manifest schema: what every stage writes next to its artifact and what later stages read.

One document per artifact (``OUT.onnx -> OUT.manifest.json``, ``X -> X.manifest.json``):
``stage``, ``artifact`` and its ``artifact_sha256``, ``inputs`` (input paths and hashes),
``options``, ``results``, ``versions``. Writers build the sections that other stages read with the
functions here, and readers go through :class:`Manifest`'s accessors, so no reader guesses keys.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from gpcl_trt.common import GpclError, manifest_path

STAGES = ("export", "calibrate", "insert", "strip", "build", "golden", "triton", "diff", "served")


# ----------------------------------------------------------------------------- writers' sections
def file_ref(path: str | os.PathLike, sha256: str | None, **extra: Any) -> dict[str, Any]:
    """An input file as manifests record it: {"path", "sha256", ...}."""
    return {"path": str(path), "sha256": sha256, **extra}


def engine_inputs(onnx: dict[str, Any], plugin_lib: dict[str, Any] | None = None) -> dict[str, Any]:
    """A build's inputs: the ONNX model and, for plugin builds, the plugin library (file_ref)."""
    return {"onnx": onnx, **({"plugin_lib": plugin_lib} if plugin_lib else {})}


def engine_weights(stripped: bool, onnx_path: str | os.PathLike) -> dict[str, Any]:
    """Where a plan's weights are: inside it, or stripped (refitted from this ONNX model at load)."""
    return {"stripped": True, "refit_from": str(onnx_path)} if stripped else {"stripped": False}


def pass_inputs(source: str | os.PathLike, source_sha256: str, model_dir: str | None, **extra: Any) -> dict[str, Any]:
    """A pass's inputs (insert, strip, calibrate): the source model and the HF model directory it
    came from (followed through the source's own manifest)."""
    return {"source": str(source), "source_sha256": source_sha256, "model_dir": model_dir, **extra}


# Generation rules a runtime follows to generate what transformers' class generates. One kind so
# far: "reprefill_at" (Phi-3 / PhiMoE LongRoPE: once the sequence first grows past ``length``, the
# cache is dropped and the whole sequence prefilled again). A reader that meets a kind it does not
# know refuses the artifact rather than generate something else.
GENERATION_RULE_KINDS = ("reprefill_at",)


def generation(
    eos_ids: list[int],
    pad_id: int | None,
    max_positions: int | None,
    rules: list[dict[str, Any]],
    **extra: Any,
) -> dict[str, Any]:
    """An export's ``results.generation``: the model's EOS ids, padding id and number of positions
    (None when its config says nothing) and its rules ([{"kind", "length", ...}]); ``extra``:
    informative keys (bos_id, sliding_window, model_type, source)."""
    section = {"eos_ids": [int(e) for e in eos_ids], "pad_id": pad_id, "max_positions": max_positions}
    return {**section, "rules": [dict(r) for r in rules], **extra}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_generation(section: Any) -> dict[str, Any]:
    ok = (
        isinstance(section, dict)
        and isinstance(section.get("eos_ids"), list)
        and all(_is_int(e) for e in section["eos_ids"])
        and all(section.get(k) is None or _is_int(section.get(k)) for k in ("pad_id", "max_positions"))
        and isinstance(section.get("rules"), list)
        and all(isinstance(r, dict) and isinstance(r.get("kind"), str) for r in section["rules"])
    )
    if not ok:
        raise ValueError("results.generation is malformed")
    return section


# ----------------------------------------------------------------------------- readers
@dataclass(frozen=True)
class Manifest:
    artifact_path: Path
    stage: str
    artifact_sha256: str | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, artifact: str | os.PathLike) -> "Manifest | None":
        """The manifest next to ``artifact``, None when there is none; one clear error when it is
        not a manifest."""
        art = Path(artifact)
        p = manifest_path(art)
        if not p.is_file():
            return None
        try:
            doc = json.loads(p.read_text())
            sections = {k: doc.get(k) or {} for k in ("inputs", "options", "results", "versions")}
            if not isinstance(doc.get("stage"), str) or not all(isinstance(v, dict) for v in sections.values()):
                raise ValueError("missing stage or sections")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
            raise GpclError(f"{p} is not a gpcl-trt manifest ({type(exc).__name__})") from None
        return cls(art, doc["stage"], doc.get("artifact_sha256"), **sections)

    def _existing(self, value: Any) -> Path | None:
        """A recorded path that still exists, as recorded or relative to the artifact."""
        if not isinstance(value, str) or not value:
            return None
        p = Path(value)
        for cand in (p, self.artifact_path.parent / p, self.artifact_path.parent / p.name):
            if cand.exists():
                return cand
        return None

    @property
    def model_dir(self) -> Path | None:
        """The Hugging Face model directory the artifact came from (export, or a pass that
        recorded it from its source), if it still exists."""
        p = self._existing(self.inputs.get("model_dir"))
        return p if p is not None and p.is_dir() else None

    @property
    def source(self) -> Path | None:
        """The ONNX model a pass or a build read."""
        if self.stage == "build":
            return self._existing((self.inputs.get("onnx") or {}).get("path"))
        return self._existing(self.inputs.get("source"))

    @property
    def plugin_lib(self) -> Path | None:
        """The GPCL plugin library a build used, if it still exists."""
        return self._existing((self.inputs.get("plugin_lib") or {}).get("path"))

    @property
    def uses_plugin(self) -> bool:
        gpcl = self.results.get("gpcl") or {}
        return bool(gpcl.get("plugin_layers") or gpcl.get("nodes_as_plugin"))

    @property
    def weights_stripped(self) -> bool:
        """A weightless plan (STRIP_PLAN) that must be refitted from its ONNX model."""
        return bool((self.results.get("weights") or {}).get("stripped"))

    @property
    def profiles(self) -> list[dict[str, Any]]:
        return list(self.results.get("profiles") or [])

    @property
    def generation(self) -> dict[str, Any] | None:
        """The generation rules the export recorded (see ``generation``); None when it recorded
        none (not a decoder, or an export made before they were recorded)."""
        if "generation" not in self.results:
            return None
        try:
            return _check_generation(self.results["generation"])
        except ValueError as exc:
            raise GpclError(f"{manifest_path(self.artifact_path)}: {exc}") from None


def _along_chain(artifact: str | os.PathLike, get: Callable[[Manifest], Any], depth: int) -> Any:
    """The first ``get(manifest)`` that is not None along an artifact's manifest chain: its own
    manifest, then its source's (an engine -> GPCL model -> export chain), ``depth`` steps at most;
    None when no manifest in the chain has it."""
    m = Manifest.read(artifact) if Path(artifact).is_file() else None
    if m is None:
        return None
    value = get(m)
    if value is not None:
        return value
    src = m.source
    return _along_chain(src, get, depth - 1) if src is not None and depth > 0 and src != Path(artifact) else None


def model_dir_of(artifact: str | os.PathLike, depth: int = 4) -> Path | None:
    """The HF model directory behind an artifact: its own manifest's, else its source's (an
    engine -> GPCL model -> export chain)."""
    return _along_chain(artifact, lambda m: m.model_dir, depth)


def generation_of(artifact: str | os.PathLike, depth: int = 4) -> dict[str, Any] | None:
    """The generation rules behind an artifact: its own manifest's, else its source's (a GPCL
    model -> export chain, an engine -> ONNX chain); None when no manifest in the chain has them."""
    return _along_chain(artifact, lambda m: m.generation, depth)


def graph_of(artifact: str | os.PathLike, depth: int = 4) -> str | None:
    """Which graph of an encoder-decoder export an artifact is (``encoder`` / ``decoder``, the
    export's ``results.graph``), following a GPCL model -> export or engine -> ONNX chain; None
    for every other model."""
    return _along_chain(artifact, lambda m: g if isinstance(g := m.results.get("graph"), str) else None, depth)


def kv_cache_of(artifact: str | os.PathLike, depth: int = 4) -> str | None:
    """How a decoder's cache may be bound (``results.kv_cache`` of ``gpcl-trt optimize``):
    ``shared-buffer`` when every past input feeds GroupQueryAttention alone, so one buffer
    preallocated to the maximum length is both past and present; None for every other graph
    (each step's presents become the next step's pasts)."""
    return _along_chain(artifact, lambda m: m.results.get("kv_cache"), depth)
