"""The GPU suite's smoke mode runs end to end on CPU and writes its report (what a GPU run writes, at tiny sizes)."""

from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_suite_smoke(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import gpu_suite
    finally:
        sys.path.pop(0)
    result = gpu_suite.main(["--smoke", "--out", str(tmp_path)])
    report = (tmp_path / "gpu_suite_smoke.md").read_text()
    data = json.loads((tmp_path / "gpu_suite_smoke.json").read_text())
    assert data["smoke"] is True and result["device"] == "cpu"
    methods = {(row["batch"], row["method"]) for row in data["decoding"]}
    assert {(1, "speculative (dynamic)"), (8, "speculative (static)"), (1, "generate (static, compiled on GPU)"),
            (1, "assistant_early_exit")} <= methods
    # greedy speculative decoding equals plain generate in the suite too
    assert all(row["identical"] for row in data["decoding"] if row["method"].startswith("speculative"))
    for section in ("## Decoding", "## Early-exit classification", "## Streamed CKA", "## Step costs"):
        assert section in report
    assert data["dream_step"]["ratio"] > 0 and data["aligned_step"]["ratio"] > 0
