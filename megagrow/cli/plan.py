"""``megagrow plan``: stage plans from the scaling law, the paper's predicted savings, and the
slope rule on a measured validation curve.

    megagrow plan --target-loss 3.2 --sizes 12x384,12x768      a staged plan vs single models
    megagrow plan --sizes 6x768,12x768 --budget-steps 50000     target = large model at a budget
    megagrow plan --paper                                       the paper's four pairs
    megagrow plan --slope curve.csv --kind width                where the slope rule grows
    megagrow plan --calibrate RUN1 RUN2 ... [--sizes ...]       fit the law to from-scratch runs,
                                                                plan with it, print the thresholds
    ... --json                                                  the same as JSON on stdout

Sizes are non-embedding parameter counts (85e6) or LAYERSxD_MODEL (12x768 = 12*12*768^2).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys

from megagrow.errors import UserError, cli_entry
from megagrow.schedule import law as scaling_law
from megagrow.schedule import planner, slope

CALIBRATE_HELP = (
    "fit N_c, alpha_N, S_c, alpha_S to these from-scratch run directories' eval curves and plan with "
    "the fitted law (with --sizes or --paper; alone: the runs' sizes as the chain); prints the fit and, "
    "per growth, the switch loss, the small model's step and the calibrated slope threshold"
)


class _Parser(argparse.ArgumentParser):
    """argparse that reports mistakes as a UserError (one line, exit 2) instead of usage+exit."""

    def error(self, message: str):  # noqa: D401
        raise UserError(message)


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="megagrow plan",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--sizes", help="growth chain, comma separated, increasing: 85e6,340e6 or 12x384,12x768")
    mode.add_argument("--paper", action="store_true", help="predicted savings for the paper's four GPT-2 pairs")
    mode.add_argument("--slope", metavar="CSV", help="validation curve: columns compute,loss (or step,loss)")
    p.add_argument("--calibrate", nargs="+", metavar="RUN_DIR", help=CALIBRATE_HELP)
    p.add_argument(
        "--min-step",
        type=float,
        help="--calibrate: drop eval points before this step (default: per run, the larger of "
        "its warmup_steps and 20%% of its last eval step)",
    )
    p.add_argument("--law", default="kaplan", help="scaling law (kaplan; with --calibrate: the base whose B* and alpha_B are kept)")
    p.add_argument(
        "--batch",
        default="integrated",
        help="token accounting: integrated (critical batch of the current loss, default) "
        "or target (constant critical batch of the target loss)",
    )
    p.add_argument("--target-loss", type=float, help="loss the last stage must reach")
    p.add_argument(
        "--budget-steps", type=float, help="instead of --target-loss: the loss the final size reaches from scratch in this many steps"
    )
    p.add_argument(
        "--batch-tokens", type=float, default=512 * 1024, help="tokens per step for --budget-steps (default 524288, the paper's 512 x 1024)"
    )
    p.add_argument(
        "--paper-target",
        default="stop-slope",
        help="target loss for --paper: stop-slope (default: where the large model's curve "
        "flattens to -0.052), optimal (where it is the compute-optimal size), or a number",
    )
    p.add_argument("--method", default="exact", help="planner: exact (default) or slsqp (reference formulation)")
    p.add_argument("--units", default="pf-days", help="compute units in the table: pf-days (default) or flops")
    p.add_argument("--threshold", type=float, help="--slope: grow when d log10 L / d log10 C rises above this")
    p.add_argument("--kind", help="--slope: use the paper's threshold for width (-0.0475), depth (-0.0575) or stop (-0.052)")
    p.add_argument("--window", type=int, default=slope.DEFAULT_WINDOW, help="--slope: points in the trailing fit")
    p.add_argument("--ema", type=float, default=0.0, help="--slope: EMA weight on log10 loss (0 = off)")
    p.add_argument("--patience", type=int, default=1, help="--slope: consecutive points above the threshold")
    p.add_argument(
        "--spike-tol",
        type=float,
        default=slope.DEFAULT_SPIKE_TOL,
        help="--slope: drop points more than this fraction above the running minimum (default 0.01; a negative value turns the filter off)",
    )
    p.add_argument(
        "--estimator",
        default="theil-sen",
        choices=slope.ESTIMATORS,
        help="--slope: slope of the window by the Theil-Sen median (default) or least squares",
    )
    p.add_argument("--json", action="store_true", help="print JSON on stdout")
    return p


def _finite(x):
    """JSON has no inf/nan: map them to None."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _fmt_n(n: float) -> str:
    for div, suf in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.4g}{suf}"
    return f"{n:.4g}"


