"""Build of the optional C helper (runtime_shim.store._planes); everything else is declared in pyproject.toml.

Where no C compiler is at hand the install goes on without the helper and the runtime decodes with numpy, slower but
with the same results (runtime_shim/store/). ``TRTX_REQUIRE_NATIVE=1`` (set by .ci/run and by cibuildwheel for the
release wheels) turns a failed build into an error, so that CI tests the helper and no wheel ships without it.
"""

import os

from setuptools import Extension, setup

REQUIRED = os.environ.get("TRTX_REQUIRE_NATIVE") == "1"

setup(
    ext_modules=[
        Extension("runtime_shim.store._planes", ["runtime_shim/store/_planes.c"], optional=not REQUIRED),
    ]
)
