"""setup.cfg's requirements against what is installed and what the code uses: every installed
dependency satisfies its requirement, every requirement has a floor, the floors of the packages
whose new or private APIs we use are no lower than the version the code was tested with (and
those APIs are there), and every third-party package the code imports is declared."""

from __future__ import annotations

import ast
import configparser
import importlib
import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent

# Packages whose new or private APIs we use: the version the code was tested with (a floor below
# it is a promise nobody checked), why, and the attributes we rely on (module, dotted name).
PRIVATE_API: dict[str, tuple[str, str, list[tuple[str, str]]]] = {
    "transformers": (
        "5.25.0",
        "lazy export (exporter/lazy.py) binds checkpoint tensors with transformers 5's loading "
        "modules and builds on meta with private PreTrainedModel methods",
        [
            ("transformers.core_model_loading", "WeightConverter"),
            ("transformers.core_model_loading", "WeightRenaming"),
            ("transformers.core_model_loading", "rename_source_key"),
            ("transformers.conversion_mapping", "get_model_conversion_mapping"),
            ("transformers.initialization", "meta_device_safe_creation_ops"),
            ("transformers", "PreTrainedModel._move_missing_keys_from_meta_to_device"),
            ("transformers", "PreTrainedModel._initialize_missing_keys"),
        ],
    ),
    "polygraphy": (
        "0.53.6",
        "accuracy/comparison.py judges outputs with the SimpleCompareFunc class (0.49 had "
        "CompareFunc.simple) and its find_output_func/check_shapes arguments",
        [
            ("polygraphy.comparator.compare", "SimpleCompareFunc"),
            ("polygraphy.comparator", "Comparator.compare_accuracy"),
        ],
    ),
    "onnxscript": (
        "0.7.2",
        "the exporter's optimiser guard reads a private module's size limit",
        [("onnxscript.optimizer._constant_folding", "DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT")],
    ),
    "torch": (
        "2.13.0",
        "lazy export traces under torch's private FakeTensorMode; the dynamo ONNX exporter changes by release",
        [("torch._subclasses.fake_tensor", "FakeTensorMode"), ("torch._subclasses.fake_tensor", "FakeTensor")],
    ),
    "pytest-timeout": (
        "2.4.0",
        "tests/conftest.py's backstop implements its timer hooks and calls its internal timeout_timer",
        [("pytest_timeout", "timeout_timer"), ("pytest_timeout", "TimeoutHooks.pytest_timeout_set_timer")],
    ),
}

# Extras that need a GPU machine: never installed here, so their floors are untested.
UNTESTED_EXTRAS = {"trt", "gpu"}

# Imported modules that map to no installed distribution, and why that is right.
NOT_A_DISTRIBUTION = {
    "tomli": "tomli",  # imported on Python < 3.11 only, where its requirement's marker holds
    "triton_python_backend_utils": None,  # provided by tritonserver's python backend inside the server
}


def _parse(text: str) -> list[Requirement]:
    lines = (ln.split("#", 1)[0].strip() for ln in text.splitlines())
    return [Requirement(ln) for ln in lines if ln]


def requirements(path: Path = ROOT / "setup.cfg") -> dict[str, list[Requirement]]:
    """``{"install_requires": [...], extra: [...]}`` as setup.cfg declares them."""
    cfg = configparser.ConfigParser()
    cfg.read(path)
    out = {"install_requires": _parse(cfg["options"]["install_requires"])}
    out.update({extra: _parse(text) for extra, text in cfg["options.extras_require"].items()})
    return out


def floor(req: Requirement) -> Version | None:
    """The lowest version a requirement allows (its >=, ==, ~= or > bound)."""
    lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=", ">")]
    return max(lows) if lows else None


def installed(name: str) -> Version | None:
    try:
        return Version(md.version(name))
    except md.PackageNotFoundError:
        return None


