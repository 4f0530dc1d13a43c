"""The `trtx-bundle` command line: one click group (app.py) and its commands, by side (bundle.py, run.py, farm.py, sign.py, delta.py, upgrade.py).

Each command module adds its commands to the group when imported; importing them here makes ``main`` complete.
"""

from . import bundle, delta, farm, run, sign, upgrade
from .app import main

__all__ = ["main", "bundle", "delta", "farm", "run", "sign", "upgrade"]
