"""The self-improvement benchmark: the loop of mcts.improve at the scale of issues 13 / 14.

    python benchmarks/self_improve.py [--second-round] [--out DIR] [--report-only]
        [--write-results] [-- extra Hydra overrides]

Runs (or resumes: every stage picks up where it stopped) `python -m mcts.improve` with the
settings below, then copies report.md / report.json / report.png to benchmarks/out/ and,
with --write-results, puts the table into benchmarks/RESULTS.md. The settings are fixed
here before any EVAL result is seen; nothing is chosen on EVAL.

--second-round: two rounds, EVAL searched in the second only (round 0 is the first
benchmark): round 1 searches TRAIN with the round-1 policy, fits a head on its hidden
states, and searches EVAL with both, against that policy's own vote; round 1's policy
stage trains the round-2 policy (ReST-EM's second iteration).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OVERRIDES = [
    "task=arith2d",  # RESULTS.md "Task for the loop"
    "improve.train_size=330",  # 299 after dropping questions that occur in EVAL
    "improve.eval_size=300",
    "improve.budgets=[128,256]",
    "improve.train_budget=256",
    "+improve.train_reward.name=verifier",  # TRAIN backs up verified terminals (no judge tokens)
    "improve.eval_runs=[mcts,best_of_n]",
    "improve.baseline=false",  # the judge on 300 EVAL problems does not fit a CPU session
    "improve.policy.method=sft",
    "search.step_max_tokens=32",
    "search.n_children=3",
    "generator.n_threads=1",
    "progress=false",
]
TITLE = "Self-improvement loop, n = 300 (issues 13 and 14)"
SECOND_ROUND = ["improve.rounds=2", "improve.eval_rounds=[1]"]
TITLE2 = "Self-improvement loop, second round, n = 300 (issue 13)"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--second-round", action="store_true", help="rounds=2, EVAL in round 1")
    ap.add_argument("--out", default=None, help="run dir (default outputs/improve/arith2d-r1|r2)")
    ap.add_argument("--report-only", action="store_true", help="no search: rebuild the report")
    ap.add_argument("--write-results", action="store_true")
    ap.add_argument("extra", nargs="*", help="more Hydra overrides")
    a = ap.parse_args(argv)
    out = (ROOT / (a.out or f"outputs/improve/arith2d-r{2 if a.second_round else 1}")).resolve()
    fixed = OVERRIDES + (SECOND_ROUND if a.second_round else [])
    overrides = fixed + list(a.extra)
    name, title = ("self_improve_round2", TITLE2) if a.second_round else ("self_improve", TITLE)
    from hydra import compose, initialize_config_dir

    import mcts.improve.__main__ as app

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="improve", overrides=overrides)
    if a.report_only:
        from omegaconf import OmegaConf

        from mcts.improve.loop import loop_splits
        from mcts.improve.report import write_report

        icfg = OmegaConf.to_object(cfg.improve)
        splits = loop_splits(icfg, OmegaConf.to_container(cfg.task, resolve=True))
        report = write_report(out, splits.eval, icfg)
    else:
        report = app.run(cfg, out)
    dest = ROOT / "benchmarks" / "out"
    dest.mkdir(exist_ok=True)
    for fname in ("report.md", "report.json", "report.png"):
        if (out / fname).exists():
            shutil.copy(out / fname, dest / f"{name}.{fname.split('.')[-1]}")
    md = (out / "report.md").read_text()
    if a.second_round:
        md += "\n" + against_round0(report, dest / "self_improve.json")
    print(md)
    if a.write_results:
        from benchmarks._results import write_section

        flag = " --second-round" if a.second_round else ""
        body = (
            f"Command: `python benchmarks/self_improve.py{flag} --write-results` (settings in "
            f"the script: {' '.join(fixed)}). Figures: benchmarks/out/{name}.png, "
            f"{name}.json.\n\n" + md
        )
        notes = ROOT / "benchmarks" / f"{name}_notes.md"  # the reading, written by hand
        if notes.exists():
            body += "\n" + notes.read_text()
        write_section(title, body)
    recs = report.get("records", [])
    print(f"{len(recs)} records; run directory: {out}")


def stored_records(stored: Path) -> dict[tuple[str, str, int], dict]:
    """The first benchmark's records (benchmarks/out/self_improve.json) by (reward, method,
    budget): what later runs on the same EVAL problems are paired with."""
    return {
        (r["reward"], r["method"], r["budget"]): r
        for r in json.loads(stored.read_text())["records"]
    }


def paired_with(rec: dict, other: dict | None, stored: Path) -> dict | None:
    """McNemar of `rec` against a stored record, refusing records of other EVAL problems."""
    from mcts.improve.report import _paired

    if other is not None and rec["complete"] and set(other["ids"]) != set(rec["ids"]):
        raise SystemExit(
            f"{stored}: its {other['reward']}/{other['method']} EVAL ids differ from this run's"
        )
    return _paired(rec, other)


def against_round0(report: dict, stored: Path) -> str:
    """The second round's runs paired with the first benchmark's round-0 runs (same EVAL
    ids, checked): did the whole loop (new policy + its head) beat what it started from?"""
    from mcts.improve.report import _fmt_test

    if not stored.is_file():
        return f"(no {stored.name}: run the first benchmark to pair round 1 with round 0)\n"
    index = stored_records(stored)
    lines = [
        "Round 1 (this run) against round 0 (the first benchmark, benchmarks/out/"
        f"{stored.name}; the same {report['eval_problems']} EVAL problems), exact McNemar:",
        "",
        "| this run | accuracy | vs the same method in round 0 | vs round 0's self-consistency |",
        "|---|---|---|---|",
    ]
    for r in sorted(report["records"], key=lambda r: (r["budget"], r["method"], r["reward"])):
        if not r["reward"].startswith("learned"):
            continue
        same = index.get(("learned_r0", r["method"], r["budget"]))
        sc0 = index.get(("policy_r0", "self_consistency", r["budget"]))
        lines.append(
            f"| {r['reward']} {r['method']} {r['budget']} | {r['accuracy']:.3f} | "
            f"{_fmt_test(paired_with(r, same, stored))} | "
            f"{_fmt_test(paired_with(r, sc0, stored))} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
