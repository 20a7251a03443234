"""Calibrating the scaling law to from-scratch runs (megagrow.schedule.calibrate) and
``megagrow plan --calibrate``.

Each test's name states the property it checks.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
try:
    import megagrow  # noqa: F401
except ImportError:  # running from a checkout that is not installed
    sys.path.insert(0, str(ROOT))

from megagrow.cli.plan import curves_from_runs  # noqa: E402
from megagrow.config import Plan  # noqa: E402
from megagrow.errors import UserError  # noqa: E402
from megagrow.metrics.flops import Ledger  # noqa: E402
from megagrow.schedule import calibrate as CAL  # noqa: E402
from megagrow.schedule import planner as P  # noqa: E402
from megagrow.schedule.law import KaplanLaw, non_embedding_params  # noqa: E402

TRUE = KaplanLaw(N_c=3e8, alpha_N=0.3, S_c=400.0, alpha_S=0.5)
SIZES = list(np.geomspace(3e5, 3e6, 4))
STEPS = np.arange(20.0, 451.0, 10.0)


def _curves(law, sizes, steps, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for N in sizes:
        L = np.array([law.loss(N, s) for s in steps])
        out.append((N, steps, L * (1.0 + noise * rng.standard_normal(L.size))))
    return out


# ============================================================================ the fit
def test_fit_recovers_each_of_the_four_constants_within_5_percent_from_noisy_synthetic_curves():
    """Curves from N_c=3e8, alpha_N=0.3, S_c=400, alpha_S=0.5 at 4 sizes 3e5..3e6, steps 20..450,
    1e-4 relative noise: every fitted constant within 5% of the truth; B*, alpha_B kept."""
    law, info = CAL.fit_law(_curves(TRUE, SIZES, STEPS, noise=1e-4))
    for k in CAL.FITTED:
        assert getattr(law, k) == pytest.approx(getattr(TRUE, k), rel=0.05), k
        assert info["constants"][k] == getattr(law, k)
    assert (law.B_star, law.alpha_B, law.batch) == (KaplanLaw().B_star, KaplanLaw().alpha_B, KaplanLaw().batch)
    assert info["n_points"] == len(SIZES) * len(STEPS) and info["sizes"] == pytest.approx(SIZES)
    assert not info["ill_conditioned"] and info["warnings"] == []
    assert info["rmse_rel"] < 3e-4 and all(v < 0.05 for v in info["stderr_rel"].values())


def test_fit_recovers_kaplans_own_constants_from_curves_of_kaplans_law():
    """Noise-free curves of KaplanLaw() at 1e6..1e9 params, steps 1e3..1e5: its four constants
    come back to 1e-6; the base law's batch accounting is kept."""
    steps = np.geomspace(1e3, 1e5, 40)
    law, info = CAL.fit_law(_curves(KaplanLaw(), np.geomspace(1e6, 1e9, 4), steps), base=KaplanLaw(batch="target"))
    for k in CAL.FITTED:
        assert getattr(law, k) == pytest.approx(getattr(KaplanLaw(), k), rel=1e-6), k
    assert law.batch == "target" and law.name == "calibrated" and info["rmse"] < 1e-9


def test_fit_is_independent_of_the_base_law_it_starts_from():
    base = KaplanLaw(N_c=1e20, alpha_N=0.05, S_c=1e5, alpha_S=1.5)
    a, _ = CAL.fit_law(_curves(TRUE, SIZES, STEPS))
    b, _ = CAL.fit_law(_curves(TRUE, SIZES, STEPS), base=base)
    for k in CAL.FITTED:
        assert getattr(a, k) == pytest.approx(getattr(b, k), rel=1e-6)


def test_one_size_only_is_a_user_error_and_points_before_min_step_are_dropped():
    with pytest.raises(UserError, match="at least 2 model sizes"):
        CAL.fit_law(_curves(TRUE, [1e6, 1e6], STEPS))
    with pytest.raises(UserError):
        CAL.fit_law([])
    _, info = CAL.fit_law(_curves(TRUE, SIZES, STEPS), min_step=100)
    assert info["steps"][0] == 100 and info["n_points"] == len(SIZES) * int((STEPS >= 100).sum())
    with pytest.raises(UserError, match="at least 6"):
        CAL.fit_law(_curves(TRUE, SIZES, STEPS), min_step=450)  # one point per size left


