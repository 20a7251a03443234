"""Compute saved by staged training against from-scratch baselines, read off run logs.

Inputs are run directories as `megagrow run` leaves them: RUN/<stage>/log.jsonl per stage, with
training records ({"stage", "step", "loss", "tokens", "flops", ...}: `tokens` and `flops`
cumulative over the whole run, earlier stages included, on the one FLOP ledger) and eval
records ({"stage", "step", "eval_loss", "tokens", "flops", "at", "time"}: validation loss on
the held-out split, periodic, at a stage end, and right before / after a growth).

Definitions (what the report's columns mean):

* a run's FLOPs: the ledger's cumulative FLOPs at its last training record; its final loss:
  the validation loss of its last eval record (the last stage's end);
* the strongest baseline curve (the headline reading): the lower envelope of EVERY validation
  point of every from-scratch run of the final size (mid-run and final, every budget and LR of
  the same seed): the best loss any from-scratch run reached with at most C FLOPs, piecewise
  linear in (log10 C, loss) between the kept points;
* the decayed-only curve (the second reading): the same envelope over the final points only,
  each from a run whose LR schedule decays fully within its budget;
* FLOPs to reach loss L: the baseline curve inverted, by interpolation only: None ("not
  reached") when L is below the best baseline loss or above the cheapest one's;
* saving: 1 - C_run / C_baseline(L_run) (positive: the run reached its loss with fewer FLOPs);
* loss at equal FLOPs: the baseline curve's loss at C_run (None outside its FLOP range), and
  the run's final loss minus it (negative: the run is better at equal FLOPs).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from megagrow.errors import UserError
from megagrow.paths import StagePaths

EVAL_KEY = "eval_loss"


# ----------------------------------------------------------------------------- reading logs
@dataclass
class Curve:
    """One run: its eval points in FLOP order and its ledger totals."""

    name: str
    eval_flops: list = field(default_factory=list)
    eval_loss: list = field(default_factory=list)
    eval_stage: list = field(default_factory=list)
    eval_step: list = field(default_factory=list)
    eval_at: list = field(default_factory=list)
    train_flops: list = field(default_factory=list)
    train_loss: list = field(default_factory=list)
    flops: float | None = None  # cumulative FLOPs at the last training record
    tokens: float | None = None
    stage_ends: list = field(default_factory=list)  # (stage name, FLOPs at its last training record)

    @property
    def final_loss(self) -> float | None:
        return self.eval_loss[-1] if self.eval_loss else None


def _records(path: str) -> list[dict]:
    from megagrow.fsutil import read_records

    return read_records(path)


def read_curve(run_dir: str, stage_names: list[str], name: str | None = None, extra_per_token: list[float] | None = None) -> Curve:
    """The eval and training points of a run's stages, in stage order. An eval record repeated
    at the same FLOPs (a stage-end eval after a periodic one at the same step; the eval after a
    growth, equal to the one before it for an exact operator) is kept once, the last one.

    extra_per_token: FLOPs per token outside the ledger, one number per stage (the logit GEMM):
    each record's FLOPs then also count them for every token trained so far, each stage at its
    own rate (tokens are cumulative over the run; a stage starts where the previous one ended)."""
    c = Curve(name or os.path.basename(os.path.normpath(run_dir)))
    start_tokens, extra_base = 0.0, 0.0

    def flops_of(r: dict, i: int) -> float:
        if not extra_per_token:
            return float(r["flops"])
        if r.get("tokens") is None:
            raise UserError(f"{run_dir}/{stage_names[i]}/log.jsonl: record without 'tokens' (needed to add the logit FLOPs)")
        return float(r["flops"]) + extra_base + (float(r["tokens"]) - start_tokens) * extra_per_token[i]

    for i, s in enumerate(stage_names):
        recs = _records(StagePaths(os.path.join(run_dir, s)).log)
        last_train = None
        for r in recs:
            if EVAL_KEY in r:
                if r.get("flops") is None:
                    raise UserError(f"{run_dir}/{s}/log.jsonl: eval record without 'flops' (a log from before the FLOP ledger)")
                fl, lo = flops_of(r, i), float(r[EVAL_KEY])
                if c.eval_flops and fl <= c.eval_flops[-1]:
                    if fl == c.eval_flops[-1]:  # same point evaluated twice: keep the later record
                        c.eval_loss[-1], c.eval_stage[-1], c.eval_step[-1], c.eval_at[-1] = lo, s, r.get("step"), r.get("at")
                    continue
                c.eval_flops.append(fl)
                c.eval_loss.append(lo)
                c.eval_stage.append(s)
                c.eval_step.append(r.get("step"))
                c.eval_at.append(r.get("at"))
            elif "loss" in r and r.get("flops") is not None:
                c.train_flops.append(flops_of(r, i))
                c.train_loss.append(float(r["loss"]))
                last_train = r
        if last_train is not None:
            c.flops = flops_of(last_train, i)
            c.tokens = float(last_train.get("tokens", math.nan))
            c.stage_ends.append((s, c.flops))
        if extra_per_token and recs:
            end = max([float(r["tokens"]) for r in recs if r.get("tokens") is not None] or [start_tokens])
            extra_base += (end - start_tokens) * extra_per_token[i]
            start_tokens = end
    return c


# ----------------------------------------------------------------------------- the baseline curve
def _interp(x: float, xs: list[float], ys: list[float]) -> float | None:
    """Linear interpolation of y at x on increasing xs; None outside [xs[0], xs[-1]]."""
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    for i in range(1, len(xs)):
        if x <= xs[i]:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            if x1 == x0:
                return y1
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


@dataclass(frozen=True)
class Frontier:
    """Best final validation loss vs FLOPs over fully-decayed from-scratch budgets.

    points: (flops, loss) per budget. The curve is their lower envelope: sorted by FLOPs, a
    budget whose loss is not below every cheaper budget's adds nothing (a bigger budget
    cannot be needed to reach a loss a smaller one reached). Interpolation is linear in
    (log10 FLOPs, loss) between kept points; nothing is extrapolated."""

    points: tuple

    @classmethod
    def of(cls, points) -> Frontier:
        pts = sorted((float(c), float(l)) for c, l in points if c is not None and l is not None)
        for c, l in pts:
            if not (math.isfinite(c) and c > 0 and math.isfinite(l)):
                raise UserError(f"baseline point must have positive FLOPs and a finite loss, got ({c}, {l})")
        kept: list = []
        for c, l in pts:
            if not kept or l < kept[-1][1]:
                kept.append((c, l))
        return cls(tuple(kept))

    @property
    def usable(self) -> bool:
        return len(self.points) >= 2

    def loss_at(self, flops: float) -> float | None:
        """The baseline curve's loss at `flops` (None outside its FLOP range)."""
        if not self.points or not flops > 0:
            return None
        xs = [math.log10(c) for c, _ in self.points]
        return _interp(math.log10(flops), xs, [l for _, l in self.points])

    def flops_to(self, loss: float) -> float | None:
        """FLOPs the baseline curve needs to reach `loss` (None: not reached without extrapolating)."""
        if not self.points:
            return None
        ls = [l for _, l in self.points][::-1]  # increasing
        xs = [math.log10(c) for c, _ in self.points][::-1]
        x = _interp(loss, ls, xs)
        return None if x is None else 10.0**x


