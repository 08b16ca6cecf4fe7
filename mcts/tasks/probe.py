"""How hard is a task for a model? Greedy accuracy and pass@k of plain full solutions.

Used to pick the default task (search needs a task that is neither ~0% nor ~100% for the
model at hand). No search, no reward: one greedy solution and `samples` sampled ones per
problem, answers extracted with mcts.answers and scored with the task's own check.

    python -m mcts.tasks.probe --task default --size 50 --samples 4
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mcts.answers import extract_answer, is_correct
from mcts.prompts import problem_messages
from mcts.types import Generator, Problem, StepRequest

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "task"


def probe(
    problems: Sequence[Problem],
    generator: Generator,
    *,
    samples: int = 4,
    temperature: float = 0.8,
    max_tokens: int = 256,
    seed: int = 0,
    on_greedy: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Greedy accuracy, per-sample accuracy and pass@`samples` over `problems`.

    `on_greedy` receives the greedy figures as soon as they are known (sampling is slower).
    """
    if samples < 0:
        raise ValueError(f"samples must be >= 0, got {samples}")
    t0 = time.perf_counter()
    greedy_reqs = [
        StepRequest(
            problem_messages(p.question), n=1, temperature=0.0, max_tokens=max_tokens, to_end=True
        )
        for p in problems
    ]
    greedy = generator.generate(greedy_reqs)
    greedy_ok = [
        is_correct(extract_answer(g.steps[0].text), p)
        for p, g in zip(problems, greedy, strict=True)
    ]
    if on_greedy is not None:
        on_greedy(
            {
                "problems": len(problems),
                "greedy_correct": sum(greedy_ok),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
    sampled = (
        generator.generate(
            [
                StepRequest(
                    problem_messages(p.question),
                    n=samples,
                    temperature=temperature,
                    max_tokens=max_tokens,
                    to_end=True,
                    seed=seed + i,
                )
                for i, p in enumerate(problems)
            ]
        )
        if samples
        else [None] * len(problems)
    )
    n_greedy = n_pass = n_correct_samples = n_samples = 0
    for p, ok, s in zip(problems, greedy_ok, sampled, strict=True):
        n_greedy += ok
        if s is not None:
            oks = [is_correct(extract_answer(st.text), p) for st in s.steps]
            counts = [st.count for st in s.steps]
            n_correct_samples += sum(c for ok, c in zip(oks, counts, strict=True) if ok)
            n_samples += sum(counts)
            n_pass += any(oks)
    n = len(problems)
    return {
        "problems": n,
        "greedy_correct": n_greedy,
        "greedy_accuracy": n_greedy / n,
        "samples": samples,
        "sample_correct": n_correct_samples,
        "sample_total": n_samples,
        "pass_at_k_correct": n_pass,
        "pass_at_k": n_pass / n if samples else None,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def native_greedy(
    problems: Sequence[Problem], generator: Any, max_tokens: int = 256
) -> dict[str, Any]:
    """Greedy accuracy through llama.cpp's own decoding loop (LlamaCppGenerator only).

    Same rendered prompt, extraction and check as `probe`; only the token loop is llama.cpp's
    C loop instead of the generator's Python sampler, which is ~4x faster on a busy machine.
    """
    t0 = time.perf_counter()
    ok = tokens = 0
    for p in problems:
        prompt = generator.encode(generator.render(problem_messages(p.question)))
        r = generator.llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0)
        tokens += r["usage"]["completion_tokens"]
        ok += is_correct(extract_answer(r["choices"][0]["text"]), p)
    n = len(problems)
    return {
        "problems": n,
        "greedy_correct": ok,
        "greedy_accuracy": ok / n,
        "generated_tokens": tokens,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def question_space(cfg: dict[str, Any], n: int = 1000) -> dict[str, Any]:
    """How many distinct questions (mcts.improve's question_key) among n drawn: a task that
    repeats cannot give disjoint TRAIN and EVAL splits of a few hundred problems each."""
    from mcts.improve.splits import question_key
    from mcts.tasks import load_task

    qs = [question_key(p.question) for p in load_task({**cfg, "size": n})]
    return {"drawn": n, "distinct": len(set(qs))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from mcts.generators.factory import make_generator
    from mcts.tasks import load_task

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="default", help="a configs/task/<name>.yaml")
    ap.add_argument("--size", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0, help="task seed")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--backend", default="llama_cpp")
    ap.add_argument(
        "--n-threads", type=int, default=None, help="llama.cpp threads (1 on a busy machine)"
    )
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument(
        "--native-greedy",
        action="store_true",
        help="greedy only, through llama.cpp's own decoding loop (llama_cpp backend)",
    )
    ap.add_argument(
        "--space",
        type=int,
        default=0,
        metavar="N",
        help="only count distinct questions among N drawn (no model)",
    )
    a = ap.parse_args(argv)
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / f"{a.task}.yaml"))
    cfg.update(size=a.size, seed=a.seed)
    if a.space:
        out = {"task": a.task, "seed": a.seed, **question_space(cfg, a.space)}
        print(json.dumps(out))
        return out
    problems = load_task(cfg)
    gcfg: dict[str, Any] = {"backend": a.backend}
    if a.n_threads is not None:
        gcfg["n_threads"] = a.n_threads
    gen = make_generator(gcfg)
    head = {"task": a.task, "backend": a.backend, "seed": a.seed, "max_tokens": a.max_tokens}
    if a.native_greedy:
        out = head | {"native": True} | native_greedy(problems, gen, a.max_tokens)
    else:
        out = head | probe(
            problems,
            gen,
            samples=a.samples,
            max_tokens=a.max_tokens,
            on_greedy=lambda g: print(json.dumps(head | {"greedy_only": True} | g), flush=True),
        )
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