def _fmt_c(flops: float, units: str) -> str:
    return f"{flops:.4e}" if units == "flops" else f"{flops / scaling_law.PF_DAY_FLOPS:.5g}"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


# ----------------------------------------------------------------------------- modes
def _sizes(args) -> list[float]:
    sizes = [scaling_law.parse_size(s) for s in args.sizes.split(",") if s.strip()]
    if not sizes:
        raise UserError("--sizes is empty")
    return sizes


def _plan(args, law, sizes: list[float]) -> dict:
    if args.target_loss is not None and args.budget_steps is not None:
        raise UserError("give either --target-loss or --budget-steps, not both")
    if args.target_loss is not None:
        target, how = args.target_loss, "given"
    elif args.budget_steps is not None:
        target = scaling_law.loss_at_budget(sizes[-1], args.budget_steps, args.batch_tokens, law)
        how = f"final size from scratch after {args.budget_steps:g} steps of {args.batch_tokens:g} tokens"
    else:
        target = planner.paper_target_loss(sizes[-1], law)
        how = f"final size's curve flattens to slope {slope.STOP_SLOPE}"
    plan = planner.plan_stages(sizes, target, law, method=args.method)
    out = plan.to_dict()
    out["target_from"] = how
    return out


def _print_plan(d: dict, units: str) -> None:
    u = "FLOPs" if units == "flops" else "PF-days"
    print(f"law: {d['law']['name']} (batch accounting: {d['law']['batch']}), method: {d['method']}")
    print(f"target loss: {d['target_loss']:.6g} ({d['target_from']})")
    rows = [["stage", "N", "start step", "steps", "tokens", u, "end loss", "grow slope", "c"]]
    for s in d["stages"]:
        rows.append(
            [
                str(s["index"]),
                _fmt_n(s["N"]),
                f"{s['start_step']:.4g}",
                f"{s['steps']:.4g}",
                f"{s['tokens']:.4e}",
                _fmt_c(s["compute"], units),
                f"{s['end_loss']:.6g}",
                "-" if s["slope_at_growth"] is None else f"{s['slope_at_growth']:.4f}",
                "-" if s["step_divisor"] is None else f"{s['step_divisor']:.4f}",
            ]
        )
    print(_table(rows))
    single, best = d["single"], d["best_single"]
    print(f"staged total: {_fmt_c(d['total_compute'], units)} {u}")
    print(
        f"single model of the final size ({_fmt_n(single['N'])}, {single['steps']:.4g} steps): "
        f"{_fmt_c(single['compute'], units)} {u}; saving {100 * d['saving']:.2f}%"
    )
    print(
        f"compute-optimal single size for this loss ({_fmt_n(best['N'])}): "
        f"{_fmt_c(best['compute'], units)} {u}; saving vs it {100 * d['saving_vs_best_single']:.2f}%"
    )


