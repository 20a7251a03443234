"""The savings report's plot (savings.png): validation loss vs FLOPs of every run, the first seed's
baseline curves in black, one panel whole and one zoomed on the end of the runs."""

from __future__ import annotations

import os

from megagrow.results.states import plan_path, run_dir

CHAIN_COLORS = {"width": "tab:blue", "depth": "tab:orange", "both": "tab:green"}

# ablation knob -> its line colour (a knob not named here is drawn in black)
ABLATION_COLORS = {
    "lrrestart": "tab:pink",
    "sym4": "tab:olive",
    "early": "tab:purple",
    "fresh": "tab:cyan",
    "freshrestart": "tab:red",
    "lrhalf": "tab:brown",
    "freshlrhalf": "tab:gray",
    "lr2restart": "gold",
    "lrfinal": "darkgreen",
}


def _curve(r: dict, out: str):
    """The run's curve read off OUT (None where it has not started or has no eval point yet)."""
    import yaml

    from megagrow.results.savings import read_curve

    name = r["name"]
    p = plan_path(out, name)
    if not r["started"] or not os.path.isfile(p):
        return None
    with open(p) as f:
        plan = yaml.safe_load(f)
    c = read_curve(run_dir(out, name), [s["name"] for s in plan["stages"]], name)
    return c if c.eval_flops else None


def _style(r: dict) -> dict | None:
    """The line style of a run by its kind, chain and seed; None for the first-stage sizes' sweeps
    (their curves are in the LR table)."""
    name, kind = r["name"], r["kind"]
    chain_kind = next((k for k in CHAIN_COLORS if f"-{k}" in name), None)
    style = dict(lw=1.2, alpha=0.9)
    first_seed = r.get("seed_index", 0) == 0
    if kind == "small-sweep":
        return None
    if kind in ("sweep", "baseline"):
        style.update(color="0.55" if first_seed else "0.8", lw=0.9, ls="-" if first_seed else ":")
    elif kind == "staged":
        style.update(color=CHAIN_COLORS.get(chain_kind, "k"), lw=1.8 if first_seed else 0.9, alpha=1.0 if first_seed else 0.5)
    elif kind == "slope":
        style.update(color=CHAIN_COLORS.get(chain_kind, "k"), ls="--", lw=1.5)
    elif kind == "ablation":
        knob = r["info"].get("knob")
        style.update(lw=1.0, ls="-.", color=ABLATION_COLORS.get(knob, "k"), alpha=1.0 if first_seed else 0.5)
    else:
        style.update(color="k", ls=":", lw=1.5)
    return style


def _lines(res: dict, out: str) -> list[tuple]:
    """(label, curve, style) of every run drawn, in the report's run order."""
    lines = []
    for r in res["rows"]:
        c = _curve(r, out)
        if c is None:
            continue
        style = _style(r)
        if style is None:
            continue
        lines.append((r["name"] + ("" if r["done"] else " (incomplete)"), c, style))
    return lines


def _draw_run(ax, label: str, c, style: dict) -> None:
    """One run's curve, a dot at each of its growths."""
    ax.plot(c.eval_flops, c.eval_loss, label=label, **style)
    for _, fl in c.stage_ends[:-1]:  # growth points
        i = min(range(len(c.eval_flops)), key=lambda j: abs(c.eval_flops[j] - fl))
        ax.plot([c.eval_flops[i]], [c.eval_loss[i]], marker="o", ms=4, color=style.get("color", "k"))


def _draw_panel(ax, res: dict, lines: list[tuple], zoom: bool) -> None:
    """One panel: every run, the first seed's two baseline curves, axes and title (`zoom`: the
    end of the runs, around the decayed-only curve)."""
    for label, c, style in lines:
        _draw_run(ax, label, c, style)
    front = res["frontiers"].get("0/strongest") or []
    decayed = res["frontiers"].get("0/decayed") or []
    if front:
        xs, ys = zip(*front)
        ax.plot(xs, ys, "k-", lw=2.2, label="strongest from-scratch curve (first seed)", zorder=5)
    if decayed:
        xs, ys = zip(*decayed)
        ax.plot(xs, ys, "k--", marker="s", lw=1.2, ms=5, label="decayed-only curve (first seed)", zorder=5)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (ledger)")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3, which="both")
    if zoom and decayed:
        xs, ys = zip(*decayed)
        ax.set_xlim(min(xs) * 0.5, max(xs) * 1.3)
        finals = [r["final_loss"] for r in res["rows"] if r["done"] and r["final_loss"] is not None]
        ax.set_ylim(min(finals + list(ys)) - 0.05, max(ys) + 0.3)
        ax.set_title("zoom: the end of the runs")
    else:
        ax.set_title("validation loss vs FLOPs (o: growth)")


def plot(res: dict, out: str, png: str) -> None:
    """savings.png from the report's numbers (`report.build`) and the curves in OUT, written
    atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = _lines(res, out)
    fig, axes = plt.subplots(1, 2, figsize=(15, 6))
    for ax, zoom in zip(axes, (False, True)):
        _draw_panel(ax, res, lines, zoom)
    axes[0].legend(fontsize=6, ncol=2, loc="upper right")
    fig.tight_layout()
    tmp = png + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)
