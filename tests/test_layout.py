"""The layout: a cheap `import hf_align` whose registrations still work, and every old import path (a shim that
warns once, naming the new home and the removal version)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import warnings

import pytest

# old path -> (new home, a name that must still be importable from the old path)
OLD_PATHS = {
    "hf_align.analysis.data": ("hf_align.data", "iter_batches"),
    "hf_align.cli_data": ("hf_align.cli.loading", "load_raw_dataset"),
    "hf_align.demo": ("hf_align.cli.demo", "run_demo"),
    "hf_align.collapse": ("hf_align.analysis.collapse", "collapse_report"),
}


def _fresh_process(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_is_cheap_and_registers_on_use():
    result = _fresh_process(
        "import sys, json\n"
        "import hf_align\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers.pipelines', 'scipy', 'datasets') if m in sys.modules)\n"
        "from transformers.pipelines import PIPELINE_REGISTRY\n"
        "task = 'early-exit-classification' in PIPELINE_REGISTRY.get_supported_tasks()\n"
        "from transformers import AutoConfig\n"
        "auto = type(AutoConfig.for_model('hf-align-multi-exit')).__name__\n"
        "import diffusers\n"
        "sr = diffusers.SuperResolutionPipeline.__module__\n"
        "print(json.dumps(dict(heavy=heavy, task=task, auto=auto, sr=sr)))\n"
    )
    assert result == {"heavy": [], "task": True, "auto": "MultiExitConfig", "sr": "hf_align.pipelines.super_resolution"}


def test_registers_at_once_when_the_modules_are_already_imported():
    result = _fresh_process(
        "import json, diffusers\n"
        "from transformers.pipelines import PIPELINE_REGISTRY\n"
        "import hf_align\n"
        "print(json.dumps(dict(task='early-exit-classification' in PIPELINE_REGISTRY.get_supported_tasks(),\n"
        "                      sr=getattr(diffusers, 'SuperResolutionPipeline', None) is hf_align.SuperResolutionPipeline)))\n"
    )
    assert result == {"task": True, "sr": True}


@pytest.mark.parametrize("old", sorted(OLD_PATHS))
def test_old_import_path_works_and_warns_once(old):
    new, name = OLD_PATHS[old]
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = importlib.import_module(old)
        again = importlib.import_module(old)
        value = getattr(first, name)
        exec(f"from {old} import {name}", {})
    moved = [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning)) and old in str(w.message)]
    assert len(moved) == 1, [str(w.message) for w in caught]
    assert new in str(moved[0].message) and "hf-align 0.3" in str(moved[0].message)
    assert first is again and value is getattr(importlib.import_module(new), name)
