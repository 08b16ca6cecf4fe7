"""The vLLM lane must fail, not skip, when vllm does not import (tests/test_vllm.py's guard).

scripts/vllm_cpu_env.sh exports MCTS_REQUIRE_VLLM=1 before running tests/test_vllm.py. Here,
in the main venv where vllm is absent, the same pytest command must fail with the guard's
message when the variable is set, and skip (as the main suite does) when it is not.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is not None, reason="vllm imports here: nothing to guard"
)


def _lane(require: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MCTS_REQUIRE_VLLM"}
    if require:
        env["MCTS_REQUIRE_VLLM"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "vllm"]
    return subprocess.run(
        [*cmd, "tests/test_vllm.py"], cwd=ROOT, env=env, capture_output=True, text=True
    )


def test_missing_vllm_fails_the_vllm_lane():
    out = _lane(require=True)
    assert out.returncode != 0, out.stdout
    assert "MCTS_REQUIRE_VLLM=1 (the vLLM lane) but vllm does not import" in out.stdout


def test_missing_vllm_still_skips_outside_the_lane():
    out = _lane(require=False)
    # a skipped module: pytest reports "1 skipped" (exit 5, nothing collected), no error
    assert out.returncode in (0, 5), out.stdout + out.stderr
    assert "1 skipped" in out.stdout and "MCTS_REQUIRE_VLLM" not in out.stdout


def test_the_lane_script_sets_the_variable():
    script = (ROOT / "scripts" / "vllm_cpu_env.sh").read_text()
    assert "export MCTS_REQUIRE_VLLM=1" in script
