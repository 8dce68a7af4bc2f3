"""Complexity classifier: how much would a strong model gain over a cheap one on this prompt?

A ridge regression of the expected gain (strong model correct minus weak model correct) over two
kinds of cheap features, trained on RouteLLM's per-prompt correctness labels of a weak
(Mixtral-8x7B) and a strong (GPT-4) model (`complexity_train.py`):

- the mean of WordLlama's static token embeddings of the prompt (256 dimensions, shipped inside
  the `wordllama` wheel, loaded from its files, never downloaded), and
- structural features: length, code, maths, numbers, multi-step wording, questions, lines and
  conversation depth.

Because the model is linear in the mean embedding, the training script folds the embedding matrix
and the weights into one score per vocabulary token: at run time the classifier tokenizes, averages
those per-token scores and adds the structural terms. No embedding matrix is held in memory and a
prediction takes tens of microseconds.

The score is calibrated to a rank: 0.7 means the prompt needs a strong model more than 70 % of the
training prompts did. So a threshold of t sends about 1 - t of benchmark-like traffic to the strong
model, which is how `complexity-tiers` thresholds are meant to be read.

Benchmark questions are all the RouteLLM labels cover, and everyday chat ("Thanks!", "Translate
'good morning' to Spanish") is unlike all of them. Two small logistic heads over the same features,
trained on the committed everyday set (`everyday_prompts.json`: prompts expected to be trivial or
hard, written for this project) and the benchmark prompts, handle it:

- the gate: how likely the prompt is everyday chat rather than benchmark-like, w in 0..1;
- the everyday hardness: how likely an everyday prompt is one of the hard kind, h in 0..1.

The score is (1 - w) * benchmark rank + w * h: a benchmark-like prompt keeps its RouteLLM rank, an
everyday one gets its hardness. Both heads are linear in the mean embedding too, so each is one more
per-token score table.
"""

from __future__ import annotations

import bisect
import copy
import functools
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    from tokenizers import Tokenizer

MODEL_FILE = "complexity_model.npz"
TOKENIZER_RESOURCE = ("wordllama", "tokenizers/l2_supercat_tokenizer_config.json")

#: Pseudo-tokens at the corpus mean that shrink a short prompt's mean embedding (see training).
PRIOR_TOKENS = 8
#: Long prompts are classified from their head and tail (the question is usually at one end);
#: this also bounds the tokenizer's time (about 0.2 ms per 1000 characters).
_HEAD_CHARS = 1500
_TAIL_CHARS = 500

_WORD = re.compile(r"\w+")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_MATH = re.compile(r"[=+*/^<>√∑∫π±≤≥∞]|\\frac|\\sum|\\int|\\sqrt|\d\s*[-+*/^x\u00d7]\s*\d")
#: Literal markers, counted with str.count (C speed) rather than word-bounded regexes.
_CODE_MARKERS = (
    "```", "def ", "class ", "#include", "function", "=>", "import ", "return", ";\n", "{\n", "</",
)  # fmt: skip
_STEP_WORDS = (
    "step by step", "step-by-step", " first", " then", " next", "finally", "after that",
    "explain", "prove", "derive", "justify", "compare", "analyze", "analyse", "evaluate",
    "design", "implement", "calculate", "why", "how many", "how much",
)  # fmt: skip

_NO_DIGITS = str.maketrans("", "", "0123456789")

STRUCTURAL_FEATURES = (
    "log_chars",
    "log_words",
    "mean_word_length",
    "long_word_share",
    "log_code_markers",
    "log_math_markers",
    "log_numbers",
    "digit_share",
    "log_step_words",
    "log_questions",
    "log_lines",
    "log_earlier_turns",
)


#: Multiple-choice scaffolding ("A. ", a closing "Answer:"): the training questions all carry it,
#: so left in, the model would learn the benchmark's format rather than the question's content.
_CHOICE_SCAFFOLD = re.compile(r"^(?:[A-D][.)] |Answer:\s*$)", re.M)


def clip_text(text: str) -> str:
    """The part of a prompt the classifier reads: head and tail, without choice scaffolding."""
    if len(text) > _HEAD_CHARS + _TAIL_CHARS:
        text = text[:_HEAD_CHARS] + "\n" + text[-_TAIL_CHARS:]
    return _CHOICE_SCAFFOLD.sub("", text)


