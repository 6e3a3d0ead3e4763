"""Calibrate tau per site: run ONNX Runtime on sample inputs with every site tensor exposed as
an extra graph output, collect the quaternion radii r = ||x[4g:4g+4]|| of real (unpadded)
tokens, and write tau = margin x percentile(r) per site (or per group) with the statistics.

Sample inputs, in order of preference: ``--data`` (.npz keyed by input name, or a text file with
one sentence a line), else the sentences shipped in passes/data/calibration.txt tokenised with
the tokenizer of the model directory recorded in the export manifest, else random token ids
(models without a tokenizer, e.g. the tiny test models)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import numpy as np

from gpcl_trt.common import (
    GpclError,
    check_can_write,
    has_large_weights,
    one_line,
    sha256_file,
    write_json_atomic,
    write_manifest,
)
from gpcl_trt.feeds import (
    INPUT_IDS,
    complete_feed,
    make_feeds,
    ort_session,
    specs_from_onnx,
    specs_from_session,
    vocab_size,
)
from gpcl_trt.gpcl import quaternion_radii
from gpcl_trt.manifest import model_dir_of, pass_inputs

CORPUS = Path(__file__).parent / "data" / "calibration.txt"
CALIB_FORMAT = "gpcl-calibration/1"
STAT_PERCENTILES = (50.0, 99.0, 99.99)
_TAU_FLOOR = 1e-6  # a dead site/group (r == 0 everywhere) still needs tau > 0
_MAX_TOKENS = 128
_NPZ_BATCH = 8


def _tokenizer(model_dir: str | None):
    """A callable sentence -> {input_ids, attention_mask, token_type_ids} ([1, S] arrays), or
    None when the model folder has no tokenizer."""
    from gpcl_trt.text import text_encoder

    encode = text_encoder(model_dir, max_tokens=_max_tokens(model_dir)) if model_dir is not None else None
    return None if encode is None else (lambda text: encode([text]))


def _max_tokens(model_dir: str) -> int:
    """_MAX_TOKENS, or fewer where the model's learned positions end sooner (a small Whisper
    decoder's max_target_positions: longer samples index past its position table)."""
    import json

    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return _MAX_TOKENS
    keys = ("max_position_embeddings", "max_target_positions", "n_positions")
    limits = [v for k in keys if isinstance(v := cfg.get(k), int) and v > 0]
    return min([_MAX_TOKENS, *limits])


def _pad_batches(encoded: list[dict[str, np.ndarray]], size: int = _NPZ_BATCH) -> list[dict[str, np.ndarray]]:
    """Right-pad sequences into batches; the attention mask keeps padding out of the radii."""
    batches = []
    for i in range(0, len(encoded), size):
        chunk = encoded[i : i + size]
        s = max(e["input_ids"].shape[1] for e in chunk)
        batch = {}
        for k in chunk[0]:
            batch[k] = np.zeros((len(chunk), s), np.int64)
            for j, e in enumerate(chunk):
                batch[k][j, : e[k].shape[1]] = e[k][0]
        batches.append(batch)
    return batches


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise GpclError(
            f"{path}: not UTF-8 text (byte {exc.start}); pass UTF-8 text, one sentence a line, or an .npz"
        ) from None
    except OSError as exc:
        raise GpclError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    lines = [ln.strip() for ln in text.splitlines()]
    return [ln for ln in lines if ln]


def sample_inputs(lm, input_path, samples: int, data: str | Path | None) -> tuple[list[dict], dict]:
    """The sample batches (dicts of input arrays) and a description of where they came from."""
    if data is not None and Path(data).suffix == ".npz":
        return _npz_batches(Path(data), samples)
    model_dir = model_dir_of(input_path)
    tok = _tokenizer(model_dir)
    # text feeds a graph that takes token ids; Whisper's encoder graph takes log-mel features although
    # its model directory has a tokenizer (for the decoder)
    specs = specs_from_onnx(lm.model)
    if not any(s.name == INPUT_IDS for s in specs):
        if data is not None and Path(data).is_file():
            raise GpclError(
                f"--data {Path(data).name}: text, but the model takes no input_ids (its inputs: "
                f"{', '.join(s.name for s in specs)}); pass an .npz"
            )
        tok = None
    if data is not None:
        p = Path(data)
        if not p.is_file():
            raise GpclError(f"{p}: no such data file")
        if tok is None:
            raise GpclError(
                f"--data {p.name}: text needs the model's tokenizer, and none was found via the export manifest; "
                "pass an .npz"
            )
        sentences, desc = _read_lines(p), {"kind": "text", "path": str(p)}
    elif tok is not None:
        sentences, desc = _read_lines(CORPUS), {"kind": "corpus", "path": CORPUS.name}
    else:
        return _random_batches(lm, samples)
    if not sentences:
        raise GpclError(f"{desc['path']}: no sentences")
    sentences = sentences[:samples]
    encoded = [tok(s) for s in sentences]
    vocab = vocab_size(lm.model)
    if any(e["input_ids"].size == 0 for e in encoded):
        raise GpclError(f"the tokenizer of {model_dir} produced no tokens for a sample sentence; pass --data FILE.npz")
    if vocab is not None and max(int(e["input_ids"].max()) for e in encoded) >= vocab:
        raise GpclError(
            f"the tokenizer of {model_dir} produces ids beyond the model's vocabulary of {vocab}; pass --data FILE.npz"
        )
    batches = _pad_batches(encoded)
    return batches, {**desc, "tokenizer": model_dir, "sentences": len(sentences)}


