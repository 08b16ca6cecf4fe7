"""Thread defaults: llama.cpp's n_threads, and the scope of libgomp's spin count (mcts.kernels)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mcts.generators import llama_cpp as L

ROOT = Path(__file__).resolve().parents[1]


def test_usable_cores_is_the_process_affinity(monkeypatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert L.usable_cores() == 3


def test_usable_cores_falls_back_to_cpu_count(monkeypatch) -> None:
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 7)
    assert L.usable_cores() == 7
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert L.usable_cores() == 1


def test_config_default_is_usable_cores() -> None:
    assert L.LlamaCppConfig().n_threads is None
    cfg = yaml.safe_load((ROOT / "configs/generator/llama_cpp.yaml").read_text())
    assert cfg["n_threads"] is None


class _Stop(Exception):
    pass


@pytest.mark.parametrize(("n_threads", "expected"), [(None, 3), (1, 1), (4, 4)])
def test_generator_threads(monkeypatch, tmp_path, n_threads, expected) -> None:
    """None resolves to the affinity (3 of 64 cores here); an explicit n_threads wins."""
    llama_cpp = pytest.importorskip("llama_cpp")
    seen: dict = {}

    def fake_llama(**kw):
        seen.update(kw)
        raise _Stop

    monkeypatch.setattr(llama_cpp, "Llama", fake_llama)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="could not be loaded"):
        L.LlamaCppGenerator(L.LlamaCppConfig(model_path=str(model), n_threads=n_threads))
    assert (seen["n_threads"], seen["n_threads_batch"]) == (expected, expected)


def _fresh_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run code in a new interpreter (this one has imported mcts.kernels already)."""
    e = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    e.update(env, OMP_DISPLAY_ENV="VERBOSE")  # libgomp prints its settings when it loads
    return subprocess.run(
        [sys.executable, "-c", code],
        env=e,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )


def _libgomp_spincount(stderr: str) -> str:
    if "OPENMP DISPLAY ENVIRONMENT" not in stderr:
        pytest.skip("numba without its omp layer (libgomp): no spin count to scope")
    (line,) = [x for x in stderr.splitlines() if x.strip().startswith("GOMP_SPINCOUNT =")]
    return line.split("=", 1)[1].strip().strip("'")


def test_kernels_import_leaves_environ_unchanged_but_tunes_libgomp() -> None:
    out = _fresh_python("import os, mcts.kernels; print(os.environ.get('GOMP_SPINCOUNT'))")
    assert out.stdout.strip() == "None"  # child processes do not inherit it
    from mcts.kernels import GOMP_SPINCOUNT

    assert _libgomp_spincount(out.stderr) == GOMP_SPINCOUNT  # this process's libgomp took it


def test_kernels_import_keeps_a_user_spincount() -> None:
    code = (
        "import os, numba, mcts.kernels; numba.get_num_threads(); "
        "print(os.environ.get('GOMP_SPINCOUNT'))"
    )
    out = _fresh_python(code, GOMP_SPINCOUNT="2500")
    assert out.stdout.strip() == "2500"
    assert _libgomp_spincount(out.stderr) == "2500"


def test_llama_cpp_generator_gets_the_spincount_first(tmp_path) -> None:
    """llama.cpp's ggml loads libgomp too: the generator has mcts.kernels load it first."""
    pytest.importorskip("llama_cpp")
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    code = f"""
import os
from mcts.generators.llama_cpp import LlamaCppConfig, LlamaCppGenerator
try:
    LlamaCppGenerator(LlamaCppConfig(model_path={str(model)!r}))
except ValueError:
    pass
print(os.environ.get('GOMP_SPINCOUNT'))
"""
    out = _fresh_python(code)
    assert out.stdout.strip() == "None"
    from mcts.kernels import GOMP_SPINCOUNT

    assert _libgomp_spincount(out.stderr) == GOMP_SPINCOUNT


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_after_import_can_run_parallel_kernels() -> None:
    """Importing mcts.kernels loads libgomp but does not launch numba's omp pool: its fork
    guard would kill a forked child that runs a parallel kernel."""
    code = """
import os
import numpy as np
import mcts.kernels
from numba import njit, prange

@njit(parallel=True)
def total(a):
    s = 0.0
    for i in prange(a.size):
        s += a[i]
    return s

pid = os.fork()
if pid == 0:
    os._exit(0 if total(np.ones(64)) == 64.0 else 1)
print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""
    assert _fresh_python(code).stdout.strip() == "0"
