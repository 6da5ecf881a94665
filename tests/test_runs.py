"""Runs survive NaN tasks, Ctrl-C, SIGTERM, SIGKILL, a full disk and a second process (issue 17, items 2 and 5)."""

import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import learnedopt
from learnedopt import MetaTrainConfig, MetaTrainer, load_net
from learnedopt.pretrained import load_file
from learnedopt.meta.runs import MetaTrainingDiverged, hold_run_folder
from learnedopt_cli import main
from learnedopt_experiments.meta_train.tasks import get_family

ROOT = Path(__file__).resolve().parents[1]
QUICK = dict(task="quadratic", horizon=20, unroll=10, meta_batch=8, eval_every=1000, checkpoint_every=3,
             eval_tasks=8, eval_lengths=(20,))
QUICK_FLAGS = ["--task", "quadratic", "--horizon", "20", "--unroll", "10", "--meta-batch", "8", "--eval-every", "1000",
               "--checkpoint-every", "3", "--eval-tasks", "8", "--eval-lengths", "20", "--no-progress"]


def _nan_family(nan_rows: int) -> learnedopt.ModuleFamily:
    """A linear-regression family whose first ``nan_rows`` examples are NaN: batches holding them give NaN losses."""
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(1024, 4, generator=generator), torch.randn(1024, 1, generator=generator)
    x[:nan_rows] = float("nan")
    return learnedopt.ModuleFamily(lambda: torch.nn.Linear(4, 1), (x, y), torch.nn.functional.mse_loss, 8,
                                   name="sometimes-nan", eval_examples=256)


def _all_finite(path: Path) -> bool:
    blob = load_file(path, "file")
    weights = blob["net"] if "net" in blob else blob["state_dict"]
    return all(torch.isfinite(t).all() for t in weights.values())


def test_non_finite_meta_gradients_are_skipped_counted_and_never_saved(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    settings = dict(iterations=6, horizon=20, unroll=5, meta_batch=4, eval_every=3, eval_tasks=4, checkpoint_every=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = learnedopt.meta_train(_nan_family(1), tmp_path, progress=False, **settings)
    messages = [str(w.message) for w in caught if "skipped a meta-step" in str(w.message)]
    assert len(messages) == 1, messages  # said once
    assert all(torch.isfinite(p).all() for p in net.parameters())
    for name in ("net.pt", "last.pt", "checkpoint.pt"):
        assert _all_finite(tmp_path / name), name
    skipped = load_file(tmp_path / "checkpoint.pt", "checkpoint")["finite_steps"]["skipped"]
    assert 1 <= skipped < 6 * 4  # some truncations had a NaN batch, most did not
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert events.Scalars("meta/skipped_steps")[-1].value == skipped
    trained, initial = load_net(tmp_path / "last.pt"), MetaTrainer(_nan_family(1), MetaTrainConfig(**settings),
                                                                   tmp_path / "fresh", progress=False).net
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), initial.parameters()))  # it trained


def test_a_task_that_is_always_nan_stops_the_run_naming_the_iteration(tmp_path, capsys):
    settings = dict(iterations=6, horizon=20, unroll=5, meta_batch=4, eval_every=3, eval_tasks=4, max_skipped=6)
    with pytest.warns(UserWarning, match="skipped a meta-step"):
        with pytest.raises(MetaTrainingDiverged, match=r"diverged at iteration 2: 6 meta-steps in a row"):
            learnedopt.meta_train(_nan_family(1024), tmp_path, progress=False, **settings)
    for path in tmp_path.glob("*.pt"):
        assert _all_finite(path), path


def _spawn(out: Path, *flags: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "learnedopt_cli", "--threads", "1", "meta-train", "--out", str(out), *flags]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # SIGINT back to its default in the child: a test run started in the background (nohup, `&`) ignores it, the
    # child would inherit that, and Python turns SIGINT into KeyboardInterrupt only where it is not ignored
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_until_training(out: Path, process: subprocess.Popen, extra: float) -> None:
    """Until ``process`` wrote its first periodic checkpoint, then ``extra`` seconds more."""
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").is_file():
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.05)
    time.sleep(extra)


def _uninterrupted(tmp_path: Path, iterations: int) -> MetaTrainer:
    trainer = MetaTrainer(get_family("quadratic"), MetaTrainConfig(iterations=iterations, **QUICK),
                          tmp_path / f"uninterrupted-{iterations}", progress=False)
    trainer.train()
    return trainer


def _assert_same_run(resumed: Path, reference: MetaTrainer) -> None:
    ckpt = load_file(resumed / "checkpoint.pt", "checkpoint")
    assert ckpt["iteration"] == reference.iteration
    for key, value in reference.net.state_dict().items():
        assert torch.equal(ckpt["net"][key], value), key
    for index, state in reference.meta_opt.state_dict()["state"].items():
        assert torch.equal(ckpt["meta_opt"]["state"][index]["exp_avg_sq"], state["exp_avg_sq"])
    assert torch.equal(ckpt["generator"], reference.generator.get_state())


