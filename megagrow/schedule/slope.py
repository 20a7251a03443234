"""The practical "when to grow / when to stop" rule of Shen et al. (2022).

Watch the validation curve on log-log axes and act when it flattens: grow when the slope
d log10 L / d log10 C of the smoothed curve rises above a threshold (width -0.0475, depth
-0.0575), stop the final model at -0.052 (shared/reference/growth-operators.md).  The grown
model then continues at the big model's equivalent step S_small / c, c = 1.776 (width) or
1.412 (depth).

Smoothing (documented choice).  Everything happens in log space, x = log10 C, y = log10 L:

1. optionally an exponential moving average of y over the evaluation points,
   y_s[i] = ema * y_s[i-1] + (1 - ema) * y[i]   (``ema = 0``, the default, turns it off:
   EMA over points that are not evenly spaced in x bends a straight line slightly);
2. the slope at point i is the least-squares slope of y_s against x over the trailing window
   of the last ``window`` points (i - window + 1 .. i).

Only past points are used, so the same numbers come out online (``SlopeRule.update``) and
offline (``find_crossing``).  On an exact power law the fitted slope is exact at any spacing.
When the true slope changes at point i0 (a kink), every window ending at or before i0 sees
only the old slope, and every window starting at or after i0 sees only the new one: with the
EMA off, a rule whose threshold lies between the two slopes fires at an index in
[i0 + 1, i0 + window - 1], never earlier.  On a smooth curve the fit is the curve's slope
somewhere inside the window, so the rule fires at most ``window - 1`` points late.
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


def _ls_slope(xs, ys) -> float:
    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    xc = x - x.mean()
    den = float(np.dot(xc, xc))
    if den <= 0.0:
        return math.nan
    return float(np.dot(xc, y - y.mean()) / den)


@dataclass
class SlopeRule:
    """A stage stop rule: feed (compute, loss) points as they come; ``update`` returns True once
    the smoothed slope d log10 L / d log10 C has been above ``threshold`` for ``patience``
    consecutive points (and keeps returning True afterwards).

    window: points in the trailing least-squares fit (>= 2; no decision before that many);
    ema: EMA weight on log10 L in [0, 1) (0 = off); patience: consecutive points required."""

    threshold: float
    window: int = DEFAULT_WINDOW
    ema: float = 0.0
    patience: int = 1
    _x: deque = field(default=None, init=False, repr=False)  # type: ignore[assignment]
    _y: deque = field(default=None, init=False, repr=False)  # type: ignore[assignment]
    _ema_y: float | None = field(default=None, init=False, repr=False)
    _last_c: float | None = field(default=None, init=False, repr=False)
    _above: int = field(default=0, init=False, repr=False)
    count: int = field(default=0, init=False)
    slope: float | None = field(default=None, init=False)
    fired_at: int | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold)):
            raise UserError(f"slope threshold must be a finite number, got {self.threshold!r}")
        if int(self.window) != self.window or self.window < 2:
            raise UserError(f"slope window must be an integer >= 2, got {self.window!r}")
        if not (0.0 <= self.ema < 1.0):
            raise UserError(f"ema must be in [0, 1), got {self.ema!r}")
        if int(self.patience) != self.patience or self.patience < 1:
            raise UserError(f"patience must be an integer >= 1, got {self.patience!r}")
        self.window = int(self.window)
        self.reset()

    @classmethod
    def for_kind(cls, kind: str, **kwargs) -> "SlopeRule":
        """The paper's rule for "width", "depth" (grow) or "stop"."""
        return cls(threshold=threshold_for(kind), **kwargs)

    def reset(self) -> None:
        self._x, self._y = deque(maxlen=self.window), deque(maxlen=self.window)
        self._ema_y, self._last_c, self._above = None, None, 0
        self.count, self.slope, self.fired_at = 0, None, None

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
        y = math.log10(loss)
        self._ema_y = y if (self._ema_y is None or self.ema == 0.0) else self.ema * self._ema_y + (1 - self.ema) * y
        self._x.append(math.log10(compute))
        self._y.append(self._ema_y)
        index = self.count
        self.count += 1
        if len(self._x) < self.window:
            return self.fired
        self.slope = _ls_slope(self._x, self._y)
        self._above = self._above + 1 if self.slope > self.threshold else 0
        if self.fired_at is None and self._above >= self.patience:
            self.fired_at = index
        return self.fired


def smoothed_slopes(compute, loss, window: int = DEFAULT_WINDOW, ema: float = 0.0) -> np.ndarray:
    """The rule's slope at every point (NaN until ``window`` points have been seen)."""
    rule = SlopeRule(threshold=0.0, window=window, ema=ema)
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


def find_crossing(compute, loss, threshold: float, window: int = DEFAULT_WINDOW,
                  ema: float = 0.0, patience: int = 1) -> int | None:
    """Index of the first point at which the smoothed slope has risen above ``threshold``
    (``patience`` points in a row), or None if it never does."""
    _check_lengths(compute, loss)
    rule = SlopeRule(threshold=threshold, window=window, ema=ema, patience=patience)
    for c, l in zip(compute, loss):
        if rule.update(c, l):
            return rule.fired_at
    return None


def should_grow(history, threshold: float, **kwargs) -> bool:
    """True if, on the (compute, loss) pairs seen so far, the rule has fired (at the last point
    or earlier).  kwargs: window, ema, patience."""
    pts = list(history)
    return find_crossing([p[0] for p in pts], [p[1] for p in pts], threshold, **kwargs) is not None
