#!/usr/bin/env bash
# Build crvae_ext's C++/CUDA extension ahead of time (setup.py path) against torch==2.14.1 (CUDA
# wheel) on a CPU-only machine, then check it links, loads and registers CPU+CUDA kernels.
# Usage: bash benchmarks/cuda_build_check.sh   (REPO: this checkout, B: /tmp/cuda_build by default)
set -euo pipefail
B=${B:-/tmp/cuda_build}; REPO=${REPO:-$(cd "$(dirname "$0")/.." && pwd)}; V=$B/venv; PY=$V/bin/python
export MAX_JOBS=2 TORCH_CUDA_ARCH_LIST="8.0;9.0" CRVAE_BUILD_CPP=1
# nvcc on PATH is /usr/local/bin/nvcc (a wrapper script), so torch would guess CUDA_HOME=/usr/local
# and link with -L/usr/local/lib -lcudart, which fails; point it at the real toolkit.
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH=$V/bin:$PATH
mkdir -p "$B"; cd "$B"

echo "== 1. venv"
if ! "$PY" -c 'import torch, ninja, numpy, setuptools, wheel; assert torch.__version__.startswith("2.14.1")' 2>/dev/null; then
  [ -x "$PY" ] || python3 -m venv "$V"
  "$PY" -m pip install -q torch==2.14.1 ninja numpy setuptools wheel
fi
"$PY" - <<'EOF' 2>&1 | grep -v "No CUDA runtime is found"
import torch, setuptools, ninja, sys
from torch.utils import cpp_extension as c
print(f"python {sys.version.split()[0]}  torch {torch.__version__}  torch.version.cuda {torch.version.cuda}"
      f"  cuda.is_available {torch.cuda.is_available()}  setuptools {setuptools.__version__}  ninja {ninja.__version__}")
print(f"CUDA_HOME={c.CUDA_HOME}  torch wheel archs: {torch._C._cuda_getArchFlags()}")
EOF
nvcc --version | tail -2 | head -1; gcc --version | head -1

echo "== 2. copy $REPO (tracked + untracked, not ignored) to $B/src"
rm -rf "$B/src"; mkdir -p "$B/src"
(cd "$REPO" && git ls-files -z -co --exclude-standard | tar --null -T - -cf -) | tar -xf - -C "$B/src"
echo "commit $(git -C "$REPO" rev-parse --short HEAD)$(git -C "$REPO" diff --quiet HEAD || echo ' (+uncommitted changes)')"

echo "== 3. build: CRVAE_BUILD_CPP=1 pip install -v --no-build-isolation --no-deps .  (log: $B/build.log)"
"$PY" -m pip uninstall -q -y crvae-ext 2>/dev/null || true
t0=$(date +%s)
if ! (cd "$B/src" && "$PY" -m pip install -v --no-build-isolation --no-deps . >"$B/build.log" 2>&1); then
  grep -n -i -E "error|cannot find|fatal" "$B/build.log" | head -20; echo "BUILD FAILED"; exit 1
fi
echo "build wall time: $(( $(date +%s) - t0 )) s"
echo "compiler warnings (unique, excluding torch-header '#pragma unroll' -Wunknown-pragmas):"
grep -E "warning" "$B/build.log" | grep -v -E "Wunknown-pragmas|SetuptoolsDeprecationWarning|byte-compiling" | sort -u | head -10 || true
grep -o -E "gencode=arch=compute_[0-9]+,code=[a-z_0-9]+" "$B/build.log" | sort -u | tr '\n' ' '; echo

