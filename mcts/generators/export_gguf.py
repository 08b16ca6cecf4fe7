"""Hugging Face Llama folder -> GGUF for the llama.cpp backend (the inverse of `convert.py`).

Why: the policy is trained as a transformers model (safetensors folder), but the default
generator is llama.cpp, which only reads GGUF. This writes an unquantized GGUF (F32, or F16
with `dtype="f16"`; 1-D norm weights stay F32 as llama.cpp's own converter does) that
`LlamaCppGenerator(LlamaCppConfig(model_path=...))` loads.

What llama.cpp needs that is not a plain copy:

- q_proj / k_proj rows are permuted: HF rotates the two halves of each head (rotate_half),
  llama.cpp's LLAMA rope rotates adjacent pairs. Per head, row `h*d + i*d/2 + j` moves to
  `h*d + 2j + i` (llama.cpp's convert_hf_to_gguf `permute`; k_proj with the KV head count).
- A tied lm_head is *omitted* (`output.weight` absent): llama.cpp then reuses `token_embd`,
  exactly as the embedded SmolLM2 GGUF does; an untied one is written.
- `tokenizer.ggml.pre` names the pre-tokenizer regex llama.cpp runs before BPE. A wrong or
  missing one tokenizes differently (silently, or with a "missing pre-tokenizer" warning and
  a generic regex), so it is derived from tokenizer.json's pre_tokenizer, and the written file's
  tokenization is checked against the HF tokenizer (`verify=True`, vocab-only load, ~0.1 s).
- Token types: HF special added tokens are CONTROL (parsed only with special=True, like
  <|im_end|>), other added tokens USER_DEFINED, ids the tokenizer lacks "[PAD<i>]" UNUSED.

Supported: `model_type` "llama", and "mistral" without a sliding window (same tensors; checked
by tests/test_export_gguf.py), byte-level BPE tokenizers (SmolLM2, Llama-3 style), default rope,
no attention/MLP biases. Anything else is refused with a ValueError naming the file.

The output is written to a temporary file beside `out_path` and renamed into place only after
it was fully written (and verified): an error never leaves a partial GGUF behind.

CLI: `python -m mcts.generators.export_gguf HF_DIR OUT.gguf [--f16] [--pre NAME] [--no-verify]`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "mistral")

# tokenizer.json pre_tokenizer -> llama.cpp tokenizer.ggml.pre, for Split-regex pre-tokenizers
# (Llama-3 style). Filled from transformers' own GGUF table when available (see _split_table).
_PREFERRED_PRE = {"llama3": "llama-bpe"}

# Strings whose tokenization must agree between the HF tokenizer and the written GGUF.
_PROBES = (
    "Hello world! It's 2024: 12345 apples, 3.14159 pies.\n\n  Indented\tline; don't stop.",
    "Solve 2 + 3 step by step. The answer is \\boxed{5}.",
    "Ünïcødé — naïve café, 東京, emoji 🙂 and CRLF\r\nend",
)


class ExportError(ValueError):
    """The folder cannot be exported to a GGUF that llama.cpp reads the same way."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from e


def _check_config(hf_dir: Path) -> dict[str, Any]:
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise ExportError(
            f"{cfg_path} does not exist: {hf_dir} is not a Hugging Face model folder; pass the "
            "folder written by model.save_pretrained(...) and tokenizer.save_pretrained(...)"
        )
    cfg = _read_json(cfg_path)
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ExportError(
            f"{cfg_path}: model_type={mt!r} is not supported; only Llama-architecture causal LMs "
            f"({', '.join(SUPPORTED_MODEL_TYPES)}) can be exported. For other architectures use "
            "llama.cpp's convert_hf_to_gguf.py"
        )
    sw = cfg.get("sliding_window")
    if mt == "mistral" and sw is not None and sw < cfg.get("max_position_embeddings", 0):
        raise ExportError(
            f"{cfg_path}: sliding_window={sw} < max_position_embeddings: the llama GGUF has no "
            "sliding-window attention; set sliding_window to null (full attention) or use "
            "convert_hf_to_gguf.py"
        )
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise ExportError(f"{cfg_path}: {key}=true is not supported by this exporter")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        raise ExportError(
            f"{cfg_path}: rope type {rope_type!r} is not supported (only default rope); "
            "use llama.cpp's convert_hf_to_gguf.py for scaled rope"
        )
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "vocab_size",
        "rms_norm_eps",
    ):
        if key not in cfg:
            raise ExportError(f"{cfg_path}: missing {key!r}")
    return cfg


