"""Unit tests of the shared generator helpers, with a small deterministic generator (no model)."""

from __future__ import annotations

import dataclasses
import sys
import types
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from mcts.generators import base
from mcts.generators.base import (
    ChatTemplate,
    GenerationError,
    PromptTooLongError,
    StepBuilder,
    Wave,
    check_prompt_fits,
    finish_step,
    log_softmax,
    merge_duplicates,
    prefix_order,
    run_wave,
    sample_rng,
    sample_token,
    split_at_stop,
    validate_continuation_requests,
    validate_step_requests,
)
from mcts.generators.factory import make_generator
from mcts.types import ContinuationRequest, Generation, Generator, Message, Step, StepRequest, Usage

ROOT = Path(__file__).resolve().parents[1]
MSGS = (Message("user", "What is 2 + 3?"),)


# ----------------------------------------------------------------- a deterministic generator


class ScriptedGenerator:
    """Emits scripted completions character by character (one 'token' per character).

    Sample j of a request returns script[(seed + j) % len(script)], so it is deterministic and
    exercises the same step splitting / dedup / accounting path the real backends use.
    """

    EOS = -1

    def __init__(self, script: Sequence[str], fail_on: str | None = None) -> None:
        self.script = list(script)
        self.fail_on = fail_on

    def generate(self, requests: Sequence[StepRequest]) -> list[Generation]:
        validate_step_requests(requests)

        def one(_: int, r: StepRequest) -> tuple[list[Step], Usage]:
            if self.fail_on is not None and self.fail_on in r.prefix:
                raise RuntimeError("backend exploded")
            usage = Usage(prompt_tokens=len(r.prefix) + 10)
            steps = []
            for j in range(r.n):
                text = self.script[((r.seed or 0) + j) % len(self.script)]
                b = StepBuilder(r.stop, r.to_end)
                for ch in text:
                    if ch == "$":  # '$' stands for end of sequence in scripts
                        b.add_eos(self.EOS, -0.5)
                        break
                    if b.add(ord(ch), -0.25, ch.encode()) or len(b.token_ids) >= r.max_tokens:
                        break
                step = b.build()
                usage.generated_tokens += step.n_tokens
                steps.append(step)
            return steps, usage

        results = run_wave(requests, one)
        return Wave([s for s, _ in results], [u for _, u in results]).generations()

    def logprob_of(self, requests: Sequence[ContinuationRequest]) -> tuple[np.ndarray, list[Usage]]:
        validate_continuation_requests(requests)
        out = np.array([[-float(len(c)) for c in r.continuations] for r in requests])
        return out, [Usage(prompt_tokens=1) for _ in requests]


def test_scripted_generator_is_a_generator() -> None:
    assert isinstance(ScriptedGenerator(["a"]), Generator)


def test_wave_splits_steps_merges_duplicates_and_accounts_tokens() -> None:
    gen = ScriptedGenerator(["First add.\n\nThen", "First add.\n\nOther", "Done$", "long text"])
    reqs = [
        StepRequest(MSGS, n=4, seed=0, max_tokens=5),
        StepRequest(MSGS, prefix="x\n\n", n=3, seed=0, max_tokens=64),
    ]
    out = gen.generate(reqs)
    assert len(out) == 2
    # Request 1: samples 0..2 = two identical "First add." steps + "Done" at EOS.
    steps = out[1].steps
    assert [s.text for s in steps] == ["First add.", "Done"]
    assert [s.count for s in steps] == [2, 1]
    assert [s.finish for s in steps] == ["step", "eos"]
    # Tokens run up to and including the delimiter; the EOS token is counted.
    assert steps[0].n_tokens == len("First add.\n\n")
    assert steps[1].n_tokens == len("Done") + 1
    assert out[1].usage.generated_tokens == 2 * len("First add.\n\n") + len("Done") + 1
    # Request 0 is capped at 5 tokens: all but the EOS sample end by length.
    got = [(s.text, s.finish, s.count, s.n_tokens) for s in out[0].steps]
    assert got == [("First", "length", 2, 5), ("Done", "eos", 1, 5), ("long", "length", 1, 5)]
    # One backend call: calls == 1 on the first generation only.
    assert [g.usage.calls for g in out] == [1, 0]


