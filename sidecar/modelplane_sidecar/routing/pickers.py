"""Step 4 of the routing pipeline: a strategy orders the surviving candidates.

The first candidate serves the request; the others, in order, are its fallback chain (unless the
route sets `options.fallback: false`). One small picker per strategy, each returning the order
and a sentence saying why. A budget in `downgrade` mode then moves the cheapest candidates first.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

from ..config import BudgetMode, BudgetState, Strategy, Tier
from .filters import Candidate, RouteContext, refusal

_TIER_RANK = {Tier.CHEAP: 0, Tier.STANDARD: 1, Tier.PREMIUM: 2}


class Picker(Protocol):
    strategy: Strategy

    def order(self, candidates: list[Candidate], ctx: RouteContext) -> tuple[list[Candidate], str]:
        """The candidates, best first, and why."""
        ...


class PriorityPicker:
    strategy = Strategy.PRIORITY

    def order(self, candidates: list[Candidate], ctx: RouteContext) -> tuple[list[Candidate], str]:
        return candidates, f"{candidates[0].name}: first in priority order"


def sticky_key(ctx: RouteContext) -> tuple[str, str] | None:
    """(where, value) of the first sticky header present, else the body's `user` field."""
    for header in ctx.route.options.sticky_headers:
        value = ctx.headers.get(header)
        if value:
            return f"header {header}", value
    user = ctx.body.get("user")
    if isinstance(user, str) and user:
        return "body field user", user
    return None


class WeightedPicker:
    """A/B split: an arm by weight, the same arm for the same user/session (hash of its key)."""

    strategy = Strategy.WEIGHTED

    def order(self, candidates: list[Candidate], ctx: RouteContext) -> tuple[list[Candidate], str]:
        total = sum(c.weight for c in candidates)
        if total == 0:
            return candidates, f"{candidates[0].name}: every remaining arm has weight 0"
        key = sticky_key(ctx)
        if key is not None:
            digest = hashlib.blake2b(f"{ctx.route.name}\x00{key[1]}".encode(), digest_size=8)
            point = int.from_bytes(digest.digest(), "big") % total
            how = f"hash of {key[0]}"
        else:
            point = ctx.rng.randrange(total)
            how = "random draw (no sticky key)"
        chosen = candidates[-1]
        for candidate in candidates:
            if point < candidate.weight:
                chosen = candidate
                break
            point -= candidate.weight
        rest = sorted((c for c in candidates if c is not chosen), key=lambda c: -c.weight)
        why = f"{chosen.name}: arm {chosen.arm!r} (weight {chosen.weight} of {total}) by {how}"
        return [chosen, *rest], why


class LowestLatencyPicker:
    """Fastest observed first: time to first token for streams, full latency otherwise.

    An endpoint without samples counts as fastest, so new ones get tried; and a small share of
    requests (`options.exploration`) goes to a random candidate, so a recovered endpoint is seen.
    """

    strategy = Strategy.LOWEST_LATENCY

    def order(self, candidates: list[Candidate], ctx: RouteContext) -> tuple[list[Candidate], str]:
        stream = ctx.stream

        def observed(c: Candidate) -> float:
            stats = c.endpoint.state.stats
            value = stats.ttft_seconds if stream else stats.latency_seconds
            if value is None and stream:
                value = stats.latency_seconds
            return -1.0 if value is None else value

        ordered = sorted(candidates, key=observed)
        metric = "time to first token" if stream else "latency"
        if len(ordered) > 1 and ctx.rng.random() < ctx.route.options.exploration:
            explore = ctx.rng.choice(ordered)
            ordered = [explore, *(c for c in ordered if c is not explore)]
            return ordered, f"{explore.name}: exploration draw (refreshes its {metric} estimate)"
        best = observed(ordered[0])
        if best < 0:
            return ordered, f"{ordered[0].name}: no {metric} observed yet"
        return ordered, f"{ordered[0].name}: lowest {metric} EWMA {best * 1000:.0f} ms"


def estimated_cost(candidate: Candidate, ctx: RouteContext) -> float:
    """USD for this request at this endpoint's prices: prompt estimate plus expected output."""
    price = candidate.endpoint.config.pricing
    size = ctx.found.size
    output = size.max_output_tokens or ctx.route.options.expected_output_tokens
    return (size.input_tokens * price.input_per_mtok + output * price.output_per_mtok) / 1e6


class LowestCostPicker:
    strategy = Strategy.LOWEST_COST

    def order(self, candidates: list[Candidate], ctx: RouteContext) -> tuple[list[Candidate], str]:
        ordered = sorted(candidates, key=lambda c: estimated_cost(c, ctx))
        cost = estimated_cost(ordered[0], ctx)
        return ordered, f"{ordered[0].name}: lowest estimated cost ${cost:.6f}"