def test_sizes_too_close_for_the_noise_flag_the_fit_as_ill_conditioned():
    """Two sizes 1% apart under 1% noise cannot pin N_c and alpha_N: flagged, with warnings;
    5% apart under 0.1% noise they can (warned about, not flagged)."""
    _, info = CAL.fit_law(_curves(TRUE, [1e6, 1.01e6], STEPS, noise=1e-2))
    assert info["ill_conditioned"] and any(w.startswith("poorly determined: N_c") for w in info["warnings"])
    law, info = CAL.fit_law(_curves(TRUE, [1e6, 1.05e6], STEPS, noise=1e-3))
    assert not info["ill_conditioned"] and any("only 2 sizes" in w for w in info["warnings"])
    assert law.alpha_N == pytest.approx(TRUE.alpha_N, rel=0.1)


# ============================================================================ switches and thresholds
def _fd_fixed_batch_slope(law, N, L):
    """d ln L / d ln S of the law's own curve L(N, S) (a fixed batch: C proportional to S),
    central difference in ln S at the step where the curve is at L."""
    S = law.steps_to_loss(N, L)
    h = 1e-4
    return (math.log(law.loss(N, S * math.exp(h))) - math.log(law.loss(N, S * math.exp(-h)))) / (2 * h)


@pytest.mark.parametrize("batch", ["integrated", "target"])
def test_calibrated_threshold_equals_the_finite_difference_slope_of_the_fixed_batch_curve(batch):
    law, _ = CAL.fit_law(_curves(TRUE, SIZES, STEPS, noise=1e-4), base=KaplanLaw(batch=batch))
    sizes = [SIZES[0], SIZES[1], SIZES[3]]
    target = law.loss(sizes[-1], 2000.0)
    sw = CAL.calibrated_switches(law, sizes, target)
    assert sw
    for s in sw:
        fd = _fd_fixed_batch_slope(law, s["from_N"], s["switch_loss"])
        assert s["threshold"] == pytest.approx(fd, rel=1e-6)
        assert s["small_step"] == pytest.approx(law.steps_to_loss(s["from_N"], s["switch_loss"]), rel=1e-12)
        assert law.loss(s["from_N"], s["small_step"]) == pytest.approx(s["switch_loss"], rel=1e-12)
        assert s["step_divisor"] == pytest.approx(s["small_step"] / s["big_start_step"], rel=1e-12)
    if batch == "target":  # the law's own curve slope is the fixed-batch one only in this accounting
        assert all(s["plan_slope"] == pytest.approx(s["threshold"], rel=1e-9) for s in sw)
    else:
        assert all(s["plan_slope"] > s["threshold"] for s in sw)


def test_planner_with_the_calibrated_law_switches_where_calibrated_switches_says_at_the_first_order_optimum():
    law, _ = CAL.fit_law(_curves(TRUE, SIZES, STEPS, noise=1e-4))
    Na, Nb = SIZES[0], SIZES[2]
    target = law.loss(Nb, 3000.0)
    (sw,) = CAL.calibrated_switches(law, [Na, Nb], target)
    plan = P.plan_stages([Na, Nb], target, law)
    assert len(plan.stages) == 2
    assert plan.stages[1].start_loss == pytest.approx(sw["switch_loss"], rel=1e-12)
    assert plan.stages[0].steps == pytest.approx(sw["small_step"], rel=1e-9)
    # the planner's optimum: (L - L_inf,a) / (L - L_inf,b) = (N_a / N_b)^(1 / (1 + 1/alpha_S))
    L = sw["switch_loss"]
    ratio = (L - law.loss_limit(Na)) / (L - law.loss_limit(Nb))
    assert ratio == pytest.approx((Na / Nb) ** (1.0 / (1.0 + 1.0 / law.alpha_S)), rel=1e-6)
    assert (sw["paper_kind"], sw["paper_threshold"]) == ("width", -0.0475)


def test_kaplan_thresholds_at_fixed_batch_are_steeper_than_the_papers_which_match_the_critical_batch_slope():
    """Under Kaplan's constants the optimal depth switch of GPT-2 base is at a fixed-batch slope
    of about -0.097 (what the trainer measures), while the law's critical-batch ("integrated")
    slope there is about -0.058, near the paper's -0.0575."""
    law = KaplanLaw()
    small, big = non_embedding_params(6, 768), non_embedding_params(12, 768)
    (sw,) = CAL.calibrated_switches(law, [small, big], P.paper_target_loss(big, law))
    assert sw["threshold"] == pytest.approx(-0.0974, abs=5e-4)
    assert sw["plan_slope"] == pytest.approx(-0.0582, abs=5e-4)
    assert sw["paper_kind"] == "depth" and sw["paper_threshold"] == -0.0575


