# Source from the project root on the lent GPU machine, after the third-party wheels are in /tmp/site:
#   . tools/device_install.sh
# Installs this checkout's two distributions, trtx-runtime (./packages/trtx-runtime, with its C helper) and trtx-bundler (.),
# into /tmp/site and exports PYTHONPATH. That machine reaches no registry, so the build uses its own setuptools
# (--no-build-isolation). Where that fails (no setuptools, or one older than packages/trtx-runtime/pyproject.toml needs), it
# compiles the C helper in place with the C compiler and imports both packages from the checkout instead.
mkdir -p /tmp/site
if python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site ./packages/trtx-runtime . \
    > /tmp/device_install.log 2>&1; then
  export PYTHONPATH=/tmp/site
  echo "device_install: trtx-runtime and trtx-bundler installed into /tmp/site" >&2
else
  ext=$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
  inc=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  if cc -O3 -shared -fPIC -I"$inc" packages/trtx-runtime/runtime_shim/store/_planes.c \
      -o "packages/trtx-runtime/runtime_shim/store/_planes$ext" >> /tmp/device_install.log 2>&1; then
    echo "device_install: pip could not build (see /tmp/device_install.log); C helper compiled in place" >&2
  else
    echo "device_install: pip and cc both failed (see /tmp/device_install.log); the runtime decodes with numpy" >&2
  fi
  export PYTHONPATH=/tmp/site:$PWD/packages/trtx-runtime:$PWD
fi
