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


@pytest.mark.parametrize("first", [
    "from hf_align import *",  # every public name: our own modules import the registration targets
    "from hf_align.pipelines.early_exit_classification import EarlyExitClassificationPipeline",
    "from hf_align import SuperResolutionPipeline",
    "from hf_align import MultiExitModel",
])
def test_registers_when_our_own_module_imports_the_target(first):
    """A module of ours that imports the registration target (transformers.pipelines, diffusers, transformers'
    Auto classes) is half-imported when the target's hook runs; it registers itself at its end instead."""
    result = _fresh_process(
        "import json, warnings\n"
        "warnings.simplefilter('error', RuntimeWarning)\n"
        f"{first}\n"
        "from transformers.pipelines import PIPELINE_REGISTRY\n"
        "from transformers import AutoConfig\n"
        "import diffusers\n"
        "print(json.dumps(dict(task='early-exit-classification' in PIPELINE_REGISTRY.get_supported_tasks(),\n"
        "                      auto=type(AutoConfig.for_model('hf-align-multi-exit')).__name__,\n"
        "                      sr=diffusers.SuperResolutionPipeline.__name__)))\n"
    )
    assert result == {"task": True, "auto": "MultiExitConfig", "sr": "SuperResolutionPipeline"}


def test_registers_at_once_when_the_modules_are_already_imported():
    result = _fresh_process(
        "import json, diffusers\n"
        "from transformers.pipelines import PIPELINE_REGISTRY\n"
        "import hf_align\n"
        "print(json.dumps(dict(task='early-exit-classification' in PIPELINE_REGISTRY.get_supported_tasks(),\n"
        "                      sr=getattr(diffusers, 'SuperResolutionPipeline', None) is hf_align.SuperResolutionPipeline)))\n"
    )
    assert result == {"task": True, "sr": True}


def test_multi_exit_folder_loads_through_auto_classes_in_a_fresh_process(tmp_path):
    """The first thing the fresh process imports after hf_align is an Auto class (no model module, no pipeline)."""
    import transformers as T

    from hf_align import add_exit_heads

    config = T.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=20, num_labels=3)
    add_exit_heads(T.BertForSequenceClassification(config)).save_pretrained(tmp_path)
    result = _fresh_process(
        "import json, hf_align\n"
        "from transformers import AutoModelForSequenceClassification\n"
        f"model = AutoModelForSequenceClassification.from_pretrained({str(tmp_path)!r})\n"
        "print(json.dumps(dict(cls=type(model).__name__, heads=len(model.exit_heads))))\n"
    )
    assert result == {"cls": "MultiExitModel", "heads": 1}


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


def _lint(root, pyproject) -> subprocess.CompletedProcess:
    import os
    import shutil

    lint = shutil.which("lint-imports") or os.path.join(os.path.dirname(sys.executable), "lint-imports")
    return subprocess.run([lint, "--config", str(pyproject), "--no-cache"], capture_output=True, text=True,
                          timeout=300, cwd=root, env={**os.environ, "PYTHONPATH": str(root), "COLUMNS": "400"})


@pytest.mark.parametrize("module,line,broken", [
    (None, None, None),  # the layout itself keeps every contract
    # an upward import, function-level: data may import nothing of hf-align
    ("data/batches.py", "def _up():\n    from ..layers import LayerView\n", "layers:"),
    # an upward import at module level: analysis must not import the CLI
    ("analysis/pooling.py", "from ..cli import main as _main\n", "layers:"),
    # siblings importing each other: modeling and analysis are independent
    ("modeling/multi_exit.py", "def _side():\n    from ..analysis import pool\n", "layers:"),
    # a cycle inside a package (function-level): similarity <-> streaming
    ("analysis/similarity.py", "def _cycle():\n    from .streaming import StreamingCKA\n", "no import cycles"),
])
def test_import_contracts(tmp_path, module, line, broken):
    """The import-linter contracts of pyproject.toml (what CI runs): kept by the layout, broken by an upward
    import, a sibling import or a cycle, function-level imports included."""
    pytest.importorskip("importlinter")
    import pathlib
    import shutil

    repo = pathlib.Path(__file__).resolve().parents[1]
    shutil.copytree(repo / "hf_align", tmp_path / "hf_align", ignore=shutil.ignore_patterns("__pycache__"))
    if module is not None:
        with open(tmp_path / "hf_align" / module, "a", encoding="utf-8") as f:
            f.write("\n\n" + line)
    result = _lint(tmp_path, repo / "pyproject.toml")
    if broken is None:
        assert result.returncode == 0, result.stdout + result.stderr
    else:
        assert result.returncode != 0
        assert any(broken in l and "BROKEN" in l for l in result.stdout.splitlines()), result.stdout
