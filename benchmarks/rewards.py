"""Step-level rewards on champ-dataset: can they find the first wrong step? (ProcessBench-style)

For every solution with a first-wrong-step annotation, every prefix (steps 1..i) is scored by
each reward through the one batched interface (`Reward.score`, one call per wave). The
predicted first error is the first step scored below the threshold (none = "no mistake").
ProcessBench F1 = harmonic mean of the accuracy on erroneous solutions (exact first-error
step) and on correct ones (no step flagged). items/s = prefixes scored per second, wall time.

    .venv/bin/python benchmarks/rewards.py --rewards judge,rollout --limit 40 --write-results
    .venv/bin/python benchmarks/rewards.py --rewards prm_shepherd \
        --prm peiyi9979/math-shepherd-mistral-7b-prm --device cuda --limit 0   # a GPU user

Steps are the solution's blank-line separated paragraphs; the annotated step is the one
whose text span contains the annotation's start. Samples are drawn with a fixed seed,
balanced between erroneous and correct solutions, and capped in length (--max-steps,
--max-chars) so the embedded model's 2k context holds them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# This file is named rewards.py: drop its own folder from the path so `import rewards` finds
# the package, not this script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from mcts.types import ScoreItem  # noqa: E402
from rewards import make_reward  # noqa: E402


@dataclass
class Sample:
    pid: str
    question: str
    answer: str
    steps: tuple[str, ...]
    first_error: int  # -1 = no mistake


def split_steps(text: str) -> tuple[list[str], list[int]]:
    """Blank-line separated paragraphs and their start offsets in `text`."""
    steps, starts = [], []
    for m in re.finditer(r"\S(?:.*?)(?=\n\s*\n|\Z)", text, flags=re.S):
        steps.append(m.group(0).strip())
        starts.append(m.start())
    return steps, starts


def load_champ(limit: int, max_steps: int, max_chars: int, seed: int) -> tuple[list[Sample], int]:
    import champ_dataset

    ds = champ_dataset.load("v0")
    err, ok = [], []
    total = 0
    for pid, p in sorted(ds.problems.items()):
        for _key, ann in sorted((p.fws_annotations or {}).items()):
            total += 1
            steps, starts = split_steps(ann.text)
            if not steps or len(steps) > max_steps or len(ann.text) > max_chars:
                continue
            if ann.start_idx is None:
                label = -1
            else:
                label = max(i for i, s in enumerate(starts) if s <= max(ann.start_idx, starts[0]))
            s = Sample(pid, p.text, p.answer, tuple(steps), label)
            (ok if label < 0 else err).append(s)
    rng = random.Random(seed)
    rng.shuffle(err)
    rng.shuffle(ok)
    if limit > 0:
        err, ok = err[: limit - limit // 2], ok[: limit // 2]
    return err + ok, total


def prefix_items(samples: list[Sample]) -> tuple[list[ScoreItem], list[tuple[int, int]]]:
    items, where = [], []
    for si, s in enumerate(samples):
        for j in range(len(s.steps)):
            items.append(
                ScoreItem(
                    s.question,
                    s.steps[: j + 1],
                    reference=s.answer,
                    terminal=j == len(s.steps) - 1,
                )
            )
            where.append((si, j))
    return items, where


def predict(scores: list[np.ndarray], threshold: float) -> np.ndarray:
    out = np.full(len(scores), -1)
    for i, s in enumerate(scores):
        bad = np.flatnonzero(s < threshold)
        if bad.size:
            out[i] = int(bad[0])
    return out


def f1(pred: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    e, c = labels >= 0, labels < 0
    acc_err = float((pred[e] == labels[e]).mean()) if e.any() else float("nan")
    acc_ok = float((pred[c] == -1).mean()) if c.any() else float("nan")
    f = 0.0 if acc_err + acc_ok == 0 else 2 * acc_err * acc_ok / (acc_err + acc_ok)
    return acc_err, acc_ok, f


def run_reward(name: str, cfg: dict, generator, items, where, samples, wave: int, threshold: float):
    reward = make_reward(cfg, generator)
    scores = np.zeros(len(items))
    tokens = 0
    t0 = time.perf_counter()
    for start in range(0, len(items), wave):
        chunk = items[start : start + wave]
        scores[start : start + len(chunk)] = reward.score(chunk)
        lt = getattr(reward, "last_tokens", None)
        tokens += int(np.sum(lt)) if lt is not None else 0
    secs = time.perf_counter() - t0
    per_sample = [np.zeros(len(s.steps)) for s in samples]
    for (si, j), v in zip(where, scores, strict=True):
        per_sample[si][j] = v
    labels = np.array([s.first_error for s in samples])
    acc_err, acc_ok, f = f1(predict(per_sample, threshold), labels)
    grid = np.unique(np.concatenate([[0.0, 1.01], scores]))
    best = max((f1(predict(per_sample, t), labels)[2], float(t)) for t in grid)
    return {
        "reward": name,
        "items": len(items),
        "seconds": round(secs, 2),
        "items_per_s": round(len(items) / secs, 2),
        "reward_tokens": tokens,
        "acc_erroneous": round(acc_err, 3),
        "acc_correct": round(acc_ok, 3),
        "f1": round(f, 3),
        "f1_oracle_threshold": round(best[0], 3),
        "oracle_threshold": round(best[1], 4),
        "mean_score": round(float(scores.mean()), 4),
    }


def write_results(text: str, path: Path) -> None:
    """Replace (or append) the '## Rewards' section of RESULTS.md, leaving others alone."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    pat = re.compile(r"^## Rewards\b.*?(?=^## |\Z)", re.S | re.M)
    if pat.search(old):
        new = pat.sub(lambda _: text.rstrip() + "\n\n", old)
    else:
        new = old.rstrip() + "\n\n" + text.rstrip() + "\n"
    path.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--rewards",
        default="judge,rollout",
        help="comma list: judge, rollout, prm_shepherd, prm_classifier",
    )
    ap.add_argument(
        "--limit", type=int, default=40, help="solutions (half erroneous); 0 = all that fit"
    )
    ap.add_argument("--max-steps", type=int, default=8)
    ap.add_argument("--max-chars", type=int, default=2500)
    ap.add_argument("--wave", type=int, default=32, help="items per score() call")
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="llama_cpp", help="generator backend for judge/rollout")
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--n-threads", type=int, default=None, help="llama.cpp threads (None = all)")
    ap.add_argument("--rollout-k", type=int, default=2)
    ap.add_argument("--rollout-max-tokens", type=int, default=96)
    ap.add_argument("--prm", default=None, help="HF id or path of the PRM (prm_* rewards)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--write-results", action="store_true", help="update benchmarks/RESULTS.md")
    args = ap.parse_args()

    samples, total = load_champ(args.limit, args.max_steps, args.max_chars, args.seed)
    items, where = prefix_items(samples)
    names = [n.strip() for n in args.rewards.split(",") if n.strip()]
    generator = None
    if any(n in ("judge", "rollout") for n in names):
        from mcts.generators.factory import make_generator

        gcfg = {"backend": args.backend}
        if args.backend == "llama_cpp":
            gcfg["n_ctx"] = args.n_ctx
            gcfg["n_threads"] = args.n_threads
        generator = make_generator(gcfg)
    cfgs = {
        "judge": {"name": "judge"},
        "rollout": {
            "name": "rollout",
            "k": args.rollout_k,
            "max_tokens": args.rollout_max_tokens,
            "seed": args.seed,
        },
        "prm_shepherd": {
            "name": "prm_shepherd",
            "model": args.prm,
            "device": args.device,
            "aggregate": "last",
        },
        "prm_classifier": {
            "name": "prm_classifier",
            "model": args.prm,
            "device": args.device,
            "aggregate": "last",
            "head": "auto",
            "trust_remote_code": True,
        },
    }
    rows = []
    for n in names:
        if n not in cfgs:
            raise SystemExit(f"unknown reward {n!r}; choose from {sorted(cfgs)}")
        print(f"[{n}] scoring {len(items)} prefixes of {len(samples)} solutions ...", flush=True)
        row = run_reward(n, cfgs[n], generator, items, where, samples, args.wave, args.threshold)
        print(json.dumps(row), flush=True)
        rows.append(row)

    n_err = sum(s.first_error >= 0 for s in samples)
    cmd = "python benchmarks/rewards.py " + " ".join(sys.argv[1:])
    lines = [
        "## Rewards",
        "",
        f"Command: `{cmd}`  ",
        f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}; generator backend "
        f"`{args.backend}` (embedded SmolLM2-135M-Instruct Q4_1 unless configured).  ",
        f"Data: champ-dataset v0, {len(samples)} of {total} annotated solutions "
        f"({n_err} with a first wrong step, {len(samples) - n_err} correct; <= {args.max_steps} "
        f"steps, <= {args.max_chars} chars), {len(items)} prefixes scored per reward, "
        f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, "
        f"waves of {args.wave}. Threshold {args.threshold}.",
        "",
        "| reward | F1 | acc. erroneous | acc. correct | F1 @ oracle threshold (optimistic) | mean score | items/s | reward tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['reward']} | {r['f1']:.3f} | {r['acc_erroneous']:.3f} | {r['acc_correct']:.3f} | "
            f"{r['f1_oracle_threshold']:.3f} (t={r['oracle_threshold']}) | {r['mean_score']:.3f} | "
            f"{r['items_per_s']:.2f} | {r['reward_tokens']} |"
        )
    lines += [
        "",
        "ProcessBench F1: harmonic mean of exact first-error accuracy on erroneous solutions and "
        "no-flag accuracy on correct ones. A 135M model is expected to be near chance here; the "
        "harness is what matters: rerun it on a GPU with a real PRM (`--rewards prm_shepherd --prm "
        "<id> --device cuda`).",
    ]
    table = "\n".join(lines)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if args.write_results:
        write_results(table, ROOT / "benchmarks" / "RESULTS.md")


if __name__ == "__main__":
    main()
