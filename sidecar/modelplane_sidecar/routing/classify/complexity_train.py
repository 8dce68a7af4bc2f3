"""Train and evaluate the complexity classifier on RouteLLM's per-prompt labels.

    python -m modelplane_sidecar.routing.classify.complexity_train \\
        --data ../shared/data/routellm-evals [--out PATH] [--check]

Data: MMLU (57 subjects) and GSM8K prompts with whether Mixtral-8x7B (weak) and GPT-4 (strong)
answered each correctly; contaminated prompts are dropped as RouteLLM does. The target is the gain
of asking the strong model, strong minus weak correctness (-1, 0 or 1), fitted by ridge
regression; prompts with the highest predicted gain go to the strong model. (A logistic model of
"the weak model fails" was tried first: it ranks prompts that both models fail as "hard" and did
worse than random on held-out subjects.)

Evaluation follows RouteLLM: route the top-scored share of prompts to the strong model; quality
is the mean correctness of whichever model answered; PGR = (quality - weak) / (strong - weak);
APGR is the area under PGR over the strong-call share 0..100 %; CPT(x %) is the smallest strong
share that reaches PGR x %. Two 5-fold cross-validations are printed, each next to a random router
on the same folds: by subject (each of the 58 subjects is held out once, so every test prompt is
from a subject never seen in training) and random. The L2 strength is chosen inside each fold on
a validation part of its training prompts.

Everyday chat is unlike every benchmark prompt, so two logistic heads are trained on top (see
complexity.py): a gate (benchmark prompts 0, the committed everyday prompts 1) and an everyday
hardness (everyday prompts expected trivial 0, expected hard 1). The RouteLLM tables are printed
for the full score (heads trained on the training folds) next to the benchmark head alone. The
everyday table scores every everyday prompt with heads trained without it (5 stratified folds)
and prints the share of trivial prompts at or above, and of hard prompts below, each threshold,
next to the benchmark head alone (which never sees the set).

The shipped weights are then trained on all prompts with the same procedure. Everything is
deterministic (fixed seeds, closed-form solves, Newton steps), so `--check` retrains and verifies
the committed weights file.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .complexity import (
    MODEL_FILE,
    PRIOR_TOKENS,
    STRUCTURAL_FEATURES,
    ComplexityModel,
    clip_text,
    load_tokenizer,
    structural_features,
)

WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"
STRONG = "gpt-4-1106-preview"
EMBEDDINGS = ("wordllama", "weights/l2_supercat_256.safetensors")
SEED = 20240601
L2_GRID = (1.0, 10.0, 100.0, 1000.0)

Array = npt.NDArray[np.float64]


@dataclass(slots=True)
class Dataset:
    prompts: list[str]
    subjects: list[str]
    weak: npt.NDArray[np.bool_]
    strong: npt.NDArray[np.bool_]


def _contaminated(path: Path) -> set[str]:
    if not path.exists():
        return set()
    with path.open() as f:
        return {json.loads(line)["eval_prompt"] for line in f if line.strip()}


def load_dataset(root: Path) -> Dataset:
    prompts: list[str] = []
    subjects: list[str] = []
    weak: list[bool] = []
    strong: list[bool] = []
    files = [
        (f.stem.removeprefix("mmlu_"), f, root / "mmlu" / "contaminated_prompts.jsonl")
        for f in sorted((root / "mmlu" / "responses").glob("mmlu_*.csv"))
    ]
    files.append(
        ("gsm8k", root / "gsm8k" / "gsm8k_responses.csv", root / "gsm8k/contaminated_prompts.jsonl")
    )
    if len(files) < 2:
        raise SystemExit(f"{root}: no RouteLLM eval files found (see its README)")
    dropped: dict[Path, set[str]] = {}
    for subject, path, contaminated in files:
        skip = dropped.setdefault(contaminated, _contaminated(contaminated))
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                if row["prompt"] in skip:
                    continue
                prompts.append(row["prompt"])
                subjects.append(subject)
                weak.append(row[WEAK] == "True")
                strong.append(row[STRONG] == "True")
    return Dataset(prompts, subjects, np.array(weak), np.array(strong))


def _embedding_matrix() -> Array:
    from safetensors.numpy import load_file

    package, name = EMBEDDINGS
    with resources.as_file(resources.files(package).joinpath(name)) as path:
        return np.asarray(load_file(str(path))["embedding.weight"], dtype=np.float64)


def featurize(prompts: list[str], prior: Array | None = None) -> tuple[Array, Array, Array]:
    """(mean token embeddings, structural features, prior embedding), exactly as at run time.

    The mean is shrunk towards the corpus's mean token embedding (`prior`; by default these
    prompts' own) by PRIOR_TOKENS pseudo-tokens, so a two-token prompt does not get an extreme
    embedding from its few tokens alone.
    """
    matrix = _embedding_matrix()
    tokenizer = load_tokenizer()
    clipped = [clip_text(p) for p in prompts]
    encoded = tokenizer.encode_batch(clipped, add_special_tokens=False)
    sums = np.zeros((len(prompts), matrix.shape[1]))
    counts = np.zeros(len(prompts))
    for row, enc in enumerate(encoded):
        if enc.ids:
            sums[row] = matrix[enc.ids].sum(axis=0)
            counts[row] = len(enc.ids)
    if prior is None:
        prior = sums.sum(axis=0) / counts.sum()
    emb = (sums + PRIOR_TOKENS * prior) / (counts + PRIOR_TOKENS)[:, None]
    struct = np.array([structural_features(text, 1) for text in clipped], dtype=np.float64)
    return emb, struct, prior


@dataclass(slots=True)
class Fitted:
    emb_weights: Array
    struct_weights: Array
    struct_mean: Array
    struct_scale: Array
    bias: float
    #: Range of each structural feature in training: a prompt outside it is clamped to it, so a
    #: prompt unlike any training prompt (a two-word greeting) does not extrapolate linearly.
    struct_low: Array
    struct_high: Array

    def predict(self, emb: Array, struct: Array) -> Array:
        z = (
            np.clip(struct, self.struct_low, self.struct_high) - self.struct_mean
        ) / self.struct_scale
        return np.asarray(emb @ self.emb_weights + z @ self.struct_weights + self.bias)


def fit(emb: Array, struct: Array, y: Array, l2: float) -> Fitted:
    """Ridge regression in closed form (deterministic, no solver dependencies)."""
    mean = struct.mean(axis=0)
    scale = struct.std(axis=0)
    scale[scale == 0] = 1.0
    x = np.hstack([emb, (struct - mean) / scale, np.ones((len(y), 1))])
    penalty = np.full(x.shape[1], l2)
    penalty[-1] = 0.0
    w = np.linalg.solve(x.T @ x + np.diag(penalty), x.T @ y)
    d = emb.shape[1]
    low, high = struct.min(axis=0), struct.max(axis=0)
    return Fitted(w[:d], w[d:-1], mean, scale, float(w[-1]), low, high)


# -- everyday heads: the gate (everyday chat vs benchmark-like) and the everyday hardness ---------


EVERYDAY_FILE = "everyday_prompts.json"
#: L2 strengths tried for the everyday hardness head (chosen by an inner cross-validation).
HEAD_L2_GRID = (0.3, 1.0, 3.0, 10.0, 30.0)
LOGISTIC_MAX_STEPS = 40
#: L2 strength of the gate, fixed rather than tuned per fold (each gate fit takes seconds). An
#: exploratory run with 1, 10 and 100 gave the same held-out everyday shares within a prompt or two;
#: 1 left the fewest benchmark prompts with a gate above 0.5.
GATE_L2 = 1.0


@dataclass(slots=True)
class Everyday:
    prompts: list[str]
    #: True: expected to need a strong model ("hard"); False: expected trivial.
    hard: npt.NDArray[np.bool_]


def load_everyday(path: Path | None = None) -> Everyday:
    source = path or Path(str(resources.files(__package__).joinpath(EVERYDAY_FILE)))
    raw = json.loads(source.read_text(encoding="utf-8"))
    trivial, hard = raw["trivial"], raw["hard"]
    return Everyday(trivial + hard, np.array([False] * len(trivial) + [True] * len(hard)))


@dataclass(slots=True)
class Logistic:
    emb_weights: Array
    struct_weights: Array
    bias: float

    def logit(self, emb: Array, z: Array) -> Array:
        return np.asarray(emb @ self.emb_weights + z @ self.struct_weights + self.bias)


def fit_logistic(emb: Array, z: Array, y: Array, weight: Array, l2: float) -> Logistic:
    """Weighted L2-regularised logistic regression by Newton's method (deterministic).

    `z` are already standardised structural features; the bias is not penalised.
    """
    x = np.hstack([emb, z, np.ones((len(y), 1))])
    penalty = np.full(x.shape[1], l2)
    penalty[-1] = 0.0
    w = np.zeros(x.shape[1])
    for _ in range(LOGISTIC_MAX_STEPS):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (weight * (p - y)) + penalty * w
        root = x * np.sqrt(weight * p * (1.0 - p))[:, None]
        step = np.linalg.solve(root.T @ root + np.diag(penalty), grad)
        w -= step
        if float(np.abs(step).max()) < 1e-7:
            break
    d = emb.shape[1]
    return Logistic(w[:d], w[d:-1], float(w[-1]))


@dataclass(slots=True)
class EverydayFit:
    gate: Logistic
    hardness: Logistic
    struct_mean: Array
    struct_scale: Array
    struct_low: Array
    struct_high: Array
    l2: tuple[float, float]

    def z(self, struct: Array) -> Array:
        clamped = np.clip(struct, self.struct_low, self.struct_high)
        return np.asarray((clamped - self.struct_mean) / self.struct_scale)

    def predict(self, emb: Array, struct: Array) -> tuple[Array, Array]:
        """(gate: probability of everyday chat, everyday hardness), each 0..1."""
        z = self.z(struct)
        gate = 1.0 / (1.0 + np.exp(-self.gate.logit(emb, z)))
        hardness = 1.0 / (1.0 + np.exp(-self.hardness.logit(emb, z)))
        return gate, hardness


def _stratified_folds(labels: npt.NDArray[np.bool_], k: int, seed: int) -> npt.NDArray[np.int64]:
    rng = np.random.default_rng(seed)
    folds = np.zeros(len(labels), dtype=np.int64)
    for value in (False, True):
        members = np.nonzero(labels == value)[0]
        folds[rng.permutation(members)] = np.arange(len(members)) % k
    return folds


def _log_loss(p: Array, y: Array, weight: Array) -> float:
    p = np.clip(p, 1e-9, 1 - 1e-9)
    return float(-(weight * (y * np.log(p) + (1 - y) * np.log(1 - p))).sum() / weight.sum())


def _balanced(labels: npt.NDArray[np.bool_], per_class: float) -> Array:
    """Row weights giving each class the same total weight, `per_class`."""
    weight = np.empty(len(labels))
    for value in (False, True):
        mask = labels == value
        weight[mask] = per_class / max(1, int(mask.sum()))
    return weight


def fit_everyday(
    bench_emb: Array,
    bench_struct: Array,
    ev_emb: Array,
    ev_struct: Array,
    ev_hard: npt.NDArray[np.bool_],
    gate_l2: float,
    hardness_l2: float | None = None,
) -> EverydayFit:
    """Fit the gate (benchmark rows 0, everyday rows 1, the two classes weighted equally) and the
    hardness (everyday rows only: trivial 0, hard 1, balanced), sharing one standardisation.

    Without `hardness_l2`, the hardness head's strength is chosen by a 5-fold cross-validation of
    the given everyday rows.
    """
    all_struct = np.vstack([bench_struct, ev_struct])
    mean = all_struct.mean(axis=0)
    scale = all_struct.std(axis=0)
    scale[scale == 0] = 1.0
    low, high = all_struct.min(axis=0), all_struct.max(axis=0)
    n_ev = len(ev_hard)

    def z(struct: Array) -> Array:
        return np.asarray((struct - mean) / scale)

    def gate(rows: npt.NDArray[np.int64], strength: float) -> Logistic:
        emb = np.vstack([bench_emb, ev_emb[rows]])
        y = np.concatenate([np.zeros(len(bench_emb)), np.ones(len(rows))])
        weight = _balanced(y.astype(bool), float(len(rows)))
        return fit_logistic(emb, z(np.vstack([bench_struct, ev_struct[rows]])), y, weight, strength)

    def hardness(rows: npt.NDArray[np.int64], strength: float) -> Logistic:
        y = ev_hard[rows].astype(np.float64)
        weight = _balanced(ev_hard[rows], len(rows) / 2)
        return fit_logistic(ev_emb[rows], z(ev_struct[rows]), y, weight, strength)

    if hardness_l2 is None:
        hardness_l2 = _select_hardness_l2(ev_emb, z(ev_struct), ev_hard)
    everything = np.arange(n_ev)
    return EverydayFit(
        gate(everything, gate_l2),
        hardness(everything, hardness_l2),
        mean,
        scale,
        low,
        high,
        (gate_l2, hardness_l2),
    )


def _select_hardness_l2(emb: Array, z: Array, hard: npt.NDArray[np.bool_]) -> float:
    """The hardness head's L2 strength, by balanced log-loss in a 5-fold CV of the given rows."""
    folds = _stratified_folds(hard, 5, SEED + 2)
    loss = dict.fromkeys(HEAD_L2_GRID, 0.0)
    for fold in range(5):
        train, test = np.nonzero(folds != fold)[0], np.nonzero(folds == fold)[0]
        for strength in HEAD_L2_GRID:
            head = fit_logistic(
                emb[train],
                z[train],
                hard[train].astype(np.float64),
                _balanced(hard[train], len(train) / 2),
                strength,
            )
            p = 1.0 / (1.0 + np.exp(-head.logit(emb[test], z[test])))
            loss[strength] += _log_loss(p, hard[test].astype(np.float64), _balanced(hard[test], 1))
    return min(HEAD_L2_GRID, key=lambda strength: loss[strength])


