"""The README's first command: `trtx-bundle demo` builds, loads and checks the built-in model."""

from __future__ import annotations

import json

from click.testing import CliRunner

from bundler.cli import main
from runtime_shim.manifest import read_manifest


def test_demo_bundles_loads_and_matches_the_original(tmp_path):
    result = CliRunner().invoke(main, ["demo", "-o", str(tmp_path / "demo"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    manifest, warnings = read_manifest(tmp_path / "demo" / "bundle")
    assert warnings == []
    assert manifest.model.name == "demo_classifier"
    assert any(e.kind == "weightful" and e.compute_capabilities == (86, 89, 120) for e in manifest.engines)
    assert report["backend"] in ("tensorrt_rtx", "onnxruntime")
    if report["backend"] == "onnxruntime":
        assert report["why_not_trt"], "the report must say why TensorRT for RTX was not used"
        # The fallback runs the same graph with the same weights on the same runtime: bit-identical.
        assert "max |difference| vs ONNX Runtime on the original model: 0\n" in result.stderr
    assert "demo OK" in result.stderr
    assert "bytes in all" in result.stderr and "engine(s) of" in result.stderr  # the bundle's size, not the engine's


def test_demo_twice_in_one_directory_keeps_working(tmp_path):
    runner = CliRunner()
    for _ in range(2):
        result = runner.invoke(main, ["demo", "-o", str(tmp_path / "d")])
        assert result.exit_code == 0, result.output
        # The report is the result (stdout); timings are named without their key's "_s" and carry one unit.
        assert "backend: " in result.stdout and "_s " not in result.stdout and " ms" in result.stdout
        if "backend: onnxruntime" in result.stdout:
            assert "runtime cache" not in result.stdout  # ONNX Runtime has none
