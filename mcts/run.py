"""Hydra entry point: `python -m mcts.run search=mcts generator=llama_cpp reward=judge task=default`.

Every config group is validated against a dataclass schema: unknown keys and wrong types
stop the run before any model loads, with the key named. The run directory is Hydra's
output dir; rerunning with `hydra.run.dir=<that dir>` resumes, skipping finished problems,
but only with the same settings: every results row carries the run's configuration
fingerprint, and a rerun whose search, task, generator or reward settings differ stops
before searching, naming the differing keys (mcts.export.fingerprint). The run holds
`<run_dir>/.lock`: a second run on the same directory fails at once.
`main` returns the accuracy of the selected answers (for sweepers).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from mcts.config import SearchConfig
from mcts.distributed.config import DistributedConfig

log = logging.getLogger("mcts.run")


@dataclass
class RunConfig:
    search: SearchConfig = field(default_factory=SearchConfig)
    generator: dict[str, Any] = field(default_factory=dict)
    reward: dict[str, Any] = field(default_factory=dict)
    task: dict[str, Any] = field(default_factory=dict)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    progress: bool = True


cs = ConfigStore.instance()
cs.store(name="run_schema", node=RunConfig)
cs.store(group="search", name="search_schema", node=SearchConfig)


def format_summary(summary: dict[str, Any]) -> str:
    """The human summary printed at the end of a run."""

    def pct(x: float) -> str:
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1%}"

    lines = [
        f"problems searched        {summary['problems']}",
        f"accuracy (selected)      {pct(summary['accuracy'])}",
        f"pass@k (any leaf)        {pct(summary['pass_at_k'])}   <- not an accuracy",
        f"generated tokens/problem {summary['generated_tokens_per_problem']:.1f}",
        f"prompt tokens/problem    {summary['prompt_tokens_per_problem']:.1f}"
        f"  (prefix-cache hit rate {pct(summary['prefix_cache_hit_rate'])})",
        f"reward tokens/problem    {summary['reward_tokens_per_problem']:.1f}",
        f"total tokens/problem     {summary.get('total_tokens_per_problem', float('nan')):.1f}"
        "  (generated + reward + uncached prompt)",
        f"waves / generator calls  {summary['waves']} / {summary['generator_calls']}"
        f"  (mean batch {summary['mean_batch_per_call']:.1f} requests,"
        f" wave fill {pct(summary.get('wave_fill'))})",
        f"truncated samples/problem {summary.get('truncated_per_problem') or 0:.2f}"
        "  (finished solutions cut by the token cap)",
        f"seconds                  {summary['seconds']:.1f}"
        f"  (outside model calls: {pct(summary['overhead_share'])})",
    ]
    if summary.get("beams_per_wave") is not None:
        lines.insert(
            -1, f"beams per wave           {summary['beams_per_wave']:.2f}  (effective width)"
        )
    chk = summary.get("answer_checks") or {}
    if chk.get("timeouts") or chk.get("errors"):
        lines.append(
            f"answer checks            {chk['timeouts']} timed out, {chk['errors']} failed "
            "(scored as incorrect)"
        )
    ex = summary.get("exports") or {}
    if ex:
        lines.append(
            "written                  "
            + ", ".join(f"{k}={v}" for k, v in ex.get("counts", {}).items())
        )
    dist = summary.get("distributed") or {}
    if dist.get("redealt_by_reason") or dist.get("poisoned_problems") or dist.get("nodes_lost"):
        redealt = ", ".join(f"{k} {v}" for k, v in dist.get("redealt_by_reason", {}).items())
        lines.append(
            f"re-dealt chunks          {redealt or 'none'}; nodes lost "
            f"{len(dist.get('nodes_lost') or [])}; poisoned problems "
            f"{dist.get('poisoned_problems') or 'none'} (failed.jsonl)"
        )
    if summary.get("reward_uses_reference"):
        lines.append(
            "NOTE: the reward reads the reference answer: accuracy is oracle-guided, "
            "not a test-time figure."
        )
    return "\n".join(lines)


def run(cfg: DictConfig | RunConfig, run_dir: str | Path) -> dict[str, Any]:
    """Everything `main` does, callable without Hydra's decorator (tests, notebooks)."""
    from mcts.distributed import run_search
    from mcts.tasks import load_task

    if isinstance(cfg, DictConfig):
        # from_dict: a key forced in with `+search.x=...` is rejected here by name too
        scfg = SearchConfig.from_dict(OmegaConf.to_container(cfg.search, resolve=True))
        gcfg = OmegaConf.to_container(cfg.generator, resolve=True)
        rcfg = OmegaConf.to_container(cfg.reward, resolve=True)
        tcfg = OmegaConf.to_container(cfg.task, resolve=True)
        dcfg: DistributedConfig = OmegaConf.to_object(cfg.distributed)  # type: ignore[assignment]
        progress = bool(cfg.progress)
    else:
        scfg, gcfg, rcfg, tcfg = cfg.search, cfg.generator, cfg.reward, cfg.task
        dcfg, progress = cfg.distributed, cfg.progress
    run_dir = Path(run_dir)
    from mcts.export import (
        ResultsLog,
        atomic_write_text,
        check_resume,
        check_writable,
        hold_run_dir,
        run_fingerprint,
    )

    check_writable(run_dir)  # before any model loads
    # One writer per run directory for the whole run (search() re-enters this lock).
    with hold_run_dir(run_dir):
        problems = load_task(tcfg)
        # A rerun with other search/task settings stops here, before any model loads; the
        # models' identities are checked by the search once they are built.
        check_resume(ResultsLog(run_dir), run_fingerprint(scfg, tcfg), problems)
        # workers=0 (distributed=single): the plain single-process search() with models built
        # by the same factories; otherwise sharded over Ray workers that each build their own.
        res = run_search(
            problems,
            gcfg,
            rcfg,
            scfg,
            run_dir=run_dir,
            distributed=dcfg,
            progress=progress,
            task_config=tcfg,
        )
        summary = res.summary
        if (run_dir / "tree.png").exists():  # drawn by write_exports
            summary["tree_png"] = str(run_dir / "tree.png")
        # atomic: a crash leaves the previous summary.json or the new one, never half of one
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
        # report.html, from results.jsonl + trees + summary.json: a failure warns, never
        # loses the run (mcts.report)
        from mcts.report import write_report_safely

        report = write_report_safely(run_dir)
        if report is not None:
            summary["report_html"] = str(report)
    return summary


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    run_dir = HydraConfig.get().runtime.output_dir
    summary = run(cfg, run_dir)
    print(format_summary(summary))
    print(f"run directory: {run_dir}")
    if summary.get("report_html"):
        print(f"report: {summary['report_html']} (open it in a browser)")
    return float(summary["accuracy"])


if __name__ == "__main__":
    main()
