"""The Kaplan et al. (2020) scaling law, as Shen et al. (2022) use it, and the from-scratch
model it predicts (the staged planner, megagrow.schedule.planner, builds on it).

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
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import optimize, special

from megagrow.errors import UserError
from megagrow.params import kaplan_params

PF_DAY_FLOPS = 8.64e19  # 1 PF-day = 1e15 FLOP/s * 86400 s
BATCH_MODES = ("target", "integrated")
LAWS = ("kaplan",)


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
            raise UserError(f"bad model size {text!r}: expected a parameter count like 85e6 or LAYERSxD_MODEL like 12x768") from None
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"model size must be a positive finite number, got {text!r}")
    return value


def check_size(N: float) -> float:
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
        return (self.N_c / check_size(N)) ** self.alpha_N

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
            val = beta - x**a / a * special.hyp2f1(a, 1.0 - b, a + 1.0, x)
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
        return 6.0 * check_size(N) * self.tokens_to_loss(N, L, batch_loss)

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
    N = check_size(N)
    if not (math.isfinite(steps) and steps > 0 and math.isfinite(batch_tokens) and batch_tokens > 0):
        raise UserError(f"steps and batch tokens must be positive, got {steps!r}, {batch_tokens!r}")
    linf = law.loss_limit(N)
    f = lambda L: linf + (law.S_c * (1.0 + law.critical_batch(L) / batch_tokens) / steps) ** law.alpha_S - L  # noqa: E731
    hi = linf + 1.0
    while f(hi) > 0:
        hi = linf + 2.0 * (hi - linf)
    return optimize.brentq(f, linf * (1 + 1e-15), hi, xtol=1e-14, rtol=1e-14, maxiter=500)


def check_target(law: KaplanLaw, N: float, L_target: float) -> float:
    L_target = float(L_target)
    if not math.isfinite(L_target) or L_target <= 0:
        raise UserError(f"target loss must be a positive finite number, got {L_target!r}")
    limit = law.loss_limit(N)
    if L_target <= limit:
        raise UserError(
            f"target loss {L_target:g} is at or below the irreducible loss {limit:.6g} of a model of {N:.4g} parameters: unreachable"
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
    check_target(law, N, L_target)
    return law.compute_to_loss(N, L_target, batch_loss=L_target)


def single_model(law: KaplanLaw, N: float, L_target: float) -> SingleModel:
    tokens = law.tokens_to_loss(N, L_target, batch_loss=L_target)
    return SingleModel(
        N=float(N), steps=law.steps_to_loss(N, L_target), tokens=tokens, compute=6.0 * N * tokens, target_loss=float(L_target)
    )


def compute_optimal_size(L_target: float, law: KaplanLaw | None = None) -> float:
    """The continuous N minimising single_model_compute(N, L_target) (scipy, bounded Brent in
    log N).  With a constant batch it is where (N_c/N)^alpha_N = alpha_S/(alpha_N+alpha_S) L."""
    law = law or KaplanLaw()
    L_target = float(L_target)
    if not math.isfinite(L_target) or L_target <= 0:
        raise UserError(f"target loss must be a positive finite number, got {L_target!r}")
    n_min = law.N_c / L_target ** (1.0 / law.alpha_N)  # limit(n_min) == L_target
    lo, hi = math.log(n_min) + 1e-9, math.log(n_min) + 60.0

    def f(x: float) -> float:  # log compute; inf where a (calibrated) law's numbers leave float range
        try:
            with np.errstate(all="ignore"):
                c = law.compute_to_loss(math.exp(x), L_target, L_target)
        except (OverflowError, ZeroDivisionError, ValueError):
            return math.inf
        return math.log(c) if c > 0 and math.isfinite(c) else math.inf

    xs = np.linspace(lo, hi, 241)
    vals = [f(x) for x in xs]
    i = int(np.argmin(vals))
    a, b = xs[max(i - 1, 0)], xs[min(i + 1, len(xs) - 1)]
    res = optimize.minimize_scalar(f, bounds=(a, b), method="bounded", options={"xatol": 1e-12, "maxiter": 500})
    return math.exp(res.x if res.fun <= vals[i] else xs[i])


def best_single_model(L_target: float, N_choices=None, law: KaplanLaw | None = None) -> SingleModel:
    """The cheapest fixed-size model reaching L_target: over ``N_choices`` if given (sizes that
    cannot reach the target are skipped), else over continuous N (``compute_optimal_size``)."""
    law = law or KaplanLaw()
    if N_choices is None:
        N = compute_optimal_size(L_target, law)
        return single_model(law, N, L_target)
    sizes = [check_size(n) for n in N_choices]
    ok = [n for n in sizes if law.loss_limit(n) < L_target]
    if not ok:
        raise UserError(f"no candidate size can reach target loss {L_target:g}")
    return min((single_model(law, n, L_target) for n in ok), key=lambda s: s.compute)
