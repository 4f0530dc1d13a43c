#!/usr/bin/env bash
# Prepare .devwheels/d for benchmark and GPU-test runs on the lent GPU machine, which reaches no registry and takes
# 64 MiB a call: zstandard, platformdirs and blake3 wheels for its Python 3.12, nvCOMP's library and the bf16
# MiniLM (each zstd-compressed: 22 + 35 MB), and the setup script. From the project root, after
# python3 -m pip install -e ./packages/trtx-runtime -e '.[bench]':
#   bash tools/bench_wheels.sh
# then, in one device call with carry [".devwheels/d"]:   . .devwheels/d/setup.sh; python3 bench/bench_upload.py ...
set -euo pipefail
out=.devwheels/d
mkdir -p "$out" .git/info
grep -qx '/.devwheels/' .git/info/exclude 2>/dev/null || echo '/.devwheels/' >> .git/info/exclude
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d "$out" zstandard platformdirs blake3
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 "${plat[@]}" -d "$tmp" "nvidia-libnvcomp-cu13>=5"
(cd "$tmp" && python3 -m zipfile -e nvidia_libnvcomp_cu13-*.whl x)
python3 -c "import sys; sys.path[:0] = ['bench', '.']; import _data; _data.make_bf16_copy('$tmp')"
python3 - "$tmp" "$out" <<'PY'
import sys, zstandard
tmp, out = sys.argv[1:]
for src, name in ((f"{tmp}/x/nvidia/libnvcomp/lib64/libnvcomp.so.6", "libnvcomp.so.6.zst"), (f"{tmp}/minilm_bf16.safetensors", "minilm_bf16.safetensors.zst")):
    with open(src, "rb") as f, open(f"{out}/{name}", "wb") as g:
        zstandard.ZstdCompressor(level=19, threads=-1).copy_stream(f, g)
PY
cp tools/device_bench.sh "$out/setup.sh"
du -sh "$out"
