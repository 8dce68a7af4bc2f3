"""Complexity classifier: RouteLLM metrics, the shipped model's shape, reproducible training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modelplane_sidecar.routing.classify import complexity_train as train
from modelplane_sidecar.routing.classify.complexity import (
    STRUCTURAL_FEATURES,
    clip_text,
    default_model,
    rank,
    structural_features,
)
from modelplane_sidecar.routing.classify.size import estimate_text_tokens

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "routellm-evals"


def test_pgr_of_an_oracle_a_random_and_an_inverted_router() -> None:
    # 4 prompts: the strong model helps on the first two only.
    weak = np.array([False, False, True, True])
    strong = np.array([True, True, True, True])
    oracle = train.router_metrics(np.array([0.9, 0.8, 0.1, 0.2]), weak, strong)
    inverted = train.router_metrics(np.array([0.1, 0.2, 0.9, 0.8]), weak, strong)
    assert oracle.cpt50 == pytest.approx(0.25) and oracle.cpt80 == pytest.approx(0.5)
    assert inverted.cpt50 == pytest.approx(0.75)
    assert oracle.apgr > 0.5 > inverted.apgr
    curve = train.pgr_curve(np.array([0.9, 0.8, 0.1, 0.2]), weak, strong)
    assert curve.tolist() == [0.0, 0.5, 1.0, 1.0, 1.0]
    rand = train.random_router_metrics(np.tile(weak, 200), np.tile(strong, 200))
    assert 0.45 < rand.apgr < 0.55


def test_ridge_fit_recovers_a_linear_signal() -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(500, 4))
    struct = rng.normal(size=(500, 2))
    y = emb @ np.array([1.0, -2.0, 0.0, 0.5]) + 0.3 * struct[:, 0] + 0.1
    fitted = train.fit(emb, struct, y, l2=1e-6)
    assert np.allclose(fitted.predict(emb, struct), y, atol=1e-4)


def test_rank_interpolates_between_quantiles() -> None:
    quantiles = [0.0, 1.0, 2.0, 3.0, 4.0]
    assert rank(quantiles, -1) == 0.0 and rank(quantiles, 5) == 1.0
    assert rank(quantiles, 2.0) == pytest.approx(0.5)
    assert rank(quantiles, 2.5) == pytest.approx(0.625)


def test_features_and_clipping() -> None:
    features = structural_features("Explain step by step: what is 2 + 2?\nThen prove it.", 3)
    assert len(features) == len(STRUCTURAL_FEATURES)
    named = dict(zip(STRUCTURAL_FEATURES, features, strict=True))
    assert named["log_step_words"] > 0 and named["log_math_markers"] > 0
    assert named["log_earlier_turns"] == pytest.approx(np.log1p(2))
    long = "a" * 10_000 + "QUESTION?"
    clipped = clip_text(long)
    assert len(clipped) < 2100 and clipped.endswith("QUESTION?")
    assert clip_text("Which?\nA. one\nB. two\nAnswer:") == "Which?\none\ntwo\n"


def test_shipped_model_scores_in_range_and_ranks_a_word_problem_above_a_lookup() -> None:
    model = default_model()
    easy = model.score("List three primary colors.")
    hard = model.score(
        "Janet has 3 times as many marbles as Tom. After giving Tom 12 marbles they have the "
        "same number. How many marbles did Janet have at first?"
    )
    assert 0.0 <= easy.score < hard.score <= 1.0
    assert 0.0 <= model.score("").score <= 1.0
    assert model.score("x " * 100_000).score <= 1.0


def test_size_estimate() -> None:
    assert estimate_text_tokens("") == 0
    assert estimate_text_tokens("abcd" * 100) == 100
    assert estimate_text_tokens("日本語のテキスト") == 8  # one token per CJK character
    assert estimate_text_tokens("naïve café") == 4  # 8 ASCII chars / 4 + 2 others


@pytest.mark.skipif(not DATA.exists(), reason="shared RouteLLM data not present")
def test_training_reproduces_the_committed_weights() -> None:
    assert train.main(["--data", str(DATA), "--check", "--skip-eval"]) == 0
