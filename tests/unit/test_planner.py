"""The Kaplan-law stage planner, the slope rule and the ``megagrow plan`` CLI.

Each test's name states the property it checks.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
try:
    import megagrow  # noqa: F401
except ImportError:  # running from a checkout that is not installed
    sys.path.insert(0, str(ROOT))

from scipy import integrate  # noqa: E402

from megagrow.errors import UserError  # noqa: E402
from megagrow.schedule import law as LAW  # noqa: E402
from megagrow.schedule import planner as P  # noqa: E402
from megagrow.schedule import slope as SL  # noqa: E402

BASE = LAW.non_embedding_params(12, 768)  # GPT-2 base, 84.9M
LAWS = [LAW.KaplanLaw(batch="integrated"), LAW.KaplanLaw(batch="target")]
LAW_IDS = ["integrated", "target"]


# ============================================================================ the law
def test_non_embedding_params_and_size_parsing():
    assert BASE == 12 * 12 * 768**2
    assert LAW.parse_size("12x768") == BASE
    assert LAW.parse_size("36X1280") == 12 * 36 * 1280**2
    assert LAW.parse_size("85e6") == 85e6
    for bad in ("-5", "0", "abc", "12x", "nan", "inf"):
        with pytest.raises(UserError):
            LAW.parse_size(bad)


@pytest.mark.parametrize("law", LAWS, ids=LAW_IDS)
def test_seff_inverts_loss_within_1e9(law):
    """L(N, S_eff(N, L)) == L and S_eff(N, L(N, S)) == S, relative 1e-9."""
    for N in (1e6, 21e6, BASE, 7e8, 1.75e11):
        limit = law.loss_limit(N)
        for L in limit * np.array([1.0001, 1.01, 1.07, 1.3, 2.0, 5.0]):
            S = law.steps_to_loss(N, L)
            assert math.isfinite(S) and S > 0
            assert abs(law.loss(N, S) / L - 1) < 1e-9
        for S in (10.0, 1e3, 1e5, 1e7):
            assert abs(law.steps_to_loss(N, law.loss(N, S)) / S - 1) < 1e-9


def test_seff_at_or_below_irreducible_loss_is_infinite_and_from_scratch_is_zero():
    law = LAW.KaplanLaw()
    limit = law.loss_limit(BASE)
    assert law.steps_to_loss(BASE, limit) == math.inf
    assert law.steps_to_loss(BASE, limit * 0.9) == math.inf
    assert law.steps_to_loss(BASE, math.inf) == 0.0
    assert law.loss(BASE, 0) == math.inf


def test_integrated_tokens_equal_quadrature_of_critical_batch_over_steps():
    """The closed form (two Gauss 2F1 branches) == int_0^S B(L(s)) ds by adaptive quadrature."""
    law = LAW.KaplanLaw(batch="integrated")
    for N in (2e7, BASE, 7e8):
        limit = law.loss_limit(N)
        # x = (L - L_inf)/L spans both branches of the closed form (switch at x = 0.3)
        for L in (limit * 1.02, limit * 1.2, limit / 0.7 * 0.999, limit / 0.7 * 1.001, limit * 2.5):
            S = law.steps_to_loss(N, L)
            ref, _ = integrate.quad(
                lambda s: law.critical_batch(law.loss(N, s)), 0.0, S, epsabs=0.0, epsrel=1e-12, limit=500, points=[S * 1e-6, S * 1e-3]
            )
            assert abs(law.tokens_to_loss(N, L) / ref - 1) < 1e-8


@pytest.mark.parametrize("law", LAWS, ids=LAW_IDS)
def test_token_derivative_matches_finite_difference(law):
    for L in (3.0, 3.3, 4.0):
        h = 1e-6
        fd = (law.tokens_to_loss(BASE, L + h, 3.2) - law.tokens_to_loss(BASE, L - h, 3.2)) / (2 * h)
        assert abs(law.dtokens_dloss(BASE, L, 3.2) / fd - 1) < 1e-6


def test_loss_at_budget_at_the_critical_batch_is_the_law():
    """With the batch equal to B(L), Kaplan's batch trade-off reduces to L(N, S)."""
    law = LAW.KaplanLaw()
    for S in (5e3, 5e4):
        L = law.loss(BASE, S)
        assert abs(LAW.loss_at_budget(BASE, S, law.critical_batch(L), law) / L - 1) < 1e-10
    # a smaller batch than critical needs more steps: the loss after S steps is higher
    assert LAW.loss_at_budget(BASE, 5e4, 1e5, law) > law.loss(BASE, 5e4)


