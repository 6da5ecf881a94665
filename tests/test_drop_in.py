"""The drop-in benchmark script runs end to end on synthetic loops and reuses its cache."""

import json
import subprocess
import sys
from pathlib import Path

import torch

import learnedopt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import drop_in
finally:
    sys.path.remove(str(ROOT / "benchmarks"))


def test_drop_in_benchmark_writes_a_report_and_reuses_cached_runs(tmp_path):
    args = [sys.executable, str(ROOT / "benchmarks" / "drop_in.py"), "--steps", "4", "--seeds", "1",
            "--loops", "regression-mlp", "lstm-copy", "rosenbrock-10d", "gru-char-text", "--nets", "general-lstm",
            "--out", str(tmp_path / "cache"), "--report", str(tmp_path / "drop_in.md")]
    first = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert first.returncode == 0, first.stderr
    report = (tmp_path / "drop_in.md").read_text()
    assert "| regression-mlp | 4 |" in report and "| lstm-copy | 4 |" in report and "tuned Adam" in report
    assert "| rosenbrock-10d | 4 |" in report and "| gru-char-text | 4 |" in report
    assert (tmp_path / "drop_in.png").stat().st_size > 0
    runs = json.loads((tmp_path / "cache" / "runs.json").read_text())
    tuning = [k for k in runs if k.split("|")[3] == "1000"]
    assert len(tuning) == 4 * (6 + 7 + 6)  # Adam's, NAG's and annealed Adam's grids on the tuning seed, every loop
    assert "| tuned Adam, annealed (lr) |" in report
    assert {k.split("|")[2] for k in runs if k.split("|")[3] == "0"} >= {"adam:0.001", drop_in.cache_name("net:general-lstm")}
    assert "## Time to target: `general-lstm` against tuned Adam" in report
    again = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0 and json.loads((tmp_path / "cache" / "runs.json").read_text()) == runs
    selection = subprocess.run([*args[:-2], "--selection", "--report", str(tmp_path / "selection.md")],
                               capture_output=True, text=True, cwd=ROOT)
    assert selection.returncode == 0, selection.stderr
    assert "| `general-lstm` |" in (tmp_path / "selection.md").read_text()
    tuned = json.loads((tmp_path / "cache" / "runs.json").read_text())
    assert set(tuned) - set(runs) == {k.replace("|0|", "|1000|") for k in runs
                                      if drop_in.cache_name("net:general-lstm") in k}  # only the net's new runs


def test_cache_keys_a_net_by_its_weights_not_its_path(tmp_path):
    net = learnedopt.load_net("general-lstm")
    learnedopt.save_net(net, tmp_path / "net.pt")
    same = drop_in.cache_name(f"net:{tmp_path / 'net.pt'}")
    assert same == drop_in.cache_name("net:general-lstm") and same.startswith("net#")
    with torch.no_grad():
        next(net.parameters()).add_(0.01)
    learnedopt.save_net(net, tmp_path / "net.pt")  # rewritten in place: its cached runs must not be reused
    drop_in.cache_name.cache_clear()
    assert drop_in.cache_name(f"net:{tmp_path / 'net.pt'}") != same
    assert drop_in.cache_name("adam:0.001") == "adam:0.001"


def test_run_key_names_annealing_only_where_it_acts():
    """A loop no longer than anneal_after runs identically with or without annealing, so it keeps one cache entry
    (the raw net's runs measured before annealing existed stay valid); a longer loop gets its own."""
    after = learnedopt.optimizer.ANNEAL_AFTER
    short, long = (drop_in.Loop("x", steps, torch.nn.Identity, lambda: None, "") for steps in (after, after + 1))
    net, raw = "net:general-lstm", "net:general-lstm@anneal=off"
    assert drop_in.run_key(short, net, 0) == drop_in.run_key(short, raw, 0)
    assert drop_in.run_key(long, net, 0) == drop_in.run_key(long, raw, 0).replace("|0|", f"~anneal{after}|0|")
    assert drop_in.run_key(long, "net:general-lstm@anneal=5000", 0) == drop_in.run_key(long, raw, 0)
    assert drop_in.optimizer_spec("net:general-lstm@anneal=500") == ("net", "general-lstm", 500)
    assert drop_in.optimizer_spec("adam:0.001") == ("adam", "0.001", None)
    assert drop_in.run_key(long, "adam:0.001@anneal=200", 0) != drop_in.run_key(long, "adam:0.001", 0)


def test_time_to_target_interpolates_between_evaluations():
    time_to = drop_in.time_to
    run = {"curve": [4.0, 2.0, 1.0, 1.5], "steps": [0, 10, 20, 30], "seconds": [0.0, 1.0, 2.0, 3.0]}
    assert time_to(run, 1.5) == 1.5 and time_to(run, 1.5, "steps") == 15.0
    assert time_to(run, 5.0) == 0.0 and time_to(run, 2.0) == 1.0
    assert time_to(run, 0.5) is None  # never reached
