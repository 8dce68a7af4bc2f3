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


@pytest.mark.skipif(not DATA.exists(), reason="shared RouteLLM data not present")
def test_everyday_set_shares_no_prompt_with_the_benchmark_data() -> None:
    benchmark = set(train.load_dataset(DATA).prompts)
    assert not benchmark.intersection(train.load_everyday().prompts)


def test_logistic_fit_separates_and_is_deterministic() -> None:
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(400, 3))
    z = rng.normal(size=(400, 2))
    y = (emb[:, 0] - emb[:, 1] + 0.5 * z[:, 0] > 0).astype(np.float64)
    weight = np.ones(400)
    first = train.fit_logistic(emb, z, y, weight, l2=1.0)
    again = train.fit_logistic(emb, z, y, weight, l2=1.0)
    assert np.array_equal(first.emb_weights, again.emb_weights)
    predicted = first.logit(emb, z) > 0
    assert np.mean(predicted == (y == 1)) > 0.95
    assert first.emb_weights[0] > 0 > first.emb_weights[1] and first.struct_weights[0] > 0


def test_everyday_set_is_two_disjoint_groups() -> None:
    everyday = train.load_everyday()
    assert len(everyday.prompts) == len(set(everyday.prompts)) <= 400
    trivial = int((~everyday.hard).sum())
    assert trivial >= 100 and int(everyday.hard.sum()) >= 100


# Plain examples of each kind that are not in the everyday set (the shipped heads saw all of it).
_TRIVIAL = (
    "Thank you, have a nice day!",
    "What is the capital of Italy?",
    "Write a haiku about winter",
    "Translate 'good night' to French",
    "hello :)",
)
_HARD = (
    "Prove that the product of two odd integers is odd, and then prove that the square root of 3 "
    "is irrational.",
    "Implement a concurrent hash map in Rust with fine-grained locking, and explain how your "
    "design avoids deadlocks and what happens when the table resizes.",
    "Janet has 3 times as many marbles as Tom. After giving Tom 12 marbles they have the same "
    "number. How many marbles did Janet have at first?",
)


def test_shipped_model_ranks_everyday_chat_below_hard_prompts() -> None:
    assert not set(_TRIVIAL + _HARD).intersection(train.load_everyday().prompts)
    model = default_model()
    trivial = [model.score(p) for p in _TRIVIAL]
    hard = [model.score(p) for p in _HARD]
    # The default complexity-tiers thresholds are 0.35 (standard) and 0.65 (premium).
    assert max(c.score for c in trivial) < 0.35
    assert min(c.score for c in hard) >= 0.65
    assert all(c.everyday > 0.5 for c in trivial)
    # Without the everyday heads (the model before them) the chat prompts ranked high.
    before = model.benchmark_only()
    assert max(before.score(p).score for p in _TRIVIAL) > 0.5