# ============================================================================ single models
def test_compute_optimal_size_constant_batch_matches_closed_form():
    """Constant batch: the optimal N has (N_c/N)^alpha_N = alpha_S/(alpha_N+alpha_S) * L."""
    law = LAW.KaplanLaw(batch="target")
    for L in (2.6, 3.0, 3.5):
        N = LAW.compute_optimal_size(L, law)
        assert abs(law.loss_limit(N) / L - law.alpha_S / (law.alpha_N + law.alpha_S)) < 1e-8


def test_compute_optimal_single_model_stops_at_the_frontier_slope_0052():
    """Integrated batch: the compute-optimal fixed size for any target reaches it exactly where
    its curve has flattened to -1/(1/a_N + 1/a_S + 1/a_B) = -0.05199, the paper's -0.052."""
    law = LAW.KaplanLaw(batch="integrated")
    frontier = -1.0 / (1 / law.alpha_N + 1 / law.alpha_S + 1 / law.alpha_B)
    for L in (2.7, 3.2, 4.0):
        N = LAW.compute_optimal_size(L, law)
        assert abs(law.curve_slope(N, L) - frontier) < 1e-6
    assert abs(frontier - SL.STOP_SLOPE) < 1e-4
    # and the default paper target (slope -0.052) is within 0.1% of the optimal target
    assert abs(P.paper_target_loss(BASE, law) / P.optimal_target_loss(BASE, law) - 1) < 1e-3


@pytest.mark.parametrize("law", LAWS, ids=LAW_IDS)
def test_best_single_model_over_choices_is_the_cheapest_feasible(law):
    L = 3.2
    choices = [1e6, 2e7, BASE, 3e8, 1e9]  # 1e6 and 2e7 cannot reach 3.2
    best = LAW.best_single_model(L, choices, law)
    feasible = [n for n in choices if law.loss_limit(n) < L]
    assert best.N in feasible
    assert best.compute == min(LAW.single_model_compute(n, L, law) for n in feasible)
    cont = LAW.best_single_model(L, None, law)
    assert cont.compute <= best.compute * (1 + 1e-12)
    with pytest.raises(UserError):
        LAW.best_single_model(2.0, [1e6, 1e7], law)


# ============================================================================ staged plans
PAIRS = [("depth", BASE / 2), ("width", BASE / 4)]


@pytest.mark.parametrize("law", LAWS, ids=LAW_IDS)
@pytest.mark.parametrize("kind,small", PAIRS, ids=[p[0] for p in PAIRS])
def test_staged_plan_reaches_target_with_less_compute_than_final_size_from_scratch(law, kind, small):
    """GPT-2 base depth (N/2 -> N) and width (N/4 -> N) pairs, target = where the from-scratch
    N flattens to slope -0.052: replaying the planned steps through the law ends exactly at the
    target (1e-6 relative) and the staged compute is strictly below training N from scratch."""
    Lt = P.paper_target_loss(BASE, law)
    plan = P.plan_stages([small, BASE], Lt, law)
    assert [s.N for s in plan.stages] == [small, BASE]
    losses = P.simulate_stages([s.N for s in plan.stages], [s.steps for s in plan.stages], law)
    assert abs(losses[-1] / Lt - 1) < 1e-6
    assert losses == pytest.approx([s.end_loss for s in plan.stages], rel=1e-12)
    assert plan.total_compute == pytest.approx(sum(s.compute for s in plan.stages), rel=1e-12)
    assert plan.total_compute < LAW.single_model_compute(BASE, Lt, law)
    assert 0 < plan.saving < 1
    # the stage compute is the difference of from-scratch computes along each model's curve
    s1, s2 = plan.stages
    assert s1.compute == pytest.approx(law.compute_to_loss(small, s1.end_loss, Lt), rel=1e-12)
    assert s2.start_step == pytest.approx(law.steps_to_loss(BASE, s1.end_loss), rel=1e-12)


