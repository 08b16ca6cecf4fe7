"""`make_generator(cfg)`: one entry point from a Hydra/dict/dataclass config to a backend.

Backends import lazily so choosing llama_cpp never imports torch, and vllm never loads here
unless asked for.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any

from mcts.types import Generator

# backend name -> (module, generator class, config dataclass)
BACKENDS: dict[str, tuple[str, str, str]] = {
    "llama_cpp": ("mcts.generators.llama_cpp", "LlamaCppGenerator", "LlamaCppConfig"),
    "transformers": ("mcts.generators.transformers", "TransformersGenerator", "TransformersConfig"),
    "vllm": ("mcts.generators.vllm", "VLLMGenerator", "VLLMConfig"),
}


def _to_dict(cfg: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return dataclasses.asdict(cfg)
    try:  # an OmegaConf DictConfig from Hydra
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return dict(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover - hydra is a core dependency
        pass
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise TypeError(f"generator config must be a dict, DictConfig or dataclass, got {type(cfg)!r}")


def make_generator(cfg: Any) -> Generator:
    """Build the backend named by `cfg["backend"]` ("llama_cpp", "transformers", "vllm").

    Unknown keys are rejected with the key named, so a typo never silently falls back to a
    default.
    """
    d = _to_dict(cfg)
    backend = d.get("backend")
    if backend not in BACKENDS:
        raise ValueError(f"generator.backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    mod_name, cls_name, cfg_name = BACKENDS[backend]
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ImportError(
            f"generator backend {backend!r} is not available here ({exc}); install its "
            "dependencies (`make install`; vllm has its own venv: `make test-vllm`)"
        ) from exc
    cfg_cls = getattr(module, cfg_name)
    known = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(
            f"unknown generator config key(s) {unknown} for backend {backend!r}; "
            f"known keys: {sorted(known)}"
        )
    gen_cls = getattr(module, cls_name)
    config = cfg_cls(**d)
    if hasattr(gen_cls, "from_config"):
        return gen_cls.from_config(config)
    return gen_cls(config)
