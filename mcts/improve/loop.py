"""The self-improvement loop (ReST-MCTS* / rStar-Math style), one resumable stage at a time.

    splits        TRAIN and EVAL from disjoint seeds (splits.json)
    round r:
      train       search TRAIN with the round's policy and reward (r=0: the configured
                  reward or improve.train_reward, e.g. verified terminals; r>0: the value
                  head of round r-1, or, when round r-1 trained a new policy, round 0's
                  TRAIN reward again, since the old head reads the old policy's features)
                                                                      round{r}/train/
                  (improve.label_runs: more TRAIN searches, e.g. best_of_n samples, whose
                  labels join the head's rows, in rounds whose head is used)
                                                                      round{r}/train_<run>/
      labels      value targets of verified terminals + the policy's hidden states
                  (the reference is used here, for TRAIN labels only)  round{r}/labels.npz
      value       train the head, held-out TRAIN problems for early stopping and the
                  figures of its own quality                          round{r}/value.pt
      eval        search EVAL with the new head and the round's policy (references hidden
                  from the search: rewards never see them; correctness is scored after) at
                  every budget; round 0 also runs the configured reward there as the
                  baseline (improve.eval_rounds: which rounds run this)
                                                                      eval/<reward>/<run>-<budget>/
      policy      (improve.policy.method sft|dpo) fine-tune the BASE policy on this round's
                  TRAIN run (ReST-EM), export it, evaluate it against the round's policy
                  (greedy, self-consistency); it is round r+1's policy  round{r}/policy/
                  (the round's own policy is not sampled again for its vote: the report
                  reads it from the learned head's best-of-N run, the same samples)
    report        accuracy + 95% CI, McNemar vs self-consistency of the same policy and vs
                  the baseline reward, pass@k, tokens                 report.json / .md / .png

Every stage resumes after a kill: searches through their results.jsonl (and refuse a run
dir made with other settings), labels/value are written atomically and reused when their
inputs are unchanged (the value head records the fingerprint of the labels it was fit on).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mcts.config import SearchConfig
from mcts.export.io import atomic_write_text
from mcts.improve.labels import LabelSet, label_rows
from mcts.improve.policy import PolicyConfig
from mcts.improve.splits import Splits, check_disjoint, make_splits
from mcts.report import write_index_safely, write_report_safely
from mcts.types import Generator, Reward
from rewards.value_model import (
    ValueHead,
    ValueHeadConfig,
    cross_validate,
    data_fingerprint,
    train_value_head,
)

log = logging.getLogger("mcts.improve")

# Evaluation runs; best_of_n (prm_max: every step scored) also yields orm_max, weighted_vote
# and vote (= self-consistency) picks from the same samples, so SC costs no extra run.
EVAL_RUNS = ("mcts", "rest_mcts", "best_of_n")
METHODS = {  # reported method -> (run, pick in the run's `picks`, None = its own answer)
    "mcts": ("mcts", None),
    "rest_mcts": ("rest_mcts", None),
    "bon_orm": ("best_of_n", "orm_max"),
    "bon_prm": ("best_of_n", "prm_max"),
    "weighted_vote": ("best_of_n", "weighted_vote"),
    "self_consistency": ("best_of_n", "vote"),
    "greedy": ("greedy", None),  # the policy stage's own evaluation (policy_eval.py)
}
POLICY_TAG = "policy_r"  # eval/policy_r<k>/: the round-k policy, reward `none`


@dataclass
class ImproveConfig:
    """What the loop does; the searches' own settings come from the search config."""

    rounds: int = 1
    train_size: int = 200
    eval_size: int = 300
    train_seed: int = 1001
    eval_seed: int = 2002
    value_target: str = "mc"  # "mc" | "rest": the labels the head learns
    min_support: int = 1  # terminal solutions below a node for its label to be used
    train_budget: int = 256  # generated tokens per TRAIN problem
    budgets: list[int] = field(default_factory=lambda: [128, 256])
    eval_runs: list[str] = field(default_factory=lambda: list(EVAL_RUNS))
    baseline: bool = True  # round 0 also searches EVAL with the configured reward
    baseline_budgets: list[int] | None = None  # budgets of that baseline (None: `budgets`)
    # Round 0's TRAIN search reward (a reward config, e.g. {name: verifier}); empty: the
    # configured reward. TRAIN references may guide it (rStar-Math's first round backs up
    # verified terminals): labels come from verified terminals either way, and EVAL never
    # sees a reference. Rows record reward_uses_reference.
    train_reward: dict[str, Any] = field(default_factory=dict)  # {}: the configured reward
    # More TRAIN searches whose labels join the head's rows (round{r}/train_<run>/), e.g.
    # [best_of_n]: independent samples, the kind of candidates best-of-N and the weighted
    # vote rank on EVAL (an ORM trained on what it ranks, as in Cobbe et al. / Math-Shepherd)
    label_runs: list[str] = field(default_factory=list)
    # The head's figures over EVERY TRAIN problem: k heads, each problem held out once
    # (value_metrics.json "cv"; the saved head is unchanged). 0: off.
    cv_folds: int = 5
    head: ValueHeadConfig = field(default_factory=ValueHeadConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)  # method none: no policy stage
    # Rounds whose EVAL searches run (None: every round). Every round still trains its head
    # and policy; e.g. [1] measures only the second round when round 0 is already known.
    eval_rounds: list[int] | None = None

    def validate(self) -> None:
        def bad(name: str, msg: str) -> ValueError:
            return ValueError(f"improve.{name}: {msg}")

        if self.value_target not in ("mc", "rest"):
            raise bad("value_target", f"choose 'mc' or 'rest', got {self.value_target!r}")
        if self.rounds < 1:
            raise bad("rounds", f"must be >= 1, got {self.rounds}")
        if not self.budgets or any(b < 1 for b in self.budgets):
            raise bad(
                "budgets", f"must be a non-empty list of positive token budgets: {self.budgets}"
            )
        if self.baseline_budgets is not None and (
            not self.baseline_budgets or any(b < 1 for b in self.baseline_budgets)
        ):
            raise bad(
                "baseline_budgets",
                f"must be null (= budgets) or a non-empty list of positive budgets: "
                f"{self.baseline_budgets}",
            )
        if self.train_reward and not (
            isinstance(self.train_reward, dict) and self.train_reward.get("name")
        ):
            raise bad(
                "train_reward",
                f"must be empty (= the configured reward) or a reward config with a name, "
                f"e.g. {{name: verifier}}; got {self.train_reward!r}",
            )
        extra = sorted(set(self.label_runs) - set(EVAL_RUNS))
        if extra or len(set(self.label_runs)) != len(self.label_runs):
            raise bad(
                "label_runs",
                f"must be distinct search algorithms from {list(EVAL_RUNS)}; got {self.label_runs}",
            )
        if not isinstance(self.cv_folds, int) or self.cv_folds == 1 or self.cv_folds < 0:
            raise bad("cv_folds", f"must be 0 (off) or an int >= 2, got {self.cv_folds!r}")
        unknown = sorted(set(self.eval_runs) - set(EVAL_RUNS))
        if unknown:
            raise bad("eval_runs", f"unknown {unknown}; choose from {list(EVAL_RUNS)}")
        if self.eval_rounds is not None:
            outside = [r for r in self.eval_rounds if not (0 <= r < self.rounds)]
            if not self.eval_rounds or outside:
                raise bad(
                    "eval_rounds",
                    f"must be null (every round) or a non-empty list of rounds in "
                    f"0..{self.rounds - 1} (improve.rounds={self.rounds}); got {self.eval_rounds}",
                )
        self.head.validate()
        self.policy.validate()

    def evaluates(self, r: int) -> bool:
        """Whether round r searches EVAL."""
        return self.eval_rounds is None or r in self.eval_rounds


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def run_improve(
    cfg: ImproveConfig,
    search_cfg: SearchConfig,
    generator: Generator,
    reward0: Reward,
    out_dir: str | Path,
    *,
    task: Any = None,
    splits: Splits | None = None,
    progress: bool = False,
    train_reward: Reward | None = None,
    policy_generator: Callable[[Path], Generator] | None = None,
    base_hf: str | Path | None = None,
) -> dict[str, Any]:
    """Run (or resume) every stage; returns the report (also written to out_dir).

    train_reward: guides round 0's TRAIN search instead of reward0 (improve.train_reward);
    reward0 stays the EVAL baseline. improve.policy.method sft|dpo adds the policy stage:
    fine-tune `base_hf` (the policy's HF folder; default: the llama.cpp GGUF converted) on
    the TRAIN run, export a GGUF, and evaluate both policies (greedy, self-consistency) with
    the generator `policy_generator(gguf_path)` builds (same settings, new weights).

    TRAIN and EVAL come from `task` (a reasoning-gym task, drawn with improve.train_seed and
    improve.eval_seed) or are given as `splits` (your own files); either way they are
    checked disjoint by id and by question text.
    """
    from mcts.search import search
    from rewards.learned import LearnedValue

    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _enable_features(generator)
    if splits is None:
        if task is None:
            raise ValueError("run_improve needs a task (reasoning-gym) or explicit splits")
        splits = loop_splits(cfg, task)
        task_of: dict[str, Any] = {
            "train": {**_task_dict(task), "seed": cfg.train_seed, "size": cfg.train_size},
            "eval": {**_task_dict(task), "seed": cfg.eval_seed, "size": cfg.eval_size},
        }
    else:
        check_disjoint(splits)
        task_of = {"train": None, "eval": None}
    _write_json(out / "splits.json", {**asdict(cfg), **splits.describe()})
    reward, tag = reward0, _tag(reward0)
    gen = generator  # the policy of this round: round r > 0 searches with round r-1's policy
    for r in range(cfg.rounds):
        new_policy = r > 0 and cfg.policy.method != "none"
        if new_policy:
            # the previous head reads the old policy's hidden states (LearnedValue refuses
            # the new one): TRAIN is searched as in round 0, and this round fits its own head
            search_reward = train_reward if train_reward is not None else reward0
        else:
            search_reward = train_reward if (r == 0 and train_reward is not None) else reward
        rd = out / f"round{r}"
        train_cfg = replace(
            search_cfg,
            token_budget=cfg.train_budget,
            value_target=cfg.value_target,
            hide_references=False,
        )
        log.info(
            "round %d: searching %d TRAIN problems (%s)",
            r,
            len(splits.train),
            _tag(search_reward) if search_reward is not reward else tag,
        )
        # the extra TRAIN searches only where this round's head is used: it searches EVAL,
        # or guides the next round's TRAIN search (no policy stage in between)
        used = cfg.evaluates(r) or (r + 1 < cfg.rounds and cfg.policy.method == "none")
        label_runs = cfg.label_runs if used else []
        trains = [(train_cfg, rd / "train")]
        trains += [(_run_config(train_cfg, run), rd / f"train_{run}") for run in label_runs]
        for tcfg, tdir in trains:
            res = search(
                splits.train, gen, search_reward, tcfg, tdir, progress, task_config=task_of["train"]
            )
            write_report_safely(tdir, summary=res.summary)  # report.html of the stage
        labels = _labels(rd, train_cfg.algorithm, cfg.min_support, label_runs)
        head_path = _value(rd, labels, cfg.head, gen, cfg.cv_folds)
        evaluate = cfg.evaluates(r)
        if r == 0 and cfg.baseline and evaluate:
            _evaluate(
                out,
                splits.eval,
                gen,
                reward,
                tag,
                search_cfg,
                cfg,
                progress,
                task_of["eval"],
                budgets=cfg.baseline_budgets,
            )
        reward = LearnedValue(gen, str(head_path))
        tag = f"learned_r{r}"
        if evaluate:  # the question of issue 13: this round's head guiding this round's policy
            _evaluate(
                out, splits.eval, gen, reward, tag, search_cfg, cfg, progress, task_of["eval"]
            )
        if cfg.policy.method == "none":
            continue
        # ReST-EM: every round fine-tunes the BASE policy on this round's verified solutions
        gguf = _policy(rd, train_cfg.algorithm, cfg.policy, generator, base_hf)
        if policy_generator is None:
            raise ValueError("the policy stage needs policy_generator (a GGUF -> Generator)")
        nxt = policy_generator(gguf)
        _enable_features(nxt)
        if evaluate:  # greedy first (cheap), sampling last
            policies = [(f"{POLICY_TAG}{r}", gen), (f"{POLICY_TAG}{r + 1}", nxt)]
            for ptag, pgen in policies:
                _evaluate_greedy(out, splits.eval, pgen, ptag, search_cfg)
            for ptag, pgen in policies:
                if pgen is gen and "best_of_n" in cfg.eval_runs:
                    continue  # this round's vote = learned_r<r>'s best-of-N vote (same samples)
                _evaluate_votes(
                    out, splits.eval, pgen, ptag, search_cfg, cfg, progress, task_of["eval"]
                )
        gen = nxt
    from mcts.improve.report import write_report

    report = write_report(out, splits.eval, cfg)
    write_index_safely(out)  # index.html: every stage's report.html, the loop's plot
    return report