def structural_features(text: str, user_turns: int) -> list[float]:
    """The structural features of an already clipped prompt, in STRUCTURAL_FEATURES order."""
    words = _WORD.findall(text)
    n_words = len(words)
    letters = sum(len(w) for w in words)
    long_words = sum(1 for w in words if len(w) >= 9)
    digits = len(text) - len(text.translate(_NO_DIGITS))
    lowered = text.lower()
    return [
        math.log1p(len(text)),
        math.log1p(n_words),
        letters / n_words if n_words else 0.0,
        long_words / n_words if n_words else 0.0,
        math.log1p(sum(text.count(marker) for marker in _CODE_MARKERS)),
        math.log1p(len(_MATH.findall(text))),
        math.log1p(len(_NUMBER.findall(text))),
        digits / len(text) if text else 0.0,
        math.log1p(sum(lowered.count(word) for word in _STEP_WORDS)),
        math.log1p(text.count("?")),
        math.log1p(text.count("\n")),
        math.log1p(max(0, user_turns - 1)),
    ]


def load_tokenizer() -> Tokenizer:
    """WordLlama's tokenizer, read from the installed wheel's own file (no network)."""
    from tokenizers import Tokenizer

    package, name = TOKENIZER_RESOURCE
    path = resources.files(package).joinpath(name)
    with resources.as_file(path) as real:
        tokenizer = Tokenizer.from_file(str(real))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


@dataclass(slots=True, frozen=True)
class Complexity:
    #: 0..1, higher: more need for a strong model. For a benchmark-like prompt, the rank of the
    #: predicted gain among the training prompts; for everyday chat, its everyday hardness.
    score: float
    #: The benchmark head's predicted gain (strong minus weak correctness), roughly -0.2..0.6.
    gain: float
    #: How likely the prompt is everyday chat rather than benchmark-like (the gate), 0..1.
    everyday: float = 0.0
    #: How likely an everyday prompt is of the hard kind, 0..1.
    hardness: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "score": round(self.score, 4),
            "predictedGain": round(self.gain, 4),
            "everyday": round(self.everyday, 4),
            "everydayHardness": round(self.hardness, 4),
        }


@dataclass(slots=True, frozen=True)
class LinearHead:
    """A logistic head over the mean embedding (folded into per-token scores) and clamped,
    standardised structural features (the standardisation folded into the weights)."""

    token_scores: list[float]
    prior: float
    struct: list[float]
    bias: float

    @classmethod
    def from_arrays(
        cls,
        token_scores: npt.NDArray[np.float32],
        prior_score: float,
        weights: npt.NDArray[np.float64],
        bias: float,
        struct_mean: npt.NDArray[np.float64],
        struct_scale: npt.NDArray[np.float64],
    ) -> LinearHead:
        folded = weights / struct_scale
        return cls(
            token_scores.astype(float).tolist(),
            PRIOR_TOKENS * prior_score,
            [float(v) for v in folded],
            float(bias - float(folded @ struct_mean)),
        )

    def logit(self, ids: list[int], clamped: list[float]) -> float:
        table = self.token_scores
        value = self.bias + (sum([table[i] for i in ids]) + self.prior) / (len(ids) + PRIOR_TOKENS)
        for weight, x in zip(self.struct, clamped, strict=True):
            value += weight * x
        return value


@dataclass(slots=True, frozen=True)
class EverydayHeads:
    """The gate (everyday chat vs benchmark-like) and the everyday hardness, sharing one clamp."""

    gate: LinearHead
    hardness: LinearHead
    low: list[float]
    high: list[float]


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


