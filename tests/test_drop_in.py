"""The drop-in benchmark script runs end to end on synthetic loops and reuses its cache."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_drop_in_benchmark_writes_a_report_and_reuses_cached_runs(tmp_path):
    args = [sys.executable, str(ROOT / "benchmarks" / "drop_in.py"), "--steps", "4", "--seeds", "1",
            "--loops", "regression-mlp", "lstm-copy", "--nets", "general-lstm",
            "--out", str(tmp_path / "cache"), "--report", str(tmp_path / "drop_in.md")]
    first = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert first.returncode == 0, first.stderr
    report = (tmp_path / "drop_in.md").read_text()
    assert "| regression-mlp | 4 |" in report and "| lstm-copy | 4 |" in report and "tuned Adam" in report
    assert (tmp_path / "drop_in.png").stat().st_size > 0
    runs = json.loads((tmp_path / "cache" / "runs.json").read_text())
    tuning = [k for k in runs if k.endswith("|1000")]
    assert len(tuning) == 2 * (6 + 7)  # Adam's and NAG's grids on the tuning seed, for both loops
    assert {k.split("|")[2] for k in runs if k.endswith("|0")} >= {"adam:0.001", "net:general-lstm"}
    again = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0 and json.loads((tmp_path / "cache" / "runs.json").read_text()) == runs
