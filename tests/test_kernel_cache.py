"""The compiled-kernel cache never loads a library that this package did not build there (issue 17, item 1).

Each test plants a library with the kernel's exported symbols whose constructor writes a marker file and whose
step moves every coordinate by 0.5 (5x the default net's bound): it must never run, and the step must stay the
torch ops' within rounding.
"""

import hashlib
import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

import learnedopt._kernel.build as kernel
from learnedopt import CoordinatewiseLSTM, LearnedOptimizer

pytestmark = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("cc", "gcc", "clang")), reason="no C compiler: the kernel cannot be built"
)

PLANTED = r"""
#include <stdint.h>
#include <stdio.h>
typedef struct { int64_t n; void *grad, *h, *c, *m, *v; float *update; } args_t;
__attribute__((constructor)) static void planted(void) { FILE *f = fopen(MARKER, "w"); if (f) fclose(f); }
int64_t lstm_step(const args_t *a, int threads) { for (int64_t i = 0; i < a->n; i++) a->update[i] = 0.5f; return 0; }
void cell_forward(const void *a) {}
void cell_backward(const void *a) {}
"""
BOUND = 1e-3 * 101  # lr * output_scale * (magnitude_range + 1) of this net at lr=1


def _net() -> CoordinatewiseLSTM:
    torch.manual_seed(0)
    net = CoordinatewiseLSTM(hidden_size=4, num_layers=1, inputs="normalized", output="adam", output_scale=1e-3)
    for p in net.parameters():
        p.data.normal_(0.0, 0.5)
    return net


@pytest.fixture
def net() -> CoordinatewiseLSTM:
    return _net()


@pytest.fixture
def first_use(monkeypatch):
    """Every call of ``step`` is a process's first use of the kernel."""
    def step(cache: Path, net: CoordinatewiseLSTM) -> tuple[float, list[str]]:
        monkeypatch.setenv("LEARNEDOPT_KERNEL_CACHE", str(cache))
        monkeypatch.setattr(kernel, "_LIBRARIES", {})
        monkeypatch.setattr(kernel, "_PRIVATE", [])
        torch.manual_seed(1)
        p, q = torch.nn.Parameter(torch.randn(500)), torch.nn.Parameter(torch.zeros(500))
        q.data.copy_(p.data)
        fused, ops = LearnedOptimizer([p], net=net, backend="kernel"), LearnedOptimizer([q], net=net, backend="torch")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                p.grad = torch.randn(500)
                q.grad = p.grad.clone()
                start = p.detach().clone()
                fused.step()
                ops.step()
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # the package's kernel ran, not the planted one
        return float((p.detach() - start).abs().max()), [str(w.message) for w in caught]

    return step


