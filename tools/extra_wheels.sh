#!/usr/bin/env bash
# Prepare .devwheels/e: the wheels for the lent GPU machine (Python 3.12, no registry) that the shared
# device-wheels.sh does not fetch: blake3 (a runtime dependency since schema 2) and model-signing with its
# dependencies (the runtime's `signing` extra, which the test suite uses). ~15 MB. Run it AFTER
# ../shared/tools/device-wheels.sh (which empties .devwheels), then carry ".devwheels/e" in call 1 beside
# ".devwheels/a"; tools/hopper_check.sh installs it from /root/stash/e.
set -euo pipefail
out=.devwheels/e
rm -rf "$out"; mkdir -p "$out" .git/info
grep -qx '/.devwheels/' .git/info/exclude 2>/dev/null || echo '/.devwheels/' >> .git/info/exclude
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d "$out" blake3 "model-signing==1.1.1" "pyOpenSSL>=24"
du -sh "$out"