def _npz_batches(path: Path, samples: int) -> tuple[list[dict], dict]:
    if not path.is_file():
        raise GpclError(f"{path}: no such data file")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:
        raise GpclError(f"{path}: not a readable .npz ({type(exc).__name__})") from None
    if not arrays or any(v.ndim < 1 for v in arrays.values()) or len({v.shape[0] for v in arrays.values()}) != 1:
        raise GpclError(
            f"{path}: needs model inputs by name (input_ids, pixel_values, ...) with one leading sample axis"
        )
    if any(v.size == 0 for v in arrays.values()):
        empty = next(k for k, v in arrays.items() if v.size == 0)
        raise GpclError(f"{path}: {empty!r} is empty (shape {arrays[empty].shape}); calibration needs samples")
    n = min(samples, next(iter(arrays.values())).shape[0])
    batches = [{k: v[i : min(i + _NPZ_BATCH, n)] for k, v in arrays.items()} for i in range(0, n, _NPZ_BATCH)]
    return batches, {"kind": "npz", "path": str(path), "sequences": n}


def _random_batches(lm, samples: int) -> tuple[list[dict], dict]:
    """Random inputs of varied length: token ids below the vocabulary (text models), normal
    pixel values (vision models)."""
    specs = specs_from_onnx(lm.model)
    vocab = vocab_size(lm.model)
    if vocab is None and any(s.name == INPUT_IDS for s in specs):
        raise GpclError(
            "no tokenizer found via the export manifest and no embedding table to draw ids from; pass --data"
        )
    rng = np.random.default_rng(0)
    batches = [make_feeds(specs, 1, int(rng.integers(8, 33)), seed=i, vocab=vocab) for i in range(samples)]
    kind = "random-token-ids" if vocab is not None else "random-inputs"
    return batches, {"kind": kind, "vocab": vocab, "sequences": samples, "seed": 0}


# ----------------------------------------------------------------------------- statistics
def _pkey(p: float) -> str:
    return f"p{p:g}"


def site_stats(r: np.ndarray, percentile: float, margin: float, per_group: bool, site: str = "site") -> dict:
    """tau = margin x percentile of the finite radii ``r`` [tokens, groups], with statistics.
    Non-finite radii (an overflowing sample) are counted, not averaged in: one of them would
    make every percentile NaN. A site (or group) with no finite radius is refused."""
    finite = np.isfinite(r)
    flat = r[finite]
    if flat.size == 0:
        raise GpclError(
            f"calibration of {site}: no finite activation radii in the sample data "
            f"({r.size} radii, {int((~finite).sum())} non-finite)"
        )
    ps = sorted(set(STAT_PERCENTILES) | {percentile})
    values = np.percentile(flat, ps)
    stats = {_pkey(p): float(v) for p, v in zip(ps, values)}
    stats.update(max=float(flat.max()), count=int(flat.size), tokens=int(r.shape[0]), non_finite=int((~finite).sum()))
    if per_group:
        if not finite.any(axis=0).all():
            bad = [int(g) for g in np.flatnonzero(~finite.any(axis=0))][:5]
            raise GpclError(f"calibration of {site}: groups {bad} have no finite activation radius in the sample data")
        per = np.nanpercentile(np.where(finite, r, np.nan), percentile, axis=0)
        tau = np.maximum(margin * per, _TAU_FLOOR).astype(np.float32)
        return {"tau": [float(t) for t in tau], "stats": stats}
    return {"tau": float(max(margin * stats[_pkey(percentile)], _TAU_FLOOR)), "stats": stats}