def blend(bench_rank: Array, gate: Array, hardness: Array) -> Array:
    """The score: benchmark rank where the prompt is benchmark-like, hardness where it is chat."""
    return np.asarray((1.0 - gate) * bench_rank + gate * hardness)


def rank_of(quantiles: Array, gains: Array) -> Array:
    """Vectorised `complexity.rank` (linear interpolation between the quantiles)."""
    return np.asarray(np.interp(gains, quantiles, np.linspace(0.0, 1.0, len(quantiles))))


# -- RouteLLM metrics ---------------------------------------------------------------------------


@dataclass(slots=True)
class RouterMetrics:
    apgr: float
    cpt50: float
    cpt80: float
    pgr_at_50: float


def pgr_curve(scores: Array, weak: npt.NDArray[np.bool_], strong: npt.NDArray[np.bool_]) -> Array:
    """PGR after routing the k highest-scored prompts to the strong model, for k = 0..n."""
    order = np.argsort(-scores, kind="stable")
    gain = strong[order].astype(np.float64) - weak[order].astype(np.float64)
    quality = (weak.sum() + np.concatenate([[0.0], np.cumsum(gain)])) / len(scores)
    q_weak = weak.mean()
    q_strong = strong.mean()
    return np.asarray((quality - q_weak) / (q_strong - q_weak), dtype=np.float64)


