"""The savings report's arithmetic on small synthetic logs, with exact expected values:
reading log.jsonl (eval vs training records, the ledger), the baseline curve (lower
envelope, interpolation in log10 FLOPs, never extrapolation), saving %, loss at equal FLOPs,
the oracle switch point, and the generated report files."""

from __future__ import annotations

import json
import math
import os

import pytest

from megagrow.results.savings import Frontier, compare, oracle_switch, read_curve, saving

# four fully-decayed budgets: FLOPs doubling, loss 5.0, 4.6, 4.3, 4.1
BASE = [(1e12, 5.0), (2e12, 4.6), (4e12, 4.3), (8e12, 4.1)]


def test_frontier_interpolates_in_log_flops_exactly():
    f = Frontier.of(BASE)
    mid = 2e12 * math.sqrt(2)  # halfway between 2e12 and 4e12 in log10
    assert f.loss_at(mid) == pytest.approx(4.45, abs=1e-12)
    assert f.flops_to(4.45) == pytest.approx(mid, rel=1e-12)
    assert f.loss_at(2e12) == pytest.approx(4.6, abs=1e-12) and f.flops_to(4.6) == pytest.approx(2e12, rel=1e-12)
    assert f.flops_to(4.0) is None and f.flops_to(5.1) is None  # below the best / above the cheapest: not reached
    assert f.loss_at(0.5e12) is None and f.loss_at(9e12) is None  # outside the FLOP range
    assert f.flops_to(4.1) == pytest.approx(8e12) and f.flops_to(5.0) == pytest.approx(1e12)  # the ends are inside


def test_frontier_is_the_lower_envelope():
    """A bigger budget that ended worse than a smaller one adds nothing to the curve."""
    f = Frontier.of([(1e12, 5.0), (2e12, 4.5), (4e12, 4.6), (8e12, 4.1)])
    assert f.points == ((1e12, 5.0), (2e12, 4.5), (8e12, 4.1))
    assert f.flops_to(4.3) == pytest.approx(10 ** (math.log10(2e12) + 0.5 * math.log10(4)), rel=1e-12)


def test_saving_and_equal_flops_loss_of_a_run():
    """A run that spends 2e12 FLOPs and ends at 4.45: the baseline needs 2^1.5 e12 for 4.45, so
    the saving is 1 - 2 / 2^1.5 = 29.289...%; at 2e12 the baseline is at 4.6, the run 0.15 lower."""
    r = compare("w", "staged", 2e12, 4.45, Frontier.of(BASE))
    assert r.baseline_flops_to_loss == pytest.approx(2e12 * math.sqrt(2), rel=1e-12)
    assert r.saving == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-12)
    assert r.baseline_loss_at_flops == pytest.approx(4.6, abs=1e-12) and r.delta_loss == pytest.approx(-0.15, abs=1e-12)
    worse = compare("d", "staged", 4e12, 4.6, Frontier.of(BASE))  # needs 4e12 for what 2e12 gives: -100%
    assert worse.saving == pytest.approx(-1.0, abs=1e-12) and worse.delta_loss == pytest.approx(0.3, abs=1e-12)
    beyond = compare("x", "staged", 8e12, 4.0, Frontier.of(BASE))
    assert beyond.saving is None and beyond.baseline_flops_to_loss is None and beyond.delta_loss == pytest.approx(-0.1)
    assert saving(1.0, None) is None and saving(3.0, 4.0) == pytest.approx(0.25)