def test_to_end_ignores_the_delimiter() -> None:
    gen = ScriptedGenerator(["a\n\nb\n\nc$"])
    (g,) = gen.generate([StepRequest(MSGS, n=1, to_end=True)])
    assert g.steps[0].text == "a\n\nb\n\nc"
    assert g.steps[0].finish == "eos"


def test_backend_raising_mid_wave_fails_whole_wave_naming_request() -> None:
    gen = ScriptedGenerator(["a\n\n"], fail_on="BOOM")
    reqs = [StepRequest(MSGS), StepRequest(MSGS, prefix="BOOM\n\n"), StepRequest(MSGS)]
    with pytest.raises(GenerationError, match=r"requests\[1\]") as info:
        gen.generate(reqs)
    assert info.value.request_index == 1
    assert isinstance(info.value.__cause__, RuntimeError)


def test_run_wave_reports_original_request_index_when_reordered() -> None:
    def fn(_: int, item: int) -> int:
        if item == 7:
            raise KeyError("nope")
        return item

    with pytest.raises(GenerationError) as info:
        run_wave([3, 7, 1], fn, request_ids=[2, 0, 1])
    assert info.value.request_index == 0


# ----------------------------------------------------------------- step splitting


def test_split_at_stop_skips_leading_blank_lines() -> None:
    assert split_at_stop("\n\n\nabc\n\ndef", "\n\n") == ("\n\n\nabc", True)
    assert split_at_stop("abc", "\n\n") == ("abc", False)
    assert split_at_stop("\n\n", "\n\n") == ("\n\n", False)


@settings(max_examples=200, deadline=None)
@given(
    st.text(alphabet="ab \n.", max_size=40),
    st.sampled_from(["\n\n", "\n", ".", "ab"]),
)
def test_finish_step_text_is_the_part_before_the_first_delimiter(text: str, stop: str) -> None:
    toks = list(range(len(text)))
    step = finish_step(text, toks, [-0.1] * len(toks), stop=stop, to_end=False, eos=False)
    if step.finish == "step":
        body = text.lstrip()
        head = body[: body.index(stop)]
        assert step.text == head.strip()
        assert stop not in head
    else:
        assert step.finish == "length"
        assert step.text == text.strip()
    assert step.n_tokens == len(text)
    assert step.logprob == pytest.approx(-0.1 * len(text))


def test_finish_step_rejects_mismatched_lengths_and_nan() -> None:
    with pytest.raises(ValueError, match="token_logprobs"):
        finish_step("a", [1, 2], [0.0], stop="\n\n", to_end=False, eos=False)
    with pytest.raises(GenerationError, match="non-finite"):
        finish_step("a", [1], [float("nan")], stop="\n\n", to_end=False, eos=False)


def test_step_builder_handles_multibyte_split_across_tokens() -> None:
    b = StepBuilder("\n\n", to_end=False)
    raw = "é ok\n\nnext".encode()
    done = False
    for k, byte in enumerate(raw):
        done = b.add(k, -1.0, bytes([byte]))
        if done:
            break
    assert done
    step = b.build()
    assert step.text == "é ok"
    assert step.finish == "step"
    assert step.n_tokens == len("é ok\n\n".encode())


def _step(text: str, toks: tuple[int, ...] = (1,), finish: str = "step") -> Step:
    return Step(text, toks, -1.0 * len(toks), tuple([-1.0] * len(toks)), finish)  # type: ignore[arg-type]


