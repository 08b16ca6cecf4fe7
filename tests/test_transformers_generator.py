"""transformers backend on a tiny random Llama + a tokenizer trained in the test (no downloads).

The strongest check here: logprobs from our left-padded, KV-cached decode loop equal those of a
plain unpadded forward over prompt + sampled tokens.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mcts.generators.base import GenerationError, PromptTooLongError, log_softmax  # noqa: E402
from mcts.generators.transformers import TransformersGenerator  # noqa: E402
from mcts.prompts import problem_messages  # noqa: E402
from mcts.types import ContinuationRequest, Message, StepRequest  # noqa: E402

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Solve 2 + 3 step by step. First add the numbers.\n\nThe answer is 5.\n\n",
    "Tom has 4 apples and buys 7 more. How many apples? 4 + 7 = 11.\n\n",
]


def tiny_tokenizer():
    """A byte-level BPE with a ChatML template, trained offline on CORPUS (no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    t.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=t, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _model(tok, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def gen(tok):
    return TransformersGenerator(_model(tok), tok, batch_size=16, seed=0)


def _requests(n: int = 3) -> list[StepRequest]:
    return [
        StepRequest(problem_messages("What is 2 + 3?"), n=n, seed=11, max_tokens=12),
        StepRequest(
            problem_messages("Tom has 4 apples and buys 7 more. How many apples now?"),
            prefix="First add.\n\n",
            n=n,
            seed=12,
            max_tokens=12,
            temperature=1.0,
        ),
        StepRequest((Message("user", "Solve 9 + 9."),), n=n, seed=13, max_tokens=8, top_p=0.9),
    ]


def _plain_logprobs(model, ids: list[int], n_prompt: int) -> list[float]:
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    lp = log_softmax(logits)
    return [float(lp[t - 1, ids[t]]) for t in range(n_prompt, len(ids))]


def test_wave_returns_n_samples_and_exact_accounting(gen, tok) -> None:
    reqs = _requests()
    out = gen.generate(reqs)
    assert len(out) == len(reqs)
    for r, g in zip(reqs, out, strict=True):
        assert sum(s.count for s in g.steps) == r.n
        prompt = tok.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in r.messages],
            tokenize=False,
            add_generation_prompt=True,
        )
        n_prompt = len(tok(prompt + r.prefix, add_special_tokens=False)["input_ids"])
        assert g.usage.prompt_tokens == n_prompt
        assert g.usage.cached_prompt_tokens == 0
        assert g.usage.generated_tokens >= sum(s.n_tokens for s in g.steps)
        for s in g.steps:
            assert 1 <= s.n_tokens <= r.max_tokens
            assert s.finish in ("step", "eos", "length")
            assert len(s.token_logprobs) == s.n_tokens
            assert np.isfinite(s.token_logprobs).all()
            assert s.logprob == pytest.approx(sum(s.token_logprobs))
            if s.finish == "step":
                assert r.stop not in s.text
    assert [g.usage.calls for g in out] == [1, 0, 0]


def test_padded_cached_logprobs_match_a_plain_forward(gen) -> None:
    reqs = _requests(n=2)
    out = gen.generate(reqs)
    for r, g in zip(reqs, out, strict=True):
        prompt = gen.encode(gen.render(r.messages, r.prefix))
        for s in g.steps:
            want = _plain_logprobs(gen.model, prompt + list(s.token_ids), len(prompt))
            np.testing.assert_allclose(s.token_logprobs, want, atol=2e-4)


def test_same_seed_same_steps_whatever_the_wave_order(gen) -> None:
    reqs = _requests()
    a = gen.generate(reqs)
    b = gen.generate(reqs[::-1])[::-1]
    for ga, gb in zip(a, b, strict=True):
        assert [(s.token_ids, s.count) for s in ga.steps] == [
            (s.token_ids, s.count) for s in gb.steps
        ]


