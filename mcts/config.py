"""The search's settings, one dataclass, shared by the library API and the Hydra app.

Hydra validates a run's `search:` group against this schema (unknown keys and wrong types
are rejected with the key named); the library takes the same object.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

ALGORITHMS = ("mcts", "rest_mcts", "best_of_n", "self_consistency", "beam", "dvts")
ANSWER_SELECTION = ("visits", "value", "vote")
BON_AGGREGATION = ("orm_max", "prm_max", "weighted_vote", "vote")
PRM_AGGREGATION = ("last", "min", "mean", "prod")


@dataclass
class SearchConfig:
    algorithm: str = "mcts"
    # Budget: generated tokens per problem. A request is only issued when its worst case
    # (n samples x max tokens) fits in what is left, so no problem ever exceeds it.
    token_budget: int = 256
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
    prior_temperature: float = 1.0  # softmax over siblings' mean token logprob
    dirichlet_alpha: float = 0.0  # 0 disables root noise
    dirichlet_eps: float = 0.25
    answer_selection: str = "visits"  # "visits" | "value" | "vote"
    value_target: str = "mc"  # "mc" (fraction of correct terminal descendants) | "rest"

    # best-of-N / self-consistency
    samples_per_wave: int = 4
    bon_aggregation: str = "orm_max"  # "orm_max" | "prm_max" | "weighted_vote" | "vote"
    prm_aggregation: str = "min"  # how prm_max folds per-step scores

    # beam / DVTS
    beam_width: int = 4
    beam_expansions: int = 4  # children per beam per step

    # outputs
    pair_margin: float = 0.2
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
            "beam_width",
            "beam_expansions",
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
        if self.value_target not in ("mc", "rest"):
            raise bad("value_target", "choose 'mc' or 'rest'")
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
        if not 0 <= self.pair_margin <= 1:
            raise bad("pair_margin", "must be in [0, 1]")

    @classmethod
    def from_dict(cls, d: dict) -> SearchConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"search: unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**d)
