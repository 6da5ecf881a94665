"""The GPU measurement scripts run end to end (on CPU, tiny sizes), so a lent GPU's minutes are not lost to a bug."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_transformer_step_benchmark_prints_both_optimizers():
    command = [sys.executable, str(ROOT / "benchmarks" / "transformer_step.py"), "--device", "cpu", "--layers", "1",
               "--width", "32", "--heads", "2", "--sequence", "16", "--vocab", "50", "--batch", "2", "--steps", "2",
               "--warmup", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "| AdamW(fused=False) | 2 |" in done.stdout and "| LearnedOptimizer (bfloat16 state) | 2 |" in done.stdout
    assert "whole training step" in done.stdout and "x (" in done.stdout.splitlines()[-1]