def router_metrics(
    scores: Array, weak: npt.NDArray[np.bool_], strong: npt.NDArray[np.bool_]
) -> RouterMetrics:
    pgr = pgr_curve(scores, weak, strong)
    share = np.linspace(0.0, 1.0, len(pgr))

    def cpt(target: float) -> float:
        reached = np.nonzero(pgr >= target)[0]
        return float(share[reached[0]]) if len(reached) else 1.0

    return RouterMetrics(
        apgr=float(np.trapezoid(pgr, share)),
        cpt50=cpt(0.5),
        cpt80=cpt(0.8),
        pgr_at_50=float(np.interp(0.5, share, pgr)),
    )


def random_router_metrics(
    weak: npt.NDArray[np.bool_], strong: npt.NDArray[np.bool_], seeds: int = 20
) -> RouterMetrics:
    rng = np.random.default_rng(SEED)
    runs = [router_metrics(rng.random(len(weak)), weak, strong) for _ in range(seeds)]
    return RouterMetrics(
        apgr=float(np.mean([r.apgr for r in runs])),
        cpt50=float(np.mean([r.cpt50 for r in runs])),
        cpt80=float(np.mean([r.cpt80 for r in runs])),
        pgr_at_50=float(np.mean([r.pgr_at_50 for r in runs])),
    )


