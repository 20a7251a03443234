"""Calibrating the scaling law to your own runs, and the switch points and slope thresholds that
follow from the calibrated law.

The law of megagrow.schedule.law, L(N, S) = (N_c / N)^alpha_N + (2 S_c / S)^alpha_S, comes with
Kaplan et al.'s constants, measured on WebText2 with their tokenizer, model family and batch
schedule.  On other data, another tokenizer or another recipe the constants differ, and with
them where the planner grows and what slope the practical rule should wait for.  Here:

* ``curve_of_run`` (with megagrow.cli.plan.curves_from_runs, which reads ``megagrow run`` run
  directories): the validation curve of a from-scratch run as (N, steps, eval loss),
  N = 12 n_layers d_model^2 (Kaplan's non-embedding count, as ``--sizes 12x768`` reads it);
* ``fit_law``: N_c, alpha_N, S_c, alpha_S fitted to those curves by nonlinear least squares on
  log L.  B* and alpha_B are kept from the base law (Kaplan's by default): a run at one fixed
  batch does not determine the critical batch.  S counts optimizer steps at the runs' batch,
  so the fitted S_c is the law's step scale at that batch;
* ``calibrated_switches``: for a chain of sizes, the planner's compute-optimal switch losses
  under the law, the small model's step there, and the slope threshold the trainer's rule
  should use to grow there.

Which slope (documented choice).  The trainer's rule (megagrow/schedule/stop.py) measures
d log10 L / d log10 C with C = 6 N (lr_offset + step) x global_batch x seq_len: a fixed batch,
so C is proportional to the model's step S on its own from-scratch curve and the slope it reads
is d log L / d log S along L(N, S):

    slope(N, L) = -alpha_S (2 S_c / S)^alpha_S / L = -alpha_S (L - (N_c / N)^alpha_N) / L

(``fixed_batch_slope``).  ``KaplanLaw.curve_slope`` is that quantity only with
``batch="target"``; with the default ``batch="integrated"`` it counts tokens at the critical
batch of the current loss, a curve the trainer never draws (its slope is shallower: a growing
batch spends more compute per step).  The thresholds here are therefore ``fixed_batch_slope``,
whatever the law's batch accounting.  The switch loss itself does not depend on the
accounting (megagrow.schedule.law, module docstring), nor does this slope depend on S_c.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import optimize

from megagrow.errors import UserError
from megagrow.schedule.law import KaplanLaw, check_size, non_embedding_params
from megagrow.schedule.planner import plan_stages
from megagrow.schedule.slope import threshold_for

FITTED = ("N_c", "alpha_N", "S_c", "alpha_S")
KEPT = ("B_star", "alpha_B")
MIN_STEP_FRACTION = 0.2  # default warm-up cut: the first 20% of each run (or its warmup, if longer)
_ALPHA_N_BOUNDS = (1e-3, 5.0)
_ALPHA_S_BOUNDS = (1e-2, 5.0)
_MAX_REL_STDERR = 0.25  # a fitted constant known to worse than ~25% (1 sigma) flags the fit
_MAX_COND = 1e8  # condition number of the (centred) Jacobian beyond which the fit is ill-conditioned


# ----------------------------------------------------------------------------- the fit
def _check_curves(curves, min_step: float):
    Ns, Ss, Ls = [], [], []
    if not curves:
        raise UserError("no curves to fit the law to")
    for i, c in enumerate(curves):
        try:
            N, steps, loss = c
        except (TypeError, ValueError):
            raise UserError(f"curve {i}: expected (N, steps, losses)") from None
        N = check_size(N)
        steps = np.asarray(steps, dtype=float).ravel()
        loss = np.asarray(loss, dtype=float).ravel()
        if steps.shape != loss.shape:
            raise UserError(f"curve {i} (N={N:.4g}): {steps.size} steps but {loss.size} losses")
        if not (np.all(np.isfinite(steps)) and np.all(np.isfinite(loss)) and np.all(loss > 0)):
            raise UserError(f"curve {i} (N={N:.4g}): steps and losses must be finite, losses positive")
        keep = (steps > 0) & (steps >= min_step)
        Ns.append(np.full(int(keep.sum()), N))
        Ss.append(steps[keep])
        Ls.append(loss[keep])
    return np.concatenate(Ns), np.concatenate(Ss), np.concatenate(Ls)


class _Model:
    """L = exp(u) (N0/N)^exp(a) + exp(v) (S0/S)^exp(b), centred at the geometric mean size N0
    and step S0 (far better conditioned than ln N_c, ln S_c: (N_c/N)^alpha_N is a product of a
    huge N_c and a small alpha_N).  Residuals ln L_model - ln L."""

    def __init__(self, N, S, L):
        self.N, self.S, self.L = N, S, L
        self.N0, self.S0 = float(np.exp(np.mean(np.log(N)))), float(np.exp(np.mean(np.log(S))))
        self.xn, self.xs = np.log(self.N0 / N), np.log(self.S0 / S)
        self.lnL = np.log(L)

    def terms(self, p):
        u, a, v, b = p
        return np.exp(u + math.exp(a) * self.xn), np.exp(v + math.exp(b) * self.xs)

    def residuals(self, p):
        tn, ts = self.terms(p)
        return np.log(tn + ts) - self.lnL

    def jac(self, p):
        tn, ts = self.terms(p)
        m = tn + ts
        aN, aS = math.exp(p[1]), math.exp(p[3])
        return np.column_stack([tn / m, tn * aN * self.xn / m, ts / m, ts * aS * self.xs / m])

    def constants(self, p) -> dict:
        """N_c, alpha_N, S_c, alpha_S of parameters p (N_c, S_c possibly inf: caller checks)."""
        u, a, v, b = p
        aN, aS = math.exp(a), math.exp(b)
        ln_nc, ln_sc = math.log(self.N0) + u / aN, math.log(self.S0) + v / aS - math.log(2.0)
        big = lambda x: math.exp(x) if x < 700 else math.inf  # noqa: E731
        return {"N_c": big(ln_nc), "alpha_N": aN, "S_c": big(ln_sc), "alpha_S": aS}

    def to_log_constants(self, p) -> np.ndarray:
        """d (ln N_c, ln alpha_N, ln S_c, ln alpha_S) / d (u, a, v, b)."""
        u, a, v, b = p
        aN, aS = math.exp(a), math.exp(b)
        return np.array([[1 / aN, -u / aN, 0, 0], [0, 1, 0, 0], [0, 0, 1 / aS, -v / aS], [0, 0, 0, 1]])

    def params_of(self, law: KaplanLaw) -> np.ndarray:
        return np.array(
            [
                law.alpha_N * math.log(law.N_c / self.N0),
                math.log(law.alpha_N),
                law.alpha_S * math.log(2.0 * law.S_c / self.S0),
                math.log(law.alpha_S),
            ]
        )


def _grid_starts(m: _Model, n_best: int = 4) -> list[np.ndarray]:
    """For fixed exponents the model is linear in exp(u), exp(v): a non-negative least-squares
    solve (relative residuals) per grid point gives the coefficients; the best few start the fit."""
    found = []
    w = 1.0 / m.L
    for aN in np.geomspace(0.01, 2.0, 30):
        fn = np.exp(aN * m.xn) * w
        for aS in np.geomspace(0.05, 3.0, 30):
            fs = np.exp(aS * m.xs) * w
            coef, rnorm = optimize.nnls(np.column_stack([fn, fs]), np.ones_like(w))
            if coef[0] > 0 and coef[1] > 0:
                found.append((rnorm, np.array([math.log(coef[0]), math.log(aN), math.log(coef[1]), math.log(aS)])))
    found.sort(key=lambda t: t[0])
    return [p for _, p in found[:n_best]]


def _least_squares(m, starts: list, lo: list, hi: list):
    """The lowest-cost finite least-squares solution over `starts`; UserError when none converged."""
    best = None
    for x0 in starts:
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # a trial step far off: inf cost, rejected
                r = optimize.least_squares(
                    m.residuals,
                    x0,
                    jac=m.jac,
                    bounds=(lo, hi),
                    method="trf",
                    x_scale="jac",
                    ftol=1e-15,
                    xtol=1e-15,
                    gtol=1e-15,
                    max_nfev=5000,
                )
        except (ValueError, FloatingPointError):
            continue
        if np.all(np.isfinite(r.fun)) and (best is None or r.cost < best.cost):
            best = r
    if best is None:
        raise UserError("the law could not be fitted to these curves (no start converged)")
    return best


def _fit_warnings(m, p, const: dict, sizes: list, S) -> tuple[dict, float, bool, list]:
    """(relative standard errors, Jacobian condition number, ill-conditioned, warnings) of a fit."""
    res = m.residuals(p)
    n = res.size
    J = m.jac(p)
    warnings = []
    sv = np.linalg.svd(J, compute_uv=False)
    cond = float(sv[0] / sv[-1]) if sv[-1] > 0 else math.inf
    stderr = {k: None for k in FITTED}
    if math.isfinite(cond) and n > 4:
        s2 = float(res @ res) / (n - 4)
        G = m.to_log_constants(p)
        cov = G @ (s2 * np.linalg.inv(J.T @ J)) @ G.T
        stderr = {k: float(math.sqrt(max(cov[i, i], 0.0))) for i, k in enumerate(FITTED)}
    ill = False
    if cond > _MAX_COND:
        ill = True
        warnings.append(f"the fit is ill-conditioned (Jacobian condition number {cond:.3g}): some constants are not determined")
    loose = [k for k, v in stderr.items() if v is not None and v > _MAX_REL_STDERR]
    if loose:
        ill = True
        warnings.append(
            "poorly determined: " + ", ".join(f"{k} (+-{100 * stderr[k]:.0f}%)" if stderr[k] < 3 else f"{k} (not at all)" for k in loose)
        )
    for k, (a, b) in (("alpha_N", _ALPHA_N_BOUNDS), ("alpha_S", _ALPHA_S_BOUNDS)):
        if not a * (1 + 1e-6) < const[k] < b * (1 - 1e-6):
            ill = True
            warnings.append(f"{k} = {const[k]:.4g} is at the edge of its search range [{a}, {b}]")
    if len(sizes) == 2:
        warnings.append("only 2 sizes: N_c and alpha_N pass exactly through them (nothing checks the power law in N)")
    if sizes[-1] / sizes[0] < 2.0:
        warnings.append(f"the sizes span only x{sizes[-1] / sizes[0]:.2f}: N_c and alpha_N are weakly determined")
    if S.max() / S.min() < 4.0:
        warnings.append(f"the steps span only x{S.max() / S.min():.2f}: S_c and alpha_S are weakly determined")
    return stderr, cond, ill, warnings


def fit_law(curves, base: KaplanLaw | None = None, min_step: float = 0.0) -> tuple[KaplanLaw, dict]:
    """Fit N_c, alpha_N, S_c, alpha_S of L(N, S) = (N_c/N)^alpha_N + (2 S_c/S)^alpha_S to
    from-scratch curves ``[(N, steps, losses), ...]`` (steps: optimizer steps at the runs' fixed
    batch; points at steps <= 0 or < ``min_step`` are left out).

    Least squares on ln L (scipy.optimize.least_squares, trust region, analytic Jacobian) over
    centred log parameters, started from the best points of a grid over the two exponents (for
    which the rest is a linear solve) and from ``base``.  B*, alpha_B and the batch accounting
    are kept from ``base`` (Kaplan's law by default).

    Returns the calibrated law (``name="calibrated"``) and a dict: "constants" (the four fitted),
    "kept" (B_star, alpha_B, batch), "stderr_rel" (1-sigma standard error of each fitted constant's
    log, i.e. relative), "rmse" (nats), "rmse_rel" (of ln L), "n_points", "n_curves", "sizes",
    "steps" ([min, max]), "min_step", "ill_conditioned" and "warnings" (one line each).
    UserError for fewer than 2 distinct sizes (N_c and alpha_N cannot be fitted) or too few points.
    """
    base = base or KaplanLaw()
    N, S, L = _check_curves(curves, float(min_step))
    sizes = sorted(set(float(n) for n in N))
    if len(sizes) < 2:
        only = f" (only N={sizes[0]:.4g})" if sizes else ""
        raise UserError(f"need from-scratch curves of at least 2 model sizes to fit alpha_N and N_c{only}")
    if N.size < 6:
        raise UserError(f"need at least 6 curve points past the warm-up cut to fit 4 constants, got {N.size}")
    m = _Model(N, S, L)
    lo = [-np.inf, math.log(_ALPHA_N_BOUNDS[0]), -np.inf, math.log(_ALPHA_S_BOUNDS[0])]
    hi = [np.inf, math.log(_ALPHA_N_BOUNDS[1]), np.inf, math.log(_ALPHA_S_BOUNDS[1])]
    starts = _grid_starts(m) + [np.clip(m.params_of(base), np.array(lo) + 1e-9, np.array(hi) - 1e-9)]
    best = _least_squares(m, starts, lo, hi)
    p = best.x
    const = m.constants(p)
    if not all(math.isfinite(v) and v > 0 for v in const.values()):
        raise UserError("the fit diverged (N_c or S_c out of range): the curves do not determine the law; add sizes or longer runs")
    law = dataclasses.replace(base, name="calibrated", **const)

    stderr, cond, ill, warnings = _fit_warnings(m, p, const, sizes, S)
    res = m.residuals(p)
    n = res.size
    model_L = np.exp(res) * L
    info = {
        "constants": const,
        "kept": {**{k: getattr(base, k) for k in KEPT}, "batch": base.batch},
        "stderr_rel": stderr,
        "rmse": float(np.sqrt(np.mean((model_L - L) ** 2))),
        "rmse_rel": float(np.sqrt(np.mean(res**2))),
        "n_points": int(n),
        "n_curves": len(curves),
        "sizes": sizes,
        "steps": [float(S.min()), float(S.max())],
        "min_step": float(min_step),
        "condition_number": cond,
        "ill_conditioned": ill,
        "warnings": warnings,
    }
    return law, info


# ----------------------------------------------------------------------------- runs
def curve_of_run(run: str, plan, steps, losses, min_step: float | None = None) -> tuple[float, np.ndarray, np.ndarray]:
    """(N, steps, eval losses) of one from-scratch run, from its plan (megagrow.config.Plan) and
    its eval points (steps counted over the whole run).  megagrow.cli.plan.curves_from_runs
    reads them from a run directory; the checks and the warm-up cut are here.

    A run is from scratch when no stage has ``grow`` (one stage, or the same model continued
    over several, e.g. at another layout, at one batch); N = 12 n_layers d_model^2.
    min_step: points before it are dropped (warm-up); None: the larger of the first stage's
    warmup_steps and MIN_STEP_FRACTION of the run's last eval step.
    UserError (one line, naming ``run``) for a staged run, one whose stages train at different
    batch sizes, or one without eval points (past the cut)."""
    grown = [s.name for s in plan.stages if s.grow]
    if grown:
        raise UserError(f"{run}: a staged run (stage {grown[0]} grows); calibrate on from-scratch runs only")
    if len({s.layout.global_batch * s.model.seq_len for s in plan.stages}) != 1:
        raise UserError(f"{run}: its stages train at different batch sizes; calibrate on runs at one fixed batch")
    steps = np.asarray(steps, dtype=float).ravel()
    losses = np.asarray(losses, dtype=float).ravel()
    if steps.shape != losses.shape:
        raise UserError(f"{run}: {steps.size} eval steps but {losses.size} eval losses")
    if not steps.size:
        raise UserError(f"{run}: no eval records in its log.jsonl (set eval_every and keep a validation split)")
    first = plan.stages[0]
    cut = max(first.optim.warmup_steps, MIN_STEP_FRACTION * steps.max()) if min_step is None else float(min_step)
    keep = (steps > 0) & (steps >= cut)
    if not keep.any():
        raise UserError(f"{run}: no eval record at or after step {cut:g} (the warm-up cut)")
    return non_embedding_params(first.model.n_layers, first.model.d_model), steps[keep], losses[keep]


# ----------------------------------------------------------------------------- what follows
def fixed_batch_slope(law: KaplanLaw, N: float, L: float) -> float:
    """d log10 L / d log10 C along the from-scratch curve of size N trained at a fixed batch
    (C proportional to the step S), at loss L: -alpha_S (L - (N_c/N)^alpha_N) / L.  The
    quantity the trainer's slope rule measures (see the module docstring)."""
    return -law.alpha_S * (L - law.loss_limit(N)) / L


def paper_kind(N_small: float, N_big: float) -> str:
    """The paper's growth nearest to this size ratio: "depth" (x2 params) or "width" (x4)."""
    return "depth" if N_big / N_small < 2.0 * math.sqrt(2.0) else "width"


def calibrated_switches(law: KaplanLaw, sizes, L_target: float, method: str = "exact") -> list[dict]:
    """The growth boundaries of the planner's compute-optimal plan for ``sizes`` under ``law``
    (megagrow.schedule.planner.plan_stages; a size it grows straight through is not a boundary).

    Per boundary: "from_N", "to_N", "switch_loss"; "small_step" (the small model's step there on
    its own from-scratch curve, law.steps_to_loss: for a grown stage its schedule position, not
    the steps it trained), "big_start_step" and "step_divisor" (c = small_step / big_start_step);
    "threshold" (``fixed_batch_slope`` of the small model at the switch loss: grow when the
    trainer's measured slope rises above it); "plan_slope" (law.curve_slope there, in the law's
    own batch accounting, as the plan table prints it); "paper_kind" / "paper_threshold" (the
    paper's threshold for the nearest of its growths, for comparison)."""
    plan = plan_stages(sizes, L_target, law, method=method)
    out = []
    for prev, st in zip(plan.stages, plan.stages[1:]):
        L = st.start_loss
        small = law.steps_to_loss(prev.N, L)
        kind = paper_kind(prev.N, st.N)
        out.append(
            {
                "from_N": prev.N,
                "to_N": st.N,
                "switch_loss": L,
                "small_step": small,
                "big_start_step": st.start_step,
                "step_divisor": st.step_divisor,
                "threshold": fixed_batch_slope(law, prev.N, L),
                "plan_slope": float(law.curve_slope(prev.N, L)),
                "paper_kind": kind,
                "paper_threshold": threshold_for(kind),
            }
        )
    return out
