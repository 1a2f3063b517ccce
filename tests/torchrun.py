"""Run a test script in 2 gloo processes under ``torch.distributed.run`` (the multi-process tests' one runner)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_two_processes(script: str, tmp_path, port: int, out_name: str, timeout: int = 300) -> str:
    """Write ``script`` (a ``str.format`` template with ``{root}`` and ``{tests}``) to ``tmp_path``, run it in 2
    processes with the output path as its argument, assert it exited 0 and return that output path."""
    path = tmp_path / "run.py"
    path.write_text(script.format(root=ROOT, tests=os.path.join(ROOT, "tests")))
    out = str(tmp_path / out_name)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(path), out]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out