@pytest.mark.parametrize("law", LAWS, ids=LAW_IDS)
@pytest.mark.parametrize("kind,small", PAIRS, ids=[p[0] for p in PAIRS])
def test_staged_plan_beats_every_fixed_size_when_final_size_is_compute_optimal(law, kind, small):
    """Precisely: at the target loss for which N_K is the compute-optimal fixed size, the staged
    plan ending at N_K costs strictly less than the best fixed size over a grid (and over
    continuous N).  (At lower targets a bigger fixed model can win; see the next test.)"""
    Lt = P.optimal_target_loss(BASE, law)
    assert LAW.compute_optimal_size(Lt, law) == pytest.approx(BASE, rel=1e-4)
    plan = P.plan_stages([small, BASE], Lt, law)
    grid = list(np.logspace(6, 10, 81)) + [small, BASE, 2 * BASE]
    assert plan.total_compute < LAW.best_single_model(Lt, grid, law).compute
    assert plan.total_compute < LAW.best_single_model(Lt, None, law).compute
    assert plan.saving_vs_best_single > 0


def test_fixed_bigger_model_beats_staged_plan_when_final_size_is_overtrained():
    """The property above is not universal: at a target far below N_K's compute-optimal loss
    (curve slope -0.02), a larger fixed model is cheaper than any plan ending at N_K."""
    law = LAW.KaplanLaw()
    Lt = law.loss_at_slope(BASE, -0.02)
    plan = P.plan_stages([BASE / 4, BASE], Lt, law)
    best = LAW.best_single_model(Lt, list(np.logspace(6, 10, 81)), law)
    assert plan.saving > 0 and best.N > BASE and best.compute < plan.total_compute


@pytest.mark.parametrize("law", LAWS, ids=LAW_IDS)
def test_switch_point_solves_first_order_condition_and_step_divisor_closed_form(law):
    """Growing N_a -> N_b optimally happens where (L - L_inf,a)/(L - L_inf,b) =
    (N_a/N_b)^(1/(1+1/alpha_S)) (independent of the batch accounting), and the grown model
    starts at S_a / c with c = (N_b/N_a)^(1/(1+alpha_S))."""
    Lt = P.paper_target_loss(4 * BASE, law)
    for ratio in (2.0, 4.0):
        plan = P.plan_stages([BASE, ratio * BASE], Lt, law)
        L = plan.stages[1].start_loss
        lhs = (L - law.loss_limit(BASE)) / (L - law.loss_limit(ratio * BASE))
        assert lhs == pytest.approx(ratio ** (-1 / (1 + 1 / law.alpha_S)), rel=1e-9)
        assert plan.stages[1].step_divisor == pytest.approx(ratio ** (1 / (1 + law.alpha_S)), rel=1e-9)


@pytest.mark.parametrize("law", LAWS, ids=LAW_IDS)
def test_exact_planner_is_never_worse_than_reference_slsqp(law):
    """Four-stage chain: the switch-loss optimum costs <= the reference SLSQP-over-steps
    optimum, and they agree to 1e-4 (same problem, two formulations)."""
    sizes = ["12x192", "12x384", "12x768", "24x768"]
    Lt = 3.1
    exact = P.plan_stages(sizes, Lt, law)
    ref = P.plan_stages(sizes, Lt, law, method="slsqp")
    assert exact.total_compute <= ref.total_compute * (1 + 1e-12)
    assert ref.total_compute / exact.total_compute - 1 < 1e-4
    assert len(exact.stages) == 4 and exact.final_loss == pytest.approx(Lt, rel=1e-9)
    ends = [s.end_loss for s in exact.stages]
    assert all(a > b for a, b in zip(ends, ends[1:]))


