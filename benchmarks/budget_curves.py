"""Accuracy of the selected answer against generated tokens, per search method.

One command runs every method at every budget on the same problems with the same model
and reward, and writes:
  benchmarks/out/budget_curves.csv   one row per (method, budget)
  benchmarks/out/budget_curves.png   accuracy vs mean generated tokens, a line per method
  the "Budget curves" section of benchmarks/RESULTS.md (with the command)

Accuracy is the ONE answer each method selects (95% Wilson interval); pass@k of the tree is
reported beside it, never instead. The reward is the policy model's own judge (no reference
answer at search time). Engine efficiency (calls per wave, batch size, prefix-cache hit
rate, tokens/s) and search overhead (share of wall time outside model calls) come from the
same runs.

    .venv/bin/python benchmarks/budget_curves.py --quick        # ~5 min on 2 cores
    .venv/bin/python benchmarks/budget_curves.py                # 100 problems, 4 budgets
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._results import write_section  # noqa: E402
from mcts.config import SearchConfig  # noqa: E402
from mcts.search import search  # noqa: E402

METHODS = {
    "mcts": {"algorithm": "mcts"},
    "rest_mcts": {"algorithm": "rest_mcts"},
    "bon_orm": {"algorithm": "best_of_n", "bon_aggregation": "orm_max"},
    "bon_prm": {"algorithm": "best_of_n", "bon_aggregation": "prm_max"},
    "bon_wvote": {"algorithm": "best_of_n", "bon_aggregation": "weighted_vote"},
    "self_consistency": {"algorithm": "self_consistency"},
    "beam": {"algorithm": "beam", "beam_width": 2, "beam_expansions": 2},
    "dvts": {"algorithm": "dvts", "beam_width": 2, "beam_expansions": 2},
}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def run(args: argparse.Namespace) -> list[dict]:
    from mcts.generators.factory import make_generator
    from mcts.tasks import load_task
    from rewards.factory import make_reward

    task = {
        "source": "reasoning_gym",
        "name": "basic_arithmetic",
        "size": args.problems,
        "seed": args.seed,
        "params": {
            "min_terms": 2,
            "max_terms": 2,
            "min_digits": 1,
            "max_digits": 1,
            "operators": ["+"],
        },
    }
    problems = load_task(task)
    gen = make_generator({"backend": "llama_cpp", "n_threads": args.n_threads})
    reward = make_reward({"name": "judge"}, gen)
    rows = []
    for budget in args.budgets:
        for name in args.methods:
            kw = dict(METHODS[name])
            cfg = SearchConfig(
                token_budget=budget,
                step_max_tokens=args.step_tokens,
                solution_max_tokens=min(budget, args.solution_tokens),
                min_step_tokens=8,
                max_depth=6,
                n_children=args.k,
                samples_per_wave=args.k,
                seed=args.seed,
                max_live_trees=args.problems,
                **kw,
            )
            t0 = time.perf_counter()
            res = search(problems, gen, reward, cfg)
            wall = time.perf_counter() - t0
            s = res.summary
            n = len(res.results)
            k = sum(r.correct for r in res.results)
            lo, hi = wilson(k, n)
            gen_tok = s["generated_tokens_per_problem"] * n
            row = {
                "method": name,
                "budget": budget,
                "problems": n,
                "accuracy": k / n,
                "ci_low": lo,
                "ci_high": hi,
                "pass_at_k": s["pass_at_k"],
                "gen_tokens_per_problem": s["generated_tokens_per_problem"],
                "reward_tokens_per_problem": s["reward_tokens_per_problem"],
                "generator_calls": s["generator_calls"],
                "waves": s["waves"],
                "mean_batch": s["mean_batch_per_call"],
                "prefix_hit_rate": s["prefix_cache_hit_rate"],
                "gen_tok_per_s": gen_tok / s["generator_seconds"] if s["generator_seconds"] else 0,
                "overhead_share": s["overhead_share"],
                "seconds": wall,
            }
            rows.append(row)
            print(
                f"{name:17s} budget={budget:5d} acc={row['accuracy']:.2f} "
                f"[{lo:.2f},{hi:.2f}] pass@k={row['pass_at_k']:.2f} "
                f"tok={row['gen_tokens_per_problem']:.0f} overhead={row['overhead_share']:.2%} "
                f"{wall:.0f}s",
                flush=True,
            )
    return rows


def write(rows: list[dict], args: argparse.Namespace, cmd: str) -> None:
    out = ROOT / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "budget_curves.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in args.methods:
        rs = [r for r in rows if r["method"] == name]
        x = [r["gen_tokens_per_problem"] for r in rs]
        y = [r["accuracy"] for r in rs]
        err = [
            [r["accuracy"] - r["ci_low"] for r in rs],
            [r["ci_high"] - r["accuracy"] for r in rs],
        ]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
    ax.set_xlabel("generated tokens per problem (mean, actually spent)")
    ax.set_ylabel("accuracy of the selected answer")
    ax.set_title(f"SmolLM2-135M, basic_arithmetic, {rows[0]['problems']} problems, judge reward")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "budget_curves.png", dpi=110)

    lines = [
        "## Budget curves",
        "",
        f"Command: `{cmd}` ({time.strftime('%Y-%m-%d %H:%M')}, 2 cores, load average "
        f"{os.getloadavg()[0]:.1f} at the end). Task: reasoning-gym basic_arithmetic, 2 terms, "
        f"1 digit, '+', seed {args.seed}; model SmolLM2-135M-Instruct Q4_1 (llama.cpp); reward: "
        "the policy model as judge (no reference at search time); K = "
        f"{args.k}, step max {args.step_tokens} tokens. CSV and plot: benchmarks/out/.",
        "",
        "| method | budget | acc (95% CI) | pass@k | gen tok/problem | reward tok/problem | "
        "calls | mean batch | prefix hit | gen tok/s | overhead |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['budget']} | {r['accuracy']:.2f} "
            f"({r['ci_low']:.2f}-{r['ci_high']:.2f}) | {r['pass_at_k']:.2f} | "
            f"{r['gen_tokens_per_problem']:.0f} | {r['reward_tokens_per_problem']:.0f} | "
            f"{r['generator_calls']} | {r['mean_batch']:.1f} | {r['prefix_hit_rate']:.2f} | "
            f"{r['gen_tok_per_s']:.1f} | {r['overhead_share']:.1%} |"
        )
    write_section("Budget curves", "\n".join(lines[2:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="20 problems, 2 budgets, 4 methods")
    ap.add_argument("--problems", type=int, default=100)
    ap.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--step-tokens", type=int, default=32)
    ap.add_argument("--solution-tokens", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-threads", type=int, default=2)
    args = ap.parse_args()
    if args.quick:
        args.problems, args.budgets = 20, [64, 192]
        args.methods = ["mcts", "bon_orm", "self_consistency", "beam"]
    cmd = "python benchmarks/budget_curves.py " + " ".join(sys.argv[1:])
    rows = run(args)
    write(rows, args, cmd.strip())


if __name__ == "__main__":
    main()
