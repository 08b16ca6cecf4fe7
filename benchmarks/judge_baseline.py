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
import json
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
    from omegaconf import OmegaConf

    import mcts.improve.__main__  # noqa: F401  (registers the config schema Hydra composes)
    from benchmarks.self_improve import OVERRIDES
    from mcts.config import SearchConfig
    from mcts.generators.factory import make_generator
    from mcts.improve.loop import _evaluate, _task_dict, loop_splits
    from mcts.improve.report import _fmt_test, _paired, collect
    from rewards.factory import make_reward

    stored = ROOT / "benchmarks" / "out" / "self_improve.json"
    if not stored.is_file():
        sys.exit(f"{stored}: missing; run benchmarks/self_improve.py first (round 0's records)")
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="improve", overrides=OVERRIDES)
    icfg = OmegaConf.to_object(cfg.improve)
    scfg = SearchConfig.from_dict(OmegaConf.to_container(cfg.search, resolve=True))
    task = OmegaConf.to_container(cfg.task, resolve=True)
    splits = loop_splits(icfg, task)
    out = (ROOT / a.out).resolve()
    gen = make_generator(OmegaConf.to_container(cfg.generator, resolve=True))
    reward = make_reward(OmegaConf.to_container(cfg.reward, resolve=True), gen)
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
    old = json.loads(stored.read_text())["records"]
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
    for reward_tag, method in (("learned_r0", "mcts"), ("learned_r0", "self_consistency")):
        other = next(
            (
                r
                for r in old
                if (r["reward"], r["method"], r["budget"]) == (reward_tag, method, a.budget)
            ),
            None,
        )
        if other is None:
            continue
        if set(other["ids"]) != set(rec["ids"]):
            sys.exit(f"{stored}: its {reward_tag}/{method} ids are not this run's EVAL ids")
        label = "learned-value MCTS" if method == "mcts" else "self-consistency"
        lines.append(f"| {label} | {other['accuracy']:.3f} | {_fmt_test(_paired(rec, other))} |")
    md = "\n".join(lines) + "\n"
    print(md)
    if a.write_results:
        from benchmarks._results import write_section

        notes = ROOT / "benchmarks" / "judge_baseline_notes.md"
        write_section(TITLE, md + ("\n" + notes.read_text() if notes.exists() else ""))


if __name__ == "__main__":
    main()