# ============================================================================ run directories and the CLI
def _fake_run(root: Path, name: str, n_layers: int, d_model: int, law: KaplanLaw, steps=400, every=20, stages: list | None = None) -> Path:
    """A run directory as `megagrow run` leaves it: RUN/manifest.json with the plan, and
    RUN/<stage>/log.jsonl with training and eval records as the stage loop writes them
    (megagrow.metrics.meter.StageMeter: train_fields and eval_record on the run's Ledger, tokens
    and flops cumulative over the run; a later stage logs "before_growth" / "after_growth" evals
    at its step 0).  The losses follow ``law`` at the model's step counted over the whole run."""
    model = {"n_layers": n_layers, "d_model": d_model, "n_heads": 4}
    plan = Plan.from_dict({"name": name, "stages": stages or [{"name": "base", "model": model, "steps": steps, "eval_every": every}]})
    run = root / name
    run.mkdir()
    (run / "manifest.json").write_text(
        json.dumps({"format": 1, "plan_file": str(root / f"{name}.yaml"), "plan": plan.to_dict(), "run_dir": str(run), "state": "done"})
    )
    done, tokens0, flops0 = 0, 0, 0
    for k, stage in enumerate(plan.stages):
        N = non_embedding_params(stage.model.n_layers, stage.model.d_model)
        ledger = Ledger.of(stage, tokens0, flops0)
        every = stage.eval_every or stage.steps

        def ev(step, at):
            return {
                "stage": stage.name,
                "step": step,
                "eval_loss": law.loss(N, done + step),
                "tokens": ledger.tokens(step),
                "flops": ledger.flops(step),
                "at": at,
                "time": time.time(),
            }

        lines = [ev(0, "before_growth"), ev(0, "after_growth")] if k else []
        for s in range(10, stage.steps + 1, 10):
            lines.append(
                {
                    "stage": stage.name,
                    "step": s,
                    "loss": law.loss(N, done + s) * 1.01,
                    "lr": 1e-3,
                    "tokens": ledger.tokens(s),
                    "flops": ledger.flops(s),
                    "time": time.time(),
                }
            )
            if s % every == 0 or s == stage.steps:
                lines.append(ev(s, "stage_end" if s == stage.steps else "periodic"))
        (run / stage.name).mkdir()
        (run / stage.name / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        done, tokens0, flops0 = done + stage.steps, ledger.tokens(stage.steps), ledger.flops(stage.steps)
    return run


def test_curves_from_runs_reads_n_steps_and_eval_losses_after_the_warmup_cut(tmp_path):
    run = _fake_run(tmp_path, "a", 2, 64, TRUE)
    ((N, steps, loss),) = curves_from_runs([str(run)])
    assert N == 12 * 2 * 64**2
    assert steps[0] == 80 and steps[-1] == 400  # default cut: max(warmup 20, 20% of 400)
    assert np.all(np.diff(steps) == 20)
    assert loss == pytest.approx([TRUE.loss(N, s) for s in steps], rel=1e-15)
    ((_, steps, _),) = curves_from_runs([str(run)], min_step=0)
    assert steps[0] == 20


def test_a_run_continuing_one_model_over_two_stages_counts_steps_over_the_whole_run(tmp_path):
    model = {"n_layers": 2, "d_model": 64, "n_heads": 4}
    run = _fake_run(
        tmp_path,
        "two",
        2,
        64,
        TRUE,
        stages=[
            {"name": "a", "model": model, "steps": 200, "eval_every": 20},
            {"name": "b", "model": model, "steps": 200, "eval_every": 20, "layout": {"micro_batch": 2, "grad_accum": 2}},
        ],
    )
    ((N, steps, loss),) = curves_from_runs([str(run)], min_step=0)
    assert list(steps) == list(range(20, 401, 20))  # b's step 0 evals repeat a's end: kept once
    assert loss == pytest.approx([TRUE.loss(N, s) for s in steps], rel=1e-15)
    other = _fake_run(
        tmp_path,
        "rebatched",
        2,
        64,
        TRUE,
        stages=[
            {"name": "a", "model": model, "steps": 200, "eval_every": 20},
            {"name": "b", "model": model, "steps": 200, "eval_every": 20, "layout": {"micro_batch": 8}},
        ],
    )
    with pytest.raises(UserError, match="rebatched.*different batch sizes"):
        curves_from_runs([str(other)])


def test_curves_from_runs_rejects_missing_staged_and_evalless_runs_naming_them(tmp_path):
    with pytest.raises(UserError, match="no such run directory"):
        curves_from_runs([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty.*manifest"):
        curves_from_runs([str(tmp_path / "empty")])
    staged = _fake_run(
        tmp_path,
        "staged",
        2,
        64,
        TRUE,
        stages=[
            {"name": "small", "model": {"n_layers": 2, "d_model": 64, "n_heads": 4}, "steps": 100},
            {"name": "deep", "model": {"n_layers": 4, "d_model": 64, "n_heads": 4}, "steps": 100, "grow": "depth"},
        ],
    )
    with pytest.raises(UserError, match="staged.*grows"):
        curves_from_runs([str(staged)])
    quiet = _fake_run(tmp_path, "quiet", 2, 64, TRUE)
    log = quiet / "base" / "log.jsonl"
    log.write_text("".join(l + "\n" for l in log.read_text().splitlines() if "eval_loss" not in l))
    with pytest.raises(UserError, match="quiet.*no eval records"):
        curves_from_runs([str(quiet)])


def test_cli_plan_calibrate_json_carries_the_fit_the_plan_and_the_thresholds(tmp_path, capsys):
    from megagrow.cli.plan import main

    law = KaplanLaw(N_c=3e8, alpha_N=0.3, S_c=40.0, alpha_S=0.5)
    runs = [_fake_run(tmp_path, f"r{i}", n, 64 * m, law) for i, (n, m) in enumerate(((2, 1), (4, 1), (4, 2)))]
    sizes = "2x64,4x128"
    target = law.loss(non_embedding_params(4, 128), 4000.0)
    rc = main(["--calibrate", *map(str, runs), "--min-step", "40", "--sizes", sizes, "--target-loss", repr(target), "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    d = json.loads(out.out)
    cal = d["calibration"]
    for k in CAL.FITTED:
        assert cal["constants"][k] == pytest.approx(getattr(law, k), rel=1e-6), k
        assert d["law"][k] == pytest.approx(cal["constants"][k], rel=1e-12)
    assert d["law"]["name"] == "calibrated" and d["law"]["B_star"] == KaplanLaw().B_star
    assert cal["kept"] == {"B_star": KaplanLaw().B_star, "alpha_B": KaplanLaw().alpha_B, "batch": "integrated"}
    assert [r["dir"] for r in cal["runs"]] == [str(r) for r in runs] and cal["n_points"] == 3 * 19
    assert cal["sizes"] == [12 * 2 * 64**2, 12 * 4 * 64**2, 12 * 4 * 128**2]
    assert len(d["stages"]) == 2 and d["stages"][-1]["end_loss"] == pytest.approx(target, rel=1e-9)
    (sw,) = d["switches"]
    for k in (
        "from_N",
        "to_N",
        "switch_loss",
        "small_step",
        "big_start_step",
        "step_divisor",
        "threshold",
        "plan_slope",
        "paper_kind",
        "paper_threshold",
        "extrapolated",
    ):
        assert k in sw
    assert sw["switch_loss"] == pytest.approx(d["stages"][1]["start_loss"], rel=1e-12)
    assert sw["extrapolated"] == (not 40 <= sw["small_step"] <= 400)
    assert sw["threshold"] == pytest.approx(_fd_fixed_batch_slope(law, sw["from_N"], sw["switch_loss"]), rel=1e-5)
    assert d["target_slope"] == pytest.approx(CAL.fixed_batch_slope(law, sw["to_N"], target), rel=1e-6)
    # the table form prints the same things
    assert main(["--calibrate", *map(str, runs), "--min-step", "40", "--sizes", sizes, "--target-loss", repr(target)]) == 0
    text = capsys.readouterr().out
    assert "law calibrated on 3 run(s)" in text and "threshold" in text and "-0.0475 (width)" in text


def test_cli_calibrate_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys):
    from megagrow.cli.plan import main

    one = _fake_run(tmp_path, "one", 2, 64, TRUE)
    twin = _fake_run(tmp_path, "twin", 2, 64, TRUE)
    for argv in (
        ["--calibrate", str(tmp_path / "missing"), "--sizes", "2x64,4x64"],
        ["--calibrate", str(one), str(twin)],  # one size only
        ["--calibrate", str(one), "--slope", "x.csv"],
        ["--min-step", "10", "--sizes", "2x64", "--target-loss", "9"],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr()
        lines = err.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and err.out == "", (argv, err)


def test_cli_without_calibrate_is_unchanged(capsys):
    from megagrow.cli.plan import main

    assert main(["--sizes", "12x384,12x768", "--target-loss", "3.2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert "calibration" not in d and "switches" not in d and d["law"]["name"] == "kaplan"
    assert d["law"]["N_c"] == KaplanLaw().N_c
