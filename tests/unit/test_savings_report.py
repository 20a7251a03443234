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
    _write_log(
        str(run / "a" / "log.jsonl"),
        [
            {"stage": "a", "step": 10, "loss": 6.0, "tokens": 100, "flops": 1e9},
            {"stage": "a", "step": 10, "eval_loss": 5.9, "tokens": 100, "flops": 1e9, "at": "periodic", "time": 0},
            {"stage": "a", "step": 20, "loss": 5.5, "tokens": 200, "flops": 2e9},
            {"stage": "a", "step": 20, "eval_loss": 5.4, "tokens": 200, "flops": 2e9, "at": "stage_end", "time": 0},
            {"stage": "a", "step": 20, "eval_loss": 5.4, "tokens": 200, "flops": 2e9, "at": "before_growth", "time": 0},
        ],
    )
    _write_log(
        str(run / "b" / "log.jsonl"),
        [
            {"stage": "b", "step": 0, "eval_loss": 5.4, "tokens": 200, "flops": 2e9, "at": "after_growth", "time": 0},
            {"stage": "b", "step": 10, "loss": 5.0, "tokens": 300, "flops": 6e9},
            {"stage": "b", "step": 10, "eval_loss": 4.9, "tokens": 300, "flops": 6e9, "at": "stage_end", "time": 0},
        ],
    )
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
    assert o["total"] == pytest.approx(1e11 + 0.5e9 - 1e9 * 10**0.1, rel=1e-9)
    o = oracle_switch(small_c[:2], small_l[:2], big_c, big_l, 4.0)
    assert o["index"] == 1 and o["at_end"]  # the minimum at the last point: the oracle may lie later
    assert oracle_switch(small_c, small_l, big_c, big_l, 2.0) is None  # the target is off the big curve


# ============================================================================ intervals, LR brackets
def test_mean_ci_is_the_student_t_interval():
    """Three savings 0.1, 0.2, 0.3: mean 0.2, sd 0.1, half-width t(0.975, 2) x 0.1 / sqrt(3) = 0.248414..."""
    from megagrow.results.savings import mean_ci

    c = mean_ci([0.1, 0.2, 0.3])
    half = 4.3026527297494 * 0.1 / math.sqrt(3)
    assert c["n"] == 3 and c["mean"] == pytest.approx(0.2, abs=1e-15) and c["sd"] == pytest.approx(0.1, abs=1e-15)
    assert c["lo"] == pytest.approx(0.2 - half, abs=1e-10) and c["hi"] == pytest.approx(0.2 + half, abs=1e-10)
    two = mean_ci([0.0, 1.0])  # t(0.975, 1) = 12.7062...
    assert two["hi"] - two["mean"] == pytest.approx(12.706204736174698 * math.sqrt(0.5) / math.sqrt(2), rel=1e-9)
    assert mean_ci([0.3, None])["lo"] is None and mean_ci([0.3])["mean"] == 0.3 and mean_ci([])["mean"] is None


def test_lr_bracket_extends_an_edge_optimum():
    """The best LR at the largest tried adds LR x factor; at the smallest, LR / factor; interior is done;
    a diverged run (inf) counts as worst; the run cap ends the sweep unbracketed; unfinished waits."""
    from megagrow.errors import UserError
    from megagrow.results.experiment import bracket

    assert bracket({0.001: 5.4, 0.002: 5.3, 0.004: 5.2}, 2, 6) == {"state": "extend", "lr": 0.008}
    assert bracket({0.001: 5.1, 0.002: 5.3, 0.004: 5.2}, 2, 6) == {"state": "extend", "lr": 0.0005}
    assert bracket({0.001: 5.4, 0.002: 5.3, 0.004: 5.5}, 2, 6) == {"state": "done", "lr": 0.002, "bracketed": True}
    assert bracket({0.001: 5.4, 0.002: 5.3, 0.004: 5.2, 0.008: math.inf}, 2, 6) == {"state": "done", "lr": 0.004, "bracketed": True}
    assert bracket({0.001: 5.4, 0.002: 5.3, 0.004: 5.2}, 2, 3) == {"state": "done", "lr": 0.004, "bracketed": False}
    assert bracket({0.001: 5.4, 0.002: None, 0.004: 5.2}, 2, 6) == {"state": "wait"}
    with pytest.raises(UserError, match="diverged"):
        bracket({0.001: math.inf, 0.002: math.inf, 0.004: math.inf}, 2, 6)


