"""How the non-model cost of the search grows with problems and simulations.

A fast deterministic generator and reward (tests/fakes.py) stand in for the model, so
what is timed is the engine itself: the Forest kernels, prompt building, bookkeeping,
answer checks and tree annotation. Non-model time = wall time minus the time inside the
generator and reward calls. Linear growth shows as a flat "us per problem-wave" column.

    .venv/bin/python benchmarks/search_scaling.py            # writes the RESULTS.md section
    .venv/bin/python benchmarks/search_scaling.py --quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._results import write_section  # noqa: E402
from mcts.config import SearchConfig  # noqa: E402
from mcts.search import Search  # noqa: E402
from tests.fakes import FakeGenerator, FakePRM, problems  # noqa: E402


def measure(n: int, budget: int, repeats: int) -> dict:
    cfg = SearchConfig(
        algorithm="mcts",
        token_budget=budget,
        step_max_tokens=4,
        min_step_tokens=2,
        max_depth=3,
        n_children=4,
        max_live_trees=n,
    )
    walls, model, waves = [], [], 0
    for _ in range(repeats):
        eng = Search(FakeGenerator(), FakePRM(), cfg)
        t0 = time.perf_counter()
        eng.run(problems(n))
        walls.append(time.perf_counter() - t0)
        model.append(eng.stats["generator_seconds"] + eng.stats["reward_seconds"])
        waves = eng.stats["waves"]
    non_model = statistics.median(w - m for w, m in zip(walls, model, strict=True))
    return {
        "problems": n,
        "budget": budget,
        "waves": waves,
        "non_model_s": non_model,
        "us_per_problem": 1e6 * non_model / n,
        "us_per_problem_wave": 1e6 * non_model / (n * max(1, waves)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    sizes = [8, 64, 256] if args.quick else [8, 64, 256, 1024]
    budgets = [40, 160] if args.quick else [40, 160, 640]
    repeats = 1 if args.quick else 3
    measure(8, 40, 1)  # warm the numba cache / JIT
    rows = []
    for budget in budgets:
        for n in sizes:
            r = measure(n, budget, repeats)
            rows.append(r)
            print(
                f"problems={n:5d} budget={budget:4d} waves={r['waves']:4d} "
                f"non-model={r['non_model_s']:.3f}s  {r['us_per_problem']:.0f} us/problem  "
                f"{r['us_per_problem_wave']:.1f} us/problem-wave",
                flush=True,
            )
    cmd = "python benchmarks/search_scaling.py" + (" --quick" if args.quick else "")
    lines = [
        "## Search overhead scaling",
        "",
        f"Command: `{cmd}` ({time.strftime('%Y-%m-%d %H:%M')}, 2 cores, load average "
        f"{os.getloadavg()[0]:.1f}). MCTS, K=4, fake generator and PRM from tests/fakes.py "
        f"(so only the engine is timed); median of {repeats}. Non-model time = wall time "
        "minus time inside generator and reward calls.",
        "",
        "| problems | token budget | waves | non-model s | us / problem | us / problem-wave |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['problems']} | {r['budget']} | {r['waves']} | {r['non_model_s']:.3f} "
            f"| {r['us_per_problem']:.0f} | {r['us_per_problem_wave']:.1f} |"
        )
    write_section("Search overhead scaling", "\n".join(lines[2:]))


if __name__ == "__main__":
    main()