def _make_extras() -> list[str]:
    """The extras `make setup` installs (Makefile EXTRAS)."""
    m = re.search(r"^EXTRAS\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    return m.group(1).split(",")


def test_every_installed_dependency_satisfies_its_requirement():
    reqs = requirements()
    # Each extra is installed by `make setup` (so tested) or named untested above.
    assert set(_make_extras()) | UNTESTED_EXTRAS == set(reqs) - {"install_requires"}
    bad = []
    for section in ["install_requires", *_make_extras()]:
        for req in reqs[section]:
            if req.marker is not None and not req.marker.evaluate():
                continue
            have = installed(req.name)
            if have is None or not req.specifier.contains(have, prereleases=True):
                bad.append(f"[{section}] {req}: installed {have}")
    assert not bad, bad


def test_every_requirement_has_a_floor():
    missing = [f"[{s}] {r}" for s, rs in requirements().items() for r in rs if floor(r) is None]
    assert not missing, missing


def floor_problems(reqs: dict[str, list[Requirement]], dist: str) -> list[str]:
    """Each requirement on ``dist`` whose floor is below the version it was tested with."""
    tested, why, _ = PRIVATE_API[dist]
    mine = [r for rs in reqs.values() for r in rs if canonicalize_name(r.name) == canonicalize_name(dist)]
    if not mine:
        return [f"{dist} is not declared in setup.cfg"]
    return [f"{r}: floor below {tested}, the version tested ({why})" for r in mine if floor(r) < Version(tested)]


@pytest.mark.parametrize("dist", sorted(PRIVATE_API))
def test_floor_is_the_tested_version_where_we_use_new_or_private_apis(dist):
    tested, why, attrs = PRIVATE_API[dist]
    assert not floor_problems(requirements(), dist)
    have = installed(dist)
    assert have is not None and have >= Version(tested), f"{dist} {have} installed; tested with {tested}"
    # The APIs that are the reason for the floor exist in what is installed.
    for module, dotted in attrs:
        obj = importlib.import_module(module)
        for part in dotted.split("."):
            assert hasattr(obj, part), f"{module}.{dotted} is gone from {dist} {have} ({why})"
            obj = getattr(obj, part)


def test_a_lowered_floor_is_caught(tmp_path):
    """setup.cfg with the floors of before (transformers >= 4.50, polygraphy >= 0.49)."""
    low = tmp_path / "setup.cfg"
    text = (ROOT / "setup.cfg").read_text()
    low.write_text(
        re.sub(r"polygraphy>=[\d.]+", "polygraphy>=0.49", re.sub(r"transformers>=[\d.]+", "transformers>=4.50", text))
    )
    reqs = requirements(low)
    (problem,) = floor_problems(reqs, "transformers")
    assert ">=4.50" in problem and "below 5.25.0" in problem
    assert len(floor_problems(reqs, "polygraphy")) == 1 and not floor_problems(reqs, "onnxscript")


def _imported_top_level_modules() -> dict[str, str]:
    """Top-level third-party modules imported anywhere in the package code -> one file."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    dirs = [ln.split("=", 1)[1].strip() for ln in cfg["options"]["package_dir"].strip().splitlines()]
    found: dict[str, str] = {}
    for d in dirs:
        for f in sorted((ROOT / d).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top != "gpcl_trt":
                        found.setdefault(top, str(f.relative_to(ROOT)))
    return found


def test_every_imported_package_is_declared():
    declared = {canonicalize_name(r.name) for rs in requirements().values() for r in rs}
    owners = md.packages_distributions()
    undeclared = []
    for module, where in _imported_top_level_modules().items():
        if module in NOT_A_DISTRIBUTION:
            dists = [NOT_A_DISTRIBUTION[module]] if NOT_A_DISTRIBUTION[module] else []
        else:
            dists = owners.get(module)
            assert dists, f"{where} imports {module}, which no installed distribution provides"
        if dists and not any(canonicalize_name(d) in declared for d in dists):
            undeclared.append(f"{module} ({where}; distribution {dists})")
    assert not undeclared, undeclared
