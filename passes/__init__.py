"""Graph-surgery passes (onnx-graphsurgeon): find GPCL sites, insert GPCL, calibrate tau, strip
GPCL; graph -> graph functions and their file-level commands."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gpcl_trt.common import lazy_exports

if TYPE_CHECKING:
    from gpcl_trt.passes.calibrate import calibrate_file as calibrate_file
    from gpcl_trt.passes.graph import load_graph as load_graph
    from gpcl_trt.passes.insert import insert_file as insert_file
    from gpcl_trt.passes.insert import insert_gpcl as insert_gpcl
    from gpcl_trt.passes.sites import Site as Site
    from gpcl_trt.passes.sites import find_sites as find_sites
    from gpcl_trt.passes.sites import sites_file as sites_file
    from gpcl_trt.passes.strip import strip_file as strip_file
    from gpcl_trt.passes.strip import strip_gpcl as strip_gpcl

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "find_sites": "sites",
        "sites_file": "sites",
        "Site": "sites",
        "insert_gpcl": "insert",
        "insert_file": "insert",
        "strip_gpcl": "strip",
        "strip_file": "strip",
        "calibrate_file": "calibrate",
        "load_graph": "graph",
    },
)