def test_merge_duplicates_keeps_first_and_counts() -> None:
    merged = merge_duplicates([_step("a", (1,)), _step(" a ", (2, 3)), _step("b"), _step("a")])
    assert [(s.text, s.count, s.token_ids) for s in merged] == [("a", 3, (1,)), ("b", 1, (1,))]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["x", " x", "y", "y ", "z", ""]), max_size=12))
def test_merge_duplicates_conserves_samples(texts: list[str]) -> None:
    merged = merge_duplicates([_step(t) for t in texts])
    assert sum(s.count for s in merged) == len(texts)
    keys = [s.text.strip() for s in merged]
    assert len(keys) == len(set(keys))
    assert set(keys) == {t.strip() for t in texts}


# ----------------------------------------------------------------- sampling


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(-20, 20), min_size=2, max_size=30),
    st.floats(0.1, 2.0),
    st.floats(0.05, 1.0),
    st.integers(0, 2**32),
)
def test_sample_token_logprob_is_raw_log_softmax(
    logits: list[float], temperature: float, top_p: float, seed: int
) -> None:
    x = np.array(logits)
    tok, lp = sample_token(x, temperature, top_p, np.random.default_rng(seed))
    assert 0 <= tok < len(x)
    assert lp == pytest.approx(log_softmax(x)[tok])
    again = sample_token(x, temperature, top_p, np.random.default_rng(seed))
    assert again == (tok, lp)


def test_sample_token_greedy_and_tiny_top_p_pick_argmax() -> None:
    x = np.array([0.1, 3.0, 2.9, -1.0])
    rng = np.random.default_rng(0)
    assert sample_token(x, 0.0, 1.0, rng)[0] == 1
    assert all(sample_token(x, 1.0, 1e-6, rng)[0] == 1 for _ in range(20))


def test_sample_token_follows_the_tempered_distribution() -> None:
    x = np.log(np.array([0.7, 0.2, 0.1]))
    rng = np.random.default_rng(1)
    draws = np.bincount([sample_token(x, 1.0, 1.0, rng)[0] for _ in range(4000)], minlength=3)
    assert np.allclose(draws / 4000, [0.7, 0.2, 0.1], atol=0.03)


def test_sample_rng_depends_only_on_seed_and_index() -> None:
    fb = np.random.default_rng(0)
    a = sample_rng(5, 2, fb).random(3)
    fb.random(10)  # advancing the fallback stream must not matter for seeded requests
    b = sample_rng(5, 2, fb).random(3)
    c = sample_rng(5, 3, fb).random(3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


# ----------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n": 0}, r"requests\[1\]\.n"),
        ({"stop": ""}, r"requests\[1\]\.stop"),
        ({"max_tokens": 0}, r"requests\[1\]\.max_tokens"),
        ({"temperature": -1.0}, r"requests\[1\]\.temperature"),
        ({"temperature": float("nan")}, r"requests\[1\]\.temperature"),
        ({"top_p": 0.0}, r"requests\[1\]\.top_p"),
        ({"messages": ()}, r"requests\[1\]\.messages"),
    ],
)
def test_bad_requests_are_rejected_naming_the_field(kwargs: dict, field: str) -> None:
    bad = StepRequest(**{"messages": MSGS, **kwargs})
    with pytest.raises(ValueError, match=field):
        validate_step_requests([StepRequest(MSGS), bad])


