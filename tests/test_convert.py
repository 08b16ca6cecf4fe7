"""GGUF -> safetensors conversion: cache keying, finished-folder detection, errors, and one real
conversion of the embedded model checked against the GGUF-loaded model (slow: ~1 min)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mcts.generators import convert as cv


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("MCTS_CACHE", str(tmp_path / "env"))
    assert cv.cache_root() == tmp_path / "env"
    assert cv.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("MCTS_CACHE")
    assert cv.cache_root() == Path.home() / ".cache" / "mcts"


def test_folder_name_is_keyed_by_hash_and_slugged(tmp_path):
    a = tmp_path / "My Model.Q4_1.gguf"
    a.write_bytes(b"one")
    b = tmp_path / "other.gguf"
    b.write_bytes(b"two")
    sa, sb = cv.file_sha256(a), cv.file_sha256(b)
    assert sa != sb and len(sa) == 64
    name = cv.folder_name(a, sa)
    assert name == f"my-model-q4-1-{sa[:16]}"
    # Same content, same hash; the chunked reader agrees with a one-shot read.
    import hashlib

    assert cv.file_sha256(a, chunk=1) == hashlib.sha256(b"one").hexdigest()


def test_is_converted_needs_marker_with_matching_hash_and_format(tmp_path):
    assert not cv.is_converted(tmp_path)
    marker = tmp_path / cv.MARKER
    marker.write_text("{not json")
    assert not cv.is_converted(tmp_path)
    marker.write_text(json.dumps({"format_version": cv.FORMAT_VERSION, "gguf_sha256": "ab"}))
    assert cv.is_converted(tmp_path) and cv.is_converted(tmp_path, "ab")
    assert not cv.is_converted(tmp_path, "cd")
    marker.write_text(json.dumps({"format_version": cv.FORMAT_VERSION + 1, "gguf_sha256": "ab"}))
    assert not cv.is_converted(tmp_path, "ab")


def test_cached_folder_is_returned_without_converting(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"fake gguf bytes")
    sha = cv.file_sha256(gguf)
    target = tmp_path / "cache" / cv.folder_name(gguf, sha)
    target.mkdir(parents=True)
    (target / cv.MARKER).write_text(
        json.dumps({"format_version": cv.FORMAT_VERSION, "gguf_sha256": sha})
    )

    def boom(*a, **k):
        raise AssertionError("must not convert a cached folder")

    monkeypatch.setattr(cv, "_convert_into", boom)
    assert cv.convert_gguf(gguf, tmp_path / "cache") == target


def test_failed_conversion_leaves_no_folder(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")

    def half(src, out):
        (out / "config.json").write_text("{}")
        raise cv.ConversionError("simulated failure mid-way")

    monkeypatch.setattr(cv, "_convert_into", half)
    with pytest.raises(cv.ConversionError, match="mid-way"):
        cv.convert_gguf(gguf, tmp_path / "cache")
    leftovers = [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


def test_bad_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="gguf"):
        cv.convert_gguf(tmp_path / "missing.gguf", tmp_path)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"\.gguf"):
        cv.convert_gguf(other, tmp_path)


def test_embedded_gguf_is_found():
    path = cv.embedded_gguf()
    assert path.suffix == ".gguf" and path.stat().st_size > 10_000_000


@pytest.mark.slow
@pytest.mark.model
def test_real_conversion_matches_gguf_model(tmp_path):
    """Convert the embedded model for real; the saved folder must load as a plain HF model
    (no GGUF quantization entry) and give the same logits as the GGUF-loaded model."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")

    folder = cv.convert_gguf(cache_dir=tmp_path)
    assert cv.is_converted(folder, cv.file_sha256(cv.embedded_gguf()))
    assert (folder / "model.safetensors").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"]
    # Second call: cached (same folder, marker untouched).
    mtime = os.stat(folder / cv.MARKER).st_mtime_ns
    assert cv.convert_gguf(cache_dir=tmp_path) == folder
    assert os.stat(folder / cv.MARKER).st_mtime_ns == mtime

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    gguf = cv.embedded_gguf()
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name
    ).eval()
    ids = torch.tensor([tok("The answer is 42.\n\n", add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        a, b = model(input_ids=ids).logits, ref(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4)
