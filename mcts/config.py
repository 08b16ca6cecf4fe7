"""The search's settings, one dataclass, shared by the library API and the Hydra app.

Hydra validates a run's `search:` group against this schema (unknown keys and wrong types
are rejected with the key named); the library takes the same object.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

ALGORITHMS = ("mcts", "rest_mcts", "best_of_n", "self_consistency", "beam", "dvts")
PRIORS = ("logprob", "count", "uniform")
VALUE_TARGETS = ("auto", "mc", "rest")
BEAM_SELECTION = ("auto", "max", "weighted_vote")
BUDGET_COUNTS = ("generated", "total")
ANSWER_SELECTION = ("visits", "value", "vote")
BON_AGGREGATION = ("orm_max", "prm_max", "weighted_vote", "vote")
PRM_AGGREGATION = ("last", "min", "mean", "prod")


@dataclass
class SearchConfig:
    algorithm: str = "mcts"
    # Budget: generated tokens per problem. A request is only issued when its worst case
    # (n samples x max tokens) fits in what is left, so no problem ever exceeds it.
    token_budget: int = 256
    # What the budget counts: "generated" tokens (bounded exactly: a request is issued only
    # when its worst case fits), or "total" = generated + reward-model tokens + uncached
    # prompt tokens (generated stays bounded the same way; reward and prompt tokens are only
    # known after a wave, so a problem can end at most one wave's reward+prompt tokens over).
    budget_counts: str = "generated"
    step_max_tokens: int = 64  # per reasoning step (tree algorithms)
    solution_max_tokens: int = 256  # per full solution (best_of_n, self_consistency)
    min_step_tokens: int = 8  # a tree retires when less than this is left
    max_depth: int = 8  # steps; a step at this depth is terminal
    delimiter: str = "\n\n"
    temperature: float = 0.8
    top_p: float = 1.0
    seed: int = 0
    system_prompt: str | None = None  # None: mcts.prompts.DEFAULT_SYSTEM
    max_live_trees: int = 64  # problems searched together (one generator call per wave)
    max_waves: int = 10_000  # safety stop per batch of problems
    max_idle_waves: int = 100  # retire a tree whose policy asks for nothing this many waves

    # MCTS
    n_children: int = 4  # K candidate steps per expansion
    leaves_per_tree: int = 1  # leaves selected per tree per wave (virtual loss keeps them apart)
    rule: str = "puct"  # "puct" | "uct"
    c_puct: float = 1.0
    c_base: float = 19652.0
    c_init: float = 1.25
    fpu: str = "parent"  # Q of unvisited children: "parent" or a number as a string
    # "logprob": softmax over distinct siblings of mean token logprob / prior_temperature;
    # "count": merged-sample frequency (Sampled MuZero); "uniform". See mcts/algorithms/mcts.py.
    prior: str = "logprob"
    prior_temperature: float = 1.0
    dirichlet_alpha: float = 0.0  # 0 disables root noise
    dirichlet_eps: float = 0.25
    answer_selection: str = "value"  # "value" | "vote" | "visits" (see mcts/algorithms/mcts.py)
    # "mc" (fraction of correct terminal descendants) | "rest" (ReST-MCTS*) | "auto": rest
    # for algorithm=rest_mcts, mc otherwise. See mcts/targets.py.
    value_target: str = "auto"

    # best-of-N / self-consistency
    samples_per_wave: int = 4
    bon_aggregation: str = "orm_max"  # "orm_max" | "prm_max" | "weighted_vote" | "vote"
    prm_aggregation: str = "min"  # how prm_max folds per-step scores

    # beam / DVTS, as in search-and-learn: n_beams (N) candidate steps per tree per step,
    # beam_width (M) of them from each kept beam; beam keeps the N/M best open beams (topped
    # up from the candidates when some finish), DVTS runs N/M independent subtrees that each
    # keep their one best child. beam_selection: "max" (highest final-step score) |
    # "weighted_vote" (answers weighted by final-step score) | "auto" (beam: max, dvts:
    # weighted_vote).
    n_beams: int = 16
    beam_width: int = 4
    beam_selection: str = "auto"

    # True: rewards never see the reference answer or the task's checker (ScoreItem.reference
    # and .problem.answer/.check are None); correctness is still scored after the search.
    # For EVAL splits; a reward that needs the reference is refused up front.
    hide_references: bool = False

    # outputs
    pair_margin: float = 0.2
    # Terminal solutions (merged samples) that must lie below each side of a step pair.
    pair_min_support: int = 1
    answer_mode: str = "auto"  # mcts.answers.extract_answer mode

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(field: str, msg: str) -> ValueError:
            return ValueError(f"search.{field}: {msg}")

        if self.algorithm not in ALGORITHMS:
            raise bad("algorithm", f"unknown {self.algorithm!r}; choose one of {ALGORITHMS}")
        for name in (
            "token_budget",
            "step_max_tokens",
            "solution_max_tokens",
            "min_step_tokens",
            "max_depth",
            "max_live_trees",
            "max_waves",
            "max_idle_waves",
            "n_children",
            "leaves_per_tree",
            "samples_per_wave",
            "n_beams",
            "beam_width",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, f"must be a positive integer, got {v!r}")
        step = (
            self.solution_max_tokens
            if self.algorithm in ("best_of_n", "self_consistency")
            else self.step_max_tokens
        )
        if self.token_budget < min(step, self.min_step_tokens):
            raise bad(
                "token_budget",
                f"{self.token_budget} is smaller than one step "
                f"(min_step_tokens={self.min_step_tokens}); raise the budget",
            )
        if not self.delimiter:
            raise bad("delimiter", "must be non-empty, e.g. '\\n\\n'")
        if not 0.0 <= self.temperature <= 5.0:
            raise bad("temperature", f"must be in [0, 5], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.rule not in ("puct", "uct"):
            raise bad("rule", f"must be 'puct' or 'uct', got {self.rule!r}")
        if self.fpu != "parent":
            try:
                float(self.fpu)
            except ValueError:
                raise bad("fpu", f"must be 'parent' or a number, got {self.fpu!r}") from None
        if self.answer_selection not in ANSWER_SELECTION:
            raise bad("answer_selection", f"choose one of {ANSWER_SELECTION}")
        if self.value_target not in VALUE_TARGETS:
            raise bad("value_target", f"choose one of {VALUE_TARGETS}")
        if self.prior not in PRIORS:
            raise bad("prior", f"choose one of {PRIORS}")
        if self.budget_counts not in BUDGET_COUNTS:
            raise bad("budget_counts", f"choose one of {BUDGET_COUNTS}")
        if self.beam_selection not in BEAM_SELECTION:
            raise bad("beam_selection", f"choose one of {BEAM_SELECTION}")
        if self.n_beams < self.beam_width or self.n_beams % self.beam_width:
            raise bad(
                "n_beams",
                f"must be a multiple of beam_width ({self.beam_width}) and at least it, got "
                f"{self.n_beams}: N/M beams are kept, each expanded into M (search-and-learn)",
            )
        if self.bon_aggregation not in BON_AGGREGATION:
            raise bad("bon_aggregation", f"choose one of {BON_AGGREGATION}")
        if self.prm_aggregation not in PRM_AGGREGATION:
            raise bad("prm_aggregation", f"choose one of {PRM_AGGREGATION}")
        if self.c_puct <= 0:
            raise bad("c_puct", "must be > 0")
        if self.prior_temperature <= 0:
            raise bad("prior_temperature", "must be > 0")
        if self.dirichlet_alpha < 0 or not 0 <= self.dirichlet_eps <= 1:
            raise bad("dirichlet_alpha", "alpha must be >= 0 and eps in [0, 1]")
        if not isinstance(self.hide_references, bool):
            raise bad("hide_references", f"must be true or false, got {self.hide_references!r}")
        if (
            not isinstance(self.pair_min_support, int)
            or isinstance(self.pair_min_support, bool)
            or self.pair_min_support < 1
        ):
            raise bad("pair_min_support", f"must be an integer >= 1, got {self.pair_min_support!r}")
        if not 0 <= self.pair_margin <= 1:
            raise bad("pair_margin", "must be in [0, 1]")

    @property
    def target_kind(self) -> str:
        """The value-target kind in force ("auto" resolved by algorithm)."""
        if self.value_target != "auto":
            return self.value_target
        return "rest" if self.algorithm == "rest_mcts" else "mc"

    @property
    def system(self) -> str:
        """The system prompt in force (None: mcts.prompts.DEFAULT_SYSTEM)."""
        from mcts.prompts import DEFAULT_SYSTEM

        return self.system_prompt if self.system_prompt is not None else DEFAULT_SYSTEM

    @property
    def beam_pick(self) -> str:
        """The beam/DVTS answer rule in force ("auto" resolved by algorithm)."""
        if self.beam_selection != "auto":
            return self.beam_selection
        return "weighted_vote" if self.algorithm == "dvts" else "max"

    @classmethod
    def from_dict(cls, d: dict) -> SearchConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"search: unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**d)
