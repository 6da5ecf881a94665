"""The wheel installs nothing under a top-level name that a published package owns (issue 18): `baselines` is
OpenAI Baselines' import name, so the experiments install as learnedopt_experiments.baselines / .meta_train."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the checkout's files (a stale build/ folder would leak into the wheel)."""
    out, source = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("source")
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    for name in listed:
        if (ROOT / name).is_file() and not name.startswith("results/"):
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(out), str(source)], capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "No module named" in done.stderr:
        pytest.skip(f"cannot build a wheel here: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr
    return next(out.glob("learnedopt-*.whl"))


@pytest.mark.multiprocess
def test_the_wheel_has_only_this_projects_top_level_names(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"learnedopt", "learnedopt_cli", "learnedopt_experiments"}, top
    assert "learnedopt/_kernel/lstm_kernel.c" in names and "learnedopt/pretrained/general-lstm.pt" in names
    assert "learnedopt_experiments/baselines/maml.py" in names and "learnedopt_experiments/meta_train/tasks.py" in names


@pytest.mark.multiprocess
def test_installs_beside_a_package_named_baselines(wheel, tmp_path):
    site, theirs = tmp_path / "site", tmp_path / "theirs"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (theirs / "baselines").mkdir(parents=True)
    (theirs / "baselines" / "__init__.py").write_text("OWNER = 'openai'\n")
    check = (
        "import baselines, learnedopt, learnedopt_experiments.baselines as ours, learnedopt_cli, torch\n"
        "from learnedopt_experiments.data import candidate_roots\n"
        f"assert baselines.OWNER == 'openai' and learnedopt.__file__.startswith({str(site)!r}), learnedopt.__file__\n"
        "assert ours.FewShotConfig().ways == 5\n"
        "assert all('site' not in str(root) for root, _ in candidate_roots()), candidate_roots()\n"
        "p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)\n"
        f"learnedopt.LearnedOptimizer([p], backend={'kernel' if shutil.which('cc') else 'auto'!r}).step()\n"
        "print('ok')\n"
    )
    env = {"PYTHONPATH": f"{theirs}:{site}", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
