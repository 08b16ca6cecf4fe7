"""Which value head to fit, chosen on held-out TRAIN problems only (never on EVAL).

    python benchmarks/value_head_study.py RUN_DIR/round0/labels.npz [--seeds 5] [--write-results]

Fits each candidate head below on the loop's TRAIN labels over several random splits BY
PROBLEM (the split seed is the head's seed: steps of one problem never sit on both sides)
and reports the held-out AUC, the within-problem AUC (pairs of one problem's correct and
incorrect steps only), ECE and Brier score, mean and spread over the splits. The rule, fixed
before running on the full labels: the one-standard-error rule, i.e. the simplest candidate
(listed first) whose mean AUC is within one standard error of the best mean (sd / sqrt(seeds)
of the best). The same rule is applied to the within-problem AUC, added after the loop's EVAL
runs showed the head ordering one problem's candidates far worse than it orders steps across
problems (it learns which problems are easy); the pairwise candidates (rStar-Math's ranking
loss within a problem) were added then too. Early stopping reads the same held-out problems,
which flatters every candidate alike.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CANDIDATES = {  # name -> (ValueHeadConfig fields, extra scalar columns); simplest first
    "logistic wd1e-4": (dict(hidden=0, weight_decay=1e-4), []),
    "logistic wd1e-2": (dict(hidden=0, weight_decay=1e-2), []),
    "mlp64 wd1e-2": (dict(hidden=64, weight_decay=1e-2), []),
    "mlp256 wd1e-2": (dict(hidden=256, weight_decay=1e-2), []),
    # cheap features the search could hand the head besides the hidden state
    "logistic wd1e-4 + depth, terminal": (dict(hidden=0), ["depth", "terminal"]),
    "logistic wd1e-4 + step logprob": (dict(hidden=0), ["mean_logprob", "min_logprob"]),
    "logistic wd1e-4 + all four": (
        dict(hidden=0),
        ["depth", "terminal", "mean_logprob", "min_logprob"],
    ),
    # BCE + a Bradley-Terry loss over pairs of one problem's steps (ValueHeadConfig.pairwise)
    "logistic wd1e-4 + pairwise 1": (dict(hidden=0, pairwise=1.0), []),
    "logistic wd1e-4 + pairwise 4": (dict(hidden=0, pairwise=4.0), []),
}
METRICS = ("auc", "within_auc", "ece", "brier")
TITLE = "Value head choice (held-out TRAIN problems)"


def extra_columns(labels) -> dict[str, np.ndarray]:
    """Per-row scalars read back from the TRAIN trees the labels came from (by problem id
    and node): the step's depth, whether it ends the solution, its tokens' logprobs."""
    from mcts.export.trees import load_tree, tree_path

    run_dir = Path(labels.meta["run_dir"])
    cols: dict[str, list[float]] = {
        k: [] for k in ("depth", "terminal", "mean_logprob", "min_logprob")
    }
    trees: dict[str, object] = {}
    for pid, node in zip(labels.problem_ids, labels.nodes, strict=True):
        if pid not in trees:
            trees[pid] = load_tree(tree_path(run_dir, str(pid), labels.meta["algorithm"]))
        d = trees[pid].nodes[int(node)]
        lp = d.get("token_logprobs") or [0.0]
        cols["depth"].append(float(d["depth"]))
        cols["terminal"].append(float(bool(d["terminal"])))
        cols["mean_logprob"].append(float(np.mean(lp)))
        cols["min_logprob"].append(float(np.min(lp)))
    return {k: np.asarray(v, dtype=np.float32) for k, v in cols.items()}


def study(labels_path: Path, seeds: int) -> dict[str, dict]:
    from mcts.improve.labels import LabelSet
    from rewards.value_model import ValueHeadConfig, train_value_head

    labels = LabelSet.load(labels_path)
    extra = extra_columns(labels)
    base = ValueHeadConfig()
    out: dict[str, dict] = {}
    for name, (fields, cols) in CANDIDATES.items():
        X = np.hstack([labels.X, *[extra[c][:, None] for c in cols]]) if cols else labels.X
        runs = []
        for seed in range(seeds):
            cfg = replace(base, seed=seed, extra_features=list(cols), **fields)
            _, m = train_value_head(
                X, labels.y, groups=labels.groups, weights=labels.weights, cfg=cfg
            )
            runs.append({k: m[k] for k in (*METRICS, "within_groups", "epochs_run")})
        summary = {
            k: [float(np.nanmean([r[k] for r in runs])), float(np.nanstd([r[k] for r in runs]))]
            for k in METRICS
        }
        cfg = replace(base, extra_features=list(cols), **fields)
        out[name] = {"config": asdict(cfg), "runs": runs, **summary}
        print(
            f"{name:>18}: AUC {summary['auc'][0]:.3f} +- {summary['auc'][1]:.3f}, within "
            f"{summary['within_auc'][0]:.3f} +- {summary['within_auc'][1]:.3f}",
            flush=True,
        )
    return out


def choose(res: dict[str, dict], key: str = "auc") -> str:
    """The one-standard-error rule over the splits (see the module docstring)."""
    best = max(res.values(), key=lambda v: v[key][0])
    se = best[key][1] / np.sqrt(len(best["runs"]))
    return next(n for n, v in res.items() if v[key][0] >= best[key][0] - se)


def to_markdown(res: dict[str, dict], labels_path: Path, meta: dict, seeds: int) -> str:
    first = next(iter(res.values()))["runs"]
    groups = "-".join(str(f(r["within_groups"] for r in first)) for f in (min, max))
    lines = [
        f"Labels: `{labels_path}` ({meta.get('rows')} steps of {meta.get('problems')} TRAIN "
        f"problems, {meta.get('positive_rate', 0):.1%} with value >= 0.5); {seeds} random "
        "splits by problem (20% held out). Mean +- sd over the splits. Within-problem AUC: "
        "over pairs of one held-out problem's steps with value >= 0.5 and < 0.5 only (held-out "
        f"problems with both per split: {groups}).",
        "",
        "| head | AUC | within-problem AUC | ECE | Brier |",
        "|---|---|---|---|---|",
    ]
    for name, v in res.items():
        lines.append(
            f"| {name} | {v['auc'][0]:.3f} +- {v['auc'][1]:.3f} | {v['within_auc'][0]:.3f} +- "
            f"{v['within_auc'][1]:.3f} | {v['ece'][0]:.3f} +- {v['ece'][1]:.3f} | "
            f"{v['brier'][0]:.4f} +- {v['brier'][1]:.4f} |"
        )
    lines += [
        "",
        f"Chosen by the rule in the script (the simplest within one standard error of the "
        f"best mean): by AUC **{choose(res)}**; by within-problem AUC "
        f"**{choose(res, 'within_auc')}**.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "labels", type=Path, nargs="+", help="round<k>/labels.npz of a loop run (TRAIN only)"
    )
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--write-results", action="store_true")
    a = ap.parse_args(argv)
    for path in a.labels:
        if not path.is_file():
            sys.exit(f"{path}: no such labels file (run the loop's TRAIN stage first)")
    from mcts.improve.labels import LabelSet

    results, parts = {}, []
    for path in a.labels:  # one table per labels file (e.g. each round's policy)
        results[str(path)] = res = study(path, a.seeds)
        parts.append(to_markdown(res, path, LabelSet.load(path).meta, a.seeds))
    md = "\n".join(parts)
    out = ROOT / "benchmarks" / "out"
    out.mkdir(exist_ok=True)
    (out / "value_head_study.json").write_text(json.dumps(results, indent=2))
    print(md)
    if a.write_results:
        from benchmarks._results import write_section

        files = " ".join(str(p) for p in a.labels)
        cmd = f"`python benchmarks/value_head_study.py {files} --seeds {a.seeds} --write-results`"
        notes = ROOT / "benchmarks" / "value_head_study_notes.md"  # the reading, by hand
        extra = "\n" + notes.read_text() if notes.exists() else ""
        write_section(TITLE, f"Command: {cmd}\n\n" + md + extra)


if __name__ == "__main__":
    main()
