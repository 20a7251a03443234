"""Stage planner on the Kaplan et al. (2020) scaling law, as Shen et al. (2022) use it.

The law (Kaplan et al. 2020, as the paper's reference code uses it), N = non-embedding
parameters, S = optimizer steps, L = loss in nats:

    L(N, S)   = (N_c / N)^alpha_N + (2 S_c / S)^alpha_S
    B(L)      = B* / L^(1 / alpha_B)                      critical batch size, tokens
    C         = 6 N B S                                   training FLOPs
    S_eff(N, L) = 2 S_c / (L - (N_c / N)^alpha_N)^(1 / alpha_S)

The S term is written ``(2 S_c / S)^alpha_S``, following the reference page and the paper's
code: Kaplan's eq. 1.6 is stated in S_min, the steps at a very large batch, and training at
the critical batch size takes S = 2 S_min steps (Kaplan eq. 5.4 with B = B_crit), hence the
factor 2.  ``(N_c / N)^alpha_N`` is the irreducible loss of a model of size N (its loss at
infinitely many steps); no finite training reaches it.

Batch size.  Every compute figure here counts tokens at the critical batch size, one of two
documented ways, chosen by ``KaplanLaw.batch`` and used identically for single models and for
staged schedules:

* ``"integrated"`` (default): every step runs at the critical batch of the loss it is at,
  tokens = integral of B(L(s)) ds along the loss trajectory (closed form, Gauss 2F1).
  This is Kaplan's C_min accounting, and it is the one in which the paper's stop threshold
  is the compute-optimal point: the from-scratch model that reaches a loss with the least
  compute is, under this accounting, exactly the one whose curve has flattened to
  d log L / d log C = -1/(1/alpha_N + 1/alpha_S + 1/alpha_B) = -0.05199 there (the paper
  uses -0.052), for every target (tested).
* ``"target"``: one constant batch B(L_target) for every step of every stage (the reference
  code's default), tokens = B(L_target) * steps.  Here the compute-optimal model stops at
  slope -alpha_S alpha_N / (alpha_N + alpha_S) = -0.069 instead.

Where to grow does not depend on the choice: the optimal switch loss between sizes N_a < N_b
solves N_a dS_a/dL = N_b dS_b/dL (the batch factor B(L) is common to both sides), i.e.
(L - L_inf,a) / (L - L_inf,b) = (N_a / N_b)^(1 / (1 + 1/alpha_S)), and the grown model starts
at S_a / c with c = (N_b / N_a)^(1 / (1 + alpha_S)) (1.483 for 2x params, 2.198 for 4x; the
paper measured 1.412 and 1.776).  The compute figures, and so the savings, do depend on it.

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
import re
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from scipy import optimize, special

from megagrow.errors import UserError
from megagrow.params import kaplan_params
from megagrow.schedule.slope import STOP_SLOPE

PF_DAY_FLOPS = 8.64e19  # 1 PF-day = 1e15 FLOP/s * 86400 s
BATCH_MODES = ("target", "integrated")
LAWS = ("kaplan",)
MAX_EXACT_STAGES = 8  # 2^(K-1) sub-chains are solved exactly; more stages -> SLSQP polish


# ----------------------------------------------------------------------------- sizes
def non_embedding_params(n_layer: int, d_model: int) -> float:
    """Kaplan's non-embedding parameter count N = 12 * n_layer * d_model^2 (d_ff = 4 d_model;
    megagrow.params.kaplan_params, pinned to the model's own count there)."""
    if int(n_layer) <= 0 or int(d_model) <= 0:
        raise UserError(f"n_layer and d_model must be positive, got {n_layer}x{d_model}")
    return kaplan_params(n_layer, d_model)


