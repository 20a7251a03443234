"""The practical "when to grow / when to stop" rule of Shen et al. (2022).

Watch the validation curve on log-log axes and act when it flattens: grow when the slope
d log10 L / d log10 C of the smoothed curve rises above a threshold (width -0.0475, depth
-0.0575), stop the final model at -0.052.  The grown
model then continues at the big model's equivalent step S_small / c, c = 1.776 (width) or
1.412 (depth).

Smoothing (documented choice).  Everything happens in log space, x = log10 C, y = log10 L:

1. spike filter (``spike_tol``, default 0.01, as the paper's analysis of its curves): a point
   whose loss is more than ``spike_tol`` above the running minimum of the losses seen so far is
   dropped (counted, never fitted).  A loss spike and its slow recovery are thus skipped
   instead of reading as a flat stretch; ``spike_tol=None`` turns it off;
2. optionally an exponential moving average of y over the kept points,
   y_s[i] = ema * y_s[i-1] + (1 - ema) * y[i]   (``ema = 0``, the default, turns it off:
   EMA over points that are not evenly spaced in x bends a straight line slightly);
3. the slope at point i is fitted on the trailing window of the last ``window`` kept points
   by ``estimator``: "theil-sen" (default: the median of the slopes of all pairs of points in
   the window; it ignores any minority of outliers, up to ~29% of the window, that the filter
   let through, e.g. a spike within ``spike_tol`` or a low outlier that set the running
   minimum) or "lsq" (least squares; one outlier moves it).

Why both.  On a pure power law of slope -0.1 with one +10% spike, least squares over a window
of 10 reads the spike as a slope of +0.13 and fires a -0.052 rule at once (patience 3 fires
two points later: the spike stays in the window for ``window`` points); the filter drops the spike,
and the median ignores what a filter cannot catch (noise, a low outlier that lowered the
running minimum, spikes below the tolerance).  The filter is meant for a validation curve
(deterministic, smooth): on a noisy per-batch training loss whose noise exceeds
``spike_tol`` it keeps mostly the lower envelope, whose slope is biased a little low (the
rule fires later); use the validation loss where there is one (megagrow/schedule/stop.py does).

Only past points are used, so the same numbers come out online (``SlopeRule.update``) and
offline (``find_crossing``).  On an exact power law both estimators are exact at any spacing.
When the true slope changes at point i0 (a kink), every window ending at or before i0 sees
only the old slope, and every window starting at or after i0 sees only the new one: with the
EMA off, a rule whose threshold lies between the two slopes fires at an index in
[i0 + 1, i0 + window - 1], never earlier (counting kept points).  On a smooth curve whose
slope rises monotonically every pair slope, hence the median and the least-squares fit, lies
between the curve's slopes at the two ends of the window, so the rule fires at most
``window - 1`` points late.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from megagrow.errors import UserError

# Slope thresholds on d log10 L / d log10 C (Shen et al. 2022, reference code cheatsheet).
WIDTH_GROW_SLOPE = -0.0475  # grow the width (4x params) when the slope rises above this
DEPTH_GROW_SLOPE = -0.0575  # grow the depth (2x params)
STOP_SLOPE = -0.052  # stop the final model (the compute-optimal point)
THRESHOLDS = {"width": WIDTH_GROW_SLOPE, "depth": DEPTH_GROW_SLOPE, "stop": STOP_SLOPE}

# The grown model continues at the big model's equivalent step S_small / c.
WIDTH_STEP_DIVISOR = 1.776
DEPTH_STEP_DIVISOR = 1.412
STEP_DIVISORS = {"width": WIDTH_STEP_DIVISOR, "depth": DEPTH_STEP_DIVISOR}

DEFAULT_WINDOW = 10


def threshold_for(kind: str) -> float:
    """The paper's slope threshold for "width", "depth" or "stop"."""
    try:
        return THRESHOLDS[kind]
    except KeyError:
        raise UserError(f"unknown rule kind {kind!r} (choose from {', '.join(THRESHOLDS)})") from None


