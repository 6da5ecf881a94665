"""Dependencies point one way: engine <- meta-training library (both in learnedopt) <- experiments <- CLI."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ABOVE_LIBRARY = {"meta_train", "baselines", "learnedopt_cli", "benchmarks", "tests"}
# the engine: the update-rule core, the optimizer, the unroll and what it needs; never the meta-training library
ENGINE = {"rules", "lstm", "kernel", "optimizer", "unroll", "estimators", "pretrained"}
META_TRAINING = {"tasks", "trainer", "evaluation", "imitation", "distributed", "data", "runs"}


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every module a file imports, anywhere in it (also inside functions), as absolute dotted names."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
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
    for name in ENGINE:
        imported = imported_modules(ROOT / "learnedopt" / f"{name}.py")
        assert not {m for m in imported if m.startswith("learnedopt.") and m.split(".")[1] in META_TRAINING}, name


def test_experiment_packages_do_not_import_the_command_line_or_each_other():
    for package, forbidden in (("meta_train", {"learnedopt_cli", "baselines"}), ("baselines", {"learnedopt_cli", "meta_train"})):
        for path in (ROOT / package).rglob("*.py"):
            assert not {m for m in imported_modules(path) if m.split(".")[0] in forbidden}, path


def test_importing_the_library_loads_no_experiment_code():
    code = "import sys, learnedopt, learnedopt.data; print(sorted({m.split('.')[0] for m in sys.modules}))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert not ABOVE_LIBRARY & set(eval(loaded))


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The graph test can fail: a lazy upward import in a function is found."""
    bad = tmp_path / "learnedopt" / "probe.py"
    bad.parent.mkdir()
    bad.write_text("def f():\n    from meta_train.tasks import get_family\n    from .tasks import Task\n")
    found = imported_modules(bad, root=tmp_path)
    assert "meta_train.tasks" in found and "learnedopt.tasks" in found