_LXD = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_size(text: str | float | int) -> float:
    """A model size: a number of non-embedding parameters ("85e6", "1.2e9") or "LAYERSxD_MODEL"
    ("12x768" -> 12 * 12 * 768^2).  Raises UserError for anything else or a size <= 0."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = _LXD.match(text)
        if m:
            return non_embedding_params(int(m.group(1)), int(m.group(2)))
        try:
            value = float(text.strip())
        except ValueError:
            raise UserError(
                f"bad model size {text!r}: expected a parameter count like 85e6 "
                "or LAYERSxD_MODEL like 12x768"
            ) from None
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"model size must be a positive finite number, got {text!r}")
    return value


def _check_size(N: float) -> float:
    N = float(N)
    if not math.isfinite(N) or N <= 0:
        raise UserError(f"model size must be a positive finite number, got {N!r}")
    return N


# ----------------------------------------------------------------------------- the law
@dataclass(frozen=True)
class KaplanLaw:
    """Kaplan et al. (2020) constants (their Table 5 / Appendix A) and the law's functions.

    All constants are overridable (``KaplanLaw(alpha_N=0.07)``); ``batch`` picks how tokens
    are counted (see the module docstring): "target" or "integrated".
    """

    N_c: float = 8.8e13
    alpha_N: float = 0.076
    S_c: float = 2.1e3
    alpha_S: float = 0.76
    B_star: float = 2.1e8
    alpha_B: float = 0.21
    batch: str = "integrated"
    name: str = field(default="kaplan", compare=False)

    def __post_init__(self) -> None:
        for k in ("N_c", "alpha_N", "S_c", "alpha_S", "B_star", "alpha_B"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise UserError(f"scaling-law constant {k} must be a positive number, got {v!r}")
        if self.batch not in BATCH_MODES:
            raise UserError(f"unknown batch mode {self.batch!r} (choose from {', '.join(BATCH_MODES)})")

    # -- loss, batch, steps
    def loss_limit(self, N: float) -> float:
        """Irreducible loss of a model of size N: (N_c / N)^alpha_N (the S -> infinity limit)."""
        return (self.N_c / _check_size(N)) ** self.alpha_N

    def loss(self, N: float, S: float) -> float:
        """L(N, S) at the critical batch size; infinite at S <= 0."""
        if S <= 0:
            return math.inf
        return self.loss_limit(N) + (2.0 * self.S_c / S) ** self.alpha_S

    def critical_batch(self, L: float) -> float:
        """B(L) = B* / L^(1/alpha_B), in tokens."""
        if not L > 0:
            raise UserError(f"loss must be positive, got {L!r}")
        return self.B_star / L ** (1.0 / self.alpha_B)

    def steps_to_loss(self, N: float, L: float) -> float:
        """S_eff(N, L): the step at which a from-scratch model of size N reaches loss L.

        0 for L = inf; math.inf when L <= the irreducible loss of N (unreachable)."""
        if L == math.inf:
            return 0.0
        u = L - self.loss_limit(N)
        if not u > 0:
            return math.inf
        return 2.0 * self.S_c / u ** (1.0 / self.alpha_S)

    def dsteps_dloss(self, N: float, L: float) -> float:
        """d S_eff / d L (negative) at a reachable loss L."""
        u = L - self.loss_limit(N)
        if not u > 0:
            return -math.inf
        return -(2.0 * self.S_c / self.alpha_S) * u ** (-1.0 / self.alpha_S - 1.0)

    # -- tokens and compute of a from-scratch model
    def tokens_to_loss(self, N: float, L: float, batch_loss: float | None = None) -> float:
        """Tokens a from-scratch model of size N consumes to reach loss L at the critical batch.

        batch "target": B(batch_loss) * S_eff(N, L), batch_loss defaulting to L.
        batch "integrated": integral_0^S_eff B(L(s)) ds (batch_loss unused)."""
        if L == math.inf:
            return 0.0
        S = self.steps_to_loss(N, L)
        if S == math.inf:
            return math.inf
        if self.batch == "target":
            return self.critical_batch(L if batch_loss is None else batch_loss) * S
        return self._integrated_tokens(N, L)

    def _integrated_tokens(self, N: float, L: float) -> float:
        # u = L(s) - L_inf = (2 S_c / s)^alpha_S, ds = -(2 S_c / alpha_S) u^(-q-1) du, q = 1/alpha_S
        # D = (2 S_c B* / alpha_S) int_{u_L}^inf (L_inf + u)^-p u^(-q-1) du,       p = 1/alpha_B
        # t = u / (L_inf + u) maps it onto [x, 1), x = (L - L_inf) / L:
        # D = (2 S_c B* / alpha_S) L_inf^(-p-q) I(x),  I(x) = int_x^1 t^(a-1) (1-t)^(b-1) dt,
        # a = -q < 0, b = p + q.  Closed form: t^a/a 2F1(a, 1-b; a+1; t) is an antiderivative and
        # its value at t = 1 is the continued Beta function G(a)G(b)/G(a+b), so
        # I(x) = B(a, b) - x^a/a 2F1(a, 1-b; a+1; x), used for x <= 0.3 (near the irreducible
        # loss, where the integrand is singular); above, s = 1 - t gives the regular incomplete
        # Beta I(x) = (1-x)^b/b 2F1(b, 1-a; b+1; 1-x) (the first form would cancel there).
        # Both agree with adaptive quadrature to ~1e-14 (tested).
        p, q = 1.0 / self.alpha_B, 1.0 / self.alpha_S
        linf = self.loss_limit(N)
        x = (L - linf) / L
        a, b = -q, p + q
        if x <= 0.3 and abs(a - round(a)) > 1e-9:
            beta = special.gamma(a) * special.gamma(b) / special.gamma(a + b)
            val = beta - x ** a / a * special.hyp2f1(a, 1.0 - b, a + 1.0, x)
        else:
            val = (1.0 - x) ** b / b * special.hyp2f1(b, 1.0 - a, b + 1.0, 1.0 - x)
        return (2.0 * self.S_c * self.B_star / self.alpha_S) * linf ** (-p - q) * val

    def dtokens_dloss(self, N: float, L: float, batch_loss: float | None = None) -> float:
        """d tokens_to_loss / d L (negative) at a reachable loss L."""
        if self.batch == "target":
            return self.critical_batch(L if batch_loss is None else batch_loss) * self.dsteps_dloss(N, L)
        return self.critical_batch(L) * self.dsteps_dloss(N, L)

    def compute_to_loss(self, N: float, L: float, batch_loss: float | None = None) -> float:
        """FLOPs a from-scratch model of size N needs to reach loss L: 6 N tokens."""
        return 6.0 * _check_size(N) * self.tokens_to_loss(N, L, batch_loss)

    def curve_slope(self, N: float, L: float) -> float:
        """d log10 L / d log10 C along the from-scratch curve of size N, at loss L.

        With a constant batch this is -alpha_S (L - L_inf) / L; "integrated" counts the
        varying batch.  This is the quantity the practical slope rule thresholds."""
        D = self.tokens_to_loss(N, L, batch_loss=L)
        if D in (0.0, math.inf):
            return -self.alpha_S if self.batch == "target" else math.nan
        return D / (L * self.dtokens_dloss(N, L, batch_loss=L))

    def loss_at_slope(self, N: float, slope: float) -> float:
        """The loss at which the from-scratch curve of size N flattens to d log L / d log C = slope."""
        linf = self.loss_limit(N)
        if self.batch == "target":
            if not -self.alpha_S < slope < 0:
                raise UserError(f"slope must lie in (-alpha_S, 0) = ({-self.alpha_S}, 0), got {slope}")
            return linf / (1.0 + slope / self.alpha_S)
        lo, hi = linf * (1.0 + 1e-9), linf + (2.0 * self.S_c) ** self.alpha_S
        f = lambda L: self.curve_slope(N, L) - slope  # noqa: E731
        if not f(lo) > 0 > f(hi):
            raise UserError(f"slope {slope} is not reached on the curve of a model of size {N:.3g}")
        return optimize.brentq(f, lo, hi, xtol=1e-14, rtol=1e-14, maxiter=500)


def get_law(name: str = "kaplan", **overrides) -> KaplanLaw:
    """The law by name (only "kaplan" so far); keyword overrides set constants or ``batch``."""
    if name != "kaplan":
        raise UserError(f"unknown scaling law {name!r} (choose from {', '.join(LAWS)})")
    return KaplanLaw(**overrides)


def loss_at_budget(N: float, steps: float, batch_tokens: float, law: KaplanLaw | None = None) -> float:
    """The loss a from-scratch model of size N reaches after ``steps`` steps of a fixed batch of
    ``batch_tokens`` tokens (not necessarily the critical one), by Kaplan's batch trade-off:
    S_min = S / (1 + B(L) / B) and L = (N_c/N)^alpha_N + (S_c / S_min)^alpha_S (at B = B(L)
    this is the law above).  Solved for L (B(L) depends on it)."""
    law = law or KaplanLaw()
    N = _check_size(N)
    if not (math.isfinite(steps) and steps > 0 and math.isfinite(batch_tokens) and batch_tokens > 0):
        raise UserError(f"steps and batch tokens must be positive, got {steps!r}, {batch_tokens!r}")
    linf = law.loss_limit(N)
    f = lambda L: linf + (law.S_c * (1.0 + law.critical_batch(L) / batch_tokens) / steps) ** law.alpha_S - L  # noqa: E731
    hi = linf + 1.0
    while f(hi) > 0:
        hi = linf + 2.0 * (hi - linf)
    return optimize.brentq(f, linf * (1 + 1e-15), hi, xtol=1e-14, rtol=1e-14, maxiter=500)


def _check_target(law: KaplanLaw, N: float, L_target: float) -> float:
    L_target = float(L_target)
    if not math.isfinite(L_target) or L_target <= 0:
        raise UserError(f"target loss must be a positive finite number, got {L_target!r}")
    limit = law.loss_limit(N)
    if L_target <= limit:
        raise UserError(
            f"target loss {L_target:g} is at or below the irreducible loss {limit:.6g} "
            f"of a model of {N:.4g} parameters: unreachable"
        )
    return L_target


# ----------------------------------------------------------------------------- single model
@dataclass(frozen=True)
class SingleModel:
    """A fixed-size model trained from scratch to the target loss."""

    N: float
    steps: float
    tokens: float
    compute: float
    target_loss: float

    @property
    def pf_days(self) -> float:
        return self.compute / PF_DAY_FLOPS

    def to_dict(self) -> dict:
        return {**asdict(self), "pf_days": self.pf_days}


def single_model_compute(N: float, L_target: float, law: KaplanLaw | None = None) -> float:
    """Minimal FLOPs for a fixed-size model of N params to reach L_target from scratch:
    S = S_eff(N, L_target) steps at the critical batch (see ``KaplanLaw.batch``)."""
    law = law or KaplanLaw()
    _check_target(law, N, L_target)
    return law.compute_to_loss(N, L_target, batch_loss=L_target)


def _single(law: KaplanLaw, N: float, L_target: float) -> SingleModel:
    tokens = law.tokens_to_loss(N, L_target, batch_loss=L_target)
    return SingleModel(N=float(N), steps=law.steps_to_loss(N, L_target), tokens=tokens,
                       compute=6.0 * N * tokens, target_loss=float(L_target))


def compute_optimal_size(L_target: float, law: KaplanLaw | None = None) -> float:
    """The continuous N minimising single_model_compute(N, L_target) (scipy, bounded Brent in
    log N).  With a constant batch it is where (N_c/N)^alpha_N = alpha_S/(alpha_N+alpha_S) L."""
    law = law or KaplanLaw()
    L_target = float(L_target)
    if not math.isfinite(L_target) or L_target <= 0:
        raise UserError(f"target loss must be a positive finite number, got {L_target!r}")
    n_min = law.N_c / L_target ** (1.0 / law.alpha_N)  # limit(n_min) == L_target
    lo, hi = math.log(n_min) + 1e-9, math.log(n_min) + 60.0
    f = lambda x: math.log(law.compute_to_loss(math.exp(x), L_target, L_target))  # noqa: E731
    xs = np.linspace(lo, hi, 241)
    vals = [f(x) for x in xs]
    i = int(np.argmin(vals))
    a, b = xs[max(i - 1, 0)], xs[min(i + 1, len(xs) - 1)]
    res = optimize.minimize_scalar(f, bounds=(a, b), method="bounded",
                                   options={"xatol": 1e-12, "maxiter": 500})
    return math.exp(res.x if res.fun <= vals[i] else xs[i])


def best_single_model(L_target: float, N_choices=None, law: KaplanLaw | None = None) -> SingleModel:
    """The cheapest fixed-size model reaching L_target: over ``N_choices`` if given (sizes that
    cannot reach the target are skipped), else over continuous N (``compute_optimal_size``)."""
    law = law or KaplanLaw()
    if N_choices is None:
        N = compute_optimal_size(L_target, law)
        return _single(law, N, L_target)
    sizes = [_check_size(n) for n in N_choices]
    ok = [n for n in sizes if law.loss_limit(n) < L_target]
    if not ok:
        raise UserError(f"no candidate size can reach target loss {L_target:g}")
    return min((_single(law, n, L_target) for n in ok), key=lambda s: s.compute)


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
    sizes = [_check_size(parse_size(n) if isinstance(n, str) else n) for n in sizes]
    if not sizes:
        raise UserError("need at least one model size")
    if any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise UserError("model sizes must be strictly increasing (each stage grows the previous)")
    _check_target(law, sizes[-1], L_target)
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
            res = optimize.minimize_scalar(f, bounds=(a, b), method="bounded",
                                           options={"xatol": 1e-13, "maxiter": 1000})
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
        stages.append(PlannedStage(
            index=len(stages) + 1, N=N, start_loss=prev, end_loss=L_end, start_step=start_step,
            steps=max(steps, 0.0), tokens=max(tokens, 0.0), compute=6.0 * N * max(tokens, 0.0),
            step_divisor=c, slope_at_growth=slope,
        ))
        prev, prev_N = L_end, N
    # the reported end losses come from the forward model, not from the optimiser's variables
    sim = simulate_stages([s.N for s in stages], [s.steps for s in stages], law)
    stages = [replace(s, end_loss=l) for s, l in zip(stages, sim)]
    total = sum(s.compute for s in stages)
    return StagePlan(law=law, target_loss=L_target, stages=tuple(stages), total_compute=total,
                     single=_single(law, sizes[-1], L_target),
                     best_single=best_single_model(L_target, None, law), method=method)


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
    res = optimize.minimize(total, np.array(x0), method="SLSQP", bounds=[(0.0, None)] * K,
                            constraints=[{"type": "eq", "fun": con}],
                            options={"ftol": 1e-12, "maxiter": 1000})
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
        out.append({
            "pair": p.name, "kind": p.kind,
            "small": f"{p.small[0]}x{p.small[1]}", "large": f"{p.large[0]}x{p.large[1]}",
            "N_small": p.N_small, "N_large": p.N_large, "target_loss": Lt,
            "predicted_saving": plan.saving, "measured_saving": p.measured_saving,
            "switch_loss": grow.start_loss if grow else None,
            "slope_at_growth": grow.slope_at_growth if grow else None,
            "step_divisor": grow.step_divisor if grow else None,
            "total_pf_days": plan.total_pf_days, "single_pf_days": plan.single.pf_days,
        })
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