def grown_step(small_step: float, kind: str) -> float:
    """The big model's equivalent step after growing at ``small_step``: S_small / c."""
    try:
        c = STEP_DIVISORS[kind]
    except KeyError:
        raise UserError(f"unknown growth kind {kind!r} (choose from {', '.join(STEP_DIVISORS)})") from None
    if not (math.isfinite(small_step) and small_step >= 0):
        raise UserError(f"step must be a non-negative number, got {small_step!r}")
    return small_step / c


ESTIMATORS = ("theil-sen", "lsq")
DEFAULT_SPIKE_TOL = 0.01


def _ls_slope(xs, ys) -> float:
    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    xc = x - x.mean()
    den = float(np.dot(xc, xc))
    if den <= 0.0:
        return math.nan
    return float(np.dot(xc, y - y.mean()) / den)


def _theil_sen_slope(xs, ys) -> float:
    """Median of (y_j - y_i) / (x_j - x_i) over all pairs i < j (x strictly increasing)."""
    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    i, j = np.triu_indices(len(x), k=1)
    dx = x[j] - x[i]
    ok = dx > 0
    if not ok.any():
        return math.nan
    return float(np.median((y[j] - y[i])[ok] / dx[ok]))


_FITS = {"theil-sen": _theil_sen_slope, "lsq": _ls_slope}


def check_options(window, ema, patience, spike_tol, estimator) -> None:
    """UserError for a bad rule option (shared by SlopeRule and the stage config)."""
    if not isinstance(window, (int, float)) or int(window) != window or window < 2:
        raise UserError(f"slope window must be an integer >= 2, got {window!r}")
    if not (isinstance(ema, (int, float)) and 0.0 <= ema < 1.0):
        raise UserError(f"ema must be in [0, 1), got {ema!r}")
    if not isinstance(patience, (int, float)) or int(patience) != patience or patience < 1:
        raise UserError(f"patience must be an integer >= 1, got {patience!r}")
    if spike_tol is not None and not (
        isinstance(spike_tol, (int, float)) and not isinstance(spike_tol, bool) and math.isfinite(spike_tol) and spike_tol >= 0
    ):
        raise UserError(f"spike_tol must be a number >= 0 or null (filter off), got {spike_tol!r}")
    if estimator not in ESTIMATORS:
        raise UserError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")


