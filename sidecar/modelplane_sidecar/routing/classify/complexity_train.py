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

The shipped weights are then trained on all prompts with the same procedure. Everything is
deterministic (fixed seeds, closed-form solves), so `--check` retrains and verifies the committed
weights file.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

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


def featurize(prompts: list[str]) -> tuple[Array, Array, Array]:
    """(mean token embeddings, structural features, prior embedding), exactly as at run time.

    The mean is shrunk towards the corpus's mean token embedding by PRIOR_TOKENS pseudo-tokens,
    so a two-token prompt does not get an extreme embedding from its few tokens alone.
    """
    from safetensors.numpy import load_file

    package, name = EMBEDDINGS
    with resources.as_file(resources.files(package).joinpath(name)) as path:
        matrix = load_file(str(path))["embedding.weight"].astype(np.float64)
    tokenizer = load_tokenizer()
    clipped = [clip_text(p) for p in prompts]
    encoded = tokenizer.encode_batch(clipped, add_special_tokens=False)
    sums = np.zeros((len(prompts), matrix.shape[1]))
    counts = np.zeros(len(prompts))
    for row, enc in enumerate(encoded):
        if enc.ids:
            sums[row] = matrix[enc.ids].sum(axis=0)
            counts[row] = len(enc.ids)
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


def cross_validate(
    title: str, data: Dataset, emb: Array, struct: Array, by_subject: bool, k: int = 5
) -> list[str]:
    folds = _folds(data, by_subject, k, SEED)
    ours: list[RouterMetrics] = []
    rand: list[RouterMetrics] = []
    l2s: list[float] = []
    for fold in range(k):
        test = np.nonzero(folds == fold)[0]
        train = np.nonzero(folds != fold)[0]
        l2 = _select_l2(data, emb, struct, train, by_subject)
        model = fit(emb[train], struct[train], _gain(data, train), l2)
        scores = model.predict(emb[test], struct[test])
        ours.append(router_metrics(scores, data.weak[test], data.strong[test]))
        rand.append(random_router_metrics(data.weak[test], data.strong[test]))
        l2s.append(l2)
    rows = [
        f"{title}: {k}-fold cross-validation over {len(data.prompts)} prompts "
        f"(L2 chosen per fold: {', '.join(f'{v:g}' for v in l2s)}); mean over folds "
        f"(min..max)",
        "| router | APGR | CPT(50%) | CPT(80%) | PGR at 50% strong calls |",
        "|---|---|---|---|---|",
    ]
    for label, runs in (("complexity classifier", ours), ("random router", rand)):
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


def save(model: Fitted, quantiles: Array, prior: Array, path: Path, info: dict[str, str]) -> None:
    from safetensors.numpy import load_file

    package, name = EMBEDDINGS
    with resources.as_file(resources.files(package).joinpath(name)) as real:
        matrix = load_file(str(real))["embedding.weight"].astype(np.float64)
    token_scores = (matrix @ model.emb_weights).astype(np.float32)
    np.savez_compressed(
        path,
        quantiles=quantiles,
        prior_score=np.float64(prior @ model.emb_weights),
        token_scores=token_scores,
        struct_weights=model.struct_weights,
        struct_mean=model.struct_mean,
        struct_scale=model.struct_scale,
        struct_low=model.struct_low,
        struct_high=model.struct_high,
        bias=np.float64(model.bias),
        struct_names=np.array(STRUCTURAL_FEATURES),
        info_keys=np.array(list(info)),
        info_values=np.array(list(info.values())),
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
    args = parser.parse_args(argv)

    data = load_dataset(args.data)
    emb, struct, prior = featurize(data.prompts)
    print(f"{len(data.prompts)} prompts in {len(set(data.subjects))} subjects")
    if not args.skip_eval:
        for by_subject, title in ((True, "Held-out subjects"), (False, "Random split")):
            for line in cross_validate(title, data, emb, struct, by_subject):
                print(line)
            print()

    everything = np.arange(len(data.prompts))
    l2 = _select_l2(data, emb, struct, everything, by_subject=True)
    model = fit(emb, struct, _gain(data, everything), l2)
    quantiles = np.quantile(model.predict(emb, struct), np.linspace(0.0, 1.0, 101))
    info = {"trained_on": f"{len(data.prompts)} RouteLLM MMLU+GSM8K prompts", "l2": f"{l2:g}"}
    if args.check:
        tmp = args.out.with_suffix(".check.npz")
        save(model, quantiles, prior, tmp, info)
        fresh = ComplexityModel.load(tmp)
        committed = ComplexityModel.load(args.out)
        tmp.unlink()
        probes = data.prompts[:200]
        diff = max(abs(fresh.score(p).score - committed.score(p).score) for p in probes)
        print(f"max score difference between retrained and committed weights: {diff:.2e}")
        return 0 if diff < 1e-4 else 1
    save(model, quantiles, prior, args.out, info)
    print(f"wrote {args.out} (L2 {l2:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