def test_greedy_is_argmax(gen) -> None:
    r = StepRequest(problem_messages("What is 2 + 3?"), n=2, temperature=0.0, max_tokens=6)
    (g,) = gen.generate([r])
    assert len(g.steps) == 1 and g.steps[0].count == 2  # identical greedy samples merge
    prompt = gen.encode(gen.render(r.messages))
    with torch.inference_mode():
        logits = gen.model(input_ids=torch.tensor([prompt])).logits[0, -1]
    assert g.steps[0].token_ids[0] == int(torch.argmax(logits))


def test_eos_is_counted_and_ends_the_step(tok) -> None:
    model = _model(tok, seed=1)
    with torch.no_grad():  # make end-of-sequence overwhelmingly likely
        model.lm_head.weight[tok.eos_token_id] = model.lm_head.weight[tok.eos_token_id] * 0 + 5.0
        model.model.norm.weight.fill_(1.0)
    g = TransformersGenerator(model, tok)
    (out,) = g.generate([StepRequest(problem_messages("Hi?"), n=2, seed=0)])
    assert [(s.text, s.finish, s.n_tokens) for s in out.steps] == [("", "eos", 1)]
    assert out.steps[0].count == 2
    assert out.usage.generated_tokens == 2


def test_logprob_of_matches_plain_forward(gen, tok) -> None:
    reqs = [
        ContinuationRequest(problem_messages("Is 2 + 3 = 5?")),
        ContinuationRequest(
            problem_messages("Tom has 4 apples."), prefix="So", continuations=("Yes", "No apples")
        ),
    ]
    vals, usages = gen.logprob_of(reqs)
    assert vals.shape == (2, 2)
    for i, r in enumerate(reqs):
        prompt = gen.encode(gen.render(r.messages, r.prefix))
        for j, c in enumerate(r.continuations):
            cont = gen.encode(c)
            want = sum(_plain_logprobs(gen.model, prompt + cont, len(prompt)))
            assert vals[i, j] == pytest.approx(want, abs=2e-4)
        n_cont = sum(len(gen.encode(c)) for c in r.continuations)
        assert usages[i].prompt_tokens == len(prompt) + n_cont


def test_prompt_longer_than_context_is_rejected(tok) -> None:
    g = TransformersGenerator(_model(tok), tok, n_ctx=128)
    long_q = "apples " * 80
    with pytest.raises(PromptTooLongError, match=r"requests\[1\].*n_ctx=128"):
        g.generate(
            [
                StepRequest((Message("user", "Hi?"),), max_tokens=4),
                StepRequest(problem_messages(long_q)),
            ]
        )


def test_model_failure_is_one_clear_error(tok) -> None:
    g = TransformersGenerator(_model(tok), tok)

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    g.model.forward = broken  # type: ignore[method-assign]
    with pytest.raises(GenerationError, match="out of memory"):
        g.generate([StepRequest(problem_messages("Hi?"))])


def test_tokenizer_without_chat_template_is_rejected(tok) -> None:
    import copy

    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        TransformersGenerator(_model(tok), bare)


@pytest.mark.model
@pytest.mark.slow
def test_real_smollm2_weights_through_transformers() -> None:
    """The embedded GGUF dequantized by transformers: a real-model check of this backend."""
    from mcts.generators.transformers import TransformersConfig

    g = TransformersGenerator.from_config(TransformersConfig(batch_size=8))
    qs = ["What is 3 + 4?", "What is 5 + 2?", "Tom has 3 apples and buys 2. How many now?"]
    reqs = [StepRequest(problem_messages(q), n=2, seed=5, max_tokens=16) for q in qs]
    out = g.generate(reqs)
    for r, gen_ in zip(reqs, out, strict=True):
        assert sum(s.count for s in gen_.steps) == 2
        assert gen_.usage.prompt_tokens == len(g.encode(g.render(r.messages)))
        assert all(s.finish in ("step", "eos", "length") and s.text for s in gen_.steps)
    yes_no, _ = g.logprob_of(
        [ContinuationRequest(problem_messages("Is 2 + 2 = 4? Say Yes or No."))]
    )
    assert np.isfinite(yes_no).all() and (yes_no < 0).all()