# -- training with a validation split, evaluation on held-out folds -----------------------------


def _gain(data: Dataset, index: npt.NDArray[np.int64]) -> Array:
    return np.asarray(data.strong[index], dtype=np.float64) - data.weak[index]


def _folds(data: Dataset, by_subject: bool, k: int, seed: int) -> npt.NDArray[np.int64]:
    """Fold number of every prompt: whole subjects per fold, or prompts at random."""
    rng = np.random.default_rng(seed)
    if not by_subject:
        return np.asarray(rng.permutation(len(data.prompts)) % k, dtype=np.int64)
    names = rng.permutation(sorted(set(data.subjects))).tolist()
    fold_of = {name: i % k for i, name in enumerate(names)}
    return np.array([fold_of[s] for s in data.subjects], dtype=np.int64)


def _select_l2(
    data: Dataset, emb: Array, struct: Array, train: npt.NDArray[np.int64], by_subject: bool
) -> float:
    """Pick the L2 strength by APGR on a validation fold of the training prompts."""
    sub = Dataset(
        [data.prompts[i] for i in train],
        [data.subjects[i] for i in train],
        data.weak[train],
        data.strong[train],
    )
    is_val = _folds(sub, by_subject, 5, SEED + 1) == 0
    fit_idx, val_idx = train[~is_val], train[is_val]
    best = (-np.inf, L2_GRID[0])
    for l2 in L2_GRID:
        model = fit(emb[fit_idx], struct[fit_idx], _gain(data, fit_idx), l2)
        scores = model.predict(emb[val_idx], struct[val_idx])
        apgr = router_metrics(scores, data.weak[val_idx], data.strong[val_idx]).apgr
        if apgr > best[0]:
            best = (apgr, l2)
    return best[1]