class ComplexityModel:
    """The trained classifier: per-token scores, structural weights and their scaling."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        token_scores: npt.NDArray[np.float32],
        struct_weights: npt.NDArray[np.float64],
        struct_mean: npt.NDArray[np.float64],
        struct_scale: npt.NDArray[np.float64],
        struct_range: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]],
        prior_score: float,
        bias: float,
        quantiles: npt.NDArray[np.float64],
        info: dict[str, Any],
        everyday: EverydayHeads | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        # A plain list: summing a few hundred entries is faster than a numpy gather of them.
        self._token_scores: list[float] = token_scores.astype(float).tolist()
        self._prior = PRIOR_TOKENS * prior_score
        # Fold standardisation into the weights: w . (x - m) / s = (w / s) . x - (w / s) . m
        folded = struct_weights / struct_scale
        self._struct = [float(v) for v in folded]
        self._low = [float(v) for v in struct_range[0]]
        self._high = [float(v) for v in struct_range[1]]
        self._bias = float(bias - float(folded @ struct_mean))
        self._quantiles = [float(q) for q in quantiles]
        self._everyday = everyday
        self.info = info

    @classmethod
    def load(cls, path: Path | None = None) -> ComplexityModel:
        import numpy as np

        source = path or Path(str(resources.files(__package__).joinpath(MODEL_FILE)))
        with np.load(source, allow_pickle=False) as data:
            names = tuple(str(n) for n in data["struct_names"])
            if names != STRUCTURAL_FEATURES:
                raise ValueError(
                    f"{source}: structural features {names} do not match this code's "
                    f"{STRUCTURAL_FEATURES}; retrain with complexity_train.py"
                )
            info = {
                str(k): str(v) for k, v in zip(data["info_keys"], data["info_values"], strict=True)
            }
            everyday = None
            if "gate_token_scores" in data.files:
                mean = data["everyday_struct_mean"].astype(np.float64)
                scale = data["everyday_struct_scale"].astype(np.float64)
                heads = [
                    LinearHead.from_arrays(
                        data[f"{name}_token_scores"].astype(np.float32),
                        float(data[f"{name}_prior_score"]),
                        data[f"{name}_struct_weights"].astype(np.float64),
                        float(data[f"{name}_bias"]),
                        mean,
                        scale,
                    )
                    for name in ("gate", "hardness")
                ]
                everyday = EverydayHeads(
                    heads[0],
                    heads[1],
                    [float(v) for v in data["everyday_struct_low"]],
                    [float(v) for v in data["everyday_struct_high"]],
                )
            return cls(
                load_tokenizer(),
                data["token_scores"].astype(np.float32),
                data["struct_weights"].astype(np.float64),
                data["struct_mean"].astype(np.float64),
                data["struct_scale"].astype(np.float64),
                (data["struct_low"].astype(np.float64), data["struct_high"].astype(np.float64)),
                float(data["prior_score"]),
                float(data["bias"]),
                data["quantiles"].astype(np.float64),
                info,
                everyday,
            )

    def benchmark_only(self) -> ComplexityModel:
        """This model without its everyday heads: the RouteLLM rank alone (for comparisons)."""
        twin = copy.copy(self)
        twin._everyday = None
        return twin

    def score(self, prompt: str, user_turns: int = 1) -> Complexity:
        text = clip_text(prompt)
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        table = self._token_scores
        token_sum = sum([table[i] for i in ids])
        gain = self._bias + (token_sum + self._prior) / (len(ids) + PRIOR_TOKENS)
        features = structural_features(text, user_turns)
        for weight, value, low, high in zip(
            self._struct, features, self._low, self._high, strict=True
        ):
            # Clamped to the training range: no linear extrapolation for unlike prompts.
            gain += weight * min(high, max(low, value))
        benchmark_rank = rank(self._quantiles, gain)
        heads = self._everyday
        if heads is None:
            return Complexity(benchmark_rank, gain)
        clamped = [
            min(high, max(low, value))
            for value, low, high in zip(features, heads.low, heads.high, strict=True)
        ]
        everyday = _sigmoid(heads.gate.logit(ids, clamped))
        hardness = _sigmoid(heads.hardness.logit(ids, clamped))
        score = (1.0 - everyday) * benchmark_rank + everyday * hardness
        return Complexity(score, gain, everyday, hardness)


def rank(quantiles: list[float], value: float) -> float:
    """Where `value` falls among evenly spaced quantiles, linearly interpolated, in 0..1."""
    steps = len(quantiles) - 1
    index = bisect.bisect_right(quantiles, value)
    if index == 0:
        return 0.0
    if index > steps:
        return 1.0
    low, high = quantiles[index - 1], quantiles[index]
    within = (value - low) / (high - low) if high > low else 0.0
    return (index - 1 + within) / steps


@functools.cache
def default_model() -> ComplexityModel:
    """The shipped model, loaded once per process on first use (about 0.1 s)."""
    return ComplexityModel.load()