def test_stage_skipped_when_growing_through_it_is_cheaper():
    """Ordering L_1 >= L_2 >= ... binds: the exact planner drops a stage (zero steps) and still
    matches or beats SLSQP on the full chain."""
    law = LAW.KaplanLaw()
    sizes = [1.55e6, 3.14e6, 50.4e6, 133.97e6, 207.28e6]
    Lt = law.loss_limit(sizes[-1]) * 1.267
    exact = P.plan_stages(sizes, Lt, law)
    assert len(exact.stages) < len(sizes) and exact.stages[-1].N == sizes[-1]
    ref = P.plan_stages(sizes, Lt, law, method="slsqp")
    assert exact.total_compute <= ref.total_compute * (1 + 1e-9)
    assert exact.final_loss == pytest.approx(Lt, rel=1e-9)


def test_single_size_plan_is_the_single_model():
    law = LAW.KaplanLaw()
    plan = P.plan_stages([BASE], 3.2, law)
    assert len(plan.stages) == 1 and plan.saving == pytest.approx(0.0, abs=1e-12)


def test_planner_rejects_bad_chains_and_unreachable_targets():
    law = LAW.KaplanLaw()
    with pytest.raises(UserError):
        P.plan_stages([-1.0, BASE], 3.2, law)
    with pytest.raises(UserError):
        P.plan_stages([BASE, BASE / 2], 3.2, law)
    with pytest.raises(UserError, match="irreducible"):
        P.plan_stages([BASE / 4, BASE], law.loss_limit(BASE) * 0.99, law)
    with pytest.raises(UserError):
        LAW.get_law("chinchilla")
    with pytest.raises(UserError):
        LAW.KaplanLaw(batch="huge")


def test_paper_pairs_and_predictions():
    """The four pairs have the paper's shapes; the law predicts a positive saving for each,
    width (4x) above depth (2x); base and large get the same prediction because the law is
    scale-free at a target defined relative to the large model's curve."""
    pairs = {p.name: p for p in P.paper_pairs()}
    assert pairs["gpt2-base-depth"].N_small == BASE / 2
    assert pairs["gpt2-base-width"].N_small == BASE / 4
    assert pairs["gpt2-large-depth"].N_large == 12 * 24 * 1536**2  # the paper's 24x1536, not HF's 36x1280
    assert (pairs["gpt2-large-depth"].small, pairs["gpt2-large-width"].small) == ((12, 1536), (24, 768))
    assert pairs["gpt2-large-width"].N_small == pairs["gpt2-large-width"].N_large / 4
    assert pairs["gpt2-large-depth"].N_small == pairs["gpt2-large-depth"].N_large / 2
    pred = {r["pair"]: r for r in P.paper_predictions()}
    assert set(pred) == set(pairs)
    for r in pred.values():
        assert 0 < r["predicted_saving"] < r["measured_saving"]
    for size in ("base", "large"):
        assert pred[f"gpt2-{size}-width"]["predicted_saving"] > pred[f"gpt2-{size}-depth"]["predicted_saving"]
    for kind in ("depth", "width"):
        a, b = pred[f"gpt2-base-{kind}"], pred[f"gpt2-large-{kind}"]
        assert a["predicted_saving"] == pytest.approx(b["predicted_saving"], rel=1e-6)


# ============================================================================ slope rule
def _piecewise(n=200, i0=120, s1=-0.08, s2=-0.03, spacing="log"):
    """Compute points and a loss that is a power law of slope s1 up to point i0 and s2 after."""
    if spacing == "log":
        c = np.logspace(15, 20, n)
    else:
        c = 1e15 * np.arange(1, n + 1, dtype=float)
    c0 = c[i0]
    loss = np.where(c <= c0, 4.0 * (c / c0) ** s1, 4.0 * (c / c0) ** s2)
    return c, loss