def _rope_theta(cfg: dict[str, Any]) -> float:
    rope = cfg.get("rope_parameters") or {}
    return float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _safetensor_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_read_json(index)["weight_map"].values()))
        return [hf_dir / n for n in names]
    single = hf_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise ExportError(
        f"{hf_dir}: no model.safetensors (or model.safetensors.index.json); save the model "
        "with model.save_pretrained(folder) (safetensors is the default)"
    )


def _iter_weights(hf_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) for every tensor of the folder (bf16/f16 upcast via torch)."""
    import torch
    from safetensors import safe_open

    for f in _safetensor_files(hf_dir):
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                yield name, fh.get_tensor(name).to(torch.float32).numpy()


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate_half row order -> llama.cpp's (convert_hf_to_gguf.LlamaModel.permute)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _gguf_name(name: str, n_layers: int) -> str | None:
    """GGUF tensor name for an HF one; None = not exported (rotary buffers)."""
    if name.startswith("model.layers."):
        rest = name[len("model.layers.") :]
        idx, _, tail = rest.partition(".")
        if idx.isdigit() and int(idx) < n_layers and tail in _LAYER_MAP:
            return f"blk.{int(idx)}.{_LAYER_MAP[tail]}"
        if tail.endswith("rotary_emb.inv_freq"):
            return None
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if name in fixed:
        return fixed[name]
    if name.endswith("rotary_emb.inv_freq"):
        return None
    raise ExportError(f"unexpected tensor {name!r}: not part of a plain Llama model")


# ---------------------------------------------------------------------------- tokenizer


def _split_table() -> dict[str, str]:
    """Split regex -> llama.cpp pre name, from transformers' GGUF loader table (its inverse)."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_PRE_TOKENIZER_SPLITS,
        )
    except ImportError:  # pragma: no cover - depends on the transformers version
        return {}
    table: dict[str, str] = {}
    for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
        table.setdefault(regex, _PREFERRED_PRE.get(name, name))
    return table


def detect_pre(tok_json: dict[str, Any], where: Path) -> str:
    """llama.cpp `tokenizer.ggml.pre` for a tokenizer.json's pre_tokenizer, or ExportError."""
    pt = tok_json.get("pre_tokenizer") or {}
    items = pt.get("pretokenizers", []) if pt.get("type") == "Sequence" else [pt]
    types = [p.get("type") for p in items]
    if types == ["ByteLevel"] and items[0].get("use_regex", True):
        return "gpt-2"
    if (
        types == ["Digits", "ByteLevel"]
        and items[0].get("individual_digits")
        and items[1].get("use_regex", True)
    ):
        return "smollm"  # SmolLM / SmolLM2's own tokenizer.json
    if types == ["Split", "ByteLevel"] and not items[1].get("use_regex", True):
        pattern = (items[0].get("pattern") or {}).get("Regex")
        name = _split_table().get(pattern or "")
        if name:
            return name
    raise ExportError(
        f"{where}: pre_tokenizer {json.dumps(pt)[:300]} is not one this exporter recognises; "
        "pass pre=<llama.cpp tokenizer.ggml.pre name> (CLI --pre), the check against the HF "
        "tokenizer (verify=True) then tells whether it matches"
    )


def _merges(tok_json: dict[str, Any]) -> list[str]:
    merges = tok_json["model"].get("merges") or []
    if merges and isinstance(merges[0], list):
        # tokenizers >= 0.20 pairs; a space inside a part is written as U+0120 (gguf-py's rule).
        return [
            " ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
            for pair in merges
        ]
    return list(merges)


