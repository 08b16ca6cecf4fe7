"""Round 0's missing baseline: MCTS guided by the 135M judge on the loop's EVAL problems.

    python benchmarks/judge_baseline.py [--budget 128] [--out outputs/improve/arith2d-judge]
        [--write-results]

The same settings as benchmarks/self_improve.py (its OVERRIDES: task, EVAL seed and size,
search settings, one llama.cpp thread), the reward the loop's round 0 would use as its
baseline (the configured `judge`), searched by the loop's own `_evaluate` (references hidden).
Resumable. The result is paired, problem by problem, with the first benchmark's round-0
records in benchmarks/out/self_improve.json (learned-value MCTS and self-consistency of the
same base policy at the same budget): the same EVAL ids, checked.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TITLE = "Judge baseline on the loop's EVAL problems (issue 13, round 0)"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--out", default="outputs/improve/arith2d-judge")
    ap.add_argument("--write-results", action="store_true")
    a = ap.parse_args(argv)
    from hydra import compose, initialize_config_dir

    import mcts.improve.__main__ as app  # registers the config schema Hydra composes
    from benchmarks.self_improve import OVERRIDES, paired_with, stored_records
    from mcts.improve.loop import _evaluate, _task_dict, loop_splits
    from mcts.improve.report import _fmt_test, collect

    stored = ROOT / "benchmarks" / "out" / "self_improve.json"
    if not stored.is_file():
        sys.exit(f"{stored}: missing; run benchmarks/self_improve.py first (round 0's records)")
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="improve", overrides=OVERRIDES)
    icfg, scfg, gen, reward, task = app.build(cfg)
    splits = loop_splits(icfg, task)
    out = (ROOT / a.out).resolve()
    tag = str(getattr(reward, "name", "judge"))
    task_eval = {**_task_dict(task), "seed": icfg.eval_seed, "size": icfg.eval_size}
    _evaluate(
        out,
        splits.eval,
        gen,
        reward,
        tag,
        scfg,
        replace(icfg, eval_runs=["mcts"]),
        False,
        task_eval,
        budgets=[a.budget],
    )
    (rec,) = [r for r in collect(out, splits.eval, [a.budget]) if r["method"] == "mcts"]
    old = stored_records(stored)
    lines = [
        f"Command: `python benchmarks/judge_baseline.py --budget {a.budget} --write-results` "
        f"(settings of benchmarks/self_improve.py). {rec['n']} EVAL problems; MCTS with the "
        f"judge: accuracy {rec['accuracy']:.3f} ({rec['ci_low']:.3f}-{rec['ci_high']:.3f}), "
        f"pass@k {rec['pass_at_k']:.3f}, {rec['gen_tokens']:.0f} generated and "
        f"{rec['total_tokens']:.0f} total tokens per problem.",
        "",
        "| judge MCTS vs (round 0, same budget) | its accuracy | judge wins/losses, McNemar p |",
        "|---|---|---|",
    ]
    for method, label in (("mcts", "learned-value MCTS"), ("self_consistency", "self-consistency")):
        other = old.get(("learned_r0", method, a.budget))
        if other is not None:
            test = _fmt_test(paired_with(rec, other, stored))
            lines.append(f"| {label} | {other['accuracy']:.3f} | {test} |")
    md = "\n".join(lines) + "\n"
    print(md)
    if a.write_results:
        from benchmarks._results import write_section

        notes = ROOT / "benchmarks" / "judge_baseline_notes.md"
        write_section(TITLE, md + ("\n" + notes.read_text() if notes.exists() else ""))


if __name__ == "__main__":
    main()