def _enable_features(generator: Any) -> None:
    enable = getattr(generator, "enable_features", None)
    if not callable(enable):
        raise ValueError(
            f"improve trains on the policy's hidden states; generator {type(generator).__name__}"
            " does not return them (use generator=llama_cpp)"
        )
    enable()


def loop_splits(cfg: ImproveConfig, task: Any) -> Splits:
    """TRAIN and EVAL of the loop with these settings (the same draw on every call)."""
    return make_splits(
        task,
        train_size=cfg.train_size,
        eval_size=cfg.eval_size,
        train_seed=cfg.train_seed,
        eval_seed=cfg.eval_seed,
    )


def _task_dict(task: Any) -> dict[str, Any]:
    from mcts.tasks.config import as_task_config

    t = as_task_config(task)
    return {**t.__dict__, "params": dict(t.params)}


def _tag(reward: Reward) -> str:
    return str(getattr(reward, "name", type(reward).__name__))


def _labels(
    rd: Path, algorithm: str, min_support: int, label_runs: list[str] | None = None
) -> LabelSet:
    """Rebuilt from the TRAIN runs every time (cheap, and always what the runs hold)."""
    parts = [label_rows(rd / "train", algorithm, min_support=min_support)]
    parts += [
        label_rows(rd / f"train_{run}", run, min_support=min_support) for run in label_runs or []
    ]
    labels = LabelSet.concat(parts)
    labels.save(rd / "labels.npz")
    log.info("labels: %s", {k: labels.meta[k] for k in ("rows", "problems", "positive_rate")})
    return labels


