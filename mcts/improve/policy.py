"""The policy stage of the loop: the policy learns from what its own TRAIN search verified.

    data     sft: verified-correct solutions (ReST-EM / STaR rejection sampling), at most
             `max_per_problem` distinct ones per problem; dpo: the run's trajectory pairs
             (pairs_dpo.parquet, kind "trajectory": a correct vs an incorrect full solution
             of one problem), consumed by TRL unchanged.      round{r}/policy/data.jsonl
    train    TRL SFTTrainer / DPOTrainer, LoRA (peft; lora_r=0: full fine-tuning), merged
             into the base weights and saved as a HF folder       round{r}/policy/hf/
    export   the same weights as a GGUF the default llama.cpp backend loads
             (mcts.generators.export_gguf)                        round{r}/policy/model.gguf

Rows are in TRL's conversational prompt-completion format with the messages the policy saw
(system prompt included, mcts.export.tables.RunPrompting). A full solution ends the
assistant turn, which is what the policy did when it wrote it (it stopped): the chat
template's end-of-turn after it is right here, unlike for step pairs (tables.py).

The tokenizer is part of the data: data.jsonl's header records the SHA-256 of the
tokenizer.json the samples were drawn with, and training on a checkpoint whose tokenizer
differs is an error (its ids would mean other text).

Each stage resumes: data.jsonl and the trained folder record the fingerprint of what they
were made from, and are reused when it matches. TRL, peft and datasets are the optional
extra [train].
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mcts.export.io import atomic_write_text
from mcts.export.results_log import ResultsLog
from mcts.export.tables import run_prompting
from mcts.export.trees import load_tree, tree_path
from mcts.prompts import join_steps

log = logging.getLogger("mcts.improve")

METHODS = ("none", "sft", "dpo")
DATA = "data.jsonl"
DONE = "trained.json"  # written last: a folder without it is unfinished


@dataclass
class PolicyConfig:
    """How the policy is fine-tuned on the TRAIN search's results (sized for a 135M model
    on a 2-core CPU by default; a 7B model on a GPU wants lora_r 16-64 and bf16)."""

    method: str = "none"  # "none" | "sft" (ReST-EM) | "dpo"
    max_per_problem: int = 4  # sft: distinct correct solutions per problem
    epochs: float = 2.0
    lr: float = 2e-4
    batch_size: int = 8
    lora_r: int = 16  # 0: full fine-tuning
    lora_alpha: int = 32
    beta: float = 0.1  # dpo
    max_length: int = 512
    seed: int = 0
    gguf_dtype: str = "f32"  # "f32" | "f16"

    def validate(self) -> PolicyConfig:
        def bad(name: str, want: str) -> ValueError:
            return ValueError(f"improve.policy.{name} must be {want}, got {getattr(self, name)!r}")

        if self.method not in METHODS:
            raise bad("method", f"one of {METHODS}")
        for name in ("max_per_problem", "batch_size", "max_length"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, "an int >= 1")
        for name in ("lora_r", "lora_alpha", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise bad(name, "an int >= 0")
        for name in ("epochs", "lr", "beta"):
            if not float(getattr(self, name)) > 0:
                raise bad(name, "a number > 0")
        if self.gguf_dtype not in ("f32", "f16"):
            raise bad("gguf_dtype", "'f32' or 'f16'")
        return self


class PolicyDataError(ValueError):
    """No usable rows, or data that does not fit the checkpoint: names the file and the fix."""


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_sha256(hf_dir: str | os.PathLike[str]) -> str:
    """Identity of a HF folder's tokenizer (its tokenizer.json bytes)."""
    path = Path(hf_dir) / "tokenizer.json"
    if not path.is_file():
        raise PolicyDataError(
            f"{path}: no tokenizer.json; the policy stage needs a HF folder with a fast "
            "tokenizer (python -m mcts.generators.convert makes one from a GGUF)"
        )
    return file_sha256(path)