def curves_from_runs(run_dirs, min_step: float | None = None) -> list[tuple]:
    """(N, steps, eval losses) of each from-scratch run directory ``megagrow run`` wrote (N a
    float, steps and losses numpy arrays), for megagrow.schedule.calibrate.fit_law.

    The run's plan comes from RUN/manifest.json, its eval records (periodic and stage end:
    mid-run points included) from RUN/<stage>/log.jsonl through the savings report's reader
    (megagrow.results.savings.read_curve); steps are counted over the whole run from the FLOP
    ledger (cumulative FLOPs / FLOPs per step at the run's one batch).  The checks (from
    scratch, one batch, eval points present) and the warm-up cut ``min_step`` (None: the larger
    of the warmup and 20% of the run) are megagrow.schedule.calibrate.curve_of_run's.  Every
    problem is a one-line UserError naming the run."""
    import os

    from megagrow.config import Plan
    from megagrow.controller.progress import read_manifest
    from megagrow.metrics.flops import Ledger
    from megagrow.paths import MANIFEST, RunPaths
    from megagrow.results.savings import read_curve
    from megagrow.schedule import calibrate

    out = []
    for run in run_dirs:
        if not os.path.isdir(run):
            raise UserError(f"{run}: no such run directory")
        m = read_manifest(run)
        if m is None:
            raise UserError(f"{run}: no {MANIFEST} (not a directory written by `megagrow run`)")
        plan = Plan.from_dict(m["plan"], f"{RunPaths(run).manifest} plan")
        c = read_curve(run, [st.name for st in plan.stages])
        per_step = Ledger.of(plan.stages[0]).flops_per_step
        steps = [round(f / per_step) for f in c.eval_flops]
        out.append(calibrate.curve_of_run(run, plan, steps, c.eval_loss, min_step))
    return out


def _calibrate(args, base):
    """The law fitted to the --calibrate runs, and the fit's report (with the runs' paths)."""
    from megagrow.schedule import calibrate

    curves = curves_from_runs(args.calibrate, min_step=args.min_step)
    law, info = calibrate.fit_law(curves, base=base)
    info["runs"] = [
        {"dir": d, "N": n, "points": len(st), "steps": [float(st[0]), float(st[-1])]} for d, (n, st, _) in zip(args.calibrate, curves)
    ]
    info["min_step"] = args.min_step
    info["base_law"] = base.name
    return law, info


def _switches(args, law, sizes: list[float], target: float, info: dict) -> dict:
    """The calibrated plan's growth boundaries; "extrapolated": the small model's switch step lies
    outside the steps the law was fitted on."""
    from megagrow.schedule import calibrate

    lo, hi = info["steps"]
    sw = calibrate.calibrated_switches(law, sizes, target, method=args.method)
    for s in sw:
        s["extrapolated"] = not lo <= s["small_step"] <= hi
    return {"switches": sw, "target_slope": calibrate.fixed_batch_slope(law, sizes[-1], target)}


def _print_calibration(info: dict) -> None:
    c, e = info["constants"], info["stderr_rel"]
    sizes = info["sizes"]
    print(
        f"law calibrated on {len(info['runs'])} run(s): {len(sizes)} sizes {_fmt_n(sizes[0])}..{_fmt_n(sizes[-1])}, "
        f"{info['n_points']} eval points, steps {info['steps'][0]:.4g}..{info['steps'][1]:.4g}; "
        f"rmse {info['rmse']:.4g} nats ({100 * info['rmse_rel']:.3g}%)"
    )

    def pm(k):
        return "" if e.get(k) is None else f" (+-{100 * e[k]:.2g}%)"

    print(
        f"  fitted: N_c {c['N_c']:.4g}{pm('N_c')}, alpha_N {c['alpha_N']:.4g}{pm('alpha_N')}, "
        f"S_c {c['S_c']:.4g}{pm('S_c')}, alpha_S {c['alpha_S']:.4g}{pm('alpha_S')}  (steps at the runs' batch)"
    )
    k = info["kept"]
    print(
        f"  kept from {info['base_law']}: B* {k['B_star']:.4g}, alpha_B {k['alpha_B']:.4g} "
        f"(a fixed-batch run does not determine the critical batch)"
    )
    for w in info["warnings"]:
        print(f"  warning: {w}")