def _value(
    rd: Path, labels: LabelSet, head_cfg: ValueHeadConfig, generator: Any, cv_folds: int = 0
) -> Path:
    """Train the head unless value.pt was already fit on exactly these labels and settings."""
    path = rd / "value.pt"
    fp = data_fingerprint(labels.X, labels.y, labels.groups, weights=labels.weights)
    if path.exists():
        try:
            old = ValueHead.load(path)
            if old.data_fingerprint == fp and asdict(old.config) == asdict(head_cfg):
                log.info("value head %s is up to date", path)
                return path
        except ValueError:
            pass  # corrupt or foreign: retrain over it
    if labels.y.size == 0:
        raise ValueError(
            f"{rd / 'labels.npz'}: no training rows ({labels.meta}); search more TRAIN "
            "problems or lower improve.min_support"
        )
    try:
        head, metrics = train_value_head(
            labels.X, labels.y, groups=labels.groups, weights=labels.weights, cfg=head_cfg
        )
    except ValueError as exc:  # e.g. one label only, too few rows: name the data
        raise ValueError(f"{rd / 'labels.npz'}: {exc}") from exc
    n_groups = len(set(labels.groups.tolist()))
    if cv_folds and n_groups >= cv_folds:
        metrics["cv"] = cross_validate(
            labels.X,
            labels.y,
            groups=labels.groups,
            weights=labels.weights,
            cfg=head_cfg,
            folds=cv_folds,
        )
    elif cv_folds:
        metrics["cv"] = {"skipped": f"{n_groups} problems < improve.cv_folds={cv_folds}"}
    head.save(
        path,
        feature_identity=generator.feature_identity(),
        data_fingerprint=fp,
        meta={"labels": labels.meta},
    )
    _write_json(rd / "value_metrics.json", metrics)
    log.info("value head: val AUC %.3f, ECE %.3f", metrics["auc"], metrics["ece"])
    return path


