# Source at the start of a device call that carries .devwheels/d (made by tools/bench_wheels.sh):
#   . .devwheels/d/setup.sh; python3 bench/bench_upload.py ...
# Installs the wheels into /tmp/site, builds the runtime's C helper in place where the machine can, unpacks nvCOMP and
# the bf16 MiniLM, and exports what the benchmarks and the GPU tests need (PYTHONPATH with the runtime's own folder,
# TRTX_NVCOMP_LIBRARY, TRTX_BENCH_DATA). The image there has numpy and cuda-bindings.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devwheels/d/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD:$PWD/packages/trtx-runtime PYTHONUNBUFFERED=1 TRTX_CACHE_DIR=/tmp/trtx-cache TRTX_BENCH_DATA=/tmp/benchdata
mkdir -p /tmp/benchdata /tmp/nvcomp
python3 - <<'PY'
import zstandard
for src, dst in ((".devwheels/d/libnvcomp.so.6.zst", "/tmp/nvcomp/libnvcomp.so.6"),
                 (".devwheels/d/minilm_bf16.safetensors.zst", "/tmp/benchdata/minilm_bf16.safetensors")):
    with open(src, "rb") as f, open(dst, "wb") as g:
        zstandard.ZstdDecompressor().copy_stream(f, g)
PY
export TRTX_NVCOMP_LIBRARY=/tmp/nvcomp/libnvcomp.so.6
# The host decoder's C helper, built in place (setup.py would need the setuptools of the runtime's pyproject); without
# a compiler the numpy fallback runs. Printed, since the benchmarks' host-decode figures depend on it.
# trtx_build_planes DIR: for another checkout's runtime folder too (a before/after comparison).
trtx_build_planes() {
    local ext inc
    ext=$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
    inc=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
    cc -O3 -shared -fPIC -I"$inc" "$1/runtime_shim/store/_planes.c" -o "$1/runtime_shim/store/_planes$ext" 2>/dev/null ||
        echo "C helper not built in $1 (no compiler?): numpy fallback"
}
trtx_build_planes packages/trtx-runtime
python3 -c "from runtime_shim.store import reader; print('C helper:', 'built' if reader.native_join() else 'absent (numpy)')"
