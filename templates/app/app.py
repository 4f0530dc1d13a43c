"""A minimal app that embeds the trtx-bundler runtime shim: load the bundle once, run it, close it.

    python app.py path/to/bundle input=frame.npy [more=other.npy]

Everything the shim decides (engine, runtime cache, why TensorRT for RTX was or was not used) is in
``session.report``; log it once at start-up so support can read it from user logs.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np

import runtime_shim

APP_NAME = "MyApp"  # names the per-user cache dir (e.g. ~/.cache/MyApp on Linux, %LOCALAPPDATA%\MyApp\Cache on Windows)
log = logging.getLogger(APP_NAME)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    bundle, pairs = Path(argv[0]), [a.partition("=") for a in argv[1:]]
    inputs = {name: np.load(path, allow_pickle=False) for name, _, path in pairs}
    try:
        # Load once at start-up: the first load of a bundle on a machine unpacks or JIT-compiles; later ones are fast.
        session = runtime_shim.load(bundle, app=APP_NAME)
    except runtime_shim.BundleError as e:
        log.error("%s%s", e, f" (hint: {e.hint})" if e.hint else "")
        return 1
    with session:  # close() saves the runtime cache so the next start skips kernel compilation
        for line in session.report.lines():
            log.info("%s", line)
        try:
            outputs = session.run(inputs)
        except runtime_shim.InputError as e:
            log.error("%s", e)
            return 1
        for name, value in outputs.items():
            print(f"{name}: {value.dtype} {list(value.shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
