#!/usr/bin/env bash
# What the lent Hopper GPU (H100/H200, SM 9.0) can show: the real probe, doctor, load() falling back with the
# reason, farm-job refusing with exit 3, and the test suite on a machine with a real NVIDIA driver.
# Run through the device tool as call 2 of ../shared/tools/device-wheels.sh (it installs the wheels first), then
# tools/device_install.sh installs this checkout's two distributions (trtx-runtime from ./packages/trtx-runtime, trtx-bundler).
set -u
test -d /root/stash || exit 3
cat /root/stash/libs.part0 .devwheels/b/libs.part1 > "/tmp/$(cat .devwheels/b/libs.name)" &&
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/*.whl .devwheels/b/*.whl &&
  cp -r .devwheels/b/tensorrt_rtx /tmp/site/ || exit 4
# tools/extra_wheels.sh's wheels (blake3, model-signing), carried in call 1 to /root/stash/e
if test -d /root/stash/e; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /root/stash/e/*.whl || exit 4
fi
. tools/device_install.sh
export PYTHONUNBUFFERED=1 TRTX_CACHE_DIR=/tmp/trtx-cache
tb() { python3 -c 'import sys; sys.argv[0] = "trtx-bundle"; from bundler.cli import main; main()' "$@"; }
out=${OUT:-/tmp/out}; mkdir -p "$out"
{
  echo "== nvidia-smi"; nvidia-smi --query-gpu=name,pci.device_id,driver_version,compute_cap --format=csv
  echo "== trtx-bundle doctor"; tb doctor; echo "rc=$?"
  echo "== trtx-bundle demo (build on the CPU path, load through the shim)"; tb demo -o /tmp/demo; echo "rc=$?"
  echo "== trtx-bundle doctor BUNDLE"; tb doctor /tmp/demo/bundle; echo "rc=$?"
  tb doctor /tmp/demo/bundle --json > "$out/doctor.json"
  echo "== load(fallback='error')"
  python3 -c '
import runtime_shim
try:
    runtime_shim.load("/tmp/demo/bundle", app="HopperCheck", fallback="error")
except Exception as e:
    print(type(e).__name__ + ":", e)
    print("hint:", getattr(e, "hint", None))
'
  echo "== trtx-bundle doctor --selftest (exit 3 and the reason where TRT-RTX cannot run)"; tb doctor --selftest; echo "rc=$?"
  echo "== trtx-bundle farm-job"; tb farm-job /tmp/demo/bundle -o /tmp/part; echo "rc=$?"
  test -e /tmp/part && echo "UNEXPECTED: /tmp/part exists" || echo "nothing written (/tmp/part absent)"
} 2>&1 | tee "$out/hopper.log"
echo "== pytest (real driver)"
python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tail -25 | tee "$out/pytest.log"
