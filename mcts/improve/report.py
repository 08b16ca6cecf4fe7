"""The loop's verdict: EVAL accuracy of every method per reward and budget, paired tests.

Read only from the EVAL run directories (results.jsonl), in EVAL problem order, so every
comparison is paired on the same problems: each method against self-consistency at the same
budget (the plain-voting bar), and each learned-reward method against the same method under
the baseline reward (did learning pay?). Accuracy is the ONE selected answer's, with a 95%
Wilson interval; pass@k is beside it and never instead.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mcts.export.io import atomic_write_text
from mcts.export.results_log import ResultsLog
from mcts.stats import discordant, mcnemar_p, wilson
from mcts.types import Problem


def _rows(run_dir: Path, algorithm: str) -> dict[str, dict[str, Any]]:
    if not (run_dir / "results.jsonl").exists():
        return {}
    return {str(r["id"]): r for r in ResultsLog(run_dir).rows() if r["algorithm"] == algorithm}


def collect(out: Path, eval_problems: list[Problem], budgets: list[int]) -> list[dict[str, Any]]:
    """One record per (reward tag, method, budget) with its per-problem outcomes."""
    from mcts.improve.loop import METHODS, POLICY_TAG

    ids = [p.id for p in eval_problems]
    recs = []
    eval_dir = out / "eval"
    tags = sorted(p.name for p in eval_dir.iterdir() if p.is_dir()) if eval_dir.exists() else []
    for tag in tags:
        policy = tag.startswith(POLICY_TAG)
        for budget in [0, *budgets]:
            for method, (run, pick) in METHODS.items():
                if (run == "greedy") != (budget == 0):
                    continue  # greedy has no budget (one solution); every other run has one
                if policy and method not in ("greedy", "self_consistency"):
                    continue  # a policy's own runs use the reward `none`: only the vote counts
                source = f"{tag}/{run}-{budget}"
                rows = _rows(eval_dir / source, run)
                if not rows and policy and method == "self_consistency":
                    # the loop does not sample the round's policy twice: its vote is the
                    # vote over the learned head's best-of-N samples (same generator, seeds)
                    source = f"learned_r{tag[len(POLICY_TAG) :]}/{run}-{budget}"
                    rows = _rows(eval_dir / source, run)
                if not rows:
                    continue
                done = [i for i in ids if i in rows]
                if pick is None:
                    ok = [bool(rows[i]["correct"]) for i in done]
                else:
                    ok = [bool(rows[i].get("picks", {}).get(pick, {}).get("correct")) for i in done]
                n = len(ok)

                def mean(key: str, rows=rows, done=done, n=n) -> float:
                    return sum(float(rows[i].get(key) or 0) for i in done) / n if n else math.nan

                lo, hi = wilson(sum(ok), n)
                recs.append(
                    {
                        "reward": tag,
                        "method": method,
                        "budget": budget,
                        "n": n,
                        "complete": n == len(ids),
                        "accuracy": sum(ok) / n if n else math.nan,
                        "ci_low": lo,
                        "ci_high": hi,
                        "pass_at_k": mean("pass_at_k"),
                        "gen_tokens": mean("tokens_generated_tokens"),
                        "total_tokens": mean("tokens_generated_tokens")
                        + mean("tokens_reward_tokens")
                        + mean("tokens_prompt_tokens")
                        - mean("tokens_cached_prompt_tokens"),
                        "ids": done,
                        "ok": ok,
                        "source": source,  # the run directory under eval/ it was read from
                    }
                )
    return recs


def _paired(a: dict[str, Any], b: dict[str, Any] | None) -> dict[str, Any] | None:
    """McNemar on the problems both finished."""
    if b is None:
        return None
    common = [i for i in a["ids"] if i in set(b["ids"])]
    ka = dict(zip(a["ids"], a["ok"], strict=True))
    kb = dict(zip(b["ids"], b["ok"], strict=True))
    x = [ka[i] for i in common]
    y = [kb[i] for i in common]
    wins, losses = discordant(x, y)
    return {
        "n": len(common),
        "wins": wins,
        "losses": losses,
        "p": mcnemar_p(x, y),
        "against": b["reward"],  # which run it was paired with
    }


def write_report(out: Path, eval_problems: list[Problem], cfg: Any) -> dict[str, Any]:
    """report.json, report.md and report.png in `out`; returns the report."""
    recs = collect(out, eval_problems, list(cfg.budgets))
    tags = sorted({r["reward"] for r in recs})
    from mcts.improve.loop import POLICY_TAG

    baseline = next(
        (t for t in tags if not t.startswith("learned") and not t.startswith(POLICY_TAG)), None
    )
    index = {(r["reward"], r["method"], r["budget"]): r for r in recs}
    for r in recs:
        # the vote of the same run's samples (the same policy) when there is one: a round
        # searched with a fine-tuned policy is compared with that policy's own vote
        sc = index.get((r["reward"], "self_consistency", r["budget"])) or next(
            (
                index.get((t, "self_consistency", r["budget"]))
                for t in tags
                if (t, "self_consistency", r["budget"]) in index
            ),
            None,
        )
        r["vs_self_consistency"] = None if r["method"] == "self_consistency" else _paired(r, sc)
        base = index.get((baseline, r["method"], r["budget"])) if baseline else None
        r["vs_baseline"] = _paired(r, base) if r["reward"] != baseline else None
        # a fine-tuned policy against the one it was trained from (same method and budget)
        prev = None
        if r["reward"].startswith(POLICY_TAG):
            k = int(r["reward"][len(POLICY_TAG) :])
            prev = index.get((f"{POLICY_TAG}{k - 1}", r["method"], r["budget"]))
        r["vs_previous_policy"] = _paired(r, prev)
    value = {}
    for mpath in sorted(out.glob("round*/value_metrics.json")):
        m = json.loads(mpath.read_text())
        value[mpath.parent.name] = {
            k: m.get(k)
            for k in (
                "auc",
                "brier",
                "ece",
                "log_loss",
                "n_train",
                "n_val",
                "epochs_run",
                "within_auc",
                "within_pairs",
                "within_groups",
                "cv",
                "calibration",
            )
        }
    candidates = (
        {
            f"{d.parent.name}/{d.name}": c
            for d in sorted(eval_dir.glob("learned_r*/*"))
            if (c := candidate_auc(d)) is not None
        }
        if (eval_dir := out / "eval").exists()
        else {}
    )
    policy = {}
    for ppath in sorted(out.glob("round*/policy/trained.json")):
        rec = json.loads(ppath.read_text())
        rec.pop("key", None)
        policy[ppath.parent.parent.name] = rec
    report = {
        "eval_problems": len(eval_problems),
        "policy": policy,
        "baseline": baseline,
        "records": recs,
        "value_model": value,
        "candidates": candidates,
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=str))
    atomic_write_text(out / "report.md", to_markdown(report))
    if recs:
        _plot(recs, out / "report.png")
    return report


def candidate_auc(run_dir: Path) -> dict[str, Any] | None:
    """How well the head's score of a finished solution (its last step's reward) separates
    right from wrong answers among one EVAL run's candidates: over all candidates, and
    within a problem only, which is what picking one answer needs. Read after the search,
    from the references the search never saw; nothing is chosen on it."""
    path = run_dir / "traces.parquet"
    if not path.exists():
        return None
    import numpy as np
    import pyarrow.parquet as pq

    from rewards.value_model import binary_auc, within_group_auc

    cols = ["problem_id", "reward", "answer", "correct"]
    rows = [r for r in pq.read_table(path, columns=cols).to_pylist() if r["answer"] is not None]
    rows = [r for r in rows if r["reward"]]
    if not rows:
        return None
    ok = np.array([bool(r["correct"]) for r in rows])
    score = np.array([float(r["reward"][-1]) for r in rows])
    w_auc, pairs, groups = within_group_auc(ok, score, [r["problem_id"] for r in rows])
    return {
        "candidates": len(rows),
        "auc": binary_auc(ok, score),
        "within_auc": w_auc,
        "within_pairs": pairs,
        "within_groups": groups,
    }


def _fmt_test(t: dict[str, Any] | None) -> str:
    if not t:
        return "-"
    return f"{t['wins']}/{t['losses']} p={t['p']:.3f}"


def _f3(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def to_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"EVAL problems: {report['eval_problems']}; baseline reward: {report['baseline']}. "
        "Accuracy of the selected answer (95% Wilson CI); paired tests are exact McNemar "
        "(wins/losses = problems only this method / only the other got right). "
        "learned_r<k> searches with round k's policy and is tested against that policy's "
        "own vote (self-consistency of the same run's samples).",
        "",
        "| reward | method | budget | n | accuracy (95% CI) | vs self-consistency | "
        "vs baseline reward | vs previous policy | pass@k | gen tok | total tok |",
        "|---|---|---:|---:|---|---|---|---|---:|---:|---:|",
    ]
    for r in sorted(report["records"], key=lambda r: (r["budget"], r["method"], r["reward"])):
        lines.append(
            f"| {r['reward']} | {r['method']} | {r['budget']} | {r['n']}"
            f"{'' if r['complete'] else ' (partial)'} | {r['accuracy']:.3f} "
            f"({r['ci_low']:.3f}-{r['ci_high']:.3f}) | {_fmt_test(r['vs_self_consistency'])} | "
            f"{_fmt_test(r['vs_baseline'])} | {_fmt_test(r.get('vs_previous_policy'))} | "
            f"{r['pass_at_k']:.3f} | {r['gen_tokens']:.0f} | "
            f"{r['total_tokens']:.0f} |"
        )
    for name, m in report["value_model"].items():
        lines.append("")
        within = (  # heads fit before the figure existed have none
            f"within-problem AUC {_f3(m.get('within_auc'))} ({m['within_groups']} problems "
            "with both labels), "
            if m.get("within_groups") is not None
            else ""
        )
        lines.append(
            f"Value model {name} on held-out TRAIN problems: AUC {_f3(m.get('auc'))}, {within}"
            f"ECE {_f3(m.get('ece'))}, Brier {_f3(m.get('brier'))} "
            f"(n_train {m.get('n_train')}, n_val {m.get('n_val')}, epochs "
            f"{m.get('epochs_run')})."
        )
        cv = m.get("cv") or {}
        if "auc" in cv:
            lines[-1] += (
                f" {cv['folds']}-fold, every one of the {cv['groups']} TRAIN problems held out "
                f"once: AUC {_f3(cv['auc'])}, within-problem AUC {_f3(cv.get('within_auc'))} "
                f"({cv.get('within_groups')} problems with both labels), ECE {_f3(cv['ece'])}."
            )
    if report.get("candidates"):
        lines += [
            "",
            "The head on EVAL candidates (after the search, against the references it never "
            "saw): AUC of a finished solution's score for a right answer, over all candidates "
            "and within one problem only (what picking an answer needs).",
            "",
            "| run | candidates | AUC | within-problem AUC (pairs, problems) |",
            "|---|---:|---:|---|",
        ]
        for name, c in report["candidates"].items():
            lines.append(
                f"| {name} | {c['candidates']} | {_f3(c['auc'])} | {_f3(c['within_auc'])} "
                f"({c['within_pairs']}, {c['within_groups']}) |"
            )
    for name, p in report.get("policy", {}).items():
        lines.append("")
        lines.append(
            f"Policy {name}: {p.get('method')} on {p.get('rows')} rows {p.get('data_counts')}, "
            f"{p.get('steps')} steps in {p.get('train_seconds')} s (peak RSS "
            f"{p.get('peak_rss_mib')} MiB), loss {p.get('loss_first')} -> {p.get('loss_last')}."
        )
    return "\n".join(lines) + "\n"


def _plot(recs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mcts.export.io import atomic_write

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for key in sorted({(r["reward"], r["method"]) for r in recs}):
        rs = sorted(
            (r for r in recs if (r["reward"], r["method"]) == key), key=lambda r: r["budget"]
        )
        ax.errorbar(
            [r["gen_tokens"] for r in rs],
            [r["accuracy"] for r in rs],
            yerr=[
                [r["accuracy"] - r["ci_low"] for r in rs],
                [r["ci_high"] - r["accuracy"] for r in rs],
            ],
            marker="o",
            capsize=3,
            label=f"{key[1]} ({key[0]})",
            alpha=0.85,
        )
    ax.set_xlabel("generated tokens per problem (mean, spent)")
    ax.set_ylabel("EVAL accuracy of the selected answer (95% CI)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
