"""Step.features on the transformers backend (tiny random Llama, no downloads): the state the
lm_head reads at the end of each step, captured in the decode loop."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from mcts.generators.transformers import TransformersGenerator  # noqa: E402
from mcts.prompts import problem_messages  # noqa: E402
from mcts.types import StepRequest  # noqa: E402
from tests.test_transformers_generator import _model, tok  # noqa: E402, F401


def _wave() -> list[StepRequest]:
    return [
        StepRequest(problem_messages("What is 2 + 3?"), n=3, seed=11, max_tokens=12),
        StepRequest(
            problem_messages("Tom has 4 apples and buys 7 more. How many apples now?"),
            prefix="First add.\n\n",
            n=2,
            seed=12,
            max_tokens=12,
            stop=" ",
        ),
        # to_end runs through delimiters: one row per piece of text.split(stop)
        StepRequest(
            problem_messages("Solve 9 + 9."), n=3, seed=13, max_tokens=16, stop=" ", to_end=True
        ),
    ]


def _chosen_tokens(g: TransformersGenerator, step, stop: str) -> list[int]:
    """For each feature row, the index of the token its state chose."""
    n_pieces, ks = len(step.text.split(stop)), []
    for k in range(step.n_tokens):
        text = g.tokenizer.decode(list(step.token_ids[: k + 1]))
        while len(ks) < n_pieces - 1 and text.lstrip().count(stop) > len(ks):
            ks.append(k)
    return [*ks, step.n_tokens - 1]


def test_features_match_a_plain_forward_and_leave_samples_alone(tok) -> None:  # noqa: F811
    g = TransformersGenerator(_model(tok), tok, batch_size=16, seed=0)
    reqs = _wave()
    off = g.generate(reqs)
    g.enable_features()
    on = g.generate(reqs)
    assert [[(s.token_ids, s.count) for s in x.steps] for x in off] == [
        [(s.token_ids, s.count) for s in x.steps] for x in on
    ]
    assert all(s.features is None for x in off for s in x.steps)
    multi = 0
    for r, x in zip(reqs, on, strict=True):
        prompt = g.encode(g.render(r.messages, r.prefix))
        for s in x.steps:
            n_pieces = len(s.text.split(r.stop))
            assert s.features.shape == (n_pieces, 32) and s.features.dtype == np.float32
            multi += n_pieces > 1
            for row, k in zip(s.features, _chosen_tokens(g, s, r.stop), strict=True):
                ids = torch.tensor([prompt + list(s.token_ids[:k])])
                with torch.inference_mode():  # LlamaModel's output: after the final norm
                    want = g.model.model(input_ids=ids).last_hidden_state[0, -1].numpy()
                np.testing.assert_allclose(row, want, rtol=0, atol=1e-4)
                text = r.prefix + g.tokenizer.decode(list(s.token_ids[:k]))
                if g.encode(g.render(r.messages, text)) == ids[0].tolist():
                    np.testing.assert_allclose(
                        g.features_of([(r.messages, text)])[0], row, rtol=0, atol=1e-4
                    )
    assert multi >= 1  # premise: a to_end sample ran through a delimiter
    ident = g.feature_identity()
    assert ident["layer"] == "output_norm" and ident["dim"] == 32
    assert ident["pooling"] == "last_token_of_step" and ident["backend"] == "transformers"