def _policy(
    rd: Path, algorithm: str, pcfg: PolicyConfig, generator: Any, base_hf: str | Path | None
) -> Path:
    """Data from the TRAIN run, then train + export (each reused when up to date)."""
    from mcts.improve.policy import tokenizer_sha256, train_policy, write_data

    if base_hf is None:
        path = getattr(generator, "path", None)
        if path is None or not str(path).endswith(".gguf"):
            raise ValueError(
                "the policy stage fine-tunes a HF folder: pass base_hf, or use a llama_cpp "
                "generator (its GGUF is converted once, mcts.generators.convert)"
            )
        from mcts.generators.convert import convert_gguf

        base_hf = convert_gguf(path)
    pol = rd / "policy"
    pol.mkdir(parents=True, exist_ok=True)
    _, header = write_data(rd / "train", algorithm, pcfg, pol, tokenizer_sha256(base_hf))
    log.info("policy data: %s", header["counts"])
    rec = train_policy(pol / "data.jsonl", base_hf, pol, pcfg)
    log.info(
        "policy: %s rows, %.0f s, loss %s -> %s",
        rec["rows"],
        rec["train_seconds"],
        rec["loss_first"],
        rec["loss_last"],
    )
    return Path(rec["gguf"])


def _evaluate_greedy(
    out: Path, problems: list, generator: Generator, tag: str, search_cfg: SearchConfig
) -> None:
    """One greedy solution per EVAL problem (policy_eval.py)."""
    from mcts.improve.policy_eval import greedy_eval

    ident = getattr(generator, "identity", None)
    log.info("eval %s greedy", tag)
    greedy_eval(
        problems,
        generator,
        out / "eval" / tag / "greedy-0",
        system=search_cfg.system,
        max_tokens=search_cfg.solution_max_tokens,
        extra={"generator": ident() if callable(ident) else type(generator).__name__},
    )


