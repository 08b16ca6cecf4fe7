"""HF PRMs on tiny randomly initialised models the test builds and saves itself (no hub)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from mcts.types import ScoreItem  # noqa: E402
from rewards import RewardError, make_reward  # noqa: E402
from rewards.prm import ClassifierPRM, MathShepherdPRM  # noqa: E402

WORDS = "what is two plus two so we add the answer four five step first then ки + - 2 4 5 =".split()


def _tokenizer(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.add_special_tokens({"additional_special_tokens": ["<extra_0>"]})
    fast.save_pretrained(path)
    return fast


def _config(vocab: int, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=0,
        **kw,
    )


@pytest.fixture(scope="module")
def shepherd_dir(tmp_path_factory) -> Path:
    from transformers import LlamaForCausalLM

    d = tmp_path_factory.mktemp("shepherd")
    tok = _tokenizer(d)
    torch.manual_seed(0)
    LlamaForCausalLM(_config(len(tok))).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> Path:
    from transformers import LlamaForTokenClassification

    d = tmp_path_factory.mktemp("qwenish")
    tok = _tokenizer(d)
    torch.manual_seed(1)
    LlamaForTokenClassification(_config(len(tok), num_labels=2)).save_pretrained(d)
    return d


Q = "what is two plus two"
STEPS = ("first we add two plus two", "so two plus two = 4", "the answer is four")


def items_for(steps):
    return [ScoreItem(Q, tuple(steps[: j + 1])) for j in range(len(steps))]


@pytest.mark.parametrize("kind", ["shepherd", "classifier"])
def test_prm_shapes_ranges_and_prefix_property(kind, shepherd_dir, classifier_dir) -> None:
    if kind == "shepherd":
        prm = MathShepherdPRM(str(shepherd_dir), aggregate="last", batch_size=2)
    else:
        prm = ClassifierPRM(str(classifier_dir), aggregate="last", batch_size=2)
    full = prm.step_scores([ScoreItem(Q, STEPS)])[0]
    assert full.shape == (3,)
    assert np.all((full >= 0) & (full <= 1))
    assert len(set(np.round(full, 6))) > 1  # random weights: steps do differ
    # A step's score depends only on the prefix up to it: score each prefix on its own,
    # batched with items of other lengths (padding must not leak in).
    prefix_scores = prm.score(items_for(STEPS) + [ScoreItem(Q, STEPS + ("then five",))])
    assert np.allclose(prefix_scores[:3], full, atol=1e-5)
    # Changing a LATER step leaves earlier step scores unchanged.
    other = prm.step_scores([ScoreItem(Q, STEPS[:2] + ("the answer is five",))])[0]
    assert np.allclose(other[:2], full[:2], atol=1e-5)
    assert prm.last_tokens.shape == (1,) and prm.last_tokens[0] > 10


def test_prm_aggregations(shepherd_dir) -> None:
    steps = MathShepherdPRM(str(shepherd_dir)).step_scores([ScoreItem(Q, STEPS)])[0]
    for how, want in [
        ("last", steps[-1]),
        ("min", steps.min()),
        ("prod", steps.prod()),
        ("mean", steps.mean()),
    ]:
        got = MathShepherdPRM(str(shepherd_dir), aggregate=how).score([ScoreItem(Q, STEPS)])
        assert got[0] == pytest.approx(want, abs=1e-6)


def test_shepherd_score_is_plus_vs_minus_at_the_tag(shepherd_dir) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shepherd_dir)
    model = AutoModelForCausalLM.from_pretrained(shepherd_dir)
    prm = MathShepherdPRM(model, tok)
    text, _ = prm.format(ScoreItem(Q, STEPS[:1]))
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = model(ids).logits[0]
    tag = tok.convert_tokens_to_ids("ки")
    pos = int((ids[0] == tag).nonzero()[0])
    plus, minus = tok.convert_tokens_to_ids("+"), tok.convert_tokens_to_ids("-")
    want = torch.softmax(logits[pos, [plus, minus]], -1)[0].item()
    assert prm.score([ScoreItem(Q, STEPS[:1])])[0] == pytest.approx(want, abs=1e-6)


def test_tag_text_inside_question_is_not_a_step(shepherd_dir) -> None:
    prm = MathShepherdPRM(str(shepherd_dir))
    s = prm.step_scores([ScoreItem(Q + " ки ки", STEPS[:2])])[0]
    assert s.shape == (2,)


def test_truncation_keeps_last_step(shepherd_dir) -> None:
    prm = MathShepherdPRM(str(shepherd_dir), max_length=12)
    s = prm.step_scores([ScoreItem(Q, STEPS)])[0]
    assert 1 <= s.shape[0] < 3 and prm.truncated == 1
    assert prm.last_tokens[0] == 12


def test_nan_model_output_is_an_error(classifier_dir) -> None:
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    model = AutoModelForTokenClassification.from_pretrained(classifier_dir)
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    prm = ClassifierPRM(model, AutoTokenizer.from_pretrained(classifier_dir))
    with pytest.raises(RewardError, match=r"prm_classifier.*non-finite.*items\[0\]") as e:
        prm.score([ScoreItem(Q, STEPS)])
    assert e.value.reward == "prm_classifier" and e.value.item_index == 0


def test_bad_prm_config(shepherd_dir) -> None:
    with pytest.raises(ValueError, match=r"prm.good='\+\+ \+'.*exactly one"):
        MathShepherdPRM(str(shepherd_dir), good="++ +")
    with pytest.raises(ValueError, match="prm.aggregate"):
        MathShepherdPRM(str(shepherd_dir), aggregate="max")
    r = make_reward({"name": "prm_shepherd", "model": str(shepherd_dir), "aggregate": "min"})
    assert isinstance(r, MathShepherdPRM) and r.aggregate == "min"
    with pytest.raises(ValueError, match="unknown key"):
        make_reward({"name": "prm_shepherd", "model": str(shepherd_dir), "tag": "x"})
