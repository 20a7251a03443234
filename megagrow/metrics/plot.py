"""`megagrow plot`: validation (and training) loss against training FLOPs, one or more runs.

    megagrow plot RUN [RUN ...] --out fig.png [--x flops|tokens] [--logx] [--no-train] [--title T]

Reads every RUN/<stage>/log.jsonl (stages in the order they ran: by the cumulative tokens of
their first record). Eval loss records are drawn as lines with markers, training loss thin
and faint in the same colour, one colour per run; dotted vertical lines mark where each later
stage of a staged run begins (labelled with the stage name), so a staged run and a from-scratch
baseline are seen on one ledger. matplotlib with the Agg backend: no display needed. The PNG is
written to a temporary name and renamed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from megagrow.errors import UserError, cli_entry
from megagrow.fsutil import read_records
from megagrow.paths import RunPaths


def read_run(run_dir: str) -> list[tuple[str, list[dict]]]:
    """[(stage name, records)] of a run directory, stages in training order."""
    if not os.path.isdir(run_dir):
        raise UserError(f"run directory not found: {run_dir}")
    stages = []
    for name in sorted(os.listdir(run_dir)):
        recs = read_records(RunPaths(run_dir).stage(name).log)
        if recs:
            stages.append((name, recs))
    if not stages:
        raise UserError(f"{run_dir} has no RUN/<stage>/log.jsonl with records (is it a megagrow run directory?)")

    def start(item):
        recs = item[1]
        return (min((r.get("tokens") or 0) for r in recs), min(r.get("time") or 0 for r in recs))

    return sorted(stages, key=start)


def _run_label(runs: list[str], labels: list[str] | None, i: int) -> str:
    """The legend name of runs[i]: labels[i] when given and non-empty, else the run directory's name."""
    return (labels[i] if labels and i < len(labels) else None) or os.path.basename(os.path.normpath(runs[i]))


def _run_points(run: str, stages: list[tuple[str, list[dict]]], x: str):
    """The points of one run against `x`: (train xs, train losses, eval xs, eval losses, stage starts as
    [(stage name, x where it begins)]). A record without `x` is refused."""
    tr_x, tr_y, ev_x, ev_y = [], [], [], []
    bounds = []
    for name, recs in stages:
        missing = [r for r in recs if r.get(x) is None]
        if missing:
            raise UserError(f"{run}/{name}/log.jsonl: records without {x!r} (written by an older megagrow?); plot against another --x")
        at0 = [r[x] for r in recs if r.get("step") == 0]  # a grown stage's step 0 (its growth evals)
        bounds.append((name, min(at0) if at0 else min(r[x] for r in recs)))
        for r in sorted(recs, key=lambda r: (r[x], r.get("step", 0))):
            if "eval_loss" in r:
                ev_x.append(r[x])
                ev_y.append(r["eval_loss"])
            elif "loss" in r:
                tr_x.append(r[x])
                tr_y.append(r["loss"])
    return tr_x, tr_y, ev_x, ev_y, bounds


def _draw_run(ax, c, label: str, tr_x, tr_y, ev_x, ev_y, bounds, train: bool) -> None:
    """One run on `ax` in colour c: faint training loss (when train), eval loss with markers, and a
    dotted, labelled vertical line where each later stage begins."""
    if train and tr_x:
        ax.plot(tr_x, tr_y, color=c, alpha=0.35, linewidth=1.0, label=f"{label} train")
    if ev_x:
        order = sorted(range(len(ev_x)), key=lambda j: ev_x[j])
        ax.plot(
            [ev_x[j] for j in order], [ev_y[j] for j in order], color=c, marker="o", markersize=3.5, linewidth=1.8, label=f"{label} eval"
        )
    if len(bounds) > 1:
        for name, bx in bounds[1:]:  # where each later stage begins
            ax.axvline(bx, color=c, linestyle=":", linewidth=1.0, alpha=0.8)
            ax.annotate(
                name,
                (bx, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(2, -12),
                textcoords="offset points",
                fontsize=8,
                color=c,
                rotation=90,
                va="top",
            )


def _save_figure(plt, fig, out: str) -> None:
    """Write the PNG to a temporary name in out's directory (which must exist) and rename it to `out`;
    the figure is closed in every case."""
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        plt.close(fig)
        raise UserError(f"output directory does not exist: {out_dir}")
    tmp = f"{out}.tmp{os.getpid()}.png"
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def plot_runs(
    runs: list[str],
    out: str,
    x: str = "flops",
    logx: bool = False,
    train: bool = True,
    title: str | None = None,
    labels: list[str] | None = None,
) -> dict:
    """Draw the runs' loss against `x` (flops or tokens) and write the PNG `out`; returns the summary
    {"out", "runs": [{"run", "stages", "eval_points", "train_points"}]}. Nothing to draw is an error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    summary = {"out": out, "runs": []}
    for i, run in enumerate(runs):
        stages = read_run(run)
        tr_x, tr_y, ev_x, ev_y, bounds = _run_points(run, stages, x)
        _draw_run(ax, colors[i % len(colors)], _run_label(runs, labels, i), tr_x, tr_y, ev_x, ev_y, bounds, train)
        summary["runs"].append({"run": run, "stages": [n for n, _ in stages], "eval_points": len(ev_x), "train_points": len(tr_x)})
    if not any(r["eval_points"] or (train and r["train_points"]) for r in summary["runs"]):
        plt.close(fig)
        raise UserError("nothing to plot: no loss or eval_loss records")
    ax.set_xlabel(
        {
            "flops": "training FLOPs (6N + 12LAs per token, cumulative over stages)",
            "tokens": "training tokens (cumulative over stages)",
        }.get(x, x)
    )
    ax.set_ylabel("loss (nats/token)")
    if logx:
        ax.set_xscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or ("loss vs compute: " + ", ".join(_run_label(runs, labels, i) for i in range(len(runs)))))
    fig.tight_layout()
    _save_figure(plt, fig, out)
    return summary


@cli_entry
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="megagrow plot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (of megagrow run / train)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--x", choices=("flops", "tokens"), default="flops", help="x axis (default flops)")
    p.add_argument("--logx", action="store_true", help="logarithmic x axis")
    p.add_argument("--no-train", action="store_true", help="eval loss only")
    p.add_argument("--title")
    p.add_argument("--label", action="append", help="legend name of each RUN, in order (default: directory names)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    args = p.parse_args(argv)
    res = plot_runs(args.runs, args.out, args.x, args.logx, not args.no_train, args.title, args.label)
    print(json.dumps(res) if args.json else f"wrote {args.out} ({', '.join(r['run'] for r in res['runs'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
