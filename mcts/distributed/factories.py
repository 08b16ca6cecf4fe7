"""Picklable recipes for a worker's models: each Ray actor builds its own from one of these.

A model object itself is never shipped (a vLLM engine or a llama.cpp context cannot be
pickled, and should be loaded once per worker anyway). A recipe is one of:

- a mapping: the same generator / reward config the Hydra app uses
  (`make_generator(cfg)`, `make_reward(cfg, generator)`);
- a pair ("package.module:attr" or "package.module.attr", {kwargs}): imported and called
  with the kwargs;
- a picklable callable (a class, a module-level function, a functools.partial).
  A reward callable with one required positional parameter is handed the worker's generator
  (a judge or rollout reward on the policy model); otherwise it is called with no arguments.
"""

from __future__ import annotations

import importlib
import inspect
import pickle
from collections.abc import Callable, Mapping
from typing import Any

from mcts.types import Generator, Reward

Spec = Mapping[str, Any] | tuple[str, Mapping[str, Any]] | Callable[..., Any]


def _import(path: str) -> Any:
    mod, sep, attr = path.partition(":")
    if not sep:
        mod, _, attr = path.rpartition(".")
    if not mod or not attr:
        raise ValueError(f"factory path {path!r} must look like 'package.module:attr'")
    try:
        obj: Any = importlib.import_module(mod)
    except ImportError as e:
        raise ImportError(f"factory path {path!r}: cannot import {mod!r} ({e})") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"factory path {path!r}: {mod!r} has no attribute {attr!r}") from None
    return obj


def _wants_generator(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        for p in params
    )


def _plain(spec: Any) -> Any:
    try:  # an OmegaConf node from Hydra -> plain containers (they pickle everywhere)
        from omegaconf import OmegaConf

        if OmegaConf.is_config(spec):
            return OmegaConf.to_container(spec, resolve=True)
    except ImportError:  # pragma: no cover - hydra is a core dependency
        pass
    return spec


def check_spec(spec: Any, what: str, optional: bool = False) -> Any:
    """Fail on the driver, before any actor starts, if `spec` cannot be a recipe."""
    spec = _plain(spec)
    if spec is None:
        if optional:
            return None
        raise ValueError(
            f"{what}: a recipe is required (a config dict, (path, kwargs) or callable)"
        )
    ok = (
        isinstance(spec, Mapping)
        or (
            isinstance(spec, (tuple, list))
            and len(spec) == 2
            and isinstance(spec[0], str)
            and isinstance(spec[1], Mapping)
        )
        or callable(spec)
    )
    if not ok:
        raise TypeError(
            f"{what}: expected a config dict, a ('module:attr', kwargs) pair or a picklable "
            f"callable, got {type(spec).__name__}; pass a recipe, not a built model"
        )
    if isinstance(spec, (tuple, list)):
        spec = (spec[0], dict(spec[1]))
    try:
        from ray import cloudpickle

        cloudpickle.dumps(spec)
    except ImportError:  # building in-process without Ray: plain pickle is the bar
        pickle.dumps(spec)
    except Exception as e:
        raise TypeError(
            f"{what}: the recipe cannot be pickled to the workers ({e}); pass a config "
            "dict or a module-level factory instead of an object holding a live model"
        ) from e
    return spec


def build_generator(spec: Spec) -> Generator:
    """Build one generator from its recipe (runs inside the worker)."""
    spec = _plain(spec)
    if isinstance(spec, Mapping):
        from mcts.generators.factory import make_generator

        return make_generator(dict(spec))
    if isinstance(spec, (tuple, list)):
        return _import(spec[0])(**dict(spec[1]))
    return spec()


def build_reward(spec: Spec | None, generator: Generator) -> Reward | None:
    """Build one reward from its recipe, on the worker's own generator where it needs one."""
    spec = _plain(spec)
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        from rewards.factory import make_reward

        return make_reward(dict(spec), generator)
    if isinstance(spec, (tuple, list)):
        return _import(spec[0])(**dict(spec[1]))
    return spec(generator) if _wants_generator(spec) else spec()