def sft_rows(run_dir: str | Path, algorithm: str, max_per_problem: int) -> tuple[list, dict]:
    """Verified-correct full solutions of a TRAIN run, as prompt-completion rows.

    Per problem: the distinct correct solution texts, most-sampled first (merged samples
    count), at most max_per_problem. Returns (rows, counts of what was kept and dropped).
    """
    run_dir = Path(run_dir)
    counts = {"problems": 0, "with_correct": 0, "solutions": 0, "duplicates": 0, "over_cap": 0}
    rows: list[dict[str, Any]] = []
    for row in ResultsLog(run_dir).rows():
        if row.get("algorithm") != algorithm:
            continue
        counts["problems"] += 1
        tp = tree_path(run_dir, str(row["id"]), algorithm)
        if not tp.exists():
            continue
        g = load_tree(tp)
        rp = run_prompting(row, g)
        found: dict[str, float] = {}
        for n, d in g.nodes(data=True):
            if not (d.get("terminal") and d.get("correct")):
                continue
            path = _path_steps(g, n)
            text = join_steps(path, rp.delimiter)[: -len(rp.delimiter)]
            if text in found:
                counts["duplicates"] += 1
            found[text] = found.get(text, 0.0) + float(d.get("count") or 1)
        if found:
            counts["with_correct"] += 1
        ranked = sorted(found, key=lambda t: (-found[t], t))
        counts["over_cap"] += max(0, len(ranked) - max_per_problem)
        for text in ranked[:max_per_problem]:
            rows.append(
                {
                    "prompt": rp.messages(str(row["question"])),
                    "completion": [{"role": "assistant", "content": text}],
                    "problem_id": str(row["id"]),
                    "question": str(row["question"]),
                    "samples": found[text],
                }
            )
    counts["solutions"] = len(rows)
    return rows, counts


def _path_steps(g: Any, node: Any) -> list[str]:
    steps = []
    while True:
        preds = list(g.predecessors(node))
        if not preds:
            break
        steps.append(str(g.nodes[node].get("text", "")))
        node = preds[0]
    return steps[::-1]


def dpo_rows(run_dir: str | Path) -> tuple[list, dict]:
    """The run's trajectory pairs (pairs_dpo.parquet), unchanged but for TRL's columns."""
    import pyarrow.parquet as pq

    path = Path(run_dir) / "pairs_dpo.parquet"
    if not path.exists():
        raise PolicyDataError(
            f"{path}: missing; it is written at the end of a search (mcts.export.write_exports)"
        )
    table = pq.read_table(path).to_pylist()
    keep = [r for r in table if r.get("kind") == "trajectory"]
    rows = [
        {
            "prompt": r["prompt"],
            "chosen": r["chosen"],
            "rejected": r["rejected"],
            "problem_id": r["problem_id"],
        }
        for r in keep
    ]
    counts = {
        "pairs": len(table),
        "trajectory": len(keep),
        "step_pairs_skipped": len(table) - len(keep),
    }
    return rows, counts


def write_data(
    run_dir: Path, algorithm: str, cfg: PolicyConfig, out: Path, data_tokenizer: str
) -> tuple[list[dict], dict]:
    """data.jsonl: a header line (method, counts, tokenizer, fingerprint), then the rows."""
    if cfg.method == "sft":
        rows, counts = sft_rows(run_dir, algorithm, cfg.max_per_problem)
    else:
        rows, counts = dpo_rows(run_dir)
    if not rows:
        why = (
            f"no verified-correct solution in {counts['problems']} TRAIN problems"
            if cfg.method == "sft"
            else f"no trajectory pair among {counts['pairs']} pairs (a problem needs both a "
            "correct and an incorrect solution)"
        )
        raise PolicyDataError(
            f"{run_dir}: no {cfg.method} rows: {why} ({counts}); search more TRAIN problems, "
            "raise improve.train_budget, or choose an easier task"
        )
    body = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    header = {
        "format": "mcts-reason/policy-data",
        "method": cfg.method,
        "source": str(run_dir),
        "counts": counts,
        "tokenizer_sha256": data_tokenizer,
        "fingerprint": hashlib.sha256(body.encode()).hexdigest(),
    }
    atomic_write_text(out / DATA, json.dumps(header, sort_keys=True) + "\n" + body)
    return rows, header


