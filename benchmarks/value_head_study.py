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

    python benchmarks/value_head_study.py RUN/round1/labels.npz --score-on train_best_of_n

--score-on SOURCE (labels of a loop run with improve.label_runs): which TRAIN rows to fit
on, scored where best-of-N and the weighted vote use the head, i.e. on the held-out
problems' rows of SOURCE only (independent samples). Candidates, simplest first: each head
of SOURCE_HEADS fit on the main run's rows only, then on all rows. Rule, fixed before the
run: the one-standard-error rule on the within-problem AUC of those rows.
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
TITLE_SOURCES = "Value head training rows: tree steps or independent samples (held-out TRAIN)"


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


def spread(runs: list[dict]) -> dict[str, list[float]]:
    """Mean and sd over the splits of each metric (NaN splits left out)."""
    return {
        k: [float(np.nanmean([r[k] for r in runs])), float(np.nanstd([r[k] for r in runs]))]
        for k in METRICS
    }


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
        summary = spread(runs)
        cfg = replace(base, extra_features=list(cols), **fields)
        out[name] = {"config": asdict(cfg), "runs": runs, **summary}
        print(
            f"{name:>18}: AUC {summary['auc'][0]:.3f} +- {summary['auc'][1]:.3f}, within "
            f"{summary['within_auc'][0]:.3f} +- {summary['within_auc'][1]:.3f}",
            flush=True,
        )
    return out


SOURCE_HEADS = ("logistic wd1e-4", "mlp64 wd1e-2")


def source_study(labels_path: Path, seeds: int, score_on: str) -> dict[str, dict]:
    """Each head of SOURCE_HEADS fit on the main run's rows, then on all rows, scored on the
    held-out problems' `score_on` rows (see the module docstring)."""
    from mcts.improve.labels import LabelSet
    from rewards.value_model import ValueHeadConfig, evaluate, split_groups, train_value_head

    labels = LabelSet.load(labels_path)
    src = labels.source_of_rows()
    if score_on not in set(src):
        raise SystemExit(f"{labels_path}: no rows from {score_on!r} (sources: {sorted(set(src))})")
    main_rows = src == src[0]
    out: dict[str, dict] = {}
    for head in SOURCE_HEADS:
        fields = CANDIDATES[head][0]
        for rows_name, keep in (
            (f"{src[0]} rows", main_rows),
            ("all rows", np.ones_like(main_rows)),
        ):
            runs = []
            for seed in range(seeds):
                cfg = replace(ValueHeadConfig(), seed=seed, **fields)
                # the same held-out problems for every candidate: drawn over ALL rows' groups
                _, held_out = split_groups(list(labels.groups), cfg)
                h, m = train_value_head(
                    labels.X[keep],
                    labels.y[keep],
                    groups=labels.groups[keep],
                    weights=labels.weights[keep],
                    cfg=cfg,
                    val_groups=held_out,
                )
                val = set(held_out)  # scored on all of them (a head may lack rows of some)
                sel = (src == score_on) & np.array([g in val for g in labels.groups])
                ev = evaluate(h, labels.X[sel], labels.y[sel], groups=labels.groups[sel])
                runs.append(
                    {
                        **{k: ev[k] for k in METRICS},
                        "within_groups": ev["within_groups"],
                        "val_groups": sorted(val),
                    }
                )
            summary = spread(runs)
            name = f"{head}, fit on {rows_name}"
            out[name] = {
                "config": asdict(replace(ValueHeadConfig(), **fields)),
                "runs": runs,
                **summary,
            }
            print(
                f"{name}: within {summary['within_auc'][0]:.3f} +- {summary['within_auc'][1]:.3f}",
                flush=True,
            )
    splits = {tuple(tuple(r["val_groups"]) for r in v["runs"]) for v in out.values()}
    for v in out.values():
        v["same_splits"] = len(splits) == 1  # every candidate held out the same problems
    return out


def choose(res: dict[str, dict], key: str = "auc") -> str:
    """The one-standard-error rule over the splits (see the module docstring)."""
    best = max(res.values(), key=lambda v: v[key][0])
    se = best[key][1] / np.sqrt(len(best["runs"]))
    return next(n for n, v in res.items() if v[key][0] >= best[key][0] - se)


def to_markdown(
    res: dict[str, dict], labels_path: Path, meta: dict, seeds: int, key: str = ""
) -> str:
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
    rule = "Chosen by the rule in the script (the simplest within one standard error of the best mean): "
    if key:
        lines += ["", rule + f"by within-problem AUC **{choose(res, key)}**."]
    else:
        lines += [
            "",
            rule + f"by AUC **{choose(res)}**; by within-problem AUC "
            f"**{choose(res, 'within_auc')}**.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "labels", type=Path, nargs="+", help="round<k>/labels.npz of a loop run (TRAIN only)"
    )
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--score-on", default=None, help="a label source, e.g. train_best_of_n")
    ap.add_argument("--write-results", action="store_true")
    a = ap.parse_args(argv)
    for path in a.labels:
        if not path.is_file():
            sys.exit(f"{path}: no such labels file (run the loop's TRAIN stage first)")
    from mcts.improve.labels import LabelSet

    results, parts = {}, []
    for path in a.labels:  # one table per labels file (e.g. each round's policy)
        meta = LabelSet.load(path).meta
        if a.score_on:
            results[str(path)] = res = source_study(path, a.seeds, a.score_on)
            parts.append(
                f"Scored on the held-out problems' `{a.score_on}` rows only (the same "
                f"problems held out for every candidate: {next(iter(res.values()))['same_splits']})"
                ". Rows per run: "
                + ", ".join(f"{Path(m['run_dir']).name} {m['rows']}" for m in meta.get("runs", []))
                + ".\n\n"
                + to_markdown(res, path, meta, a.seeds, key="within_auc")
            )
        else:
            results[str(path)] = res = study(path, a.seeds)
            parts.append(to_markdown(res, path, meta, a.seeds))
    md = "\n".join(parts)
    out = ROOT / "benchmarks" / "out"
    out.mkdir(exist_ok=True)
    suffix = f"_{a.score_on}" if a.score_on else ""
    (out / f"value_head_study{suffix}.json").write_text(json.dumps(results, indent=2))
    print(md)
    if a.write_results:
        from benchmarks._results import write_section

        files = " ".join(str(p) for p in a.labels)
        flag = f" --score-on {a.score_on}" if a.score_on else ""
        cmd = f"`python benchmarks/value_head_study.py {files} --seeds {a.seeds}{flag} --write-results`"
        notes = ROOT / "benchmarks" / f"value_head_study{suffix}_notes.md"  # the reading, by hand
        extra = "\n" + notes.read_text() if notes.exists() else ""
        title = TITLE_SOURCES if a.score_on else TITLE
        write_section(title, f"Command: {cmd}\n\n" + md + extra)


if __name__ == "__main__":
    main()