@dataclass(slots=True)
class EverydayRows:
    """The everyday set, featurised like the benchmark prompts (same prior embedding)."""

    data: Everyday
    emb: Array
    struct: Array


def _quantiles(gains: Array) -> Array:
    return np.asarray(np.quantile(gains, np.linspace(0.0, 1.0, 101)))


def cross_validate(
    title: str,
    data: Dataset,
    emb: Array,
    struct: Array,
    by_subject: bool,
    everyday: EverydayRows,
    gate_l2: float,
    k: int = 5,
) -> list[str]:
    """RouteLLM metrics on held-out folds: the benchmark head alone (the score before the everyday
    heads), the full score (the heads trained on the training folds' benchmark prompts and the
    whole everyday set, which has no prompt of any fold) and a random router."""
    folds = _folds(data, by_subject, k, SEED)
    alone: list[RouterMetrics] = []
    full: list[RouterMetrics] = []
    rand: list[RouterMetrics] = []
    l2s: list[float] = []
    gate_means: list[float] = []
    for fold in range(k):
        test = np.nonzero(folds == fold)[0]
        train = np.nonzero(folds != fold)[0]
        l2 = _select_l2(data, emb, struct, train, by_subject)
        model = fit(emb[train], struct[train], _gain(data, train), l2)
        gains = model.predict(emb[test], struct[test])
        heads = fit_everyday(
            emb[train], struct[train], everyday.emb, everyday.struct, everyday.data.hard, gate_l2
        )
        gate, hardness = heads.predict(emb[test], struct[test])
        quantiles = _quantiles(model.predict(emb[train], struct[train]))
        scores = blend(rank_of(quantiles, gains), gate, hardness)
        weak, strong = data.weak[test], data.strong[test]
        alone.append(router_metrics(gains, weak, strong))
        full.append(router_metrics(scores, weak, strong))
        rand.append(random_router_metrics(weak, strong))
        l2s.append(l2)
        gate_means.append(float(gate.mean()))
    rows = [
        f"{title}: {k}-fold cross-validation over {len(data.prompts)} prompts "
        f"(L2 chosen per fold: {', '.join(f'{v:g}' for v in l2s)}; mean everyday gate on the "
        f"test prompts: {', '.join(f'{v:.3f}' for v in gate_means)}); mean over folds (min..max)",
        "| router | APGR | CPT(50%) | CPT(80%) | PGR at 50% strong calls |",
        "|---|---|---|---|---|",
    ]
    for label, runs in (
        ("complexity classifier", full),
        ("benchmark head alone (before the everyday heads)", alone),
        ("random router", rand),
    ):
        cells = []
        for attr, pct in (("apgr", False), ("cpt50", True), ("cpt80", True), ("pgr_at_50", False)):
            values = np.array([getattr(r, attr) for r in runs]) * (100 if pct else 1)
            unit = " %" if pct else ""
            digits = 1 if pct else 3
            cells.append(
                f"{values.mean():.{digits}f}{unit} ({values.min():.{digits}f}.."
                f"{values.max():.{digits}f})"
            )
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return rows


