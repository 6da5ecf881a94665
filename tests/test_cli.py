import json
import os
import subprocess
import sys

import learnedopt
from learnedopt_cli import main


def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "learnedopt_cli", "--help"], capture_output=True, text=True)
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


TINY = ["--iterations", "1", "--horizon", "10", "--unroll", "10", "--meta-batch", "4", "--eval-every", "1",
        "--eval-tasks", "4", "--no-progress"]


def _one_line_error(capsys, args, match):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err and "Traceback" not in err, err
    return err


def test_a_finished_run_is_never_silently_replaced(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["meta-train", "--out", str(run), *TINY]) == 0
    before = (run / "checkpoint.pt").read_bytes()
    _one_line_error(capsys, ["meta-train", "--out", str(run), *TINY], "already holds a run: pass --resume")
    assert (run / "checkpoint.pt").read_bytes() == before
    assert main(["meta-train", "--out", str(run), *TINY, "--overwrite", "--seed", "1"]) == 0
    assert (run / "checkpoint.pt").read_bytes() != before


def test_resume_applies_a_new_meta_lr_and_says_so(tmp_path):
    import pytest

    run = tmp_path / "run"
    assert main(["meta-train", "--out", str(run), *TINY]) == 0
    more = [a if a != "1" or i != 1 else "2" for i, a in enumerate(TINY)]  # --iterations 2
    with pytest.warns(UserWarning, match="meta-lr 0.0001"):
        assert main(["meta-train", "--out", str(run), *more, "--resume", "--meta-lr", "1e-4"]) == 0
    import torch

    assert torch.load(run / "checkpoint.pt", weights_only=True)["meta_opt"]["param_groups"][0]["lr"] == 1e-4


def test_bad_devices_and_outputs_are_one_line_errors(tmp_path, capsys):
    import torch

    _one_line_error(capsys, ["meta-train", "--out", str(tmp_path / "a"), "--device", "cpuu"], "is not a device")
    if not torch.cuda.is_available():
        _one_line_error(capsys, ["meta-train", "--out", str(tmp_path / "a"), "--device", "cuda"], "no CUDA device")
        _one_line_error(capsys, ["benchmark", "--device", "cuda", "--out", str(tmp_path)], "no CUDA device")
        _one_line_error(capsys, ["maml", "train", "--out", str(tmp_path / "m"), "--device", "cuda"], "no CUDA device")
    file = tmp_path / "file"
    file.write_text("x")
    _one_line_error(capsys, ["meta-train", "--out", str(file), *TINY], "is a file")
    _one_line_error(capsys, ["protonet", "train", "--out", str(file)], "is a file")
    fewshot_run = tmp_path / "fewshot-run"
    fewshot_run.mkdir()
    (fewshot_run / "checkpoint.pt").write_bytes(b"an earlier run")
    _one_line_error(capsys, ["maml", "train", "--out", str(fewshot_run)], "already holds a run")
    assert (fewshot_run / "checkpoint.pt").read_bytes() == b"an earlier run"
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # as root, permissions do not bind: nothing to test
            _one_line_error(capsys, ["meta-train", "--out", str(locked / "run"), *TINY], "cannot write")
    finally:
        locked.chmod(0o700)


def test_corrupt_hostile_and_foreign_checkpoints_are_one_line_errors(tmp_path, capsys):
    import torch

    run = tmp_path / "run"
    assert main(["meta-train", "--out", str(run), *TINY]) == 0
    blob = bytearray((run / "checkpoint.pt").read_bytes())
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    weight = ckpt["net"]["cells.0.weight_ih"].numpy().tobytes()
    at = bytes(blob).find(weight[:64])
    assert at > 0
    blob[at + 8] ^= 0xFF  # flip bits inside a tensor's payload
    (run / "checkpoint.pt").write_bytes(bytes(blob))
    _one_line_error(capsys, ["meta-train", "--out", str(run), *TINY, "--resume"], "is corrupt")

    hostile = tmp_path / "hostile"
    hostile.mkdir()
    torch.save({"config": {}, "x": torch.nn.Linear(2, 2)}, hostile / "checkpoint.pt")  # pickled code
    err = _one_line_error(capsys, ["meta-train", "--out", str(hostile), *TINY, "--resume"], str(hostile))
    assert "weights_only" not in err

    fewshot = tmp_path / "fewshot"
    fewshot.mkdir()
    torch.save({"fewshot_config": {}, "model": {}}, fewshot / "checkpoint.pt")
    _one_line_error(capsys, ["meta-train", "--out", str(fewshot), *TINY, "--resume"], "not a meta-training checkpoint")


def test_every_generated_flag_defaults_to_its_config_field():
    """The command line with no optional flags builds exactly the library's default configs (issue 18)."""
    import dataclasses

    from learnedopt import MetaTrainConfig
    from learnedopt_cli import build_parser
    from learnedopt_cli.configargs import config_from_args, flag_defaults
    from learnedopt_experiments.baselines import FewShotConfig

    parser = build_parser()
    args = parser.parse_args(["meta-train", "--out", "x"])
    assert config_from_args(MetaTrainConfig, args, task="") == MetaTrainConfig()
    for algorithm in ("maml", "protonet", "matching"):
        args = parser.parse_args([algorithm, "train", "--out", "x"])
        assert config_from_args(FewShotConfig, args, algorithm=algorithm) == FewShotConfig(algorithm=algorithm)
    # and every flag that a config field generated parses to that field's default
    args = vars(parser.parse_args(["meta-train", "--out", "x"]))
    defaults = flag_defaults(MetaTrainConfig, {"net": {"inputs": "normalized", "output": "adam"}})
    del defaults["task"]  # --task names a registered family (default quadratic); the config's label follows it
    assert len(defaults) > 25 and all(args[k] == v for k, v in defaults.items())
    net_fields = {f.name: f.default for f in dataclasses.fields(learnedopt.LSTMConfig) if "help" in f.metadata}
    assert {k: args[k] for k in net_fields} == {**net_fields, "inputs": "normalized", "output": "adam"}


def test_estimator_choices_come_from_the_registry():
    from learnedopt import ESTIMATORS
    from learnedopt_cli import build_parser

    meta_train = next(a for a in build_parser()._subparsers._group_actions[0].choices["meta-train"]._actions
                      if a.dest == "estimator")
    assert meta_train.choices == list(ESTIMATORS)