def read_data(path: Path) -> tuple[list[dict], dict]:
    try:
        lines = path.read_text().splitlines()
        header = json.loads(lines[0])
        rows = [json.loads(x) for x in lines[1:]]
    except (OSError, ValueError, IndexError) as exc:
        raise PolicyDataError(
            f"{path}: not a policy data file ({exc}); delete it and rerun"
        ) from exc
    if header.get("format") != "mcts-reason/policy-data":
        raise PolicyDataError(f"{path}: not a policy data file (no mcts-reason header)")
    return rows, header


def train_policy(
    data_path: str | Path, base_dir: str | Path, out_dir: str | Path, cfg: PolicyConfig
) -> dict[str, Any]:
    """Fine-tune base_dir on data_path; write out_dir/hf (merged) and out_dir/model.gguf.

    Resumes: a finished out_dir (trained.json) made from the same data and settings is
    returned as it is. Returns what trained.json records (time, peak memory, losses).
    """
    cfg.validate()
    data_path, base_dir, out_dir = Path(data_path), Path(base_dir), Path(out_dir)
    rows, header = read_data(data_path)
    have = tokenizer_sha256(base_dir)
    if header.get("tokenizer_sha256") != have:
        raise PolicyDataError(
            f"{data_path}: sampled with tokenizer {str(header.get('tokenizer_sha256'))[:12]}, but "
            f"{base_dir / 'tokenizer.json'} is {have[:12]}: train the policy the data came from "
            "(its token ids would mean other text)"
        )
    key = {
        "data": header["fingerprint"],
        "base_tokenizer": have,
        "base_weights": _weights_sha(base_dir),
        "config": asdict(cfg),
    }
    done = out_dir / DONE
    if done.exists():
        old = json.loads(done.read_text())
        if old.get("key") == key and (out_dir / "model.gguf").exists():
            log.info("policy %s is up to date", out_dir)
            return old
    if cfg.method not in ("sft", "dpo"):
        raise ValueError(f"improve.policy.method {cfg.method!r} trains nothing")
    try:
        import datasets
        import torch
        import trl
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ImportError(
            f"the policy stage needs the [train] extra ({exc}): pip install -e '.[train]'"
        ) from exc
    torch.manual_seed(cfg.seed)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_config = None
    if cfg.lora_r > 0:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
    cols = ("prompt", "completion") if cfg.method == "sft" else ("prompt", "chosen", "rejected")
    ds = datasets.Dataset.from_list([{c: r[c] for c in cols} for r in rows])
    work = out_dir / "trainer"
    common = dict(
        output_dir=str(work),
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.lr,
        per_device_train_batch_size=cfg.batch_size,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=cfg.seed,
        use_cpu=not torch.cuda.is_available(),
        max_length=cfg.max_length,
    )
    t0 = time.perf_counter()
    if cfg.method == "sft":
        args = trl.SFTConfig(**common, completion_only_loss=True)
        trainer = trl.SFTTrainer(
            model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_config
        )
    else:
        args = trl.DPOConfig(**common, beta=cfg.beta)
        trainer = trl.DPOTrainer(
            model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_config
        )
    result = trainer.train()
    seconds = time.perf_counter() - t0
    trained = trainer.model
    if peft_config is not None:
        trained = trained.merge_and_unload()
    hf = out_dir / "hf"
    tmp = out_dir / "hf.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trained.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(hf, ignore_errors=True)
    os.replace(tmp, hf)
    shutil.rmtree(work, ignore_errors=True)
    from mcts.generators.export_gguf import export_gguf

    export_gguf(hf, out_dir / "model.gguf", dtype=cfg.gguf_dtype)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    record = {
        "key": key,
        "method": cfg.method,
        "rows": len(rows),
        "data_counts": header.get("counts"),
        "train_seconds": round(seconds, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "steps": int(trainer.state.global_step),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "train_loss": float(result.training_loss),
        "gguf": str(out_dir / "model.gguf"),
        "hf": str(hf),
    }
    atomic_write_text(done, json.dumps(record, indent=2))
    return record


def _weights_sha(hf_dir: Path) -> str:
    """Identity of a HF folder's weights: its config and safetensors files' hashes."""
    h = hashlib.sha256()
    for p in sorted(hf_dir.glob("*.safetensors")) + [hf_dir / "config.json"]:
        if p.exists():
            h.update(p.name.encode())
            h.update(file_sha256(p).encode())
    return h.hexdigest()