def saving(flops: float, baseline_flops: float | None) -> float | None:
    """1 - C_run / C_baseline: the fraction of the baseline's FLOPs the run did not need."""
    if baseline_flops is None or not baseline_flops > 0:
        return None
    return 1.0 - flops / baseline_flops


@dataclass(frozen=True)
class Row:
    name: str
    kind: str
    flops: float | None
    final_loss: float | None
    baseline_flops_to_loss: float | None
    saving: float | None
    baseline_loss_at_flops: float | None
    delta_loss: float | None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def compare(name: str, kind: str, flops: float | None, final_loss: float | None, frontier: Frontier) -> Row:
    """A run's row against the baseline curve (see the module docstring)."""
    if flops is None or final_loss is None:
        return Row(name, kind, flops, final_loss, None, None, None, None)
    need = frontier.flops_to(final_loss)
    at = frontier.loss_at(flops)
    return Row(name, kind, flops, final_loss, need, saving(flops, need), at, None if at is None else final_loss - at)


def mean_ci(values, level: float = 0.95) -> dict:
    """Mean and a `level` confidence interval of the mean (Student t, n - 1 degrees of freedom)
    over independent values, e.g. one saving per seed, each read against its own seed's
    baselines (paired by seed). n = 1: the value, no interval. None values are left out."""
    from scipy import stats

    xs = [float(v) for v in values if v is not None]
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": None, "lo": None, "hi": None, "sd": None}
    mean = sum(xs) / n
    if n == 1:
        return {"n": 1, "mean": mean, "lo": None, "hi": None, "sd": None}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "lo": mean - half, "hi": mean + half, "sd": sd}


# ----------------------------------------------------------------------------- where to switch
def oracle_switch(small_flops, small_loss, big_flops, big_loss, target_loss: float) -> dict | None:
    """The best switch point in hindsight, the paper's oracle analysis: growing at the small
    model's eval point i and then following the big model's from-scratch curve from the point
    where it has the same loss costs C_small(i) + C_big(target) - C_big(L_i); the oracle is the
    i that minimises it. C_big(L) is read off the big curve by interpolation (its running
    minimum, so it is monotone); points whose loss the big curve does not cover are skipped.
    Returns {"index", "flops", "loss", "total", "at_end"} (at_end: the minimum is the last
    usable point, so the true oracle may lie later) or None."""
    env_l, env_c = [], []
    for c, l in zip(big_flops, big_loss):
        if not env_l or l < env_l[-1]:
            env_l.append(l)
            env_c.append(math.log10(c))
    ls, xs = env_l[::-1], env_c[::-1]

    def big_c(loss):
        x = _interp(loss, ls, xs)
        return None if x is None else 10.0**x

    end = big_c(target_loss)
    if end is None:
        return None
    best, usable = None, []
    for i, (c, l) in enumerate(zip(small_flops, small_loss)):
        cb = big_c(l)
        if cb is None or l < target_loss:
            continue
        total = c + end - cb
        usable.append(i)
        if best is None or total < best["total"]:
            best = {"index": i, "flops": c, "loss": l, "total": total}
    if best is None:
        return None
    best["at_end"] = best["index"] == usable[-1]
    return best