def _iter_progress(items: list, description: str) -> Iterator:
    from gpcl_trt.progress import make_progress

    with make_progress() as progress:
        task = progress.add_task(description, total=len(items))
        for item in items:
            yield item
            progress.advance(task)


# ----------------------------------------------------------------------------- file level
def _check_options(samples: int, percentile: float, margin: float) -> None:
    if not (isinstance(samples, int) and samples >= 1):
        raise GpclError(f"--samples must be a positive integer, got {samples}")
    if not (0 < percentile <= 100):
        raise GpclError(f"--percentile must be in (0, 100], got {percentile}")
    if not (math.isfinite(margin) and margin > 0):
        raise GpclError(f"--margin must be a finite number > 0, got {margin}")


def calibrate_file(
    input: str | Path,
    output: str | Path,
    samples: int = 64,
    data: str | Path | None = None,
    percentile: float = 99.99,
    margin: float = 1.25,
    per_group: bool = False,
    force: bool = False,
) -> dict:
    """Measure the quaternion radius distribution at every site of ``input`` and write
    calib.json (tau per site or per group, statistics, source_sha256) + its manifest."""
    import onnx

    from gpcl_trt.gpcl import KINDS
    from gpcl_trt.passes.graph import load_graph
    from gpcl_trt.passes.insert import select_sites
    from gpcl_trt.passes.sites import find_sites_loaded

    _check_options(samples, percentile, margin)
    check_can_write(output, force)
    lm = load_graph(input)
    sites = select_sites(find_sites_loaded(lm), KINDS, None)
    batches, data_desc = sample_inputs(lm, input, samples, data)

    # Expose each site tensor as an extra graph output (the graph is otherwise unchanged).
    model = lm.model
    tensors = lm.graph.tensors()
    have = {o.name for o in model.graph.output}
    for s in sites:
        if s.tensor not in have:
            elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(tensors[s.tensor].dtype or np.float32))
            model.graph.output.append(onnx.helper.make_tensor_value_info(s.tensor, elem, None))
    # External weights: a bounded session reads them from their file mapping, no anonymous copies.
    session = ort_session(model, base_dir=lm.path.parent, bounded=has_large_weights(model, lm.path.parent))
    specs = specs_from_session(session)
    names = [s.tensor for s in sites]
    radii: dict[str, list[np.ndarray]] = {s.tensor: [] for s in sites}
    for batch in _iter_progress(batches, "calibrating"):
        feed = complete_feed(specs, batch)
        try:
            outs = session.run(names, feed)
        except Exception as exc:
            raise GpclError(f"ONNX Runtime failed on the sample data ({one_line(exc)})") from None
        for name, arr in zip(names, outs):
            radii[name].append(quaternion_radii(arr, feed.get("attention_mask")))

    result_sites = {}
    for s in sites:
        r = np.concatenate(radii[s.tensor], axis=0)
        result_sites[s.key] = {
            "layer": s.layer,
            "kind": s.kind,
            "tensor": s.tensor,
            "hidden": s.hidden,
            **site_stats(r, percentile, margin, per_group, s.key),
        }
    src_sha = sha256_file(input)
    doc = {
        "format": CALIB_FORMAT,
        "source": str(input),
        "source_sha256": src_sha,
        "percentile": percentile,
        "margin": margin,
        "per_group": per_group,
        "samples": sum(len(next(iter(b.values()))) for b in batches),
        "data": data_desc,
        "sites": result_sites,
    }
    write_json_atomic(output, doc, force=force)
    model_dir = model_dir_of(input)
    write_manifest(
        output,
        "calibrate",
        inputs=pass_inputs(input, src_sha, str(model_dir) if model_dir else None, data=data_desc),
        options={"samples": samples, "percentile": percentile, "margin": margin, "per_group": per_group},
        packages=("onnxruntime",),
    )
    summary = {
        k: {
            "tau": v["tau"] if not per_group else {"min": min(v["tau"]), "max": max(v["tau"])},
            _pkey(percentile): v["stats"][_pkey(percentile)],
            "max": v["stats"]["max"],
        }
        for k, v in result_sites.items()
    }
    return {
        "ok": True,
        "output": str(output),
        "samples": doc["samples"],
        "data": data_desc,
        "tokens": next(iter(result_sites.values()))["stats"]["tokens"],
        "sites": summary,
    }