def _evaluate_votes(
    out: Path,
    problems: list,
    generator: Generator,
    tag: str,
    search_cfg: SearchConfig,
    cfg: ImproveConfig,
    progress: bool,
    task_config: dict[str, Any] | None,
) -> None:
    """Self-consistency at every budget: the best-of-N runs of `_evaluate` with the reward
    `none` (only the vote pick is read)."""
    from rewards.constant import ConstantReward

    votes = replace(cfg, eval_runs=["best_of_n"])
    _evaluate(
        out, problems, generator, ConstantReward(), tag, search_cfg, votes, progress, task_config
    )


def _run_config(search_cfg: SearchConfig, run: str) -> SearchConfig:
    """The search settings of one run kind: best-of-N scores every step (prm_max), so one
    run yields its ORM, PRM, weighted-vote and vote picks."""
    extra = {"bon_aggregation": "prm_max"} if run == "best_of_n" else {}
    return replace(search_cfg, algorithm=run, **extra)


def _evaluate(
    out: Path,
    problems: list,
    generator: Generator,
    reward: Reward,
    tag: str,
    search_cfg: SearchConfig,
    cfg: ImproveConfig,
    progress: bool,
    task_config: dict[str, Any] | None,
    budgets: list[int] | None = None,
) -> None:
    from mcts.search import search

    for budget in budgets or cfg.budgets:
        for run in cfg.eval_runs:
            ecfg = replace(
                _run_config(search_cfg, run),
                token_budget=budget,
                solution_max_tokens=min(search_cfg.solution_max_tokens, budget),
                hide_references=True,
                value_target="auto",
            )
            log.info("eval %s %s budget %d", tag, run, budget)
            res = search(
                problems,
                generator,
                reward,
                ecfg,
                out / "eval" / tag / f"{run}-{budget}",
                progress,
                task_config=task_config,
            )
            write_report_safely(out / "eval" / tag / f"{run}-{budget}", summary=res.summary)