@pytest.mark.parametrize("spacing", ["log", "linear"])
@pytest.mark.parametrize("window", [2, 5, 10, 20])
def test_slope_rule_grows_within_one_window_after_the_slope_change_and_never_earlier(spacing, window):
    """Loss = power law with slope -0.08 up to point i0, -0.03 after; threshold -0.0475 (width).
    With the trailing least-squares window of w points, the rule fires at an index in
    [i0 + 1, i0 + w - 1] and update() is False at every point up to i0."""
    i0 = 120
    c, loss = _piecewise(i0=i0, spacing=spacing)
    rule = SL.SlopeRule.for_kind("width", window=window)
    fired = [rule.update(ci, li) for ci, li in zip(c, loss)]
    idx = fired.index(True)
    assert not any(fired[: i0 + 1])
    assert i0 + 1 <= idx <= i0 + window - 1
    assert all(fired[idx:])  # stays fired
    assert rule.fired_at == idx
    assert SL.find_crossing(c, loss, SL.WIDTH_GROW_SLOPE, window=window) == idx


def test_slope_rule_under_noise_never_fires_before_the_change():
    """Same curve with 0.01% multiplicative noise (seeded), window 20: no early firing and the
    crossing is still within the window after the change."""
    i0, w = 120, 20
    c, loss = _piecewise(i0=i0)
    rng = np.random.default_rng(0)
    noisy = loss * (1 + 1e-4 * rng.standard_normal(len(loss)))
    idx = SL.find_crossing(c, noisy, SL.DEPTH_GROW_SLOPE, window=w)
    assert idx is not None and i0 + 1 <= idx <= i0 + w - 1


def test_slope_rule_on_a_law_curve_fires_within_a_window_of_the_true_crossing():
    """On the Kaplan curve of GPT-2 base (slope rising smoothly), evaluated every 100 steps, the
    stop rule fires at index i such that the curve's true slope crossed -0.052 in (i - w, i]
    (a least-squares slope is an average of the true slope over its window)."""
    law = LAW.KaplanLaw()
    w = 10
    steps = np.arange(100, 60001, 100, dtype=float)
    L = np.array([law.loss(BASE, s) for s in steps])
    C = np.array([law.compute_to_loss(BASE, x) for x in L])
    idx = SL.find_crossing(C, L, SL.STOP_SLOPE, window=w)
    true = np.array([law.curve_slope(BASE, x) for x in L])
    assert idx is not None
    assert true[idx] > SL.STOP_SLOPE
    assert true[idx - w] <= SL.STOP_SLOPE


def test_patience_delays_by_patience_minus_one_points_and_ema_only_delays():
    c, loss = _piecewise()
    base = SL.find_crossing(c, loss, -0.0475, window=10)
    assert SL.find_crossing(c, loss, -0.0475, window=10, patience=3) == base + 2
    with_ema = SL.find_crossing(c, loss, -0.0475, window=10, ema=0.5)
    assert with_ema is not None and with_ema >= base


def test_should_grow_and_smoothed_slopes():
    c, loss = _piecewise(i0=120)
    rule = SL.SlopeRule(threshold=-1.0, window=10)  # would fire at once if it could decide
    assert [rule.update(ci, li) for ci, li in zip(c[:9], loss[:9])] == [False] * 9
    assert rule.slope is None and rule.update(c[9], loss[9]) and rule.fired_at == 9
    hist = list(zip(c, loss))
    assert not SL.should_grow(hist[:121], SL.WIDTH_GROW_SLOPE)
    assert SL.should_grow(hist, SL.WIDTH_GROW_SLOPE)
    s = SL.smoothed_slopes(c, loss, window=10)
    assert np.isnan(s[:9]).all() and s[9:121] == pytest.approx(-0.08, abs=1e-9)
    assert s[-1] == pytest.approx(-0.03, abs=1e-9)


