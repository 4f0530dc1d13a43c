"""Format fingerprint: the sha256 of every file of bundles built from the test models, engines excluded.

A refactor that must not change the bundle format compares two runs: build 8 test models (tests/models.py) in each
weight encoding, without engines (TRT-RTX engine bytes are not reproducible), and write {bundle: {file: sha256}}.
From the repository root: ``python3 tools/format_fingerprint.py OUT.json``, then ``cmp`` two outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fingerprint() -> dict[str, object]:
    os.environ.setdefault("SOURCE_DATE_EPOCH", "1700000000")
    sys.path.insert(0, str(ROOT / "tests"))
    import models  # tests/models.py: real ONNX models made with onnx.helper

    from bundler.build import build_bundle
    from bundler.config import make_options

    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, factory, profile in models.ALL_BUNDLABLE:
            src = factory(Path(tmp) / name)
            for encoding in ("none", "zstd", "zstd-byteplane"):
                bundle = Path(tmp) / f"{name}-{encoding}"
                options = make_options(shapes=models.shape_args(profile), encoding=encoding, weightful=False)
                build_bundle(src, bundle, options=options, probe=lambda: None)
                out[f"{name}-{encoding}"] = {
                    str(p.relative_to(bundle)): hashlib.sha256(p.read_bytes()).hexdigest()
                    for p in sorted(bundle.rglob("*"))
                    if p.is_file()
                }
    return out


if __name__ == "__main__":
    result = fingerprint()
    Path(sys.argv[1]).write_text(json.dumps(result, indent=1, sort_keys=True))
    print(
        f"{len(result)} bundles, {sum(len(v) for v in result.values() if isinstance(v, dict))} files", file=sys.stderr
    )
