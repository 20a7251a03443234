"""Stage planner: the cheapest staged schedule for a chain of sizes on the scaling law of
megagrow.schedule.law (Kaplan et al. 2020, as Shen et al. 2022 use it), and the paper's pairs.

Staged schedule.  For a chain N_1 < ... < N_K the grown model k starts where stage k-1 ended,
at loss L_{k-1}, i.e. at its own equivalent step S_eff(N_k, L_{k-1}), and trains dS_k steps to
L_k = L(N_k, S_eff(N_k, L_{k-1}) + dS_k); L_K must equal the target.  We optimise over the
intermediate losses L_1 >= L_2 >= ... >= L_{K-1} >= L_target instead of the steps (the
reference's SLSQP over steps is kept as ``method="slsqp"`` for cross-checking): each stage's
steps are then closed-form, and with D(N, L) = tokens a from-scratch model of size N needs to
reach L, the total compute telescopes into a sum of one-variable terms

    C / 6 = sum_{k<K} [N_k D(N_k, L_k) - N_{k+1} D(N_{k+1}, L_k)] + N_K D(N_K, L_target)

so each switch loss L_k is a one-dimensional minimisation (grid + bounded Brent, scipy).  Its
first-order condition is "grow when the small model's compute per unit of loss equals the big
model's at the same loss", the law's version of the slope rule.  Where the ordering
constraint binds, some stage takes zero steps; that optimum is the unconstrained optimum of a
sub-chain, so we solve every sub-chain (2^(K-1) of them, K <= MAX_EXACT_STAGES) and keep the
cheapest ordered one: the result is the global optimum up to the 1-D searches.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy import optimize

from megagrow.errors import UserError
from megagrow.schedule.law import (
    PF_DAY_FLOPS,
    KaplanLaw,
    SingleModel,
    best_single_model,
    check_size,
    check_target,
    compute_optimal_size,
    non_embedding_params,
    parse_size,
    single_model,
)
from megagrow.schedule.slope import STOP_SLOPE

MAX_EXACT_STAGES = 8  # 2^(K-1) sub-chains are solved exactly; more stages -> SLSQP polish


# ----------------------------------------------------------------------------- staged plan
@dataclass(frozen=True)
class PlannedStage:
    """One stage of a staged schedule.  ``start_step`` is the model's equivalent step at the
    start (S_eff(N, loss it was grown at): where its LR schedule should be placed);
    ``step_divisor`` is c = (previous model's equivalent step) / start_step at the growth point,
    the law's counterpart of the paper's c = 1.776 (width) / 1.412 (depth)."""

    index: int
    N: float
    start_loss: float
    end_loss: float
    start_step: float
    steps: float
    tokens: float
    compute: float
    step_divisor: float | None = None
    slope_at_growth: float | None = None

    @property
    def pf_days(self) -> float:
        return self.compute / PF_DAY_FLOPS

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pf_days"] = self.pf_days
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


@dataclass(frozen=True)
class StagePlan:
    law: KaplanLaw
    target_loss: float
    stages: tuple[PlannedStage, ...]
    total_compute: float
    single: SingleModel  # the final size trained from scratch
    best_single: SingleModel  # the compute-optimal fixed size (continuous N)
    method: str

    @property
    def saving(self) -> float:
        """Fraction of compute saved against the final size trained from scratch."""
        return 1.0 - self.total_compute / self.single.compute

    @property
    def saving_vs_best_single(self) -> float:
        """Fraction saved against the compute-optimal fixed size (may be negative)."""
        return 1.0 - self.total_compute / self.best_single.compute

    @property
    def total_pf_days(self) -> float:
        return self.total_compute / PF_DAY_FLOPS

    @property
    def final_loss(self) -> float:
        return self.stages[-1].end_loss

    def to_dict(self) -> dict:
        law = {k: v for k, v in asdict(self.law).items()}
        return {
            "law": law,
            "target_loss": self.target_loss,
            "method": self.method,
            "stages": [s.to_dict() for s in self.stages],
            "total_compute": self.total_compute,
            "total_pf_days": self.total_pf_days,
            "final_loss": self.final_loss,
            "single": self.single.to_dict(),
            "saving": self.saving,
            "best_single": self.best_single.to_dict(),
            "saving_vs_best_single": self.saving_vs_best_single,
        }


def simulate_stages(sizes, steps, law: KaplanLaw | None = None) -> list[float]:
    """Forward model: the loss at the end of each stage when stage k (size N_k, grown from the
    previous stage and starting at S_eff(N_k, L_{k-1})) trains steps[k] steps."""
    law = law or KaplanLaw()
    losses, prev = [], math.inf
    for N, dS in zip(sizes, steps):
        if dS < 0:
            raise UserError(f"stage steps must be >= 0, got {dS}")
        start = law.steps_to_loss(N, prev)
        prev = law.loss(N, start + dS) if dS > 0 else prev
        losses.append(prev)
    return losses


def _check_chain(sizes, law: KaplanLaw, L_target: float) -> list[float]:
    sizes = [check_size(parse_size(n) if isinstance(n, str) else n) for n in sizes]
    if not sizes:
        raise UserError("need at least one model size")
    if any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise UserError("model sizes must be strictly increasing (each stage grows the previous)")
    check_target(law, sizes[-1], L_target)
    return sizes


class _Boundary:
    """The switch from size a to size b at loss L: cost term N_a D_a(L) - N_b D_b(L)."""

    def __init__(self, law: KaplanLaw, Na: float, Nb: float, L_target: float, scale: float):
        self.law, self.Na, self.Nb, self.Lt = law, Na, Nb, L_target
        self.limit = law.loss_limit(Na)
        self.lower = max(L_target, self.limit)  # L_a >= L_target and above a's limit
        self.upper = self.limit + 2.0 * (2.0 * law.S_c) ** law.alpha_S  # about step 0.4 for a
        self.scale = scale  # normaliser: the final size's compute from scratch (finite)

    def cost(self, L: float) -> float:
        law, Lt = self.law, self.Lt
        return 6.0 * (self.Na * law.tokens_to_loss(self.Na, L, Lt) - self.Nb * law.tokens_to_loss(self.Nb, L, Lt))

    def grad(self, L: float) -> float:
        law, Lt = self.law, self.Lt
        return 6.0 * (self.Na * law.dtokens_dloss(self.Na, L, Lt) - self.Nb * law.dtokens_dloss(self.Nb, L, Lt))

    def solve(self) -> tuple[float, float]:
        """Global 1-D minimum over [lower, upper] in x = log(L - limit): grid, then Brent."""
        u_lo = self.lower - self.limit
        x_lo = math.log(u_lo) if u_lo > 0 else math.log(self.upper - self.limit) - 60.0
        x_hi = math.log(self.upper - self.limit)

        def f(x: float) -> float:
            v = self.cost(self.limit + math.exp(x)) / self.scale
            return v if not math.isnan(v) else math.inf  # at a's irreducible loss: inf - finite

        xs = np.linspace(x_lo, x_hi, 301)
        vals = np.array([f(x) for x in xs])
        i = int(np.argmin(vals))
        best_x, best_v = xs[i], vals[i]
        a, b = xs[max(i - 1, 0)], xs[min(i + 1, len(xs) - 1)]
        g = lambda x: self.grad(self.limit + math.exp(x))  # noqa: E731  (sign of df/dx)
        if 0 < i < len(xs) - 1 and g(a) < 0 < g(b):
            # interior minimum: solve the first-order condition (more precise than comparing
            # values of a flat function)
            x = optimize.brentq(g, a, b, xtol=1e-15, rtol=4 * np.finfo(float).eps, maxiter=500)
            if f(x) <= best_v:
                best_x, best_v = x, f(x)
        elif b > a:
            res = optimize.minimize_scalar(f, bounds=(a, b), method="bounded", options={"xatol": 1e-13, "maxiter": 1000})
            if res.fun < best_v:
                best_x, best_v = float(res.x), float(res.fun)
        L = self.lower if best_x == x_lo and u_lo > 0 else self.limit + math.exp(best_x)
        return L, best_v * self.scale


def _assemble(law, sizes, switch_losses, L_target, method) -> StagePlan:
    """Build the plan from the chain and its switch losses (stages with zero steps dropped)."""
    ends = list(switch_losses) + [L_target]
    stages, prev, prev_N = [], math.inf, None
    for N, L_end in zip(sizes, ends):
        start_step = law.steps_to_loss(N, prev)
        steps = law.steps_to_loss(N, L_end) - start_step
        if steps <= 0 and N != sizes[-1]:
            continue  # a skipped stage (grow straight through it)
        tokens = law.tokens_to_loss(N, L_end, L_target) - law.tokens_to_loss(N, prev, L_target)
        c = slope = None
        if prev_N is not None:
            c = law.steps_to_loss(prev_N, prev) / start_step
            slope = law.curve_slope(prev_N, prev)
        stages.append(
            PlannedStage(
                index=len(stages) + 1,
                N=N,
                start_loss=prev,
                end_loss=L_end,
                start_step=start_step,
                steps=max(steps, 0.0),
                tokens=max(tokens, 0.0),
                compute=6.0 * N * max(tokens, 0.0),
                step_divisor=c,
                slope_at_growth=slope,
            )
        )
        prev, prev_N = L_end, N
    # the reported end losses come from the forward model, not from the optimiser's variables
    sim = simulate_stages([s.N for s in stages], [s.steps for s in stages], law)
    stages = [replace(s, end_loss=l) for s, l in zip(stages, sim)]
    total = sum(s.compute for s in stages)
    return StagePlan(
        law=law,
        target_loss=L_target,
        stages=tuple(stages),
        total_compute=total,
        single=single_model(law, sizes[-1], L_target),
        best_single=best_single_model(L_target, None, law),
        method=method,
    )


def plan_stages(sizes, L_target: float, law: KaplanLaw | None = None, method: str = "exact") -> StagePlan:
    """Compute-optimal steps for a growth chain N_1 < ... < N_K ending at L_target.

    method "exact": optimise the switch losses (see module docstring); "slsqp": the reference's
    formulation, SLSQP over the stage steps with an equality constraint on the final loss
    (local, kept to cross-check).  Stages the optimum trains for zero steps are left out of
    ``stages`` (except the last)."""
    law = law or KaplanLaw()
    sizes = _check_chain(sizes, law, L_target)
    K = len(sizes)
    if method == "slsqp":
        return _plan_slsqp(law, sizes, float(L_target))
    if method != "exact":
        raise UserError(f"unknown planner method {method!r} (exact, slsqp)")
    if K == 1:
        return _assemble(law, sizes, [], float(L_target), "single")
    if K > MAX_EXACT_STAGES:
        return _plan_slsqp(law, sizes, float(L_target))

    cache: dict[tuple[int, int], tuple[float, float]] = {}

    def boundary(a: int, b: int) -> tuple[float, float]:
        if (a, b) not in cache:
            cache[(a, b)] = _Boundary(law, sizes[a], sizes[b], L_target, base).solve()
        return cache[(a, b)]

    best = None
    base = law.compute_to_loss(sizes[-1], L_target, L_target)
    for keep in itertools.product((False, True), repeat=K - 1):
        chain = [i for i in range(K - 1) if keep[i]] + [K - 1]
        Ls, total = [], base
        for a, b in zip(chain, chain[1:]):
            L, c = boundary(a, b)
            Ls.append(L)
            total += c
        if any(x < y for x, y in zip(Ls, Ls[1:])):
            continue  # not ordered: covered by a sub-chain that drops a stage
        if best is None or total < best[0] * (1 - 1e-12):
            best = (total, chain, Ls)
    _, chain, Ls = best
    return _assemble(law, [sizes[i] for i in chain], Ls, float(L_target), "exact")


def _plan_slsqp(law: KaplanLaw, sizes: list[float], L_target: float) -> StagePlan:
    """Reference formulation: minimise sum_k 6 N_k tokens_k over the steps dS_k >= 0, subject to
    log L_K(dS) = log L_target, scipy SLSQP.  Variables are steps / S_eff(N_K, L_target)."""
    K = len(sizes)
    S_ref = law.steps_to_loss(sizes[-1], L_target)
    norm = law.compute_to_loss(sizes[-1], L_target, L_target)

    def losses(x):
        return simulate_stages(sizes, [max(v, 0.0) * S_ref for v in x], law)

    def total(x):
        Ls, prev, c = losses(x), math.inf, 0.0
        for N, L in zip(sizes, Ls):
            c += 6.0 * N * (law.tokens_to_loss(N, L, L_target) - law.tokens_to_loss(N, prev, L_target))
            prev = L
        return c / norm

    def con(x):
        L = losses(x)[-1]
        return math.log(L / L_target) if math.isfinite(L) else 50.0

    # start: each stage trains to an evenly spaced loss on the way down, last one to target
    L_hi = law.loss_limit(sizes[0]) + 1.0
    x0, prev = [], math.inf
    for k, N in enumerate(sizes):
        L_end = L_target if k == K - 1 else max(L_target, law.loss_limit(N) * 1.02, L_hi - (k + 1) * (L_hi - L_target) / K)
        L_end = min(L_end, prev)
        x0.append((law.steps_to_loss(N, L_end) - law.steps_to_loss(N, prev)) / S_ref)
        prev = L_end
    res = optimize.minimize(
        total,
        np.array(x0),
        method="SLSQP",
        bounds=[(0.0, None)] * K,
        constraints=[{"type": "eq", "fun": con}],
        options={"ftol": 1e-12, "maxiter": 1000},
    )
    x = np.maximum(res.x, 0.0)
    Ls = losses(x)
    # re-impose the target exactly on the last stage (the constraint holds to SLSQP's tolerance)
    return _assemble(law, sizes, Ls[:-1], L_target, "slsqp" if res.success else f"slsqp ({res.message})")


# ----------------------------------------------------------------------------- the paper's pairs
@dataclass(frozen=True)
class PaperPair:
    name: str
    kind: str  # "depth" (x2 layers) or "width" (x2 d_model, 4x params)
    small: tuple[int, int]  # (n_layer, d_model)
    large: tuple[int, int]
    measured_saving: float  # Shen et al. 2022, oracle analysis of their validation curves

    @property
    def N_small(self) -> float:
        return non_embedding_params(*self.small)

    @property
    def N_large(self) -> float:
        return non_embedding_params(*self.large)


def paper_pairs() -> list[PaperPair]:
    """The paper's pairs with its measured compute savings: GPT-2 base (12 x 768) and its
    "large" (24 x 1536, the size of the paper's data and notebook, not Hugging Face's 36 x 1280
    gpt2-large), each grown from half the layers (depth: 6 x 768, 12 x 1536) or half d_model
    (width, 1/4 of the parameters: 12 x 384, 24 x 768)."""
    base, large = (12, 768), (24, 1536)
    return [
        PaperPair("gpt2-base-depth", "depth", (6, 768), base, 0.132),
        PaperPair("gpt2-large-depth", "depth", (12, 1536), large, 0.148),
        PaperPair("gpt2-base-width", "width", (12, 384), base, 0.216),
        PaperPair("gpt2-large-width", "width", (24, 768), large, 0.255),
    ]


def paper_target_loss(N_large: float, law: KaplanLaw | None = None, stop_slope: float = STOP_SLOPE) -> float:
    """Default target for a paper pair: the loss at which the from-scratch large model's curve
    flattens to the paper's stop slope (-0.052), i.e. where the paper's rule ends its baseline."""
    return (law or KaplanLaw()).loss_at_slope(N_large, stop_slope)


def paper_predictions(law: KaplanLaw | None = None, target: str | float = "stop-slope") -> list[dict]:
    """Predicted saving of the two-stage plan for each of the paper's pairs.

    target "stop-slope" (default): ``paper_target_loss``; "optimal": the loss for which the
    large size is the compute-optimal fixed size; a number: that loss for every pair."""
    law = law or KaplanLaw()
    out = []
    for p in paper_pairs():
        if target == "stop-slope":
            Lt = paper_target_loss(p.N_large, law)
        elif target == "optimal":
            Lt = optimal_target_loss(p.N_large, law)
        else:
            Lt = float(target)
        plan = plan_stages([p.N_small, p.N_large], Lt, law)
        grow = plan.stages[1] if len(plan.stages) > 1 else None
        out.append(
            {
                "pair": p.name,
                "kind": p.kind,
                "small": f"{p.small[0]}x{p.small[1]}",
                "large": f"{p.large[0]}x{p.large[1]}",
                "N_small": p.N_small,
                "N_large": p.N_large,
                "target_loss": Lt,
                "predicted_saving": plan.saving,
                "measured_saving": p.measured_saving,
                "switch_loss": grow.start_loss if grow else None,
                "slope_at_growth": grow.slope_at_growth if grow else None,
                "step_divisor": grow.step_divisor if grow else None,
                "total_pf_days": plan.total_pf_days,
                "single_pf_days": plan.single.pf_days,
            }
        )
    return out


def optimal_target_loss(N: float, law: KaplanLaw | None = None) -> float:
    """The target loss for which N is the compute-optimal fixed size (``compute_optimal_size``
    of it is N).  Constant batch: (N_c/N)^alpha_N (alpha_N + alpha_S) / alpha_S; integrated
    batch: solved numerically (the curve of N has slope -1/(1/alpha_N + 1/alpha_S + 1/alpha_B)
    there, the compute-efficient frontier's slope, -0.05199 with Kaplan's constants)."""
    law = law or KaplanLaw()
    limit = law.loss_limit(N)
    if law.batch == "target":
        return limit * (law.alpha_N + law.alpha_S) / law.alpha_S
    f = lambda L: math.log(compute_optimal_size(L, law) / N)  # noqa: E731
    return optimize.brentq(f, limit * 1.0001, limit * 3.0, xtol=1e-13)