@pytest.mark.multiprocess
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGKILL, -9)])
def test_a_stopped_run_resumes_bit_identical_to_an_uninterrupted_one(tmp_path, signum, code):
    """Ctrl-C and SIGTERM write the resume point at once and say so in one line; after SIGKILL the last periodic
    checkpoint is the resume point. Either way, resuming ends exactly where an uninterrupted run does."""
    out = tmp_path / "run"
    process = _spawn(out, *QUICK_FLAGS, "--iterations", "100000")
    _wait_until_training(out, process, extra=1.0)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    stopped = load_file(out / "checkpoint.pt", "checkpoint")["iteration"]
    if signum != signal.SIGKILL:
        lines = stderr.strip().splitlines()
        assert "Traceback" not in stderr and len(lines) == 1, stderr
        assert re.fullmatch(rf"learnedopt: interrupted at iteration {stopped}; continue with --resume .*", lines[0])
    assert stopped >= 3
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert main(["--threads", "1", "meta-train", "--out", str(out), *QUICK_FLAGS, "--resume",
                 "--iterations", str(stopped + 2)]) == 0
    _assert_same_run(out, _uninterrupted(tmp_path, stopped + 2))


@pytest.mark.parametrize("command", [
    ["meta-train", *QUICK_FLAGS, "--iterations", "1"],
    ["maml", "train", "--dataset", "sinusoid", "--iterations", "1", "--no-progress"],
    ["protonet", "train", "--iterations", "1", "--no-progress"],
])
def test_a_folder_in_use_by_another_run_is_refused_in_one_line(tmp_path, capsys, command):
    out = tmp_path / "run"
    with hold_run_folder(out):
        assert main([*command, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{out} is in use by process {os.getpid()}" in err, err
    assert not (out / "checkpoint.pt").exists()


@pytest.mark.multiprocess
def test_two_processes_started_at_once_on_one_folder(tmp_path):
    """One trains; the other refuses in one line (the folder is in use, or, if it came late, already holds a run)."""
    out = tmp_path / "run"
    processes = [_spawn(out, *QUICK_FLAGS, "--iterations", "40") for _ in range(2)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in processes]
    assert sorted(code for code, _ in results) == [0, 2], results
    (refusal,) = [err.strip() for code, err in results if code == 2]
    assert "\n" not in refusal and ("is in use by process" in refusal or "already holds a run" in refusal), refusal
    assert load_file(out / "checkpoint.pt", "checkpoint")["iteration"] == 40
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def _tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


@pytest.mark.multiprocess
@pytest.mark.parametrize("disk", ["tmpfs", "file-size limit"])
def test_a_full_disk_is_one_line_and_leaves_the_previous_checkpoint_resumable(tmp_path, disk):
    out = tmp_path / "disk" / "run"
    if disk == "tmpfs" and not _tmpfs(tmp_path / "disk", "3m"):
        pytest.skip("mounting a tmpfs needs root (or CAP_SYS_ADMIN)")
    try:
        flags = [*QUICK_FLAGS, "--checkpoint-every", "1"]
        assert main(["--threads", "1", "meta-train", "--out", str(out), *flags, "--iterations", "2"]) == 0
        before = (out / "checkpoint.pt").read_bytes()
        script = "import sys, learnedopt_cli; sys.exit(learnedopt_cli.main(sys.argv[1:]))"
        if disk == "tmpfs":  # fill it, but for a few kilobytes
            filler = out.parent / "filler"
            with open(filler, "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * 4096)
                except OSError:
                    pass
            os.truncate(filler, filler.stat().st_size - 40_000)
        else:  # files may grow to 60 kB: last.pt fits, checkpoint.pt (~80 kB) does not
            script = ("import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                      "resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000)); " + script)
        resumed = [sys.executable, "-c", script, "--threads", "1", "meta-train", "--out", str(out), *flags,
                   "--resume", "--iterations", "4"]
        done = subprocess.run(resumed, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 2, done.stderr
        error = [line for line in done.stderr.splitlines() if line.startswith("learnedopt: error")]
        assert len(error) == 1 and "Traceback" not in done.stderr, done.stderr
        cause = "No space left on device" if disk == "tmpfs" else "File too large"
        assert re.search(rf"could not write {re.escape(str(out))}/\S+\.pt: {cause}; the previous", error[0]), error
        assert (out / "checkpoint.pt").read_bytes() == before  # intact
        assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # no leftovers
        if disk == "tmpfs":
            filler.unlink()
        assert main(["--threads", "1", "meta-train", "--out", str(out), *flags, "--resume", "--iterations", "4"]) == 0
        reference = MetaTrainer(get_family("quadratic"), MetaTrainConfig(iterations=4, **{**QUICK, "checkpoint_every": 1}),
                                tmp_path / "reference", progress=False)
        reference.train()
        _assert_same_run(out, reference)
    finally:
        if disk == "tmpfs":
            subprocess.run(["umount", str(tmp_path / "disk")], capture_output=True)


def test_a_diverged_run_is_one_line_on_the_command_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "nan_tasks_cli.py").write_text(
        "import torch, learnedopt\n"
        "def make_family():\n"
        "    x, y = torch.full((64, 4), float('nan')), torch.zeros(64, 1)\n"
        "    return learnedopt.ModuleFamily(lambda: torch.nn.Linear(4, 1), (x, y), torch.nn.functional.mse_loss, 8,\n"
        "                                   name='always-nan', eval_examples=32)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["--threads", "1", "meta-train", "--task", "nan_tasks_cli:make_family", "--out", str(tmp_path / "run"),
            "--iterations", "4", "--horizon", "10", "--unroll", "5", "--meta-batch", "2", "--eval-tasks", "2",
            "--max-skipped", "3", "--no-progress"]
    with pytest.warns(UserWarning, match="skipped a meta-step"):
        assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("learnedopt: error: meta-training diverged at iteration 2: 3 meta-steps in a row"), err
    assert "\n" not in err and "Traceback" not in err