def test_sweeps_grow_from_the_choices():
    """The run list carries the LRs the driver added: a sweep extended to 0.008 has a fourth run."""
    from megagrow.results.experiment import load_spec, runs

    spec = load_spec(SPEC)
    names = [r.name for r in runs(spec, "d", {"sweeps": {"final": [0.008], "6x96": [0.0005]}})]
    assert "sweep-lr0.008" in names and "small-6x96-lr0.0005" in names
    assert names.count("sweep-lr0.002") == 1


# ============================================================================ the whole report
SPEC = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "savings", "experiment.yaml")
DECAYED = {0.35: (1e12, 5.0), 0.6: (2e12, 4.6), 1.0: (4e12, 4.3), 1.4: (8e12, 4.1)}


def _fake_experiment(tmp_path, data):
    """An experiment directory as tools/savings.py leaves it, with synthetic logs (two seeds),
    every run done, FLOPs and losses chosen so the report's numbers are known exactly. Each
    run's eval points: half-way (loss + 0.5) and at the end; the first seed's longest baseline
    instead passes 4.5 at 2e12 and 4.25 at 4e12, below the shorter decayed runs' final losses."""
    import yaml

    from megagrow.results.experiment import load_spec, runs

    spec = load_spec(SPEC)
    spec["seeds"] = [1234, 4321]
    spec_path = tmp_path / "spec.yaml"
    with open(spec_path, "w") as f:
        yaml.safe_dump(spec, f)
    out = tmp_path / "exp"
    choices = {
        "lr": {
            k: {"lr": 0.002, "bracketed": True, "losses": {"0.001": 4.7, "0.002": 4.6, "0.004": 4.8}}
            for k in ("final", "6x96", "3x192", "3x96")
        },
        "calibration": {
            "thresholds": {"width": [-0.1], "depth": [-0.1], "both": [-0.1, -0.1]},
            "target": 4.3,
            "runs": [],
            "fit": {"constants": {"N_c": 1e9, "alpha_N": 0.1, "S_c": 100.0, "alpha_S": 0.5}},
            "switches": {},
        },
        "failed": [],
    }
    os.makedirs(out)
    with open(out / "choices.json", "w") as f:
        json.dump(choices, f)
    plans = {}
    for r in runs(spec, data, choices):
        plan = r.build(choices)
        plans[r.name] = (r, plan)
        os.makedirs(out / "plans", exist_ok=True)
        with open(out / "plans" / f"{r.name}.yaml", "w") as f:
            yaml.safe_dump(plan, f)
        if r.kind in ("sweep", "small-sweep"):
            flops, loss = 2e12, {0.001: 4.7, 0.002: 4.6, 0.004: 4.8}[r.info["lr"]] + (0 if r.kind == "sweep" else 0.5)
        elif r.kind == "baseline":
            flops, loss = DECAYED[r.info["budget"]]
        else:
            flops, loss = 2e12, 4.45
        names = [s["name"] for s in plan["stages"]]
        evals = {
            i: [
                ((i + 0.5) / len(names) * flops, loss + 0.5 * (len(names) - i)),
                ((i + 1) / len(names) * flops, loss + 0.5 * (len(names) - 1 - i)),
            ]
            for i in range(len(names))
        }
        if r.name == "base-1.4":
            evals = {0: [(2e12, 4.5), (4e12, 4.25), (8e12, 4.1)]}
        for i, n in enumerate(names):
            d = out / "runs" / r.name / n
            os.makedirs(d)
            recs = []
            for j, (c, l) in enumerate(evals[i]):
                recs.append({"stage": n, "step": 10 * (j + 1), "loss": l + 0.1, "tokens": j + 1, "flops": c, "time": 100.0 * i + j})
                recs.append(
                    {
                        "stage": n,
                        "step": 10 * (j + 1),
                        "eval_loss": l,
                        "tokens": j + 1,
                        "flops": c,
                        "at": "stage_end" if j == len(evals[i]) - 1 else "periodic",
                        "time": 0,
                    }
                )
            with open(d / "log.jsonl", "w") as f:
                f.writelines(json.dumps(x) + "\n" for x in recs)
            with open(d / "status.json", "w") as f:
                json.dump({"state": "done", "step": 10 * len(evals[i])}, f)
    return spec_path, out, len(plans)