def _write_log(path, recs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")


def test_read_curve_takes_eval_records_and_the_ledger(tmp_path):
    """Eval records give the curve (the repeated eval at a growth counted once, the later one),
    the last training record of the last stage gives the run's FLOPs; a torn last line is ignored."""
    run = tmp_path / "run"
    _write_log(str(run / "a" / "log.jsonl"), [
        {"stage": "a", "step": 10, "loss": 6.0, "tokens": 100, "flops": 1e9},
        {"stage": "a", "step": 10, "eval_loss": 5.9, "tokens": 100, "flops": 1e9, "at": "periodic", "time": 0},
        {"stage": "a", "step": 20, "loss": 5.5, "tokens": 200, "flops": 2e9},
        {"stage": "a", "step": 20, "eval_loss": 5.4, "tokens": 200, "flops": 2e9, "at": "stage_end", "time": 0},
        {"stage": "a", "step": 20, "eval_loss": 5.4, "tokens": 200, "flops": 2e9, "at": "before_growth", "time": 0},
    ])
    _write_log(str(run / "b" / "log.jsonl"), [
        {"stage": "b", "step": 0, "eval_loss": 5.4, "tokens": 200, "flops": 2e9, "at": "after_growth", "time": 0},
        {"stage": "b", "step": 10, "loss": 5.0, "tokens": 300, "flops": 6e9},
        {"stage": "b", "step": 10, "eval_loss": 4.9, "tokens": 300, "flops": 6e9, "at": "stage_end", "time": 0},
    ])
    with open(run / "b" / "log.jsonl", "a") as f:
        f.write('{"stage": "b", "step": 11, "lo')
    c = read_curve(str(run), ["a", "b"])
    assert c.eval_flops == [1e9, 2e9, 6e9] and c.eval_loss == [5.9, 5.4, 4.9]
    assert c.eval_stage == ["a", "b", "b"] and c.eval_at[1] == "after_growth"
    assert c.flops == 6e9 and c.tokens == 300 and c.final_loss == 4.9
    assert c.stage_ends == [("a", 2e9), ("b", 6e9)] and c.train_loss == [6.0, 5.5, 5.0]

    # the same log with the logit GEMM counted at 1e6 FLOPs/token in stage a and 3e6 in stage b:
    # a record at t tokens adds 1e6 * t in a, and 1e6 * 200 + 3e6 * (t - 200) in b
    t = read_curve(str(run), ["a", "b"], extra_per_token=[1e6, 3e6])
    assert t.eval_flops == [1e9 + 1e8, 2e9 + 2e8, 6e9 + 2e8 + 3e8] and t.eval_loss == c.eval_loss
    assert t.eval_at[1] == "after_growth"  # the growth's two evals still coincide, so one is kept
    assert t.flops == 6e9 + 5e8 and t.stage_ends == [("a", 2.2e9), ("b", 6.5e9)]
    assert t.train_flops == [1e9 + 1e8, 2e9 + 2e8, 6e9 + 5e8]


def test_oracle_switch_is_the_argmin_of_total_compute():
    """Big curve: loss 6 - log10(C / 1e9) (1 per decade); the small model reaches the same loss with
    1/4 of the FLOPs early on but flattens: its points (C, L) = (0.25e9, 6), (0.5e9, 5.9),
    (1e9, 5.85), (2e9, 5.84). Growing at point i costs C_i + C_big(4) - C_big(L_i); C_big(4) = 1e11,
    C_big(L) = 1e9 * 10^(6 - L): totals 1e11 + 0.25e9 - 1e9, + 0.5e9 - 1.2589e9, + 1e9 - 1.4125e9,
    + 2e9 - 1.4454e9: point 1 (-0.7589e9) is the minimum."""
    big_c = [1e9 * 10 ** (k / 10) for k in range(0, 31)]
    big_l = [6 - math.log10(c / 1e9) for c in big_c]
    small_c = [0.25e9, 0.5e9, 1e9, 2e9]
    small_l = [6.0, 5.9, 5.85, 5.84]
    o = oracle_switch(small_c, small_l, big_c, big_l, 4.0)
    assert o["index"] == 1 and not o["at_end"]
    assert o["total"] == pytest.approx(1e11 + 0.5e9 - 1e9 * 10 ** 0.1, rel=1e-9)
    o = oracle_switch(small_c[:2], small_l[:2], big_c, big_l, 4.0)
    assert o["index"] == 1 and o["at_end"]  # the minimum at the last point: the oracle may lie later
    assert oracle_switch(small_c, small_l, big_c, big_l, 2.0) is None  # the target is off the big curve


# ============================================================================ the whole report
def _fake_experiment(tmp_path):
    """An experiment directory as tools/savings.py leaves it, with synthetic logs: every run
    done, final losses and FLOPs chosen so the report's numbers are known exactly."""
    import yaml

    from megagrow.results.experiment import load_spec, runs

    spec = load_spec(os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "savings", "experiment.yaml"))
    spec.update(baseline_budgets=[0.35, 0.6, 1.0, 1.6], headline_budgets=[0.6, 1.0])  # the runs named below
    spec["lr_sweep"] = {"budget": 1.0, "lrs": [0.0025, 0.005, 0.01]}
    spec["ablation_base"] = "width"
    with open(tmp_path / "spec.yaml", "w") as f:
        yaml.safe_dump(spec, f)
    out = tmp_path / "exp"
    finals = {  # run -> (FLOPs, final val loss)
        "sweep-lr0.0025": (4e12, 4.35), "sweep-lr0.005": (4e12, 4.3), "sweep-lr0.01": (4e12, 4.4),
        "base-0.35": (1e12, 5.0), "base-0.6": (2e12, 4.6), "base-1.6": (8e12, 4.1),
        "staged-width": (2e12, 4.45), "staged-depth": (3e12, 4.2), "staged-both": (2e12, 3.9),
        "slope-width": (2.5e12, 4.5), "slope-depth": (2e12, 4.7), "slope-both": (2e12, 4.6),
        "abl-width-optreset": (2e12, 4.5), "abl-width-lrkeep": (2e12, 4.46), "abl-width-lrrestart": (2e12, 4.40),
        "abl-width-nosym": (2e12, 4.6), "seed2-staged": (3e12, 4.4),
        "seed2-base-0.6": (2e12, 4.62), "seed2-base-1": (4e12, 4.28),
    }
    for r in runs(spec, "data_cache/stdlib"):
        plan = r.build({"lr": 0.005, "headline": "staged-depth"})
        os.makedirs(out / "plans", exist_ok=True)
        with open(out / "plans" / f"{r.name}.yaml", "w") as f:
            yaml.safe_dump(plan, f)
        flops, loss = finals[r.name]
        names = [s["name"] for s in plan["stages"]]
        for i, n in enumerate(names):
            d = out / "runs" / r.name / n
            os.makedirs(d)
            f0, f1 = flops * i / len(names), flops * (i + 1) / len(names)
            l1 = loss + 0.5 * (len(names) - 1 - i)
            recs = [{"stage": n, "step": 10, "loss": l1 + 1.1, "tokens": 1, "flops": (f0 + f1) / 2, "time": 100.0 * i},
                    {"stage": n, "step": 10, "eval_loss": l1 + 1.0, "tokens": 1, "flops": (f0 + f1) / 2, "at": "periodic", "time": 0},
                    {"stage": n, "step": 20, "loss": l1 + 0.1, "tokens": 2, "flops": f1, "time": 100.0 * i + 50},
                    {"stage": n, "step": 20, "eval_loss": l1, "tokens": 2, "flops": f1, "at": "stage_end", "time": 0}]
            with open(d / "log.jsonl", "w") as f:
                f.writelines(json.dumps(x) + "\n" for x in recs)
            with open(d / "status.json", "w") as f:
                json.dump({"state": "done", "step": 20}, f)
    with open(out / "choices.json", "w") as f:
        json.dump({"lr": 0.005, "lr_run": "sweep-lr0.005", "headline": "staged-depth"}, f)
    return spec, out