def test_paper_constants_and_grown_step():
    assert (SL.WIDTH_GROW_SLOPE, SL.DEPTH_GROW_SLOPE, SL.STOP_SLOPE) == (-0.0475, -0.0575, -0.052)
    assert SL.grown_step(1776.0, "width") == pytest.approx(1000.0)
    assert SL.grown_step(1412.0, "depth") == pytest.approx(1000.0)
    assert SL.SlopeRule.for_kind("stop").threshold == -0.052
    with pytest.raises(UserError):
        SL.grown_step(10, "sideways")


def test_slope_rule_rejects_bad_points():
    rule = SL.SlopeRule(threshold=-0.05)
    rule.update(1.0, 3.0)
    for c, l in ((1.0, 2.9), (0.5, 2.9), (2.0, float("nan")), (2.0, -1.0)):
        with pytest.raises(UserError):
            rule.update(c, l)
    with pytest.raises(UserError):
        SL.SlopeRule(threshold=-0.05, window=1)


# ============================================================================ CLI
def _cli(*args, cwd=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run(
        [sys.executable, "-c", "import sys; from megagrow.cli.plan import main; sys.exit(main())", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or ROOT,
        timeout=120,
    )


def test_cli_plan_json_parses_and_has_the_fields():
    r = _cli("--law", "kaplan", "--target-loss", "3.2", "--sizes", "12x384,85e6", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    for k in ("target_loss", "stages", "total_compute", "total_pf_days", "single", "saving", "best_single", "saving_vs_best_single", "law"):
        assert k in d
    assert len(d["stages"]) == 2
    for s in d["stages"]:
        for k in ("index", "N", "steps", "tokens", "compute", "pf_days", "end_loss", "start_step"):
            assert k in s
    assert d["stages"][-1]["end_loss"] == pytest.approx(3.2, rel=1e-9)
    assert 0 < d["saving"] < 1


def test_cli_paper_json_has_four_pairs_with_predicted_and_measured():
    r = _cli("--paper", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert [p["pair"] for p in d["pairs"]] == ["gpt2-base-depth", "gpt2-large-depth", "gpt2-base-width", "gpt2-large-width"]
    assert [p["measured_saving"] for p in d["pairs"]] == [0.132, 0.148, 0.216, 0.255]
    assert all(0 < p["predicted_saving"] < 1 for p in d["pairs"])


def test_cli_slope_reads_csv_and_reports_crossing_and_grown_step(tmp_path):
    i0 = 120
    c, loss = _piecewise(i0=i0, spacing="linear")
    f = tmp_path / "curve.csv"
    f.write_text("step,loss\n" + "".join(f"{int(s)},{float(l)!r}\n" for s, l in zip(c / 1e15, loss)))
    r = _cli("--slope", str(f), "--kind", "width", "--window", "10", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    cross = d["crossing"]
    assert i0 + 1 <= cross["index"] <= i0 + 9
    assert cross["grown_step"] == pytest.approx(cross["step"] / SL.WIDTH_STEP_DIVISOR)
    r = _cli("--slope", str(f), "--threshold", "-0.01")  # never reached
    assert r.returncode == 0 and "no crossing" in r.stdout


@pytest.mark.parametrize(
    "args",
    [
        ("--sizes=-85e6,340e6", "--target-loss", "3.2"),  # negative size
        ("--law", "chinchilla", "--sizes", "85e6", "--target-loss", "3.2"),  # unknown law
        ("--sizes", "12x384,12x768", "--target-loss", "2.5"),  # below the irreducible loss of N_K
        ("--sizes", "12x768,12x384", "--target-loss", "3.2"),  # not increasing
        ("--slope", "/nonexistent/curve.csv", "--kind", "width"),  # missing file
        ("--no-such-flag",),
    ],
    ids=["negative-size", "unknown-law", "below-irreducible", "decreasing", "missing-csv", "bad-flag"],
)
def test_cli_bad_input_is_one_error_line_and_exit_2(args):
    r = _cli(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
