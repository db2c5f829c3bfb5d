"""launch/gpu_benchmark.sh without a GPU: it refuses at once, and every benchmark it would run parses.

Its commands run through $PYTHON, here a recorder that answers "a GPU is here" and writes down each
command instead of running it; the recorded recipe flags then go through the benchmark's own parser.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

from pipeline import cli

SCRIPT = ROOT / "launch" / "gpu_benchmark.sh"


def run_script(out: Path, python: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHON": python}
    return subprocess.run(
        ["bash", str(SCRIPT), str(out)], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT
    )


def test_without_a_gpu_it_stops_before_anything_runs(tmp_path):
    out = tmp_path / "gpu"
    proc = run_script(out, sys.executable)
    assert proc.returncode != 0
    assert "error: no GPU here" in proc.stderr and "recipes/benchmark.py" in proc.stderr
    assert not out.exists()  # nothing written, nothing measured


def test_each_benchmark_it_runs_is_one_the_recipe_accepts(tmp_path, recipe):
    log = tmp_path / "commands.txt"
    shim = tmp_path / "python"
    shim.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"with open({str(log)!r}, 'a') as log:\n    log.write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    shim.chmod(0o755)
    out = tmp_path / "gpu"
    proc = run_script(out, str(shim))
    assert proc.returncode == 0, proc.stderr
    commands = [json.loads(line) for line in log.read_text().splitlines()]
    runs = [c[1:] for c in commands if c and c[0] == "recipes/benchmark.py"]
    assert [run[run.index("--preset") + 1] for run in runs] == ["seed", "gpt2_small"]
    for args in runs:
        cfg = cli.parse(recipe.BenchmarkConfig, recipe.PRESETS, args)
        assert "compiled" in cfg.variants and "eager" in cfg.variants  # compile measured against eager
        assert "naive" in cfg.impls  # and the textbook code beside them
        assert Path(cfg.out).parent == out
    gpt2 = cli.parse(recipe.BenchmarkConfig, recipe.PRESETS, runs[1])
    assert "eager-foreach" in gpt2.variants and gpt2.model.n_layers == 12 and gpt2.data.seq_len == 1024
    assert ["-m", "torch.utils.collect_env"] in commands  # the machine's facts beside the figures
