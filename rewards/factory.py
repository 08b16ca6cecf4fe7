"""`make_reward(cfg, generator)`: build a Reward from a Hydra/dict config by name.

Every key is checked against the reward's constructor, so a typo fails at config time with
the list of valid keys instead of being silently ignored. Mixtures nest: a component is
itself a reward config.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from mcts.types import Generator, Reward

__all__ = ["make_reward", "REWARD_NAMES"]

REWARD_NAMES = (
    "verifier",
    "judge",
    "rollout",
    "learned",
    "prm_shepherd",
    "prm_classifier",
    "mix",
    "switch",
    "none",
)


def _plain(cfg: Any) -> dict[str, Any]:
    """A plain dict from a dict or an OmegaConf node (resolved)."""
    if isinstance(cfg, Mapping) and not hasattr(cfg, "_get_node"):
        return dict(cfg)
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):
            out = OmegaConf.to_container(cfg, resolve=True)
            if isinstance(out, dict):
                return {str(k): v for k, v in out.items()}
    except ImportError:  # pragma: no cover - hydra is a core dependency
        pass
    raise TypeError(f"reward config must be a mapping with a 'name' key, got {type(cfg).__name__}")


def _build(cls: Any, kwargs: dict[str, Any], name: str, *, extra_ok: tuple[str, ...] = ()) -> Any:
    params: list[str] = []
    for klass in cls.__mro__:  # PRM subclasses forward **kw to HFPRM: accept its keys too
        if klass is object or "__init__" not in vars(klass):
            continue
        params += [
            p for p in inspect.signature(klass.__init__).parameters if p not in ("self", "kw")
        ]
    unknown = sorted(set(kwargs) - set(params) - set(extra_ok))
    if unknown:
        raise ValueError(
            f"reward '{name}': unknown key(s) {unknown}; valid keys: {sorted(set(params))}"
        )
    return cls(**kwargs)


def make_reward(cfg: Any, generator: Generator | None = None) -> Reward:
    """Build the reward named by `cfg["name"]` (one of REWARD_NAMES).

    generator: the policy model, used by "judge" and "rollout" unless their config has its
    own `generator` sub-config (a judge on another model).
    """
    c = _plain(cfg)
    name = c.pop("name", None)
    if name not in REWARD_NAMES:
        raise ValueError(f"reward.name must be one of {REWARD_NAMES}, got {name!r}")
    if name == "none":
        from rewards.constant import ConstantReward

        return _build(ConstantReward, c, name)
    if name == "verifier":
        from rewards.verifier import OutcomeVerifier

        return _build(OutcomeVerifier, c, name)
    if name in ("judge", "rollout"):
        gen_cfg = c.pop("generator", None)
        if gen_cfg is not None:
            from mcts.generators.factory import make_generator

            generator = make_generator(gen_cfg)
        if generator is None:
            raise ValueError(
                f"reward '{name}' needs a generator: pass the policy's, or give the reward "
                "config a `generator:` sub-config"
            )
        if name == "judge":
            from rewards.judge import LLMJudge

            cls: Any = LLMJudge
        else:
            from rewards.rollout import MCRollout

            cls = MCRollout
        return _checked(cls, c, name, generator)
    if name == "learned":
        from rewards.learned import LearnedValue

        if generator is None:
            raise ValueError("reward 'learned' needs the policy generator (its hidden states)")
        return _checked(LearnedValue, c, name, generator)
    if name in ("prm_shepherd", "prm_classifier"):
        from rewards.prm import ClassifierPRM, MathShepherdPRM

        if "model" not in c or not c["model"]:
            raise ValueError(f"reward '{name}' needs `model`: a HF model id or local path")
        return _build(MathShepherdPRM if name == "prm_shepherd" else ClassifierPRM, c, name)
    if name == "mix":
        from rewards.mix import WeightedMix

        comps = c.pop("components", None)
        if c:
            raise ValueError(
                f"reward 'mix': unknown key(s) {sorted(c)}; valid keys: ['components']"
            )
        if not comps:
            raise ValueError("reward 'mix' needs `components`: a list of {weight, reward} entries")
        pairs = []
        for j, comp in enumerate(comps):
            comp = _plain(comp)
            if set(comp) != {"weight", "reward"}:
                raise ValueError(
                    f"reward 'mix': components[{j}] must have exactly the keys weight and "
                    f"reward, got {sorted(comp)}"
                )
            pairs.append((float(comp["weight"]), make_reward(comp["reward"], generator)))
        return WeightedMix(pairs)
    from rewards.mix import TerminalSwitch

    if set(c) != {"terminal", "other"}:
        raise ValueError(
            f"reward 'switch' needs exactly the keys terminal and other, got {sorted(c)}"
        )
    return TerminalSwitch(make_reward(c["terminal"], generator), make_reward(c["other"], generator))


def _checked(cls: Any, c: dict[str, Any], name: str, generator: Generator) -> Any:
    params = set(inspect.signature(cls.__init__).parameters) - {"self", "generator"}
    unknown = sorted(set(c) - params)
    if unknown:
        raise ValueError(f"reward '{name}': unknown key(s) {unknown}; valid keys: {sorted(params)}")
    return cls(generator, **c)