def test_bad_request_types_are_rejected() -> None:
    with pytest.raises(TypeError, match="sequence of StepRequest"):
        validate_step_requests(StepRequest(MSGS))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"requests\[0\]"):
        validate_step_requests(["hello"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"seed"):
        validate_step_requests([StepRequest(MSGS, seed=1.5)])  # type: ignore[arg-type]


def test_bad_continuation_requests() -> None:
    with pytest.raises(ValueError, match=r"requests\[0\]\.continuations\[1\]"):
        validate_continuation_requests([ContinuationRequest(MSGS, continuations=("Yes", ""))])
    with pytest.raises(ValueError, match="same count"):
        validate_continuation_requests(
            [ContinuationRequest(MSGS), ContinuationRequest(MSGS, continuations=("A", "B", "C"))]
        )


def test_prompt_too_long_names_request_and_fix() -> None:
    with pytest.raises(PromptTooLongError, match=r"requests\[3\].*n_ctx=100") as info:
        check_prompt_fits(3, 90, 20, 100)
    assert info.value.request_index == 3
    check_prompt_fits(3, 80, 20, 100)  # fits exactly: no error


# ----------------------------------------------------------------- prompts


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_template_renders_messages_then_prefix() -> None:
    text = ChatTemplate(CHATML).render((Message("system", "S"), Message("user", "Q")), "a\n\n")
    assert text == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
        "<|im_start|>assistant\na\n\n"
    )


def test_chat_template_raise_exception_is_a_clear_error() -> None:
    t = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="roles must alternate"):
        t.render(MSGS)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(alphabet="ab", max_size=5), min_size=1, max_size=12))
def test_prefix_order_puts_shared_prefixes_together(keys: list[str]) -> None:
    order = prefix_order(keys)
    assert sorted(order) == list(range(len(keys)))
    seq = [keys[i] for i in order]
    # Every group of keys sharing a first character is contiguous.
    firsts = [k[:1] for k in seq]
    seen: list[str] = []
    for f in firsts:
        if not seen or seen[-1] != f:
            assert f not in seen
            seen.append(f)


def test_embedded_model_path_missing_package_says_make_install(monkeypatch) -> None:
    monkeypatch.setattr(base.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="make install"):
        base.embedded_model_path()


# ----------------------------------------------------------------- factory and configs


@dataclasses.dataclass
class _FakeConfig:
    backend: str = "fake"
    script: tuple[str, ...] = ("hi\n\n",)


def _install_fake_backend(monkeypatch) -> None:
    mod = types.ModuleType("fake_backend_mod")
    mod.FakeConfig = _FakeConfig  # type: ignore[attr-defined]
    mod.FakeGen = lambda cfg: ScriptedGenerator(cfg.script)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_backend_mod", mod)
    from mcts.generators import factory

    monkeypatch.setitem(factory.BACKENDS, "fake", ("fake_backend_mod", "FakeGen", "FakeConfig"))


def test_make_generator_accepts_dict_dataclass_and_dictconfig(monkeypatch) -> None:
    _install_fake_backend(monkeypatch)
    for cfg in (
        {"backend": "fake", "script": ("yo\n\n",)},
        _FakeConfig(script=("yo\n\n",)),
        OmegaConf.create({"backend": "fake", "script": ["yo\n\n"]}),
    ):
        gen = make_generator(cfg)
        assert gen.generate([StepRequest(MSGS)])[0].steps[0].text == "yo"


def test_make_generator_rejects_unknown_backend_and_keys(monkeypatch) -> None:
    _install_fake_backend(monkeypatch)
    with pytest.raises(ValueError, match="generator.backend must be one of"):
        make_generator({"backend": "gpt5"})
    with pytest.raises(ValueError, match=r"unknown generator config key\(s\) \['temprature'\]"):
        make_generator({"backend": "fake", "temprature": 0.5})
    with pytest.raises(TypeError, match="generator config"):
        make_generator(42)


@pytest.mark.parametrize(
    ("name", "module", "cls"),
    [
        ("llama_cpp", "mcts.generators.llama_cpp", "LlamaCppConfig"),
        ("transformers", "mcts.generators.transformers", "TransformersConfig"),
    ],
)
def test_yaml_configs_match_their_dataclasses(name: str, module: str, cls: str) -> None:
    import importlib

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "generator" / f"{name}.yaml"))
    fields = {f.name for f in dataclasses.fields(getattr(importlib.import_module(module), cls))}
    assert cfg["backend"] == name
    assert set(cfg) == fields
