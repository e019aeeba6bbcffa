# Sourced by the device-call scripts (benchmarks/gpu_throughput.sh, benchmarks/experiments_gpu.sh,
# training/gpu_recipe.sh) after `cd` to the repository root, with WORK (scratch folder) and LOG (the log's
# file name) set. Sets PY (default python3) and OUT (set by the device tool; default $WORK/out), sends
# everything printed from here on to the terminal and to $OUT/$LOG, defines stage() for the log's section
# heads, and makes xctrt importable on the lent machine's own Python: carried wheels ($WHEELS, default
# .whl, see training/gpu_stage.sh) into /tmp/xctrt_site when $1 (a Python import line) fails, then the
# C++ kernels built for that Python.
PY=${PYTHON:-python3}
OUT=${OUT:-$WORK/out}
mkdir -p "$WORK" "$OUT"
exec > >(tee -a "$OUT/$LOG") 2>&1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::FutureWarning,ignore::UserWarning,ignore::DeprecationWarning
stage() { echo; echo "=== [+${SECONDS}s] $*"; }
stage "environment"
_xctrt_needs=${1:-}
# xctrt's writer needs TiffWriter.write(buffersize=) (tifffile >= 2023.8.30): a machine's older tifffile
# gets the carried one
[ -n "$_xctrt_needs" ] && _xctrt_needs="$_xctrt_needs; import inspect, tifffile; assert 'buffersize' in inspect.signature(tifffile.TiffWriter.write).parameters"
_xctrt_wheels=${WHEELS:-.whl}
if [ -n "$_xctrt_needs" ] && [ -d "$_xctrt_wheels" ] && ! $PY -c "$_xctrt_needs" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/xctrt_site "$_xctrt_wheels"/*.whl
  export PYTHONPATH=/tmp/xctrt_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! $PY -c "import xctrt._core" 2>/dev/null; then   # the C++ kernels, for this machine's Python
  _xctrt_build=build/device-$($PY -c 'import sys; print("%d%d" % sys.version_info[:2])')
  cmake -S . -B "$_xctrt_build" -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v $PY)" \
    -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" > "$WORK/cmake.log" 2>&1 \
    && cmake --build "$_xctrt_build" -j "$(nproc)" >> "$WORK/cmake.log" 2>&1 || { tail -30 "$WORK/cmake.log"; exit 1; }
fi