def _report(tmp_path, out, spec_path, data, *extra):
    import subprocess
    import sys

    root = os.path.join(os.path.dirname(__file__), "..", "..")
    md, png = tmp_path / "report" / "s.md", tmp_path / "plots" / "s.png"
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(root, "tools", "savings.py"),
            "report",
            "--out",
            str(out),
            "--data",
            data,
            "--md",
            str(md),
            "--png",
            str(png),
            "--spec",
            str(spec_path),
            *extra,
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.path.abspath(root)),
        timeout=300,
    )
    return r, md, png


def test_report_reads_the_strongest_curve_and_intervals(tmp_path, data_prefix):
    """The strongest curve is the envelope of every from-scratch eval point: base-1.4's mid-run 4.5 at 2e12
    beats the decayed 0.6 run's 4.6. staged-width (2e12 FLOPs, 4.45) then needs 2e12 x 2^0.2 on it (saving
    1 - 2^-0.2 = 12.9%) but 2e12 x 2^0.5 on the decayed-only curve (29.3%). The second seed has no such mid-run
    point: 29.3% on both. The headline is the mean over the two seeds with its t interval (t(0.975, 1))."""
    from megagrow.results.savings import mean_ci

    spec_path, out, n = _fake_experiment(tmp_path, data_prefix)
    r, md, png = _report(tmp_path, out, spec_path, data_prefix, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert [2e12, 4.5] in res["frontiers"]["0/strongest"] and [4e12, 4.25] in res["frontiers"]["0/strongest"]
    assert [2e12, 4.6] in res["frontiers"]["0/decayed"] and [2e12, 4.5] not in res["frontiers"]["0/decayed"]
    rows = {x["name"]: x for x in res["rows"]}
    sw = rows["staged-width"]["readings"]
    assert sw["strongest"]["saving"] == pytest.approx(1 - 2**-0.2, abs=1e-12)
    assert sw["decayed"]["saving"] == pytest.approx(1 - 2**-0.5, abs=1e-12)
    assert rows["staged-width-s2"]["readings"]["strongest"]["saving"] == pytest.approx(1 - 2**-0.5, abs=1e-12)
    g = res["groups"]["staged-width"]
    want = mean_ci([1 - 2**-0.2, 1 - 2**-0.5])
    assert g["strongest"]["mean"] == pytest.approx(want["mean"], abs=1e-12) and g["strongest"]["n"] == 2
    assert g["strongest"]["lo"] == pytest.approx(want["lo"], abs=1e-12)
    text = md.read_text()
    assert f"All {n} runs complete." in text and "+12.9%" in text and "+29.3%" in text
    assert "| final | 0.001 -> 4.7000, 0.002 -> 4.6000, 0.004 -> 4.8000 | 0.002 | yes |" in text
    assert png.stat().st_size > 10_000


def test_report_names_its_corpus_and_plot(tmp_path, data_prefix):
    """The report names the corpus it was run on (name, documents, tokens, content hash), gives the
    commands that reproduce this very report (its --data, --md and --png) and the plot path it wrote."""
    from megagrow.data.dataset import TokenDataset

    spec_path, out, n = _fake_experiment(tmp_path, data_prefix)
    r, md, png = _report(tmp_path, out, spec_path, data_prefix)
    assert r.returncode == 0, r.stderr[-3000:]
    text = md.read_text()
    name = os.path.basename(data_prefix)
    ds = TokenDataset(data_prefix)
    assert (
        f"Savings on `{name}`" in text
        and f"Corpus: `{name}` ({ds.num_documents:,} training documents, {ds.num_tokens:,} training tokens" in text
        and "sha256:" in text
    )
    assert f"--data data_cache/{name} " in text and f"--md {md} --png {png}" in text
    assert f"- Plot: `{png}`" in text and "docs/results/savings.png" not in text and "make data " not in text


def test_report_says_which_runs_are_incomplete(tmp_path, data_prefix):
    import subprocess
    import sys

    spec_path, out, n = _fake_experiment(tmp_path, data_prefix)
    for stage in ("small", "final"):
        with open(out / "runs" / "abl-width-sym4" / stage / "status.json", "w") as f:
            json.dump({"state": "running" if stage == "final" else "done", "step": 5}, f)
    r, md, _ = _report(tmp_path, out, spec_path, data_prefix)
    assert r.returncode == 0, r.stderr[-3000:]
    text = md.read_text()
    assert f"Runs complete: {n - 1} of {n}" in text and "abl-width-sym4" in text.split("Not complete")[1].splitlines()[0]
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    r = subprocess.run(
        [sys.executable, os.path.join(root, "tools", "savings.py"), "report", "--out", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.path.abspath(root)),
        timeout=300,
    )
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and "Traceback" not in r.stderr
