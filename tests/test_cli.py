import json
import subprocess
import sys

from learnedopt.cli import main


def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "learnedopt.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("meta-train", "demo", "benchmark", "pretrained"):
        assert command in out.stdout


def test_meta_train_then_benchmark_then_plot_only(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["meta-train", "--out", str(run), "--iterations", "2", "--horizon", "20", "--unroll", "10",
            "--meta-batch", "8", "--eval-every", "2", "--no-progress"]
    assert main(args) == 0
    assert (run / "net.pt").is_file() and (run / "checkpoint.pt").is_file() and any((run / "tb").iterdir())
    assert main(args + ["--resume"]) == 0  # already finished: resumes and stops at once

    out = tmp_path / "bench"
    bench = ["benchmark", "--net", str(run), "--steps", "10", "--tasks", "20", "--baselines", "Adam,NAG",
             "--out", str(out), "--name", "b"]
    assert main(bench) == 0
    payload = json.loads((out / "b.json").read_text())
    assert set(payload["finals"]) == {str(run), "Adam", "NAG"} and len(payload["finals"]["Adam"]) == 20
    assert len(payload["quartiles"]["Adam"]) == 3 and len(payload["quartiles"]["Adam"][1]) == 11
    assert (out / "b.png").stat().st_size > 0 and "| Adam |" in (out / "b.md").read_text()
    (out / "b.png").unlink()
    assert main(bench + ["--plot-only"]) == 0 and (out / "b.png").is_file()


def test_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["benchmark", "--plot-only", "--out", str(tmp_path)]) == 2
    assert "run the benchmark once" in capsys.readouterr().err
    assert main(["benchmark", "--baselines", "Adamm", "--out", str(tmp_path)]) == 2
    assert "unknown baselines" in capsys.readouterr().err
    assert main(["meta-train", "--task", "nope", "--out", str(tmp_path)]) == 2
    assert "choose one of" in capsys.readouterr().err
