"""HF Llama folder -> GGUF (mcts.generators.export_gguf), read back by llama.cpp.

A tiny random Llama (hidden 64, 2 layers, 4 heads, 2 KV heads) with the byte-level BPE of
test_transformers_generator is saved, exported and loaded with llama.cpp; its logits are
compared with the HF model's token by token. Measured max abs difference over the 3 prompts
(logits up to ~1.1 in size, llama.cpp on 1 thread): F32 tied 1.4e-4, F32 untied 1.5e-4, F16
4.0e-4, Mistral (no sliding window) 1.5e-4 -- the bound asserted is 1e-2.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

from mcts.generators.export_gguf import ExportError, export_gguf, main, permute_qk  # noqa: E402
from tests.test_transformers_generator import tiny_tokenizer  # noqa: E402

PROMPTS = [
    "Solve 2 + 3 step by step. First add the numbers.",
    "Tom has 4 apples and buys 7 more. How many apples?",
    "<|im_start|>user\nWhat is 9 + 9?<|im_end|>\n<|im_start|>assistant\n",
]
STRINGS = [
    *PROMPTS,
    "Hello world! It's 2024: 12345 apples, 3.14 pies.\n\n  two  spaces\tand a tab",
    "naïve café 東京 🙂\r\nend",
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _model(tok, kind: str = "llama", tied: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    kw = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=tied,
    )
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(**kw, sliding_window=None)).eval()
    return LlamaForCausalLM(LlamaConfig(**kw)).eval()


def _save(model, tok, path):
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def exported(tok, tmp_path_factory):
    """(HF model, GGUF path) of the tied Llama, exported in F32."""
    root = tmp_path_factory.mktemp("export")
    model = _model(tok)
    hf = _save(model, tok, root / "hf")
    return model, export_gguf(hf, root / "tiny.gguf")


def _llama(path):
    return llama_cpp.Llama(
        model_path=str(path), logits_all=True, n_ctx=64, n_threads=1, verbose=False
    )


def _max_logit_diff(model, tok, path) -> float:
    llm = _llama(path)
    try:
        worst = 0.0
        for text in PROMPTS:
            ids = tok(text)["input_ids"]
            with torch.no_grad():
                ref = model(torch.tensor([ids])).logits[0].numpy()
            llm.reset()
            llm.eval(ids)
            got = np.asarray(llm.scores[: len(ids)])
            assert got.shape == ref.shape
            worst = max(worst, float(np.abs(got - ref).max()))
        return worst
    finally:
        llm.close()


def test_permute_matches_llama_cpp_rope_layout() -> None:
    # One head of dim 4: HF pairs rows (0, 2), (1, 3); llama.cpp pairs adjacent rows.
    w = np.arange(8, dtype=np.float32).reshape(4, 2)
    assert permute_qk(w, 1)[:, 0].tolist() == [0, 4, 2, 6]


def test_logits_match_hf_f32_tied(exported, tok) -> None:
    model, path = exported
    diff = _max_logit_diff(model, tok, path)
    assert diff < 1e-2, diff  # measured 1.4e-4


@pytest.mark.parametrize(
    ("kind", "tied", "dtype"),
    [("llama", False, "f32"), ("llama", False, "f16"), ("mistral", False, "f32")],
)
def test_logits_match_hf_other_variants(tok, tmp_path, kind, tied, dtype) -> None:
    model = _model(tok, kind, tied)
    path = export_gguf(_save(model, tok, tmp_path / "hf"), tmp_path / "m.gguf", dtype)
    diff = _max_logit_diff(model, tok, path)
    assert diff < 1e-2, diff  # measured 1.5e-4 (f32), 4.0e-4 (f16), 1.5e-4 (mistral)


def test_tied_output_omitted_untied_written(exported, tok, tmp_path) -> None:
    import gguf

    names = {t.name for t in gguf.GGUFReader(str(exported[1])).tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    path = export_gguf(_save(_model(tok, tied=False), tok, tmp_path / "hf"), tmp_path / "u.gguf")
    assert "output.weight" in {t.name for t in gguf.GGUFReader(str(path)).tensors}


def test_tokenization_and_chat_template_carried(exported, tok) -> None:
    llm = _llama(exported[1])
    try:
        for s in STRINGS:
            ours = llm.tokenize(s.encode("utf-8"), add_bos=False, special=True)
            assert ours == tok(s, add_special_tokens=False)["input_ids"], s
        meta = llm.metadata
        assert meta["tokenizer.chat_template"] == tok.chat_template
        assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
        assert llm.token_eos() == tok.eos_token_id
        assert llm.n_vocab() == len(tok)
    finally:
        llm.close()


def test_default_backend_serves_it_like_transformers(exported, tok) -> None:
    """The llama.cpp generator loads the export and scores like the transformers generator."""
    from mcts.generators.llama_cpp import LlamaCppConfig, LlamaCppGenerator
    from mcts.generators.transformers import TransformersGenerator
    from mcts.prompts import problem_messages
    from mcts.types import ContinuationRequest, StepRequest

    model, path = exported
    gen = LlamaCppGenerator(LlamaCppConfig(model_path=str(path), n_ctx=256, n_threads=1))
    reqs = [ContinuationRequest(problem_messages("What is 2 + 3?"), "First add.\n\n")]
    ours, _ = gen.logprob_of(reqs)
    ref, _ = TransformersGenerator(model, tok, batch_size=4, seed=0).logprob_of(reqs)
    np.testing.assert_allclose(ours, ref, atol=1e-2)
    out = gen.generate([StepRequest(problem_messages("What is 2 + 3?"), n=2, seed=1, max_tokens=8)])
    assert sum(s.count for s in out[0].steps) == 2


def test_non_llama_config_is_refused_and_writes_nothing(tmp_path, tok) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = tmp_path / "gpt2"
    GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tok))
    ).save_pretrained(hf)
    tok.save_pretrained(hf)
    out = tmp_path / "out" / "m.gguf"
    with pytest.raises(ValueError, match=r"config\.json: model_type='gpt2' is not supported"):
        export_gguf(hf, out)
    assert not out.exists() and not (out.parent.exists() and os.listdir(out.parent))


def test_missing_config_or_tokenizer_is_clear(tmp_path, tok) -> None:
    with pytest.raises(ExportError, match="config.json does not exist"):
        export_gguf(tmp_path, tmp_path / "m.gguf")
    hf = tmp_path / "no_tok"
    _model(tok).save_pretrained(hf)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")  # an earlier export stays untouched on error
    with pytest.raises(ExportError, match="tokenizer.json does not exist"):
        export_gguf(hf, out)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "no_tok"]


def test_wrong_pre_tokenizer_is_caught_before_the_rename(exported, tok, tmp_path) -> None:
    hf = _save(exported[0], tok, tmp_path / "hf")
    out = tmp_path / "m.gguf"
    with pytest.raises(ExportError, match="tokenizes .* differently"):
        export_gguf(hf, out, pre="llama-bpe")  # Llama-3's regex splits digits differently
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_cli_f16(exported, tok, tmp_path, capsys) -> None:
    import gguf

    hf = _save(exported[0], tok, tmp_path / "hf")
    main([str(hf), str(tmp_path / "m.gguf"), "--f16"])
    printed = capsys.readouterr().out.strip()
    reader = gguf.GGUFReader(printed)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["output_norm.weight"] == "F32"
    cfg = json.loads((hf / "config.json").read_text())
    assert int(reader.fields["llama.block_count"].contents()) == cfg["num_hidden_layers"]
    with pytest.raises(SystemExit, match="export_gguf: .*model_type"):
        (hf / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
        main([str(hf), str(tmp_path / "x.gguf")])


def test_detect_pre_from_tokenizer_json(tmp_path) -> None:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    from mcts.generators.export_gguf import detect_pre

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    digits = {"type": "Digits", "individual_digits": True}
    split = {
        "type": "Split",
        "pattern": {"Regex": GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"]},
        "behavior": "Isolated",
    }
    cases = {
        "gpt-2": byte_level,
        "smollm": {"type": "Sequence", "pretokenizers": [digits, byte_level]},  # SmolLM2's own
        "llama-bpe": {
            "type": "Sequence",
            "pretokenizers": [split, {**byte_level, "use_regex": False}],
        },
    }
    for name, pt in cases.items():
        assert detect_pre({"pre_tokenizer": pt}, tmp_path) == name
    with pytest.raises(ExportError, match="pass pre="):
        detect_pre({"pre_tokenizer": {"type": "Metaspace"}}, tmp_path)