EVERYDAY_THRESHOLDS = (0.35, 0.5, 0.65, 0.85)


def everyday_table(
    bench_scores: Array, everyday: EverydayRows, emb: Array, struct: Array, gate_l2: float
) -> list[str]:
    """Routing shares on the everyday set: the benchmark head alone (which never sees the set)
    against the full score, whose heads are cross-validated: every everyday prompt is scored by
    heads trained without it (5 stratified folds)."""
    hard = everyday.data.hard
    folds = _stratified_folds(hard, 5, SEED)
    full = np.zeros(len(hard))
    chosen: list[float] = []
    for fold in range(5):
        train, test = np.nonzero(folds != fold)[0], np.nonzero(folds == fold)[0]
        heads = fit_everyday(
            emb, struct, everyday.emb[train], everyday.struct[train], hard[train], gate_l2
        )
        gate, hardness = heads.predict(everyday.emb[test], everyday.struct[test])
        full[test] = blend(bench_scores[test], gate, hardness)
        chosen.append(heads.l2[1])
    n_trivial, n_hard = int((~hard).sum()), int(hard.sum())
    rows = [
        f"Everyday set: {n_trivial} prompts expected trivial, {n_hard} expected hard; full score "
        f"5-fold cross-validated (hardness L2 chosen per fold: "
        f"{', '.join(f'{v:g}' for v in chosen)})",
        "| score | threshold | trivial prompts at or above it | hard prompts below it |",
        "|---|---|---|---|",
    ]
    for label, scores in (("before (benchmark head alone)", bench_scores), ("now", full)):
        for t in EVERYDAY_THRESHOLDS:
            up = int((scores[~hard] >= t).sum())
            down = int((scores[hard] < t).sum())
            rows.append(
                f"| {label} | {t:g} | {100 * up / n_trivial:.1f} % ({up}) | "
                f"{100 * down / n_hard:.1f} % ({down}) |"
            )
    for label, scores in (("before", bench_scores), ("now", full)):
        ordered = float(np.mean(scores[hard][:, None] > scores[~hard][None, :]))
        rows.append(
            f"{label}: a hard prompt scores above a trivial one in {100 * ordered:.1f} % of pairs"
        )
    return rows


