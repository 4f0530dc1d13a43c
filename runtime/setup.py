"""Build of the optional C helper (runtime_shim.store._planes); everything else is declared in pyproject.toml.

``optional=True``: where no C compiler is at hand the install goes on without it and the shim decodes with numpy,
slower but with the same results (runtime_shim/store/reader.py). Release wheels (cibuildwheel, see
pyproject.toml) carry it compiled, so users on Linux and Windows never need a compiler.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("runtime_shim.store._planes", ["runtime_shim/store/_planes.c"], optional=True)])