cd /tmp  # import the installed package, not the source tree
SO=$("$PY" -c 'import crvae_ext._cpp._build as b; p = b.aot_library(); print(p or "")' 2>/dev/null)
[ -n "$SO" ] || { echo "no ahead-of-time library found / hash mismatch"; exit 1; }
echo "== 4. library: $SO ($(du -h "$SO" | cut -f1))"
TL=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null)
echo "-- ldd without torch/lib on the path (no RUNPATH; normal for torch extensions, torch loads them first):"
ldd "$SO" | grep "not found" | sed 's/^\s*/   /' || echo "   none"
echo "-- LD_LIBRARY_PATH=torch/lib ldd: not found: $(LD_LIBRARY_PATH=$TL ldd "$SO" | grep -c 'not found' || true); CUDA/torch deps:"
LD_LIBRARY_PATH=$TL ldd "$SO" | grep -E "cudart|c10|torch" | sed -e 's/ (0x.*//' -e 's/^\s*/   /'
echo "-- nm -D --undefined-only: $(nm -D --undefined-only "$SO" | wc -l) symbols; CUDA runtime ones:"
nm -D --undefined-only "$SO" | awk '{print $2}' | grep -E "^(cuda|__cuda)" | tr '\n' ' '; echo
CUOBJDUMP=$(command -v cuobjdump || ls "$V"/lib/python3.11/site-packages/triton/backends/nvidia/bin/cuobjdump 2>/dev/null || true)
if [ -n "$CUOBJDUMP" ]; then
  echo "-- $CUOBJDUMP --list-elf / --list-ptx:"
  "$CUOBJDUMP" --list-elf "$SO" | sed 's/^/   /'
  echo "   PTX entries: $("$CUOBJDUMP" --list-ptx "$SO" 2>/dev/null | wc -l)"
  echo "   SM archs in fatbinary: $("$CUOBJDUMP" --list-elf "$SO" | grep -o -E 'sm_[0-9]+a?' | sort -u | tr '\n' ' ')"
else
  echo "-- cuobjdump not available"
fi

echo "== 5. load and dispatch-key check"
"$PY" - "$SO" <<'EOF' 2>&1 | grep -v "No CUDA runtime is found"
import sys, torch
so = sys.argv[1]
import crvae_ext._cpp as cpp                     # the package's own loader (AOT library, then fakes)
reason = cpp._load()
print(f"crvae_ext._cpp._load(): {reason or 'OK (ahead-of-time library loaded)'}")
print(f"unusable_reason('cpu')={cpp.unusable_reason('cpu')}  unusable_reason('cuda')={cpp.unusable_reason('cuda')}")
entries = cpp._load_once()[1]
print(f"Python entry points (csrc/python.cpp): {sorted(n for n in dir(entries) if not n.startswith('_')) if entries else 'NOT LOADED'}")
torch.ops.load_library(so)                       # idempotent; the explicit route
ops = sorted({s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas()
              if s.name.startswith("crvae_ext_cpp::")})
has = torch._C._dispatch_has_kernel_for_dispatch_key
print(f"{'op':24} {'CUDA':5} {'CPU':5} {'Meta(fake)':10}")
bad, composite = 0, []
for op in ops:
    q = f"crvae_ext_cpp::{op}"
    if has(q, "CompositeImplicitAutograd"):  # autograd.cpp: over the kernels, any device
        composite.append(op)
        continue
    c, p, m = has(q, "CUDA"), has(q, "CPU"), has(q, "Meta")
    bad += not (c and p)
    print(f"{op:24} {str(c):5} {str(p):5} {str(m):10}")
print(f"composite over those kernels (CompositeImplicitAutograd): {composite}")
x = torch.randn(3, 8)
y = torch.ops.crvae_ext_cpp.groupsort(x, 2, 1)  # the raw op takes a non-negative dim
ref = x.view(3, 4, 2).sort(-1).values.view(3, 8)
print(f"CPU smoke test groupsort: {'OK' if torch.equal(y, ref) else 'MISMATCH'}")
cudart = sorted({l.split()[-1] for l in open("/proc/self/maps") if "libcudart" in l})
print(f"libcudart mapped in this process: {cudart}")
kernels = len(ops) - len(composite)
print(f"SUMMARY: {kernels} kernel ops, {kernels - bad} with both CPU and CUDA kernels"
      + ("" if bad == 0 else f", {bad} MISSING")
      + ("" if entries is not None else "; Python entry points NOT LOADED"))
sys.exit(1 if bad or not kernels or entries is None else 0)
EOF
