"""The self-improvement benchmark: the loop of mcts.improve at the scale of issues 13 / 14.

    python benchmarks/self_improve.py [--second-round [--head NAME]] [--out DIR]
        [--report-only] [--write-results] [-- extra Hydra overrides]

Runs (or resumes: every stage picks up where it stopped) `python -m mcts.improve` with the
settings below, then copies report.md / report.json / report.png to benchmarks/out/ and,
with --write-results, puts the table into benchmarks/RESULTS.md. The settings are fixed
here before any EVAL result is seen; nothing is chosen on EVAL.

--second-round: two rounds, EVAL searched in the second only (round 0 is the first
benchmark): round 1 searches TRAIN with the round-1 policy, fits a head on its hidden
states, and searches EVAL with both, against that policy's own vote; round 1's policy
stage trains the round-2 policy (ReST-EM's second iteration).

--head NAME (with --second-round): the same second round with another value head, a
candidate of benchmarks/value_head_study.py picked there on held-out TRAIN labels only. Its
run dir starts from the second round's finished TRAIN stages and policy votes (hard links:
the fingerprints check they were made with the same settings), so only the heads and the
learned EVAL searches run; its table pairs each method with the default head's.

--label-runs best_of_n (with --head): round 1 also samples best-of-N on TRAIN and the head
is fit on those rows too (improve.label_runs); EVAL runs MCTS and best-of-N as before.
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
REUSED = ("round*/train", "round*/labels.*", "round*/policy", "eval/policy_r*")


def head_overrides(name: str) -> list[str]:
    """Hydra overrides that make the loop fit value_head_study's candidate `name`."""
    from benchmarks.value_head_study import CANDIDATES

    plain = {n: f for n, (f, cols) in CANDIDATES.items() if not cols}
    if name not in plain:
        raise SystemExit(f"--head {name!r}: choose one of {sorted(plain)}")
    return [f"improve.head.{k}={v}" for k, v in plain[name].items()]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def seed_from(src: Path, dest: Path) -> None:
    """Start `dest` with src's finished TRAIN stages and policy votes (hard links for big
    files, copies for small ones, so appending in dest never touches src)."""
    if dest.exists():
        return
    if not (src / "splits.json").is_file():
        raise SystemExit(f"{src}: no finished second round to start from; run --second-round")
    for pattern in REUSED:
        for path in sorted(src.glob(pattern)):
            for f in (
                [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            ):
                to = dest / f.relative_to(src)
                to.parent.mkdir(parents=True, exist_ok=True)
                if f.stat().st_size > 1 << 20 and f.suffix != ".jsonl":
                    to.hardlink_to(f)
                else:
                    shutil.copy2(f, to)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--second-round", action="store_true", help="rounds=2, EVAL in round 1")
    ap.add_argument("--head", default=None, help="with --second-round: a value_head_study head")
    ap.add_argument("--label-runs", default=None, help="with --head: e.g. best_of_n")
    ap.add_argument(
        "--pair-with",
        default="self_improve_round2",
        help="with --head: the benchmarks/out/<name>.json run to pair with",
    )
    ap.add_argument("--out", default=None, help="run dir (default outputs/improve/arith2d-r1|r2)")
    ap.add_argument("--report-only", action="store_true", help="no search: rebuild the report")
    ap.add_argument("--write-results", action="store_true")
    ap.add_argument("extra", nargs="*", help="more Hydra overrides")
    a = ap.parse_args(argv)
    if a.head and not a.second_round:
        ap.error("--head needs --second-round")
    default = f"outputs/improve/arith2d-r{2 if a.second_round else 1}"
    fixed = OVERRIDES + (SECOND_ROUND if a.second_round else [])
    name, title = ("self_improve_round2", TITLE2) if a.second_round else ("self_improve", TITLE)
    if a.label_runs and not a.head:
        ap.error("--label-runs needs --head")
    if a.head:
        fixed += head_overrides(a.head)
        default, name = f"{default}-{slug(a.head)}", f"{name}_{slug(a.head)}"
        title = f"{TITLE2[: TITLE2.index(' (')]}, value head {a.head}"
        if a.label_runs:
            fixed += [f"improve.label_runs=[{a.label_runs}]"]
            default, name = f"{default}-{a.label_runs}-labels", f"{name}_{a.label_runs}_labels"
            title += f" fit with {a.label_runs} TRAIN samples"
        title += " (issue 13)"
    out = (ROOT / (a.out or default)).resolve()
    overrides = fixed + list(a.extra)
    if a.head and not a.report_only:
        seed_from(ROOT / "outputs/improve/arith2d-r2", out)
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
    if a.head:
        md += "\n" + against_default_head(report, dest / f"{a.pair_with}.json")
    elif a.second_round:
        md += "\n" + against_round0(report, dest / "self_improve.json")
    print(md)
    if a.write_results:
        from benchmarks._results import write_section

        flag = " --second-round" if a.second_round else ""
        flag += f" --head '{a.head}'" if a.head else ""
        flag += f" --label-runs {a.label_runs}" if a.label_runs else ""
        flag += (
            f" --pair-with {a.pair_with}" if a.head and a.pair_with != "self_improve_round2" else ""
        )
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


def against_default_head(report: dict, stored: Path) -> str:
    """Each learned run of this head paired with the same run of the default head (the
    second round's stored records; same policy, same EVAL ids, checked)."""
    from mcts.improve.report import _fmt_test

    if not stored.is_file():
        return f"(no {stored.name}: run --second-round first to pair the heads)\n"
    index = stored_records(stored)
    lines = [
        f"This head against the default head (benchmarks/out/{stored.name}; the same policy "
        f"and {report['eval_problems']} EVAL problems), exact McNemar:",
        "",
        "| this run | accuracy | default head | vs the default head |",
        "|---|---|---|---|",
    ]
    for r in sorted(report["records"], key=lambda r: (r["budget"], r["method"], r["reward"])):
        other = index.get((r["reward"], r["method"], r["budget"]))
        if not r["reward"].startswith("learned") or other is None:
            continue
        lines.append(
            f"| {r['reward']} {r['method']} {r['budget']} | {r['accuracy']:.3f} | "
            f"{other['accuracy']:.3f} | {_fmt_test(paired_with(r, other, stored))} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
