#!/usr/bin/env bash
# Everything GPU-side of the GPCL op in one call, on a machine with a CUDA GPU, torch (CUDA),
# numpy, pytest and nvcc, but no TensorRT and no network:
#   1. build the kernel library for this GPU (and sm_80/89/90 as a compile check),
#   2. run the GPU tests (tests/test_plugins_gpu.py) and the host-math tests,
#   3. run tools/bench_gpcl.py,
#   4. write a summary (summary.md + the raw files) under $OUT (default: a new temp folder).
#
#   tools/gpu_check.sh            # from the repository root
#   OUT=/tmp/gpcl QUICK=1 tools/gpu_check.sh
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$(mktemp -d /tmp/gpcl_gpu_check.XXXXXX)}"
mkdir -p "$OUT"
cd "$ROOT"
if [[ -x "$ROOT/.venv/bin/python" ]] && "$ROOT/.venv/bin/python" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  PY="$ROOT/.venv/bin/python"
else
  PY="${PYTHON:-python3}"
  [[ "$PY" == */* && "$PY" != /* ]] && PY="$ROOT/$PY" # we cd away below
fi

# Import gpcl_trt from the source tree without installing: the areas live in root folders
# (setup.cfg package_dir), so lay out a gpcl_trt package of symlinks.
SHIM="$(mktemp -d /tmp/gpcl_shim.XXXXXX)"
mkdir -p "$SHIM/gpcl_trt"
for f in gpcl_trt/*; do ln -s "$ROOT/$f" "$SHIM/gpcl_trt/$(basename "$f")"; done
ln -s "$ROOT/plugins" "$SHIM/gpcl_trt/plugins"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
cd "$SHIM" # so that the source tree's own gpcl_trt/ (no areas inside) does not shadow the shim

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: needs a CUDA GPU visible to torch ($PY); nothing was run" | tee "$OUT/summary.md" >&2
  rm -rf "$SHIM"
  exit 2
fi

status=0
step() { echo "== $*" | tee -a "$OUT/log.txt"; }

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/device.csv" 2>&1 || true
"$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" > "$OUT/torch.txt" 2>&1
cat "$OUT/device.csv" "$OUT/torch.txt" | tee -a "$OUT/log.txt"
nvcc --version | tail -1 | tee -a "$OUT/log.txt"

step "build the kernel library (native arch) and compile-check sm_80/89/90"
if ! GPCL_OUT="$OUT" "$PY" - > "$OUT/build.txt" 2>&1 <<'EOF'
import os, time, torch
from pathlib import Path
from gpcl_trt.plugins import native
out = Path(os.environ["GPCL_OUT"])
t = time.time()
major, minor = torch.cuda.get_device_capability()
lib = native.build_kernel_library(out, archs=(f"{major}{minor}",))
print("native", lib, f"{time.time() - t:.1f}s")
t = time.time()
(out / "all").mkdir(exist_ok=True)
native.build_kernel_library(out / "all", archs=native.DEFAULT_ARCHS)
print("sm_80/89/90", f"{time.time() - t:.1f}s")
EOF
then
  status=1
fi
cat "$OUT/build.txt" | tee -a "$OUT/log.txt"
export GPCL_KERNEL_LIB="$OUT/libgpcl_kernel.so"

step "GPU tests"
"$PY" -m pytest -q -ra -p no:cacheprovider "$ROOT/tests/test_plugins_gpu.py" "$ROOT/tests/test_plugins_reference.py" \
  > "$OUT/gpu_tests.txt" 2>&1 || status=1
tail -15 "$OUT/gpu_tests.txt" | tee -a "$OUT/log.txt"

step "benchmark"
BENCH_ARGS=(--json "$OUT/bench_gpcl.json" --markdown "$OUT/bench_gpcl.md")
[[ -n "${QUICK:-}" ]] && BENCH_ARGS+=(--quick)
"$PY" "$ROOT/tools/bench_gpcl.py" "${BENCH_ARGS[@]}" > "$OUT/bench.txt" 2>&1 || status=1
tail -25 "$OUT/bench.txt" | tee -a "$OUT/log.txt"

{
  echo "# GPCL GPU check ($(date -u +%FT%TZ))"
  echo
  echo '```'
  cat "$OUT/device.csv" "$OUT/torch.txt" "$OUT/build.txt"
  echo '```'
  echo
  echo "## GPU tests"
  echo '```'
  tail -15 "$OUT/gpu_tests.txt"
  echo '```'
  echo
  [[ -f "$OUT/bench_gpcl.md" ]] && cat "$OUT/bench_gpcl.md"
  echo
  echo "exit status: $status"
} > "$OUT/summary.md"
rm -rf "$SHIM"
echo "summary: $OUT/summary.md"
exit "$status"