@dataclass
class SlopeRule:
    """A stage stop rule: feed (compute, loss) points as they come; ``update`` returns True once
    the smoothed slope d log10 L / d log10 C has been above ``threshold`` for ``patience``
    consecutive kept points (and keeps returning True afterwards).

    window: kept points in the trailing fit (>= 2; no decision before that many);
    ema: EMA weight on log10 L in [0, 1) (0 = off); patience: consecutive kept points required;
    spike_tol: drop a point whose loss exceeds the running minimum by more than this fraction
    (None = keep every point); estimator: "theil-sen" (median of pair slopes) or "lsq"."""

    threshold: float
    window: int = DEFAULT_WINDOW
    ema: float = 0.0
    patience: int = 1
    spike_tol: float | None = DEFAULT_SPIKE_TOL
    estimator: str = "theil-sen"
    _x: deque = field(default=None, init=False, repr=False)  # type: ignore[assignment]
    _y: deque = field(default=None, init=False, repr=False)  # type: ignore[assignment]
    _ema_y: float | None = field(default=None, init=False, repr=False)
    _last_c: float | None = field(default=None, init=False, repr=False)
    _min_loss: float | None = field(default=None, init=False, repr=False)
    _above: int = field(default=0, init=False, repr=False)
    count: int = field(default=0, init=False)
    dropped: int = field(default=0, init=False)
    slope: float | None = field(default=None, init=False)
    fired_at: int | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold)):
            raise UserError(f"slope threshold must be a finite number, got {self.threshold!r}")
        check_options(self.window, self.ema, self.patience, self.spike_tol, self.estimator)
        self.window = int(self.window)
        self.reset()

    @classmethod
    def for_kind(cls, kind: str, **kwargs) -> SlopeRule:
        """The paper's rule for "width", "depth" (grow) or "stop"."""
        return cls(threshold=threshold_for(kind), **kwargs)

    def reset(self) -> None:
        self._x, self._y = deque(maxlen=self.window), deque(maxlen=self.window)
        self._ema_y, self._last_c, self._min_loss, self._above = None, None, None, 0
        self.count, self.dropped, self.slope, self.fired_at = 0, 0, None, None

    @property
    def fired(self) -> bool:
        return self.fired_at is not None

    def update(self, compute: float, loss: float) -> bool:
        """Add one evaluation point; True when it is time to grow (or stop)."""
        compute, loss = float(compute), float(loss)
        if not (math.isfinite(compute) and compute > 0):
            raise UserError(f"compute must be a positive finite number, got {compute!r}")
        if not (math.isfinite(loss) and loss > 0):
            raise UserError(f"loss must be a positive finite number, got {loss!r}")
        if self._last_c is not None and compute <= self._last_c:
            raise UserError(f"compute must increase strictly: {compute!r} after {self._last_c!r}")
        self._last_c = compute
        index = self.count
        self.count += 1
        if self.spike_tol is not None and self._min_loss is not None and loss > self._min_loss * (1.0 + self.spike_tol):
            self.dropped += 1  # a spike (or its recovery): not fitted, decides nothing
            return self.fired
        self._min_loss = loss if self._min_loss is None else min(self._min_loss, loss)
        y = math.log10(loss)
        self._ema_y = y if (self._ema_y is None or self.ema == 0.0) else self.ema * self._ema_y + (1 - self.ema) * y
        self._x.append(math.log10(compute))
        self._y.append(self._ema_y)
        if len(self._x) < self.window:
            return self.fired
        self.slope = _FITS[self.estimator](self._x, self._y)
        self._above = self._above + 1 if self.slope > self.threshold else 0
        if self.fired_at is None and self._above >= self.patience:
            self.fired_at = index
        return self.fired


def smoothed_slopes(
    compute, loss, window: int = DEFAULT_WINDOW, ema: float = 0.0, spike_tol: float | None = DEFAULT_SPIKE_TOL, estimator: str = "theil-sen"
) -> np.ndarray:
    """The rule's slope after every point (NaN until ``window`` points have been kept; a
    dropped point repeats the slope of the last kept one)."""
    rule = SlopeRule(threshold=0.0, window=window, ema=ema, spike_tol=spike_tol, estimator=estimator)
    out = np.full(len(compute), math.nan)
    _check_lengths(compute, loss)
    for i, (c, l) in enumerate(zip(compute, loss)):
        rule.update(c, l)
        if rule.slope is not None:
            out[i] = rule.slope
    return out


def _check_lengths(compute, loss) -> None:
    if len(compute) != len(loss):
        raise UserError(f"compute and loss differ in length ({len(compute)} vs {len(loss)})")


def find_crossing(
    compute,
    loss,
    threshold: float,
    window: int = DEFAULT_WINDOW,
    ema: float = 0.0,
    patience: int = 1,
    spike_tol: float | None = DEFAULT_SPIKE_TOL,
    estimator: str = "theil-sen",
) -> int | None:
    """Index of the first point at which the smoothed slope has risen above ``threshold``
    (``patience`` kept points in a row), or None if it never does."""
    _check_lengths(compute, loss)
    rule = SlopeRule(threshold=threshold, window=window, ema=ema, patience=patience, spike_tol=spike_tol, estimator=estimator)
    for c, l in zip(compute, loss):
        if rule.update(c, l):
            return rule.fired_at
    return None


def should_grow(history, threshold: float, **kwargs) -> bool:
    """True if, on the (compute, loss) pairs seen so far, the rule has fired (at the last point
    or earlier).  kwargs: window, ema, patience, spike_tol, estimator."""
    pts = list(history)
    return find_crossing([p[0] for p in pts], [p[1] for p in pts], threshold, **kwargs) is not None