def _print_switches(d: dict) -> None:
    print(
        "growth boundaries under the calibrated law; threshold = d log10 L / d log10 C of the small model's "
        "curve at its fixed batch (what the trainer's slope rule measures):"
    )
    rows = [["from", "to", "switch loss", "small step", "grown start", "c", "threshold", f"law slope ({d['law']['batch']})", "paper"]]
    for s in d["switches"]:
        star = "*" if s["extrapolated"] else ""
        rows.append(
            [
                _fmt_n(s["from_N"]),
                _fmt_n(s["to_N"]),
                f"{s['switch_loss']:.6g}",
                f"{s['small_step']:.5g}{star}",
                f"{s['big_start_step']:.5g}",
                f"{s['step_divisor']:.4f}",
                f"{s['threshold']:.4f}",
                f"{s['plan_slope']:.4f}",
                f"{s['paper_threshold']} ({s['paper_kind']})",
            ]
        )
    if len(rows) > 1:
        print(_table(rows))
        if any(s["extrapolated"] for s in d["switches"]):
            lo, hi = d["calibration"]["steps"]
            print(f"  * outside the steps the law was fitted on ({lo:.4g}..{hi:.4g}): extrapolated")
    else:
        print("  none: the plan trains the final size only")
    print(f"the final size reaches the target loss at slope {d['target_slope']:.4f} (same definition)")


def _paper(args, law) -> dict:
    t = args.paper_target
    if t not in ("stop-slope", "optimal"):
        try:
            t = float(t)
        except ValueError:
            raise UserError(f"--paper-target must be stop-slope, optimal or a loss, got {t!r}") from None
    rows = planner.paper_predictions(law, t)
    law_d = {"name": law.name, "batch": law.batch}
    if law.name != "kaplan":
        law_d.update({k: getattr(law, k) for k in ("N_c", "alpha_N", "S_c", "alpha_S", "B_star", "alpha_B")})
    return {"law": law_d, "target": args.paper_target, "pairs": rows}


def _print_paper(d: dict) -> None:
    print(f"law: {d['law']['name']} (batch accounting: {d['law']['batch']}), target: {d['target']}")
    rows = [["pair", "small", "large", "target loss", "switch loss", "grow slope", "c", "predicted", "paper"]]
    for r in d["pairs"]:
        rows.append(
            [
                r["pair"],
                r["small"],
                r["large"],
                f"{r['target_loss']:.5g}",
                "-" if r["switch_loss"] is None else f"{r['switch_loss']:.5g}",
                "-" if r["slope_at_growth"] is None else f"{r['slope_at_growth']:.4f}",
                "-" if r["step_divisor"] is None else f"{r['step_divisor']:.4f}",
                f"{100 * r['predicted_saving']:.1f}%",
                f"{100 * r['measured_saving']:.1f}%",
            ]
        )
    print(_table(rows))


def _read_curve(path: str) -> tuple[list[float], list[float], list[float] | None, str]:
    """(compute, loss, steps or None, which column was used as compute)."""
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if not rows:
        raise UserError(f"{path}: empty file")

    def num(s):
        try:
            return float(s)
        except ValueError:
            return None

    header = [c.strip().lower() for c in rows[0]]
    if all(num(c) is not None for c in header):
        ci, li, si, body, used = 0, 1, None, rows, "column 1"
        if len(header) < 2:
            raise UserError(f"{path}: need two columns, compute and loss")
    else:
        body = rows[1:]

        def col(*names):
            for n in names:
                if n in header:
                    return header.index(n)
            return None

        li = col("loss", "val_loss", "value")
        ci = col("compute", "flops", "c")
        si = col("step", "steps")
        if li is None or (ci is None and si is None):
            raise UserError(f"{path}: need a loss column (loss/val_loss/value) and a compute or step column")
        used = "compute" if ci is not None else "step (slope is the same: compute is proportional to it)"
        ci = ci if ci is not None else si
    comp, loss, steps = [], [], ([] if si is not None else None)
    for n, r in enumerate(body, start=2 if body is not rows else 1):
        try:
            comp.append(float(r[ci]))
            loss.append(float(r[li]))
            if steps is not None:
                steps.append(float(r[si]))
        except (ValueError, IndexError):
            raise UserError(f"{path}:{n}: not a number row: {','.join(r)}") from None
    if len(comp) < 2:
        raise UserError(f"{path}: need at least 2 points")
    return comp, loss, steps, used


