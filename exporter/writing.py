"""Writing: where the weights go (inline, links into the checkpoint, copies, ``OUT.onnx.data``),
the eager path's ONNX file, and what an existing output refers to; all into the staging
directory (gpcl_trt.weightfiles.Staging) that is committed once every check has passed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpcl_trt.common import GpclError, check_can_write, manifest_path
from gpcl_trt.gpcl import EXTERNAL_DATA_BYTES


def check_output(output: str | Path, force: bool) -> Path:
    """OUT.onnx as a Path, refused in one line unless it (and its manifest) may be written."""
    out = Path(output)
    if out.suffix != ".onnx":
        raise GpclError(f"output {out} must end in .onnx")
    if out.is_dir():
        raise GpclError(f"output {out} is a directory")
    check_can_write(out, force)
    check_can_write(manifest_path(out), force)  # the manifest is an output too
    return out


# ----------------------------------------------------------------------------- saving
def _initializer_bytes(proto: Any) -> int:
    return sum(len(t.raw_data) for t in proto.graph.initializer)


def write_eager(proto: Any, path: Path, external_data: bool | None) -> list[str]:
    """The eager path's ONNX file into the staging directory; weights inline, or in
    ``OUT.onnx.data`` when asked or above ~1.8 GB. Returns the data files written."""
    import onnx

    external = _initializer_bytes(proto) > EXTERNAL_DATA_BYTES if external_data is None else external_data
    if not external:
        onnx.save_model(proto, path)
        return []
    data_name = path.name + ".data"
    onnx.save_model(
        proto, path, save_as_external_data=True, all_tensors_to_one_file=True, location=data_name, size_threshold=1024
    )
    return [data_name]


INLINE_LIMIT = 256 << 20  # lazy export keeps weights up to this size inside the ONNX file by default
LAYOUTS = ("auto", "link", "copy", "inline")


def weights_layout(external_data: bool | str | None, nbytes: int) -> str:
    """Where a lazy export puts the weights. ``auto`` (None): inside the ONNX file up to 256 MB
    (one self-contained file, like an eager export; onnx's own loader refuses hard-linked data),
    else ``link``. True = ``link``, False = ``inline``."""
    layout = {None: "auto", True: "link", False: "inline"}.get(external_data, external_data)  # type: ignore[arg-type]
    if layout not in LAYOUTS:
        raise GpclError(f"unknown external data layout {external_data!r}; choose {', '.join(LAYOUTS)}")
    if layout == "auto":
        layout = "inline" if nbytes <= INLINE_LIMIT else "link"
    if layout == "inline" and nbytes > EXTERNAL_DATA_BYTES:
        raise GpclError(
            f"the weights ({nbytes / 1e9:.1f} GB) cannot be stored inside one ONNX file (protobuf's 2 GB limit); use "
            "external data"
        )
    return layout


def external_locations(path: Path) -> set[str]:
    """Data files an existing ONNX output refers to (to remove those a --force export replaces
    and no longer uses). Never raises."""
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return set()
    locs = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    return {loc for loc in locs if "/" not in loc and "\\" not in loc and loc not in ("", ".", "..")}


def extra_disk(paths: list[Path]) -> int:
    """Disk blocks of the outputs not shared with another hard link (a hard link to the
    checkpoint costs nothing; reflinks cannot be told from copies by stat and count fully)."""
    total = 0
    for p in paths:
        st = p.stat()
        if st.st_nlink == 1:
            total += st.st_blocks * 512
    return total
