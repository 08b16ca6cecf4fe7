"""The real embedded model (SmolLM2-135M-Instruct Q4_1) through llama.cpp. Few, short tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from mcts.generators.base import GenerationError, PromptTooLongError, log_softmax  # noqa: E402
from mcts.generators.llama_cpp import LlamaCppConfig, LlamaCppGenerator  # noqa: E402
from mcts.prompts import problem_messages  # noqa: E402
from mcts.types import ContinuationRequest, StepRequest  # noqa: E402

pytestmark = pytest.mark.model

QUESTIONS = [
    "What is 3 + 4?",
    "Tom has 3 apples and buys 2 more. How many apples does he have?",
    "What is 9 - 5?",
]


@pytest.fixture(scope="module")
def gen() -> LlamaCppGenerator:
    # One thread: on a busy 2-core box llama.cpp's spinning thread barriers cost ~10x.
    return LlamaCppGenerator(LlamaCppConfig(n_ctx=1024, seed=0, n_threads=1))


@pytest.fixture(scope="module")
def wave_out(gen: LlamaCppGenerator):
    return gen.generate(_wave())


def _wave() -> list[StepRequest]:
    reqs = [
        StepRequest(problem_messages(q), n=2, seed=100 + i, max_tokens=24)
        for i, q in enumerate(QUESTIONS)
    ]
    reqs.append(
        StepRequest(
            problem_messages(QUESTIONS[0]),
            prefix="First, look at the numbers.\n\n",
            n=2,
            seed=7,
            max_tokens=24,
        )
    )
    return reqs


def test_wave_from_several_problems(gen: LlamaCppGenerator, wave_out) -> None:
    reqs = _wave()
    out = wave_out
    assert len(out) == len(reqs)
    for r, g in zip(reqs, out, strict=True):
        assert sum(s.count for s in g.steps) == r.n
        # Accounting: prompt tokens are what the model's tokenizer counts for the rendered prompt.
        n_prompt = len(
            gen.llm.tokenize(gen.render(r.messages, r.prefix).encode(), add_bos=False, special=True)
        )
        assert g.usage.prompt_tokens == n_prompt
        assert 0 <= g.usage.cached_prompt_tokens < n_prompt
        assert g.usage.generated_tokens >= sum(s.n_tokens for s in g.steps)
        for s in g.steps:
            assert s.text
            assert s.finish in ("step", "eos") or (
                s.finish == "length" and s.n_tokens == r.max_tokens
            )
            if s.finish == "step":
                assert "\n\n" not in s.text
            assert len(s.token_logprobs) == s.n_tokens >= 1
            assert np.isfinite(s.token_logprobs).all() and max(s.token_logprobs) <= 0.0
            assert s.logprob == pytest.approx(sum(s.token_logprobs))
    assert sum(g.usage.calls for g in out) == 1
    # The 4th request extends the 1st's prompt: it is served right after it, from the cache.
    assert out[3].usage.cached_prompt_tokens >= out[0].usage.prompt_tokens - 1


def test_same_seed_same_steps_whatever_the_order(gen: LlamaCppGenerator, wave_out) -> None:
    reqs = _wave()
    a = wave_out
    b = gen.generate(reqs[::-1])[::-1]
    for ga, gb in zip(a, b, strict=True):
        assert [(s.text, s.token_ids, s.count) for s in ga.steps] == [
            (s.text, s.token_ids, s.count) for s in gb.steps
        ]


def test_logprobs_match_a_fresh_evaluation(gen: LlamaCppGenerator) -> None:
    r = StepRequest(problem_messages(QUESTIONS[1]), n=1, seed=3, max_tokens=12)
    (g,) = gen.generate([r])
    step = g.steps[0]
    prompt = gen.encode(gen.render(r.messages))
    gen.llm.reset()  # evaluate from scratch, token by token, and compare
    want = []
    for k, tok in enumerate(step.token_ids):
        logits = gen._eval_prompt(prompt + list(step.token_ids[:k]))[0]
        want.append(float(log_softmax(logits)[tok]))
    np.testing.assert_allclose(step.token_logprobs, want, atol=1e-3)


def test_to_end_and_logprob_of(gen: LlamaCppGenerator) -> None:
    (g,) = gen.generate(
        [StepRequest(problem_messages(QUESTIONS[0]), n=1, seed=1, max_tokens=16, to_end=True)]
    )
    assert g.steps[0].finish in ("eos", "length")
    vals, usages = gen.logprob_of(
        [
            ContinuationRequest(problem_messages("Is 3 + 4 = 7? Answer Yes or No.")),
            ContinuationRequest(
                problem_messages("Is 3 + 4 = 9? Answer Yes or No."), continuations=("Yes", "No")
            ),
        ]
    )
    assert vals.shape == (2, 2) and np.isfinite(vals).all() and (vals < 0).all()
    assert usages[0].calls == 1 and usages[0].prompt_tokens > 2


def test_bad_inputs(gen: LlamaCppGenerator, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model_path"):
        LlamaCppGenerator(LlamaCppConfig(model_path=str(tmp_path / "missing.gguf")))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="could not be loaded"):
        LlamaCppGenerator(LlamaCppConfig(model_path=str(junk)))
    long_q = "apples and pears " * 400
    with pytest.raises(PromptTooLongError, match=r"requests\[1\].*n_ctx=1024"):
        gen.generate([StepRequest(problem_messages("Hi?")), StepRequest(problem_messages(long_q))])
    with pytest.raises(ValueError, match=r"requests\[0\]\.n"):
        gen.generate([StepRequest(problem_messages("Hi?"), n=0)])


@pytest.fixture(scope="module")
def seq_gen() -> LlamaCppGenerator:
    """The one-sequence-at-a-time path (batched=false), the reference for batched decoding."""
    return LlamaCppGenerator(LlamaCppConfig(n_ctx=1024, seed=0, n_threads=1, batched=False))


@pytest.mark.parametrize("mode", ["batched", "sequential"])
def test_backend_error_mid_wave_is_one_error(
    gen: LlamaCppGenerator, seq_gen: LlamaCppGenerator, mode: str, monkeypatch
) -> None:
    g = gen if mode == "batched" else seq_gen
    target, name = (g._multi, "_decode") if mode == "batched" else (g.llm, "eval")
    calls = {"n": 0}
    real = getattr(target, name)

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("llama_decode returned 1")
        return real(*args)

    monkeypatch.setattr(target, name, flaky)
    reqs = [StepRequest(problem_messages(q), n=2, seed=1, max_tokens=8) for q in QUESTIONS]
    with pytest.raises(GenerationError, match=r"requests\[\d\].*llama_decode") as info:
        gen.generate(reqs) if mode == "batched" else seq_gen.generate(reqs)
    assert info.value.request_index in (0, 1, 2)
    monkeypatch.undo()
    # The generator stays usable after a failed wave, and gives what a fresh wave gives.
    again = g.generate(reqs[:1])[0].steps
    assert [s.token_ids for s in again] == [
        s.token_ids for s in seq_gen.generate(reqs[:1])[0].steps
    ]


def test_batched_decoding_gives_the_single_sequence_samples(
    seq_gen: LlamaCppGenerator,
) -> None:
    """Same seeds -> bit-identical samples and logprobs, batched or one sequence at a time.

    Holds exactly (not approximately) because both contexts use flash attention and the batched
    cache keeps every sequence's cells in position order. The small n_seq_max and n_ctx_total
    force slot reuse (samples > slots) and whole-cache clears between requests.
    """
    small = LlamaCppGenerator(
        LlamaCppConfig(n_ctx=256, n_threads=1, n_seq_max=3, n_ctx_total=256, seed=0)
    )
    reqs = [
        StepRequest(problem_messages(QUESTIONS[0]), n=3, temperature=0.0, max_tokens=16),
        StepRequest(problem_messages(QUESTIONS[1]), n=4, seed=11, max_tokens=16),
        StepRequest(problem_messages(QUESTIONS[2]), n=2, seed=12, max_tokens=16, to_end=True),
        StepRequest(
            problem_messages(QUESTIONS[1]),
            prefix="Tom starts with 3.\n\n",
            n=3,
            seed=13,
            max_tokens=16,
        ),
    ]
    a = small.generate(reqs)
    b = seq_gen.generate(reqs)
    assert small._multi.clears >= 1  # 256 cells cannot hold the whole wave
    for ga, gb in zip(a, b, strict=True):
        assert [(s.token_ids, s.token_logprobs, s.count, s.finish) for s in ga.steps] == [
            (s.token_ids, s.token_logprobs, s.count, s.finish) for s in gb.steps
        ]
        assert ga.usage.generated_tokens == gb.usage.generated_tokens
        assert ga.usage.prompt_tokens == gb.usage.prompt_tokens
    # Greedy samples of one request are all the same step.
    assert len(a[0].steps) == 1 and a[0].steps[0].count == 3


def test_request_larger_than_the_batched_cache(seq_gen: LlamaCppGenerator) -> None:
    """n samples that outgrow n_ctx_total: the cache is cleared between them and the prompt
    evaluated again, which is paid for (prompt_tokens counts each evaluation); samples are
    unchanged."""
    small = LlamaCppGenerator(
        LlamaCppConfig(n_ctx=128, n_threads=1, n_seq_max=4, n_ctx_total=128, seed=0)
    )
    assert small._multi.n_cells == 256  # llama.cpp pads the cell count to a multiple of 256
    r = StepRequest(problem_messages(QUESTIONS[1]), n=8, seed=5, max_tokens=64, to_end=True)
    (a,) = small.generate([r])
    (b,) = seq_gen.generate([r])
    n_prompt = len(small.encode(small.render(r.messages)))
    assert n_prompt + a.usage.generated_tokens - 8 > 256  # the cells it needed (premise)
    clears = small._multi.clears  # each one re-evaluated the prompt
    assert clears >= 1
    assert a.usage.prompt_tokens == (1 + clears) * n_prompt and b.usage.prompt_tokens == n_prompt
    assert a.usage.generated_tokens == b.usage.generated_tokens
    assert [(s.token_ids, s.token_logprobs, s.count) for s in a.steps] == [
        (s.token_ids, s.token_logprobs, s.count) for s in b.steps
    ]


def test_batched_config_errors() -> None:
    with pytest.raises(ValueError, match="n_seq_max"):
        LlamaCppGenerator(LlamaCppConfig(n_seq_max=0))
    with pytest.raises(ValueError, match="n_ctx_total"):
        LlamaCppGenerator(LlamaCppConfig(n_ctx=512, n_ctx_total=100))
    with pytest.raises(TypeError, match="batched"):
        LlamaCppGenerator(LlamaCppConfig(batched="yes"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="features"):
        LlamaCppGenerator(LlamaCppConfig(features="yes"))  # type: ignore[arg-type]


# ---------------------------------------------------------------------- step features


def _feature_wave() -> list[StepRequest]:
    m0, m1 = problem_messages(QUESTIONS[0]), problem_messages(QUESTIONS[1])
    return [
        StepRequest(m0, n=4, seed=0, max_tokens=24),  # eos and length steps
        StepRequest(m1, n=1, temperature=0.0, stop=",", max_tokens=24),  # a delimiter step
        StepRequest(m0, n=2, seed=3, stop=",", max_tokens=24, to_end=True),  # several pieces
        StepRequest(m1, prefix="Tom starts with 3.\n\n", n=2, seed=13, max_tokens=16),
    ]


@pytest.fixture(scope="module")
def feat_gen() -> LlamaCppGenerator:
    return LlamaCppGenerator(LlamaCppConfig(n_ctx=1024, seed=0, n_threads=1, features=True))


@pytest.fixture(scope="module")
def feat_out(feat_gen: LlamaCppGenerator):
    return feat_gen.generate(_feature_wave())


def _samples(gens) -> list:
    return [[(s.token_ids, s.token_logprobs, s.count, s.finish) for s in g.steps] for g in gens]


def test_features_do_not_change_samples(
    gen: LlamaCppGenerator, seq_gen: LlamaCppGenerator, feat_out, monkeypatch
) -> None:
    """Same seeds -> bit-identical samples with features on or off, batched or sequential;
    both paths capture the same states."""
    reqs = _feature_wave()
    off = gen.generate(reqs)
    assert all(s.features is None for g in off for s in g.steps)
    assert _samples(off) == _samples(feat_out)
    monkeypatch.setattr(seq_gen, "features", False)  # restored after the test
    seq_gen.enable_features()  # at runtime, after the generator was built
    seq = seq_gen.generate(reqs)
    assert _samples(seq) == _samples(feat_out)
    for r, gb, gs in zip(reqs, feat_out, seq, strict=True):
        for a, b in zip(gb.steps, gs.steps, strict=True):
            n_pieces = len(a.text.split(r.stop))
            assert a.features.shape == (n_pieces, 576) and a.features.dtype == np.float32
            assert r.to_end or n_pieces == 1
            np.testing.assert_allclose(a.features, b.features, rtol=0, atol=1e-4)
    assert any(len(s.features) > 1 for s in feat_out[2].steps)  # premise: to_end crossed ","


def _chosen_tokens(gen: LlamaCppGenerator, step, stop: str) -> list[int]:
    """For each feature row, the index of the token its state chose (Step.features)."""
    n_pieces, ks = len(step.text.split(stop)), []
    for k in range(step.n_tokens):
        text = gen.llm.detokenize(list(step.token_ids[: k + 1])).decode("utf-8", "replace")
        while len(ks) < n_pieces - 1 and text.lstrip().count(stop) > len(ks):
            ks.append(k)
    return [*ks, step.n_tokens - 1]


def test_features_are_the_state_at_the_last_fed_token(
    feat_gen: LlamaCppGenerator, feat_out
) -> None:
    """Each row equals a fresh forward pass over the prompt + the tokens fed before the token
    it chose; and features_of(prefix + that text) wherever the text re-tokenizes to the same
    tokens (a delimiter split across tokens, e.g. '.\\n' + '\\n', can merge differently)."""
    g, text_checks, literal = feat_gen, 0, 0
    for r, gen_out in zip(_feature_wave(), feat_out, strict=True):
        prompt = g.encode(g.render(r.messages, r.prefix))
        for s in gen_out.steps:
            for row, k in zip(s.features, _chosen_tokens(g, s, r.stop), strict=True):
                fed = prompt + list(s.token_ids[:k])
                np.testing.assert_allclose(row, g._eval_prompt(fed, state=True)[2], atol=1e-4)
                text = r.prefix + g.llm.detokenize(list(s.token_ids[:k])).decode("utf-8")
                if g.encode(g.render(r.messages, text)) == fed:
                    (want,) = g.features_of([(r.messages, text)])
                    np.testing.assert_allclose(row, want, rtol=0, atol=1e-4)
                    text_checks += 1
            if s.finish in ("step", "eos") and not r.to_end:
                # The documented use: the state of a step = features_of(prefix + step text).
                (want,) = g.features_of([(r.messages, r.prefix + s.text)])
                if np.abs(s.features[0] - want).max() <= 1e-4:
                    literal += 1
    assert text_checks >= 3 and literal >= 1


def test_feature_identity_and_features_of(feat_gen: LlamaCppGenerator) -> None:
    ident = feat_gen.feature_identity()
    assert ident == {
        "backend": "llama_cpp",
        "model_sha256": feat_gen.identity()["model_sha256"],
        "layer": "output_norm",
        "pooling": "last_token_of_step",
        "dim": 576,
    }
    m = problem_messages(QUESTIONS[0])
    x = feat_gen.features_of([(m, "3 + 4 = 7"), (list(m), "3 + 4"), (m, "3 + 4 = 7")])
    assert x.shape == (3, 576) and x.dtype == np.float32 and np.isfinite(x).all()
    assert np.array_equal(x[0], x[2]) and not np.allclose(x[0], x[1])
    with pytest.raises(TypeError, match=r"texts\[0\]"):
        feat_gen.features_of([("not messages", "")])