def _slope(args) -> dict:
    if (args.threshold is None) == (args.kind is None):
        raise UserError("--slope needs exactly one of --threshold or --kind")
    thr = args.threshold if args.threshold is not None else slope.threshold_for(args.kind)
    comp, loss, steps, used = _read_curve(args.slope)
    tol = None if args.spike_tol < 0 else args.spike_tol
    opts = dict(window=args.window, ema=args.ema, spike_tol=tol, estimator=args.estimator)
    slopes = slope.smoothed_slopes(comp, loss, **opts)
    idx = slope.find_crossing(comp, loss, thr, patience=args.patience, **opts)
    out = {
        "file": args.slope,
        "compute_column": used,
        "threshold": thr,
        "kind": args.kind,
        "window": args.window,
        "ema": args.ema,
        "patience": args.patience,
        "spike_tol": tol,
        "estimator": args.estimator,
        "points": len(comp),
        "last_slope": None if math.isnan(slopes[-1]) else float(slopes[-1]),
        "crossing": None,
    }
    if idx is not None:
        cross = {"index": idx, "compute": comp[idx], "loss": loss[idx], "slope": float(slopes[idx])}
        if steps is not None:
            cross["step"] = steps[idx]
            if args.kind in slope.STEP_DIVISORS:
                cross["grown_step"] = slope.grown_step(steps[idx], args.kind)
        out["crossing"] = cross
    return out


def _print_slope(d: dict) -> None:
    print(
        f"{d['file']}: {d['points']} points, compute from {d['compute_column']}; "
        f"threshold {d['threshold']}, window {d['window']}, ema {d['ema']}, patience {d['patience']}, "
        f"spike filter {d['spike_tol']}, {d['estimator']}"
    )
    c = d["crossing"]
    if c is None:
        last = "n/a" if d["last_slope"] is None else f"{d['last_slope']:.4f}"
        print(f"no crossing: the slope stays below the threshold (last smoothed slope {last})")
        return
    line = f"grow at point {c['index']}: compute {c['compute']:.6g}, loss {c['loss']:.6g}, slope {c['slope']:.4f}"
    if "step" in c:
        line += f", step {c['step']:.6g}"
    if "grown_step" in c:
        line += f"; the grown model continues at step {c['grown_step']:.6g} (S / c)"
    print(line)


@cli_entry
def main(argv=None) -> int:
    args = _build_parser().parse_args(argv)
    if not (args.sizes or args.paper or args.slope or args.calibrate):
        raise UserError("nothing to do: give --sizes (with --target-loss), --paper, --slope CSV or --calibrate RUN_DIR ...")
    if args.slope and args.calibrate:
        raise UserError("--calibrate plans with the fitted law: use it with --sizes or --paper, not --slope")
    if args.min_step is not None and not args.calibrate:
        raise UserError("--min-step applies to --calibrate only")
    units = args.units.lower().replace("_", "-")
    if units not in ("pf-days", "flops"):
        raise UserError(f"unknown --units {args.units!r} (pf-days, flops)")
    if args.slope:
        out = _slope(args)
        printer = _print_slope
    else:
        law = scaling_law.get_law(args.law, batch=args.batch)
        info = None
        if args.calibrate:
            law, info = _calibrate(args, law)
        if args.paper:
            out, printer = _paper(args, law), _print_paper
        else:
            sizes = _sizes(args) if args.sizes else info["sizes"]
            out = _plan(args, law, sizes)
            printer = lambda d: _print_plan(d, units)  # noqa: E731
            if info is not None:
                out.update(_switches(args, law, sizes, out["target_loss"], info))
                printer = lambda d: (_print_plan(d, units), _print_switches(d))  # noqa: E731
        if info is not None:
            out["calibration"] = info
            inner = printer
            printer = lambda d: (_print_calibration(d["calibration"]), inner(d))  # noqa: E731
    if args.json:
        json.dump(_finite(out), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        printer(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