def _tokenizer_fields(hf_dir: Path, vocab_size: int, pre: str | None) -> dict[str, Any]:
    tj_path = hf_dir / "tokenizer.json"
    if not tj_path.is_file():
        raise ExportError(
            f"{tj_path} does not exist: the folder needs a fast (tokenizers) tokenizer; run "
            "tokenizer.save_pretrained(folder) with the model's tokenizer"
        )
    tj = _read_json(tj_path)
    model = tj.get("model") or {}
    decoder = (tj.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder != "ByteLevel":
        raise ExportError(
            f"{tj_path}: only byte-level BPE tokenizers (GPT-2 / SmolLM2 / Llama-3 style) are "
            f"supported, got model={model.get('type')!r} byte_fallback={model.get('byte_fallback')}"
            f" decoder={decoder!r} (SentencePiece-style Llama-2 vocabularies need "
            "convert_hf_to_gguf.py)"
        )
    if tj.get("normalizer"):
        raise ExportError(f"{tj_path}: a tokenizer normalizer is not supported by llama.cpp's BPE")
    pre = pre or detect_pre(tj, tj_path)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ExportError(
            f"{tj_path}: token id {max(vocab.values())} >= config vocab_size={vocab_size}"
        )
    added = tok.added_tokens_decoder  # id -> AddedToken
    reverse = {i: t for t, i in vocab.items()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED
        elif i in added:
            tokens.append(added[i].content)
            types.append(3 if added[i].special else 4)  # CONTROL | USER_DEFINED
        else:
            tokens.append(reverse[i])
            types.append(1)  # NORMAL

    # Whether HF adds BOS/EOS on plain encode, measured rather than read from flags.
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a")["input_ids"]
    template = tok.chat_template
    if isinstance(template, dict):  # several named templates: llama.cpp reads the default one
        template = template.get("default")
    return {
        "tok": tok,
        "pre": pre,
        "tokens": tokens,
        "types": types,
        "merges": _merges(tj),
        "ids": {
            "bos": tok.bos_token_id,
            "eos": tok.eos_token_id,
            "unk": tok.unk_token_id,
            "pad": tok.pad_token_id,
        },
        "add_bos": len(full) > len(plain) and full[0] == tok.bos_token_id,
        "add_eos": len(full) > len(plain) and full[-1] == tok.eos_token_id,
        "chat_template": template,
    }


# ---------------------------------------------------------------------------- writing


def _write(hf_dir: Path, tmp: Path, dtype: str, pre: str | None) -> dict[str, Any]:
    import gguf

    cfg = _check_config(hf_dir)
    n_vocab = int(cfg["vocab_size"])
    tk = _tokenizer_fields(hf_dir, n_vocab, pre)
    n_embd = int(cfg["hidden_size"])
    n_layer = int(cfg["num_hidden_layers"])
    n_head = int(cfg["num_attention_heads"])
    n_head_kv = int(cfg.get("num_key_value_heads") or n_head)
    head_dim = int(cfg.get("head_dim") or n_embd // n_head)
    tied = bool(cfg.get("tie_word_embeddings", False))

    w = gguf.GGUFWriter(str(tmp), arch="llama")
    w.add_name(hf_dir.resolve().name)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(n_vocab)
    w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_rope_dimension_count(head_dim)
    if head_dim != n_embd // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tk["pre"])
    w.add_token_list(tk["tokens"])
    w.add_token_types(tk["types"])
    w.add_token_merges(tk["merges"])
    setters = {
        "bos": w.add_bos_token_id,
        "eos": w.add_eos_token_id,
        "unk": w.add_unk_token_id,
        "pad": w.add_pad_token_id,
    }
    for kind, tid in tk["ids"].items():
        if tid is not None:
            setters[kind](int(tid))
    w.add_add_bos_token(bool(tk["add_bos"]))
    w.add_add_eos_token(bool(tk["add_eos"]))
    if tk["chat_template"]:
        w.add_chat_template(tk["chat_template"])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    expected = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{t}" for i in range(n_layer) for t in _LAYER_MAP.values()
    }
    if not tied:
        expected.add("output.weight")
    seen: set[str] = set()
    for name, arr in _iter_weights(hf_dir):
        gname = _gguf_name(name, n_layer)
        if gname is None or (tied and gname == "output.weight"):
            continue  # tied lm_head: llama.cpp reuses token_embd when output.weight is absent
        if gname.endswith("attn_q.weight"):
            arr = permute_qk(arr, n_head)
        elif gname.endswith("attn_k.weight"):
            arr = permute_qk(arr, n_head_kv)
        if gname == "token_embd.weight" and arr.shape[0] != n_vocab:
            raise ExportError(
                f"{hf_dir}: embed_tokens has {arr.shape[0]} rows, vocab_size={n_vocab}"
            )
        out = arr.astype(np.float16) if dtype == "f16" and arr.ndim > 1 else arr
        w.add_tensor(gname, np.ascontiguousarray(out))
        seen.add(gname)
    if seen != expected:
        raise ExportError(
            f"{hf_dir}: weights do not form the configured model: missing="
            f"{sorted(expected - seen)[:5]} extra={sorted(seen - expected)[:5]}"
        )
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    return tk


def verify_tokenization(gguf_path: Path, tok: Any, texts: tuple[str, ...] = _PROBES) -> None:
    """Tokenize `texts` (+ every special token) with the GGUF's vocab in llama.cpp and with `tok`;
    raise ExportError on the first difference."""
    import llama_cpp
    from llama_cpp._internals import LlamaModel  # the model alone: no context, no KV cache

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = LlamaModel(path_model=str(gguf_path), params=params, verbose=False)
    try:
        specials = "".join(tok.all_special_tokens)
        for text in (*texts, f"{specials} x {texts[0]}"):
            ours = list(model.tokenize(text.encode("utf-8"), add_bos=False, special=True))
            ref = list(tok(text, add_special_tokens=False)["input_ids"])
            if ours != ref:
                at = next(
                    (i for i, (a, b) in enumerate(zip(ours, ref, strict=False)) if a != b), None
                )
                at = min(len(ours), len(ref)) if at is None else at
                raise ExportError(
                    f"{gguf_path.name}: llama.cpp tokenizes {text[:40]!r} differently from the HF "
                    f"tokenizer from token {at} on (llama.cpp {ours[at : at + 4]} vs HF "
                    f"{ref[at : at + 4]}): the pre-tokenizer type is wrong; pass pre=... (CLI --pre)"
                )
    finally:
        model.close()


def export_gguf(
    hf_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    dtype: str = "f32",
    *,
    pre: str | None = None,
    verify: bool = True,
) -> Path:
    """Write `hf_dir` (a saved Llama causal LM + its tokenizer) as a GGUF at `out_path`.

    dtype: "f32" (exact) or "f16" (half the size; 1-D tensors stay F32). pre: override the
    llama.cpp pre-tokenizer name (default: derived from tokenizer.json). verify: check the
    written file's tokenization against the HF tokenizer before it is moved into place.
    Returns the output path. Raises ExportError (a ValueError) for unsupported input; on any
    error no file is left at `out_path` (an existing one is kept untouched).
    """
    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype must be 'f32' or 'f16', got {dtype!r}")
    src = Path(hf_dir).expanduser()
    if not src.is_dir():
        raise FileNotFoundError(f"hf_dir: {src} is not a folder; pass a save_pretrained folder")
    _check_config(src)  # fail before creating anything
    out = Path(out_path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        tk = _write(src, tmp, dtype, pre)
        if verify:
            verify_tokenization(tmp, tk["tok"])
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: export and print the GGUF path."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "hf_dir", help="folder from save_pretrained (config.json, safetensors, tokenizer)"
    )
    ap.add_argument("out", help="output .gguf path")
    ap.add_argument("--f16", action="store_true", help="F16 weights (default F32)")
    ap.add_argument("--pre", default=None, help="llama.cpp tokenizer.ggml.pre (default: derived)")
    ap.add_argument("--no-verify", action="store_true", help="skip the tokenization check")
    args = ap.parse_args(argv)
    try:
        path = export_gguf(
            args.hf_dir,
            args.out,
            "f16" if args.f16 else "f32",
            pre=args.pre,
            verify=not args.no_verify,
        )
    except (ExportError, FileNotFoundError) as e:
        raise SystemExit(f"export_gguf: {e}") from None
    print(path)


if __name__ == "__main__":
    main()