def _plant(path: Path, marker: Path, forge_manifest: bool) -> None:
    """Compile the hostile library to ``path``; with ``forge_manifest`` also write a manifest that vouches for it."""
    compiler = next(c for c in ("cc", "gcc", "clang") if shutil.which(c))
    source = path.parent / "planted.c"
    source.write_text(PLANTED)
    subprocess.run([compiler, "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(path), str(source)], check=True)
    source.unlink()
    if forge_manifest:
        manifest = path.with_suffix(".json")
        identity = json.loads(manifest.read_text())["identity"] if manifest.exists() else {}
        manifest.write_text(json.dumps({"identity": identity, "library_sha256": _sha256(path)}))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> Path:
    """A cache folder holding the net's library as the package builds it (built once for this file's tests)."""
    folder = tmp_path_factory.mktemp("genuine")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LEARNEDOPT_KERNEL_CACHE", str(folder))
        patch.setattr(kernel, "_LIBRARIES", {})
        p = torch.nn.Parameter(torch.zeros(3))
        p.grad = torch.ones(3)
        LearnedOptimizer([p], net=_net(), backend="kernel").step()
    return folder


def _built_before(cache: Path, genuine: Path) -> Path:
    """``cache`` as a process that built the library there earlier left it; returns the library's path."""
    shutil.copytree(genuine, cache)
    (library,) = cache.glob("lstm_step_*.so")
    return library


def test_a_library_planted_in_a_world_writable_cache_never_runs(tmp_path, net, first_use, genuine):
    cache, marker = tmp_path / "cache", tmp_path / "marker"
    library = _built_before(cache, genuine)  # a genuine manifest stays beside the planted library
    cache.chmod(0o1777)
    _plant(library, marker, forge_manifest=False)
    moved, messages = first_use(cache, net)
    assert not marker.exists() and moved <= BOUND
    assert sum("not loading compiled kernels" in m for m in messages) == 1, messages
    assert any("writable by other users" in m for m in messages)


def test_a_planted_library_replacing_a_cached_one_never_runs(tmp_path, net, first_use, genuine):
    cache, marker = tmp_path / "cache", tmp_path / "marker"
    built = _built_before(cache, genuine)
    cache.chmod(0o777)  # the cache became writable by others: someone swapped the library and its manifest
    _plant(built, marker, forge_manifest=True)
    moved, messages = first_use(cache, net)
    assert not marker.exists() and moved <= BOUND
    assert any("not loading compiled kernels" in m for m in messages)


def test_a_cache_inside_a_folder_others_can_write_is_not_private(tmp_path, net, first_use):
    """Another user could rename the private cache folder away and put their own in its place."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # not sticky, unlike /tmp
    _, messages = first_use(shared / "cache", net)
    assert any("not loading compiled kernels" in m and str(shared) in m for m in messages), messages
    assert not list((shared / "cache").glob("*.so"))


def test_in_a_private_cache_only_the_library_built_there_is_loaded(tmp_path, net, first_use, genuine):
    """A planted file without a manifest, with a manifest of other bytes, or writable by others is rebuilt."""
    cache, marker = tmp_path / "cache", tmp_path / "marker"
    built = _built_before(cache, genuine)
    genuine = json.loads(built.with_suffix(".json").read_text())
    for tamper in ("no manifest", "other bytes", "writable by others", "other build identity"):
        _plant(built, marker, forge_manifest=tamper in ("writable by others", "other build identity"))
        if tamper == "no manifest":
            built.with_suffix(".json").unlink()
        if tamper == "writable by others":
            built.chmod(0o666)
        if tamper == "other build identity":
            manifest = json.loads(built.with_suffix(".json").read_text())
            manifest["identity"] = {**genuine["identity"], "flags": "-O0"}
            built.with_suffix(".json").write_text(json.dumps(manifest))
        moved, messages = first_use(cache, net)
        assert not marker.exists() and moved <= BOUND, tamper
        if tamper == "writable by others":  # said once; a stale or unvouched file is rebuilt silently
            assert len(messages) == 1 and "mode 666" in messages[0], messages
        else:
            assert not messages, (tamper, messages)
        assert _sha256(built) == json.loads(built.with_suffix(".json").read_text())["library_sha256"]


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_a_library_owned_by_another_user_is_not_loaded_by_root(tmp_path, net, first_use, genuine):
    cache, marker = tmp_path / "cache", tmp_path / "marker"
    built = _built_before(cache, genuine)
    _plant(built, marker, forge_manifest=True)
    os.chown(built, 65534, 65534)
    moved, messages = first_use(cache, net)
    assert not marker.exists() and moved <= BOUND
    assert len(messages) == 1 and "owner uid 65534" in messages[0], messages
    assert built.stat().st_uid == 0  # rebuilt by this user


def test_a_garbage_library_is_rebuilt_once_not_warned_about_forever(tmp_path, net, first_use, genuine):
    cache = tmp_path / "cache"
    built = _built_before(cache, genuine)
    built.write_bytes(b"\x7fELF not really")
    _, messages = first_use(cache, net)
    assert not messages
    rebuilt = built.stat().st_mtime_ns
    _, messages = first_use(cache, net)  # the next process loads the rebuilt library as it is
    assert not messages and built.stat().st_mtime_ns == rebuilt


def test_cache_folders_are_created_private_whatever_the_umask(tmp_path, net, first_use):
    previous = os.umask(0o002)
    try:
        first_use(tmp_path / "a" / "b" / "cache", net)
    finally:
        os.umask(previous)
    for folder in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "cache"):
        assert folder.stat().st_mode & 0o777 == 0o700, folder
    assert not [p for p in (tmp_path / "a" / "b" / "cache").iterdir() if p.name.startswith(".")]  # no leftovers
