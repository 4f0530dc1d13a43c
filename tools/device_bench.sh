# Source at the start of a device call that carries .devwheels/d (made by tools/bench_wheels.sh):
#   . .devwheels/d/setup.sh; python3 bench/bench_upload.py ...
# Installs the wheels into /tmp/site, unpacks nvCOMP and the bf16 MiniLM, and exports what the benchmarks and the
# GPU tests need (PYTHONPATH, TRTX_NVCOMP_LIBRARY, TRTX_BENCH_DATA). The image there has numpy and cuda-bindings.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devwheels/d/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRTX_CACHE_DIR=/tmp/trtx-cache TRTX_BENCH_DATA=/tmp/benchdata
mkdir -p /tmp/benchdata /tmp/nvcomp
python3 - <<'PY'
import zstandard
for src, dst in ((".devwheels/d/libnvcomp.so.6.zst", "/tmp/nvcomp/libnvcomp.so.6"),
                 (".devwheels/d/minilm_bf16.safetensors.zst", "/tmp/benchdata/minilm_bf16.safetensors")):
    with open(src, "rb") as f, open(dst, "wb") as g:
        zstandard.ZstdDecompressor().copy_stream(f, g)
PY
export TRTX_NVCOMP_LIBRARY=/tmp/nvcomp/libnvcomp.so.6
