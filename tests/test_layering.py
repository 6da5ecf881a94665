"""Dependencies point one way: engine <- meta-training library (both in learnedopt) <- experiments <- CLI.

The folders show the layers: ``learnedopt/`` top-level modules, ``learnedopt/lstm/`` and ``learnedopt/_kernel/``
are the engine; ``learnedopt/meta/`` is the meta-training library; ``meta_train/`` and ``baselines/`` (installed as
``learnedopt_experiments.meta_train`` and ``.baselines``) are the experiments; ``learnedopt_cli`` is the top.
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = "learnedopt_experiments"
ABOVE_LIBRARY = {EXPERIMENTS, "learnedopt_cli", "benchmarks", "tests", "meta_train", "baselines"}
ENGINE_FILES = [*ROOT.glob("learnedopt/*.py"), *ROOT.glob("learnedopt/lstm/*.py"), *ROOT.glob("learnedopt/_kernel/*.py")]
# the package's __init__ re-exports the meta-training library's public names: the one engine file allowed to
ENGINE_FILES = [p for p in ENGINE_FILES if p != ROOT / "learnedopt" / "__init__.py"]
FOLDERS = {"meta_train": f"{EXPERIMENTS}.meta_train", "baselines": f"{EXPERIMENTS}.baselines"}  # as installed


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every module a file imports, anywhere in it (also inside functions), as absolute dotted names."""
    parts = list(path.relative_to(root).with_suffix("").parts[:-1])
    if parts and parts[0] in FOLDERS:
        parts = FOLDERS[parts[0]].split(".") + parts[1:]
    package = ".".join(parts)
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_the_library_imports_nothing_above_it():
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if m.split(".")[0] in ABOVE_LIBRARY)
        for path in (ROOT / "learnedopt").rglob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_the_engine_imports_nothing_of_the_meta_training_library():
    assert len(ENGINE_FILES) > 15
    for path in ENGINE_FILES:
        imported = imported_modules(path)
        assert not {m for m in imported if m.startswith("learnedopt.meta")}, path


def test_the_kernel_is_private_to_the_lstm():
    for path in (ROOT / "learnedopt").rglob("*.py"):
        if path.parent.name in ("lstm", "_kernel"):
            continue
        assert not {m for m in imported_modules(path) if m.startswith("learnedopt._kernel")}, path


def test_experiment_packages_do_not_import_the_command_line_or_each_other():
    for folder, forbidden in (("meta_train", {"learnedopt_cli", f"{EXPERIMENTS}.baselines"}),
                              ("baselines", {"learnedopt_cli", f"{EXPERIMENTS}.meta_train"})):
        for path in (ROOT / folder).rglob("*.py"):
            imported = imported_modules(path)
            assert not {m for m in imported if any(m == f or m.startswith(f + ".") for f in forbidden)}, path
            assert not {m for m in imported if m.split(".")[0] in FOLDERS}, path  # only the installed names


def test_importing_the_library_loads_no_experiment_code():
    code = "import sys, learnedopt, learnedopt.meta; print(sorted({m.split('.')[0] for m in sys.modules}))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert not ABOVE_LIBRARY & set(eval(loaded))


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The graph test can fail: a lazy upward import in a function is found, and relative imports resolve."""
    bad = tmp_path / "learnedopt" / "lstm" / "probe.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("def f():\n    from learnedopt_experiments.meta_train.tasks import get_family\n"
                   "    from ..meta.tasks import Task\n")
    found = imported_modules(bad, root=tmp_path)
    assert "learnedopt_experiments.meta_train.tasks" in found and "learnedopt.meta.tasks" in found


def test_files_and_classes_stay_small():
    """The longest file in learnedopt/ is under ~400 lines and no class over ~200 (issue 18)."""
    for path in (ROOT / "learnedopt").rglob("*.py"):
        text = path.read_text()
        assert len(text.splitlines()) <= 400, path
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno - node.lineno < 200, f"{path}: class {node.name}"
