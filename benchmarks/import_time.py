"""Import time of hf-align (issue 21): ``import hf_align`` at most 1 s more than ``import torch, transformers``
(median of fresh processes), and ``hf-align --version`` under 1 s.

Every case runs in a fresh interpreter; the cases are interleaved round by round so that they share the machine's
load. Reported: the time of the import statement inside the process (``time.perf_counter``), and the wall time of
the whole process (interpreter start included). Extra rows: the registration's cost where it is paid, on the first
``from transformers import pipeline`` after ``import hf_align``, against the same import without hf-align.

    python benchmarks/import_time.py --repeats 5 [--before <checkout of an earlier hf-align>]

(with hf-align installed, or ``PYTHONPATH=<checkout>``; ``hf-align --version`` is the installed script when it is
on PATH, else ``python -m hf_align.cli --version``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

RESULTS = os.path.join(os.path.dirname(__file__), "results")

CASES = {
    "import torch, transformers": "import torch, transformers",
    "import hf_align": "import hf_align",
    "import torch, transformers, hf_align": "import torch, transformers, hf_align",
    "from transformers import pipeline (no hf_align)": "from transformers import pipeline",
    "import hf_align; from transformers import pipeline": "import hf_align; from transformers import pipeline",
}


def run_case(statement: str, pythonpath: str | None = None) -> tuple[float, float]:
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    start = time.perf_counter()
    # cwd outside any checkout: `python -c` puts the working directory first on sys.path
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=tempfile.gettempdir())
    return float(out.stdout.strip().splitlines()[-1]), time.perf_counter() - start


def version_command() -> list[str]:
    script = shutil.which("hf-align")
    return [script, "--version"] if script else [sys.executable, "-m", "hf_align.cli", "--version"]


def run_version() -> float:
    command = version_command()
    start = time.perf_counter()
    subprocess.run(command, capture_output=True, check=True, cwd=tempfile.gettempdir())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(RESULTS, "import_time"))
    parser.add_argument("--before", default=None, help="a checkout of an earlier hf-align: its `import hf_align` is "
                        "timed in the same rounds (PYTHONPATH=<before>)")
    args = parser.parse_args()
    if args.before:
        CASES["import hf_align (--before checkout)"] = "import hf_align"
    for name, statement in CASES.items():  # warm the file-system cache once (not measured)
        run_case(statement, args.before if name.endswith("(--before checkout)") else None)
    inside = {name: [] for name in CASES}
    wall = {name: [] for name in CASES}
    version = []
    for _ in range(args.repeats):
        for name, statement in CASES.items():
            t_in, t_wall = run_case(statement, args.before if name.endswith("(--before checkout)") else None)
            inside[name].append(t_in)
            wall[name].append(t_wall)
        version.append(run_version())
    def where(pythonpath=None):  # which hf_align each case imported
        env = {**os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {})}
        return subprocess.run([sys.executable, "-c", "import os, hf_align; print(os.path.dirname(hf_align.__file__))"],
                              capture_output=True, text=True, check=True, env=env,
                              cwd=tempfile.gettempdir()).stdout.strip()

    med = {name: statistics.median(v) for name, v in inside.items()}
    med_wall = {name: statistics.median(v) for name, v in wall.items()}
    base = med["import torch, transformers"]
    result = {
        "command": "python benchmarks/import_time.py " + " ".join(sys.argv[1:]),
        "repeats": args.repeats,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "load_average_1min": os.getloadavg()[0]},
        "hf_align_imported_from": where(),
        "before_imported_from": where(args.before) if args.before else None,
        "median_import_s": med,
        "median_process_wall_s": med_wall,
        "all_import_s": inside,
        "hf_align_minus_torch_transformers_s": med["import hf_align"] - base,
        "registration_cost_on_first_pipeline_import_s": (med["import hf_align; from transformers import pipeline"]
                                                         - med["from transformers import pipeline (no hf_align)"]),
        "hf_align_version_wall_s": {"median": statistics.median(version), "all": version,
                                    "command": " ".join(os.path.basename(c) for c in version_command())},
    }
    result["targets_met"] = {"import <= torch+transformers + 1 s": result["hf_align_minus_torch_transformers_s"] <= 1.0,
                             "hf-align --version < 1 s": result["hf_align_version_wall_s"]["median"] < 1.0}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    lines = ["# Import time", "", f"Command: `{result['command']}` (median of {args.repeats} fresh processes per case, "
             f"cases interleaved; {result['machine']['cores']} cores, 1-min load average "
             f"{result['machine']['load_average_1min']:.1f} at the end).", "",
             "| case | import (s) | process wall (s) |", "| --- | ---: | ---: |"]
    lines += [f"| `{name}` | {med[name]:.3f} | {med_wall[name]:.3f} |" for name in CASES]
    lines += [f"| `{result['hf_align_version_wall_s']['command']}` | | {result['hf_align_version_wall_s']['median']:.3f} |", "",
              f"- `import hf_align` minus `import torch, transformers`: **{result['hf_align_minus_torch_transformers_s']:+.3f} s** "
              f"(target <= +1 s: {'met' if result['targets_met']['import <= torch+transformers + 1 s'] else 'NOT met'}).",
              f"- `hf-align --version`: **{result['hf_align_version_wall_s']['median']:.3f} s** (target < 1 s: "
              f"{'met' if result['targets_met']['hf-align --version < 1 s'] else 'NOT met'}).",
              f"- The registrations are paid where they are used: the first `from transformers import pipeline` costs "
              f"{result['registration_cost_on_first_pipeline_import_s']:+.3f} s more after `import hf_align` (the "
              "early-exit pipeline module and the multi-exit Auto classes are imported then)."]
    if args.before:
        before = med["import hf_align (--before checkout)"]
        lines.append(f"- Before (`{args.before}`, imported from `{result['before_imported_from']}`): `import hf_align` "
                     f"{before:.3f} s, {before - base:+.3f} s over `import torch, transformers`.")
    lines.append("")
    with open(args.out + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
