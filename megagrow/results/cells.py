"""The savings report's cells as text: numbers, percentages, mean [95% interval] readings and
markdown tables (megagrow.results.render writes the report with them)."""

from __future__ import annotations


def fmt_e(x: float | None) -> str:
    return "-" if x is None else f"{x:.3e}"


def fmt_f(x: float | None, nd: int = 4) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def fmt_g(x) -> str:
    return "-" if x is None else f"{float(x):.4g}"


def fmt_pct(x: float | None) -> str:
    return "-" if x is None else ("0.0%" if abs(x) < 5e-4 else f"{100 * x:+.1f}%")


def fmt_ci(c: dict, pct: bool = True) -> str:
    """mean [lo, hi] (n) of a mean_ci dict."""
    if not c or c.get("mean") is None:
        return "-"
    f = (lambda x: f"{100 * x:+.1f}%") if pct else (lambda x: f"{x:+.4f}")
    if c.get("lo") is None:
        return f"{f(c['mean'])} (1 seed)"
    return f"{f(c['mean'])} [{f(c['lo'])}, {f(c['hi'])}] (n={c['n']})"


def fmt_speed(c: dict) -> str:
    """A learning-speed reading (mean_ci dict) as a percentage, its interval where there is one."""
    if not c or c.get("mean") is None:
        return "-"
    return f"{100 * c['mean']:.0f}%" + (f" [{100 * c['lo']:.0f}, {100 * c['hi']:.0f}]" if c.get("lo") is not None else "")


def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)
