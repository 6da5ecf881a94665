"""The examples users copy keep working (reduced modes, run as users run them)."""

import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_meta_train_your_model_example_runs_and_compares_its_net(tmp_path):
    out = tmp_path / "my-cnn"
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "meta_train_your_model.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "net.pt").is_file() and (out / "checkpoint.pt").is_file()
    rows = [line.rsplit(maxsplit=1) for line in done.stdout.splitlines() if line.startswith("  ")]
    assert [name.strip().split(" (")[0] for name, _ in rows] == ["LearnedOptimizer", "LearnedOptimizer", "Adam"]
    assert all(math.isfinite(float(value)) and float(value) < math.log(10) for _, value in rows)  # below chance