def test_report_from_synthetic_logs(tmp_path):
    """The LR and headline choices from the logs, and the generated markdown: saving of
    staged-width 1 - 2/2^1.5 = +29.3%, staged-depth (3e12 FLOPs, 4.2: baseline needs 4e12 x 2^0.5)
    +47.0%, staged-both below the best baseline: "not reached"; the plot file is written."""
    import subprocess
    import sys

    from megagrow.results.report import best_lr, headline, load_all

    spec, out = _fake_experiment(tmp_path)
    states = load_all(str(out), spec, "data_cache/stdlib")
    assert best_lr(states) == (0.005, "sweep-lr0.005")
    assert headline(states) == "staged-depth"
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    md, png = tmp_path / "savings.md", tmp_path / "savings.png"
    r = subprocess.run([sys.executable, os.path.join(root, "tools", "savings.py"), "report", "--out", str(out),
                        "--md", str(md), "--png", str(png), "--json", "--spec", str(tmp_path / "spec.yaml")], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=os.path.abspath(root)), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    rows = {x["row"]["name"]: x["row"] for x in res["rows"]}
    assert rows["staged-width"]["saving"] == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-12)
    assert rows["staged-depth"]["saving"] == pytest.approx(1 - 3 / (4 * math.sqrt(2)), abs=1e-12)
    assert rows["staged-both"]["saving"] is None and rows["staged-both"]["delta_loss"] == pytest.approx(-0.7, abs=1e-12)
    # second seed: read against the second seed's baselines (2e12, 4.62) and (4e12, 4.28)
    need = 2e12 * 2 ** ((4.62 - 4.4) / (4.62 - 4.28))
    assert rows["seed2-staged"]["saving"] == pytest.approx(1 - 3e12 / need, abs=1e-12)
    text = md.read_text()
    assert "All 19 runs complete." in text
    assert "| staged-width | staged |" in text and "+29.3%" in text and "+47.0%" in text and "not reached" in text
    assert "best 0.005, used for every run" in text and "`staged-depth`" in text
    ab = {a["knob"]: a for a in res["ablations"]}
    assert ab["lrrestart"]["delta"] == pytest.approx(4.40 - 4.45, abs=1e-12)
    assert png.stat().st_size > 10_000


def test_report_says_which_runs_are_incomplete(tmp_path):
    import subprocess
    import sys

    spec, out = _fake_experiment(tmp_path)
    for stage in ("small", "final"):
        with open(out / "runs" / "abl-width-nosym" / stage / "status.json", "w") as f:
            json.dump({"state": "running" if stage == "final" else "done", "step": 5}, f)
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    md = tmp_path / "s.md"
    r = subprocess.run([sys.executable, os.path.join(root, "tools", "savings.py"), "report", "--out", str(out),
                        "--md", str(md), "--png", str(tmp_path / "s.png"), "--spec", str(tmp_path / "spec.yaml")], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=os.path.abspath(root)), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    text = md.read_text()
    assert "Runs complete: 18 of 19" in text and "abl-width-nosym" in text.split("Not complete")[1].splitlines()[0]
    r = subprocess.run([sys.executable, os.path.join(root, "tools", "savings.py"), "report", "--out", str(tmp_path / "none")],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.path.abspath(root)), timeout=300)
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and "Traceback" not in r.stderr