class LeastLoadedPicker:
    """Fewest requests in flight, relative to the endpoint's concurrency limit when it has one."""

    strategy = Strategy.LEAST_LOADED

    def order(self, candidates: list[Candidate], ctx: RouteContext) -> tuple[list[Candidate], str]:
        def load(c: Candidate) -> float:
            limit = c.endpoint.config.limits.max_concurrency
            return c.endpoint.state.in_flight / (limit or 1)

        ordered = sorted(candidates, key=load)
        first = ordered[0]
        return ordered, f"{first.name}: least loaded ({first.endpoint.state.in_flight} in flight)"


def tier_for(score: float, ctx: RouteContext) -> Tier:
    tiers = ctx.route.options.tiers
    if score >= tiers.premium:
        return Tier.PREMIUM
    if score >= tiers.standard:
        return Tier.STANDARD
    return Tier.CHEAP


class ComplexityTiersPicker:
    """Complexity score -> tier; that tier's targets first, then higher tiers, then lower ones."""

    strategy = Strategy.COMPLEXITY_TIERS

    def order(self, candidates: list[Candidate], ctx: RouteContext) -> tuple[list[Candidate], str]:
        score = ctx.found.complexity().score
        wanted = tier_for(score, ctx)
        rank = _TIER_RANK[wanted]

        def distance(c: Candidate) -> tuple[int, int]:
            have = _TIER_RANK[c.tier or Tier.STANDARD]
            # Same tier first, then upwards (quality kept), then downwards.
            return (0, 0) if have == rank else ((1, have) if have > rank else (2, -have))

        ordered = sorted(candidates, key=distance)
        served = ordered[0].tier or Tier.STANDARD
        tiers = ctx.route.options.tiers
        why = (
            f"{ordered[0].name}: complexity {score:.2f} -> {wanted.value} "
            f"(standard >= {tiers.standard:g}, premium >= {tiers.premium:g})"
        )
        if served is not wanted:
            why += f"; no {wanted.value} endpoint left, served by {served.value}"
        return ordered, why


PICKERS: dict[Strategy, Picker] = {
    p.strategy: p
    for p in (
        PriorityPicker(),
        WeightedPicker(),
        LowestLatencyPicker(),
        LowestCostPicker(),
        LeastLoadedPicker(),
        ComplexityTiersPicker(),
    )
}


def _budget_state(candidates: list[Candidate], ctx: RouteContext) -> BudgetState:
    """The namespace-wide state, else the strongest downgrade among the budgets that cover a
    candidate (the lowest tier cap wins; no tier means cheapest-first, the strongest)."""
    if ctx.budget.mode is not BudgetMode.NORMAL:
        return ctx.budget
    best: BudgetState | None = None
    for budget in ctx.budgets:
        if budget.mode is not BudgetMode.DOWNGRADE:
            continue
        if not any(budget.covers(c.name) for c in candidates):
            continue
        rank = -1 if budget.tier is None else _TIER_RANK[budget.tier]
        if best is None or rank < (-1 if best.tier is None else _TIER_RANK[best.tier]):
            best = BudgetState(mode=BudgetMode.DOWNGRADE, budget=budget.name, tier=budget.tier)
    return best or ctx.budget


def apply_budget(candidates: list[Candidate], ctx: RouteContext) -> tuple[list[Candidate], str]:
    """The hook for budget state from the operator: stop refuses, downgrade serves cheaper.

    Downgrade with a tier (a ladder such as premium -> standard -> cheap): candidates above the
    tier move behind the others, which keep the strategy's order; a target without a tier counts
    as standard. Without a tier: cheapest first by estimated cost.
    """
    budget = _budget_state(candidates, ctx)
    if budget.mode is BudgetMode.NORMAL:
        return candidates, ""
    name = repr(budget.budget) if budget.budget else "(unnamed)"
    if budget.mode is BudgetMode.STOP:
        raise refusal(
            ctx,
            429,
            "budget_exhausted",
            f"Budget {name} is exhausted for this period; requests are refused until it resets "
            f"(rule {ctx.route.name!r})",
            type="insufficient_quota",
        )
    if not ctx.route.options.budget_downgrade:
        return candidates, f"budget {name} in downgrade mode; this route opts out"
    if budget.tier is not None:
        cap = _TIER_RANK[budget.tier]
        ordered = sorted(candidates, key=lambda c: _TIER_RANK[c.tier or Tier.STANDARD] > cap)
        if ordered[0] is candidates[0]:
            return ordered, (
                f"budget {name} in downgrade mode (tier {budget.tier.value} and below first); "
                f"{ordered[0].name} already within it"
            )
        return ordered, (
            f"budget {name} in downgrade mode: {ordered[0].name} (tier "
            f"{(ordered[0].tier or Tier.STANDARD).value}) instead of {candidates[0].name} "
            f"(tier {(candidates[0].tier or Tier.STANDARD).value})"
        )
    ordered = sorted(candidates, key=lambda c: estimated_cost(c, ctx))
    if ordered[0] is candidates[0]:
        return ordered, f"budget {name} in downgrade mode; {ordered[0].name} already cheapest"
    return ordered, (
        f"budget {name} in downgrade mode: {ordered[0].name} (cheapest) instead of "
        f"{candidates[0].name}"
    )
