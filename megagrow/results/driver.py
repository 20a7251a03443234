"""`megagrow savings` (= tools/savings.py): staged runs against from-scratch baselines at equal FLOPs.

    megagrow savings run    [--data PREFIX] [--out runs/savings] [--jobs 2]
    megagrow savings list   [--data PREFIX] [--json]          the runs, their stages and steps
    megagrow savings report [--out runs/savings] [--md docs/results/savings.md] [--png docs/results/savings.png]

`run` trains every run of recipes/savings/experiment.yaml (`--spec`) with `megagrow run`, one
process each, `--jobs` at a time, in priority order (LR sweep, baselines, staged, slope-rule,
ablations, second seed). It is resumable: a run whose stages are all done (their status.json)
is skipped, an interrupted one resumes from its checkpoints; SIGINT/SIGTERM make the running
stages save and the driver exit 75. Choices it makes from the logs (the best LR of the sweep,
the headline staged run) are written to OUT/choices.json. `report` writes the markdown and the
plot from whatever has finished, saying which runs are incomplete. The data must be a prepared
corpus with a validation split (tools/prepare_data.py; `make data` prepares the default one).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

from megagrow.errors import UserError, cli_entry
from megagrow.fsutil import read_json, write_file_atomic

# the checkout megagrow is installed from (pip install -e .): recipes/, runs/, docs/ are found there
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_SPEC = os.path.join("recipes", "savings", "experiment.yaml")
EXIT_PREEMPTED = 75


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D401
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="megagrow savings",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    for name, help_ in (
        ("run", "train every run not done yet"),
        ("list", "print the runs and their plans"),
        ("report", "write the markdown report and the plot from the logs"),
    ):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--spec", default=DEFAULT_SPEC, help=f"experiment spec (default {DEFAULT_SPEC})")
        s.add_argument(
            "--data",
            default="data_cache/stdlib",
            help="prepared corpus prefix, with a validation split (default data_cache/stdlib, from `make data`)",
        )
        s.add_argument("--out", default="runs/savings", help="experiment directory: plans/, runs/, logs/ (default runs/savings)")
        s.add_argument("--json", action="store_true", help="print JSON on stdout")
        if name == "run":
            s.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2; each is one process)")
            s.add_argument("--only", help="comma-separated run names to train (others are left alone)")
        if name == "report":
            s.add_argument("--md", default=os.path.join("docs", "results", "savings.md"), help="markdown output")
            s.add_argument("--png", default=os.path.join("docs", "results", "savings.png"), help="plot output")
    return p


def _check_data(prefix: str) -> None:
    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise UserError(
                f"no prepared corpus at {prefix} ({prefix}{ext} missing): run `make data` or tools/prepare_data.py --out PREFIX"
            )


def _write_yaml_atomic(path: str, d: dict) -> None:
    import yaml

    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_file_atomic(path, yaml.safe_dump(d, sort_keys=False))


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("DS_ACCELERATOR", "cpu")
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


# ----------------------------------------------------------------------------- run
class Driver:
    def __init__(self, args, spec: dict):
        self.args, self.spec = args, spec
        self.out = os.path.abspath(args.out)
        self.data = os.path.abspath(args.data)
        self.procs: dict = {}  # name -> (Popen, log file, start time)
        self.failed: set = set()
        self.stopping = False
        self.choices_path = os.path.join(self.out, "choices.json")
        self.ch = read_json(self.choices_path) or {}
        self.ch.setdefault("failed", [])
        # a failed sweep run counts as diverged for good; any other failed run is retried by a new driver
        self.failed |= {n for n in self.ch["failed"] if n.startswith(("sweep-", "small-"))}

    @property
    def runs(self) -> list:
        from megagrow.results.experiment import runs

        return runs(self.spec, self.data, self.ch)

    def states(self) -> dict:
        from megagrow.results.states import load_all

        return load_all(self.out, self.spec, self.data, self.ch)

    def choices(self, states: dict) -> dict:
        """The LR of each size (its sweep extended until the best is interior), then the law
        calibrated on the first seed's from-scratch runs: computed from the logs as soon as they
        can be, and then kept (a rerun must not change the config of runs already started)."""
        from megagrow.fsutil import write_json_atomic
        from megagrow.results.experiment import bracket, sweep_sizes
        from megagrow.results.report import calibrate
        from megagrow.results.states import sweep_losses

        ch, changed = self.ch, False
        sw = self.spec["lr_sweep"]
        for key in sweep_sizes(self.spec):
            if key in ch.setdefault("lr", {}):
                continue
            losses = sweep_losses(states, key, set(ch["failed"]) | self.failed)
            step = bracket(losses, float(sw.get("factor", 2)), int(sw.get("max_runs", 6)))
            if step["state"] == "extend":
                ch.setdefault("sweeps", {}).setdefault(key, [])
                if step["lr"] not in ch["sweeps"][key]:
                    ch["sweeps"][key].append(step["lr"])
                    self.say(f"sweep  {key}: best LR at the edge of {sorted(losses)}: adding {step['lr']:g}")
                    changed = True
            elif step["state"] == "done":
                ch["lr"][key] = {
                    "lr": step["lr"],
                    "bracketed": step["bracketed"],
                    "losses": {f"{k:g}": v for k, v in sorted(losses.items())},
                }
                self.say(f"LR     {key}: {step['lr']:g} ({'interior' if step['bracketed'] else 'NOT bracketed'})")
                changed = True
        if "calibration" not in ch:
            cal = calibrate(states, self.spec, ch)
            if cal is not None:
                ch["calibration"] = cal
                self.say(
                    "calibrated the law: "
                    + (cal["error"] if "error" in cal else ", ".join(f"{k} {v}" for k, v in cal["thresholds"].items()))
                )
                changed = True
        if changed:
            os.makedirs(self.out, exist_ok=True)
            write_json_atomic(self.choices_path, ch)
        return ch

    def ready(self, r, states: dict, ch: dict) -> bool:
        if any(d in self.failed for d in r.deps) or r.name in self.failed:
            return False
        if not all(states[d].done for d in r.deps):
            return False
        for need in r.needs:
            if need[0] == "lr" and need[1] not in ch.get("lr", {}):
                return False
            if need[0] == "calibration" and "thresholds" not in ch.get("calibration", {}):
                return False
        return True

    def blocked(self, r, ch: dict) -> str | None:
        """Why `r` can never start in this session, or None."""
        if ("calibration",) in r.needs and "error" in ch.get("calibration", {}):
            return "the law could not be calibrated: " + ch["calibration"]["error"]
        return None

    def start(self, r, ch: dict) -> None:
        from megagrow.results.experiment import plan_of
        from megagrow.results.states import plan_path, run_dir

        plan = r.build(ch)
        plan_of(plan)  # validates: a bad spec is an error before anything trains
        path = plan_path(self.out, r.name)
        _write_yaml_atomic(path, plan)
        os.makedirs(os.path.join(self.out, "logs"), exist_ok=True)
        log = open(os.path.join(self.out, "logs", f"{r.name}.log"), "a")
        cmd = [
            sys.executable,
            "-m",
            "megagrow.cli",
            "run",
            path,
            "--run-dir",
            run_dir(self.out, r.name),
            "--data",
            self.data,
            "--max-procs",
            "1",
        ]
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=REPO, start_new_session=True)
        self.procs[r.name] = (p, log, time.time())
        self.say(f"start  {r.name} ({r.kind})")

    def reload(self, name: str):
        from megagrow.results.states import load_state

        return load_state(self.out, next(r for r in self.runs if r.name == name))

    def record_time(self, name: str, seconds: float) -> None:
        """Wall seconds of this session of the run (a resumed run adds to what is recorded)."""
        from megagrow.fsutil import write_json_atomic

        path = os.path.join(self.out, "timing", f"{name}.json")
        prev = float((read_json(path) or {}).get("seconds", 0.0))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json_atomic(path, {"seconds": prev + seconds})

    def say(self, msg: str) -> None:
        print(f"[savings {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def on_signal(self, signum, frame) -> None:
        self.stopping = True
        for p, _, _ in self.procs.values():
            try:
                p.send_signal(signal.SIGTERM)  # the controller forwards it: the stage saves and exits 75
            except ProcessLookupError:
                pass

    def loop(self) -> int:
        from tqdm import tqdm

        from megagrow.fsutil import write_json_atomic

        only = set(self.args.only.split(",")) if self.args.only else None
        signal.signal(signal.SIGINT, self.on_signal)
        signal.signal(signal.SIGTERM, self.on_signal)
        states = self.states()
        self.choices(states)
        if only and not only <= set(states):
            raise UserError(f"--only: unknown run(s) {', '.join(sorted(only - set(states)))} (runs: {', '.join(states)})")
        bar = tqdm(total=len(states), desc="savings runs", unit="run", file=sys.stderr, initial=sum(s.done for s in states.values()))
        skipped = [n for n, s in states.items() if s.done and (only is None or n in only)]
        if skipped:
            self.say(f"done already (skipped): {', '.join(skipped)}")
        while True:
            states = self.states()
            ch = self.choices(states)
            if set(states) != {r.name for r in self.runs}:  # a sweep was extended: its new run has a state too
                states = self.states()
            todo = [r for r in self.runs if only is None or r.name in only]
            bar.total = len(states)
            bar.refresh()
            for name, (p, log, t0) in list(self.procs.items()):
                rc = p.poll()
                if rc is None:
                    continue
                log.close()
                del self.procs[name]
                states[name] = self.reload(name)
                self.record_time(name, time.time() - t0)
                if states[name].done:
                    bar.update(1)
                    self.say(f"done   {name}")
                elif rc == EXIT_PREEMPTED or self.stopping:
                    self.say(f"saved  {name} (interrupted; rerun to resume)")
                else:
                    self.failed.add(name)
                    if name not in ch["failed"]:
                        ch["failed"].append(name)
                        write_json_atomic(self.choices_path, ch)
                    self.say(f"FAILED {name} (exit {rc}; see {os.path.join(self.out, 'logs', name + '.log')})")
            if self.stopping:
                if not self.procs:
                    bar.close()
                    return EXIT_PREEMPTED
                time.sleep(1)
                continue
            pending = [r for r in todo if not states[r.name].done and r.name not in self.procs and r.name not in self.failed]
            never = {r.name: self.blocked(r, ch) for r in pending if self.blocked(r, ch)}
            for r in pending:
                if len(self.procs) >= self.args.jobs:
                    break
                if r.name not in never and self.ready(r, states, ch):
                    self.start(r, ch)
            if not self.procs:
                bar.close()
                left = [r.name for r in pending]
                for n, why in never.items():
                    self.say(f"cannot run {n}: {why}")
                if left:
                    self.say(f"cannot run (a dependency failed or is missing): {', '.join(n for n in left if n not in never)}")
                    return 1
                self.say("all runs done")
                return 1 if self.failed else 0
            time.sleep(3)


def cmd_run(args, spec) -> int:
    _check_data(args.data)
    if args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {args.jobs}")
    return Driver(args, spec).loop()


def cmd_list(args, spec) -> int:
    from megagrow.results.experiment import KINDS, plan_of, runs, sweep_sizes
    from megagrow.schedule.slope import THRESHOLDS

    lr0 = float(spec["lr_sweep"]["lrs"][1])  # a placeholder: the sweeps decide
    ctx = {
        "lr": {k: {"lr": lr0} for k in sweep_sizes(spec)},
        "calibration": {"thresholds": {k: [THRESHOLDS["width" if k == "width" else "depth"]] * 2 for k in KINDS}},
    }
    rows = []
    for r in runs(spec, args.data):
        plan = plan_of(r.build(ctx))
        rows.append(
            {
                "run": r.name,
                "kind": r.kind,
                "after": r.deps,
                "stages": [
                    {
                        "name": s.name,
                        "model": f"{s.model.n_layers}x{s.model.d_model}",
                        "steps": s.steps,
                        "grow": s.grow,
                        "stop": s.stop.rule,
                    }
                    for s in plan.stages
                ],
            }
        )
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for x in rows:
            st = " -> ".join(f"{s['model']} x{s['steps']}{' (slope)' if s['stop'] == 'slope' else ''}" for s in x["stages"])
            print(f"{x['run']:24s} {x['kind']:15s} {st}")
        print("(the LR of each size, extra sweep runs and the slope thresholds are decided from the logs while the experiment runs)")
    return 0


def commands(args) -> list[str]:
    """The commands that reproduce this report from a fresh checkout: the corpus's own preparation
    (a Makefile target where there is one), the run and the report with this invocation's paths.
    A path outside the checkout is named by its file name under data_cache/ (the report must not
    carry paths of the machine that made it)."""

    def rel(path: str, default_dir: str) -> str:
        r = os.path.relpath(os.path.abspath(path), REPO)
        return os.path.join(default_dir, os.path.basename(path)) if r.startswith("..") else r

    data = rel(args.data, "data_cache")
    out = rel(args.out, "runs")
    prep = {
        "data_cache/stdlib": "make data            # prepares data_cache/stdlib (the Python standard library's sources)",
        "data_cache/manpages": "python tools/prepare_data.py --out data_cache/manpages --input /usr/share/man --input-kind man "
        "--vocab-size 4096 --valid-fraction 0.01   # every installed English man page: which pages "
        "depends on the Debian packages installed (compare the content hash; `make data-manpages` "
        "prepares the same kind of corpus)",
    }
    first = prep.get(data, f"python tools/prepare_data.py --out {data} --input YOUR_CORPUS --vocab-size 4096   # the corpus named above")
    lines = ["make install", first]
    spec = "" if os.path.abspath(args.spec) == os.path.join(REPO, DEFAULT_SPEC) else f" --spec {rel(args.spec, 'recipes')}"
    if (
        not spec
        and data == "data_cache/stdlib"
        and out == "runs/savings"
        and args.md == os.path.join("docs", "results", "savings.md")
        and args.png == os.path.join("docs", "results", "savings.png")
    ):
        lines.append("make savings         # = the two commands below")
    lines += [
        f"python tools/savings.py run{spec} --data {data} --out {out} --jobs 2",
        f"python tools/savings.py report{spec} --data {data} --out {out} --md {args.md} --png {args.png}",
    ]
    return lines


def cmd_report(args, spec) -> int:
    from megagrow.results.figure import plot
    from megagrow.results.render import markdown
    from megagrow.results.report import build

    if not os.path.isdir(args.out):
        raise UserError(f"no experiment directory {args.out}: run `tools/savings.py run` first")
    _check_data(args.data)
    res = build(os.path.abspath(args.out), spec, args.spec, os.path.abspath(args.data))
    res["out"] = args.out
    md = markdown(res, spec, commands(args), args.png)
    for path in (args.md, args.png):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    plot(res, os.path.abspath(args.out), args.png)
    write_file_atomic(args.md, md)
    if args.json:
        print(json.dumps(res, indent=1, default=str))
    else:
        print(f"wrote {args.md} and {args.png} ({len(res['complete'])} of {len(res['rows'])} runs complete)")
    return 0


@cli_entry
def main(argv=None) -> int:
    from megagrow.results.experiment import load_spec

    args = build_parser().parse_args(argv)
    spec = load_spec(args.spec)
    return {"run": cmd_run, "list": cmd_list, "report": cmd_report}[args.cmd](args, spec)


if __name__ == "__main__":
    sys.exit(main())