def save(
    model: Fitted,
    quantiles: Array,
    prior: Array,
    heads: EverydayFit,
    path: Path,
    info: dict[str, str],
) -> None:
    matrix = _embedding_matrix()
    extra: dict[str, Any] = {}  # Any: savez_compressed types its **kwds like allow_pickle
    for name, head in (("gate", heads.gate), ("hardness", heads.hardness)):
        extra[f"{name}_token_scores"] = (matrix @ head.emb_weights).astype(np.float32)
        extra[f"{name}_prior_score"] = np.float64(prior @ head.emb_weights)
        extra[f"{name}_struct_weights"] = head.struct_weights
        extra[f"{name}_bias"] = np.float64(head.bias)
    np.savez_compressed(
        path,
        quantiles=quantiles,
        prior_score=np.float64(prior @ model.emb_weights),
        token_scores=(matrix @ model.emb_weights).astype(np.float32),
        struct_weights=model.struct_weights,
        struct_mean=model.struct_mean,
        struct_scale=model.struct_scale,
        struct_low=model.struct_low,
        struct_high=model.struct_high,
        bias=np.float64(model.bias),
        everyday_struct_mean=heads.struct_mean,
        everyday_struct_scale=heads.struct_scale,
        everyday_struct_low=heads.struct_low,
        everyday_struct_high=heads.struct_high,
        struct_names=np.array(STRUCTURAL_FEATURES),
        info_keys=np.array(list(info)),
        info_values=np.array(list(info.values())),
        **extra,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/routellm-evals"))
    default_out = Path(str(resources.files(__package__).joinpath(MODEL_FILE)))
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument(
        "--check", action="store_true", help="retrain and compare with --out instead of writing"
    )
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument(
        "--gate-l2", type=float, default=GATE_L2, help="L2 strength of the everyday gate"
    )
    args = parser.parse_args(argv)

    data = load_dataset(args.data)
    emb, struct, prior = featurize(data.prompts)
    ev = load_everyday()
    ev_emb, ev_struct, _ = featurize(ev.prompts, prior)
    everyday = EverydayRows(ev, ev_emb, ev_struct)
    print(f"{len(data.prompts)} prompts in {len(set(data.subjects))} subjects")
    everything = np.arange(len(data.prompts))
    l2 = _select_l2(data, emb, struct, everything, by_subject=True)
    model = fit(emb, struct, _gain(data, everything), l2)
    quantiles = _quantiles(model.predict(emb, struct))
    if not args.skip_eval:
        for by_subject, title in ((True, "Held-out subjects"), (False, "Random split")):
            for line in cross_validate(
                title, data, emb, struct, by_subject, everyday, args.gate_l2
            ):
                print(line)
            print()
        bench_scores = rank_of(quantiles, model.predict(ev_emb, ev_struct))
        for line in everyday_table(bench_scores, everyday, emb, struct, args.gate_l2):
            print(line)
        print()

    heads = fit_everyday(emb, struct, ev_emb, ev_struct, ev.hard, args.gate_l2)
    info = {
        "trained_on": f"{len(data.prompts)} RouteLLM MMLU+GSM8K prompts",
        "l2": f"{l2:g}",
        "everyday": f"{len(ev.prompts)} everyday prompts ({EVERYDAY_FILE})",
        "everyday_l2": f"gate {heads.l2[0]:g}, hardness {heads.l2[1]:g}",
    }
    if args.check:
        tmp = args.out.with_suffix(".check.npz")
        save(model, quantiles, prior, heads, tmp, info)
        fresh = ComplexityModel.load(tmp)
        committed = ComplexityModel.load(args.out)
        tmp.unlink()
        probes = data.prompts[:200] + ev.prompts
        diff = max(abs(fresh.score(p).score - committed.score(p).score) for p in probes)
        print(f"max score difference between retrained and committed weights: {diff:.2e}")
        return 0 if diff < 1e-4 else 1
    save(model, quantiles, prior, heads, args.out, info)
    print(f"wrote {args.out} (L2 {l2:g}; everyday heads: {info['everyday_l2']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
