"""Accuracy of the selected answer against generated tokens, per search method.

One command runs every method at every budget on the same problems with the same model
and reward. Each finished (run, budget) cell is appended to benchmarks/out/budget_curves.jsonl
at once, and a rerun skips the cells already there (so a long run resumes, and cells can be
split over processes with --runs). From that log it writes, atomically:
  benchmarks/out/budget_curves.csv   one row per (method, budget)
  benchmarks/out/budget_curves.png   accuracy vs mean tokens per problem, a line per method:
                                     left generated tokens (the budget's unit), right total
                                     (generated + reward-model + uncached prompt tokens)
  with --write-results, the "Budget curves" section of benchmarks/RESULTS.md (with the command)

Accuracy is the ONE answer each method selects (95% Wilson interval), with an exact
McNemar test against self-consistency at the same budget on the same problems; pass@k of
the tree is reported beside it, never instead. Wave fill = requests per generator call /
(live trees x the method's requests per tree). The reward is the policy model's own judge (no reference
answer at search time). Engine efficiency (calls per wave, batch size, prefix-cache hit
rate, tokens/s) and search overhead (share of wall time outside model calls) come from the
same runs.

    .venv/bin/python benchmarks/budget_curves.py --quick     # < 5 min, writes benchmarks/out/quick/
    .venv/bin/python benchmarks/budget_curves.py --write-results   # 100 problems, 4 budgets
    # on 2 cores: two workers take the cells in turn (claims in out/claims/), then report
    .venv/bin/python benchmarks/budget_curves.py & .venv/bin/python benchmarks/budget_curves.py
    wait; .venv/bin/python benchmarks/budget_curves.py --report --write-results
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._results import write_section  # noqa: E402
from mcts.config import SearchConfig  # noqa: E402
from mcts.search import search  # noqa: E402
from mcts.stats import mcnemar_p, wilson  # noqa: E402

# What is run. best_of_n runs once with prm_max (every step scored) and the four sampling
# methods below are read off its `picks`: the samples depend only on (seed, problem, sample
# index), so they are exactly the samples separate runs would draw (tests/test_search.py
# checks pick for pick). Their token cost is the same by construction.
RUNS = {
    "mcts": {"algorithm": "mcts"},
    "rest_mcts": {"algorithm": "rest_mcts"},
    "best_of_n": {"algorithm": "best_of_n", "bon_aggregation": "prm_max"},
    "beam": {"algorithm": "beam", "n_beams": 4, "beam_width": 2},
    "dvts": {"algorithm": "dvts", "n_beams": 4, "beam_width": 2},
}
# Reported method -> (run, aggregation read from the run's picks, or None for its own pick).
METHODS = {
    "mcts": ("mcts", None),
    "rest_mcts": ("rest_mcts", None),
    "bon_orm": ("best_of_n", "orm_max"),
    "bon_prm": ("best_of_n", "prm_max"),
    "bon_wvote": ("best_of_n", "weighted_vote"),
    "self_consistency": ("best_of_n", "vote"),
    "beam": ("beam", None),
    "dvts": ("dvts", None),
}
OUT = ROOT / "benchmarks" / "out"


ENGINE = 2
"""Bumped when the search's semantics change (2: issue 12 — terminals take no selection
slot, fair budget shares, votes on answer classes, search-and-learn beams), so rows of an
older engine in the log are not mixed with new ones."""


def settings(args: argparse.Namespace) -> dict:
    """What makes two rows comparable: rows of other settings in the log are ignored."""
    return {
        "engine": ENGINE,
        "problems": args.problems,
        "seed": args.seed,
        "k": args.k,
        "step_tokens": args.step_tokens,
        "solution_tokens": args.solution_tokens,
    }


def load_rows(log: Path, args: argparse.Namespace) -> list[dict]:
    if not log.exists():
        return []
    key = settings(args)
    rows = []
    for line in log.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if all(row.get(k) == v for k, v in key.items()):
                rows.append(row)
    return rows


def method_rows(run_name: str, budget: int, res, wall: float, args: argparse.Namespace):
    """The reported rows (one per method read off this run) for one (run, budget)."""
    s = res.summary
    n = len(res.results)
    gen_tok = s["generated_tokens_per_problem"] * n
    common = {
        "budget": budget,
        "run": run_name,
        **settings(args),
        "pass_at_k": s["pass_at_k"],
        "gen_tokens_per_problem": s["generated_tokens_per_problem"],
        "total_tokens_per_problem": s["total_tokens_per_problem"],
        "wave_fill": s["wave_fill"],
        "beams_per_wave": s.get("beams_per_wave"),
        "reward_tokens_per_problem": s["reward_tokens_per_problem"],
        "generator_calls": s["generator_calls"],
        "waves": s["waves"],
        "mean_batch": s["mean_batch_per_call"],
        "prefix_hit_rate": s["prefix_cache_hit_rate"],
        "gen_tok_per_s": gen_tok / s["generator_seconds"] if s["generator_seconds"] else 0,
        "overhead_share": s["overhead_share"],
        "seconds": wall,
    }
    out = []
    for method, (run, agg) in METHODS.items():
        if run != run_name:
            continue
        if agg is None:
            ok = [bool(r.correct) for r in res.results]
        else:
            ok = [bool(r.extra["picks"][agg]["correct"]) for r in res.results]
        k = sum(ok)
        lo, hi = wilson(k, n)
        out.append(
            {
                "method": method,
                "accuracy": k / n,
                "ci_low": lo,
                "ci_high": hi,
                "ok": [int(x) for x in ok],  # per problem, in problem order (paired tests)
                **common,
            }
        )
    return out


def _claim_path(args: argparse.Namespace, budget: int, name: str) -> Path:
    key = "-".join(str(v) for v in settings(args).values())
    return args.out / "claims" / f"{name}-{budget}-{key}"


def done_or_claimed(args: argparse.Namespace, budget: int, name: str) -> bool:
    if any(r["run"] == name and r["budget"] == budget for r in load_rows(args.log, args)):
        return True
    path = _claim_path(args, budget, name)
    return path.exists() and _alive(path)


def _alive(path: Path) -> bool:
    try:
        os.kill(int(path.read_text() or 0), 0)
        return True
    except (ValueError, ProcessLookupError, FileNotFoundError):
        return False
    except PermissionError:
        return True


def claim(args: argparse.Namespace, budget: int, name: str) -> bool:
    """Take a cell for this process: not in the log and not held by a live process.

    Why: several processes (one per core) share one list of cells and each takes the next
    free one, so they finish together; a claim left by a dead process is taken over.
    """
    if done_or_claimed(args, budget, name):
        return False
    path = _claim_path(args, budget, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # stale (its process is gone)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(str(os.getpid()))
    return True


def release(args: argparse.Namespace, budget: int, name: str) -> None:
    _claim_path(args, budget, name).unlink(missing_ok=True)


def run(args: argparse.Namespace) -> None:
    """Run every (budget, run) not yet in the log, appending its rows as it finishes."""
    import yaml

    from mcts.generators.factory import make_generator
    from mcts.tasks import load_task
    from rewards.factory import make_reward

    # The default task itself (configs/task/default.yaml), more problems of it.
    task = yaml.safe_load((ROOT / "configs" / "task" / "default.yaml").read_text())
    task.update(size=args.problems, seed=args.seed)
    cells = [(b, m) for b in args.budgets for m in args.runs]
    if all(done_or_claimed(args, b, m) for b, m in cells):
        return
    problems = load_task(task)
    gen = make_generator({"backend": "llama_cpp", "n_threads": args.n_threads})
    reward = make_reward({"name": "judge"}, gen)
    for budget, name in cells:
        if not claim(args, budget, name):
            continue  # done, or another process is running it
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
            **RUNS[name],
        )
        t0 = time.perf_counter()
        res = search(problems, gen, reward, cfg)
        wall = time.perf_counter() - t0
        rows = method_rows(name, budget, res, wall, args)
        with open(args.log, "a") as fh:  # one write per (run, budget): a crash loses one cell
            fh.write("".join(json.dumps(r) + "\n" for r in rows))
            fh.flush()
            os.fsync(fh.fileno())
        release(args, budget, name)
        for row in rows:
            print(
                f"{row['method']:17s} budget={budget:5d} acc={row['accuracy']:.2f} "
                f"[{row['ci_low']:.2f},{row['ci_high']:.2f}] pass@k={row['pass_at_k']:.2f} "
                f"tok={row['gen_tokens_per_problem']:.0f} "
                f"overhead={row['overhead_share']:.2%} {wall:.0f}s",
                flush=True,
            )


def write(rows: list[dict], args: argparse.Namespace, cmd: str) -> None:
    """CSV and PNG from every row in the log (atomically), and the RESULTS.md table."""
    order = list(METHODS)
    rows = sorted(rows, key=lambda r: (r["budget"], order.index(r["method"])))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "budget_curves.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out / "budget_curves.csv")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for ax, key, label in (
        (axes[0], "gen_tokens_per_problem", "generated tokens per problem (mean, spent)"),
        (axes[1], "total_tokens_per_problem", "total tokens per problem (gen + reward + prompt)"),
    ):
        for name in order:
            rs = [r for r in rows if r["method"] == name]
            if not rs:
                continue
            x = [r[key] for r in rs]
            y = [r["accuracy"] for r in rs]
            err = [
                [r["accuracy"] - r["ci_low"] for r in rs],
                [r["ci_high"] - r["accuracy"] for r in rs],
            ]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name, alpha=0.85)
        ax.set_xlabel(label)
        if key == "total_tokens_per_problem":
            ax.set_xscale("log")
    axes[0].set_ylabel("accuracy of the selected answer (95% CI)")
    fig.suptitle(f"SmolLM2-135M, basic_arithmetic, {rows[0]['problems']} problems, judge reward")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "budget_curves.png.tmp.png", dpi=110)
    os.replace(out / "budget_curves.png.tmp.png", out / "budget_curves.png")
    print(f"wrote {out / 'budget_curves.csv'} and {out / 'budget_curves.png'}")
    if not args.write_results:
        return
    lines = [
        f"Command: `{cmd}` ({time.strftime('%Y-%m-%d %H:%M')}, 2 cores, load average "
        f"{os.getloadavg()[0]:.1f} at the end). Task: reasoning-gym basic_arithmetic, 2 terms, "
        f"1 digit, '+', {rows[0]['problems']} problems, task seed and search seed "
        f"{args.seed}; model SmolLM2-135M-Instruct Q4_1 (llama.cpp, 1 thread); reward: the "
        "policy model as judge (no reference at search time); K = "
        f"{args.k}, step max {args.step_tokens} tokens, solution max {args.solution_tokens}. "
        "bon_* and self_consistency are read off one best_of_n run per budget (column run; "
        "its reward tokens are prm_max's, which scores every step). CSV and plot: "
        "benchmarks/out/.",
        "",
        "| method | budget | acc (95% CI) | p vs SC | pass@k | gen tok/problem | "
        "total tok/problem | wave fill | calls / waves | mean batch | prefix hit | gen tok/s "
        "| overhead | run (s) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    sc = {r["budget"]: r["ok"] for r in rows if r["method"] == "self_consistency" and "ok" in r}
    for r in rows:
        base = sc.get(r["budget"])
        if r["method"] == "self_consistency" or base is None or "ok" not in r:
            p = "-"
        else:
            p = f"{mcnemar_p([bool(x) for x in r['ok']], [bool(x) for x in base]):.2f}"
        width = r.get("beams_per_wave")
        fill = f"{r['wave_fill']:.2f}" + (f" ({width:.1f} beams)" if width else "")
        lines.append(
            f"| {r['method']} | {r['budget']} | {r['accuracy']:.2f} "
            f"({r['ci_low']:.2f}-{r['ci_high']:.2f}) | {p} | {r['pass_at_k']:.2f} | "
            f"{r['gen_tokens_per_problem']:.0f} | {r['total_tokens_per_problem']:.0f} | "
            f"{fill} | {r['generator_calls']} / {r['waves']} | {r['mean_batch']:.1f} | "
            f"{r['prefix_hit_rate']:.2f} | "
            f"{r['gen_tok_per_s']:.1f} | {r['overhead_share']:.1%} | "
            f"{r['run']} ({r['seconds']:.0f}) |"
        )
    write_section("Budget curves", "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="20 problems, budgets 32 and 64, mcts + best_of_n (all 4 picks)",
    )
    ap.add_argument("--problems", type=int, default=100)
    ap.add_argument("--budgets", type=int, nargs="+", default=[32, 64, 96, 128])
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--step-tokens", type=int, default=32)
    ap.add_argument("--solution-tokens", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--report", action="store_true", help="only rewrite CSV/PNG from the log")
    ap.add_argument("--write-results", action="store_true", help="also update RESULTS.md")
    args = ap.parse_args()
    if args.quick:
        # ~4.5 min on one core (cells of the full run scaled to 20 problems: 25+43+108+88 s)
        args.problems, args.budgets = 20, [32, 64]
        args.runs = ["mcts", "best_of_n"]
        args.out = OUT / "quick"
    args.log = args.out / "budget_curves.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/budget_curves.py " + " ".join(sys.argv[1:])
    if not args.report:
        run(args)
    rows = load_rows(args.log, args)
    if rows:
        write(rows, args, cmd.strip())


if __name__ == "__main__":
    main()
