"""Build of the optional C helper (runtime_shim._planes); everything else is declared in pyproject.toml.

``optional=True``: where no C compiler is at hand the install goes on without it and the shim decodes with numpy,
slower but with the same results (runtime_shim/weights.py).
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("runtime_shim._planes", ["runtime_shim/_planes.c"], optional=True)])
