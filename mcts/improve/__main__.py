"""`python -m mcts.improve [improve.rounds=1 improve.train_size=200 ...]` (Hydra).

The run directory is Hydra's output dir; rerun with `hydra.run.dir=<that dir>` to resume:
every stage picks up where it stopped (mcts/improve/loop.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mcts.config import SearchConfig
from mcts.improve.loop import ImproveConfig, run_improve
from mcts.improve.report import to_markdown

log = logging.getLogger("mcts.improve")


@dataclass
class ImproveRunConfig:
    improve: ImproveConfig = field(default_factory=ImproveConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    generator: dict[str, Any] = field(default_factory=dict)
    reward: dict[str, Any] = field(default_factory=dict)
    task: dict[str, Any] = field(default_factory=dict)
    progress: bool = True


cs = ConfigStore.instance()
cs.store(name="improve_schema", node=ImproveRunConfig)
cs.store(group="search", name="search_schema", node=SearchConfig)


def build(cfg: DictConfig) -> tuple[ImproveConfig, SearchConfig, Any, Any, dict[str, Any]]:
    """The loop's settings, policy, configured reward and task from a composed config
    (settings validated before any model loads)."""
    from mcts.generators.factory import make_generator
    from rewards.factory import make_reward

    icfg: ImproveConfig = OmegaConf.to_object(cfg.improve)  # type: ignore[assignment]
    icfg.validate()
    scfg = SearchConfig.from_dict(OmegaConf.to_container(cfg.search, resolve=True))
    gen = make_generator(OmegaConf.to_container(cfg.generator, resolve=True))
    reward = make_reward(OmegaConf.to_container(cfg.reward, resolve=True), gen)
    task = OmegaConf.to_container(cfg.task, resolve=True)
    return icfg, scfg, gen, reward, task  # type: ignore[return-value]


def run(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """What `main` does, without Hydra's decorator (tests)."""
    from mcts.generators.factory import make_generator
    from rewards.factory import make_reward

    icfg, scfg, gen, reward, task = build(cfg)
    train_reward = make_reward(dict(icfg.train_reward), gen) if icfg.train_reward else None
    gen_cfg = OmegaConf.to_container(cfg.generator, resolve=True)

    def policy_generator(gguf: Path) -> Any:
        """The fine-tuned policy, served like the first one (same settings, new weights)."""
        return make_generator({**gen_cfg, "model_path": str(gguf)})

    return run_improve(
        icfg,
        scfg,
        gen,
        reward,
        out_dir,
        task=task,
        progress=bool(cfg.progress),
        train_reward=train_reward,
        policy_generator=policy_generator,
    )


@hydra.main(version_base="1.3", config_path="../../configs", config_name="improve")
def main(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    report = run(cfg, out)
    print(to_markdown(report))
    print(f"run directory: {out}")


if __name__ == "__main__":
    main()
