#!/usr/bin/env python
"""The savings experiment: staged runs against from-scratch baselines at equal FLOPs.

    python tools/savings.py run    [--data PREFIX] [--out runs/savings] [--jobs 2]
    python tools/savings.py list   [--data PREFIX] [--json]          the runs, their stages and steps
    python tools/savings.py report [--out runs/savings] [--md docs/results/savings.md] [--png docs/results/savings.png]

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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megagrow.errors import UserError, cli_entry  # noqa: E402
from megagrow.fsutil import write_file_atomic  # noqa: E402

DEFAULT_SPEC = os.path.join("recipes", "savings", "experiment.yaml")
EXIT_PREEMPTED = 75


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D401
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tools/savings.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    for name, help_ in (("run", "train every run not done yet"), ("list", "print the runs and their plans"),
                        ("report", "write the markdown report and the plot from the logs")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--spec", default=DEFAULT_SPEC, help=f"experiment spec (default {DEFAULT_SPEC})")
        s.add_argument("--data", default="data_cache/stdlib", help="prepared corpus prefix, with a validation split "
                                                                   "(default data_cache/stdlib, from `make data`)")
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
            raise UserError(f"no prepared corpus at {prefix} ({prefix}{ext} missing): run `make data` or "
                            "tools/prepare_data.py --out PREFIX")


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
        from megagrow.results.experiment import runs

        self.args, self.spec = args, spec
        self.out = os.path.abspath(args.out)
        self.data = os.path.abspath(args.data)
        self.runs = runs(spec, self.data)
        self.procs: dict = {}  # name -> (Popen, log file, start time)
        self.failed: set = set()
        self.stopping = False
        self.choices_path = os.path.join(self.out, "choices.json")

    def states(self) -> dict:
        from megagrow.results.report import load_all

        return load_all(self.out, self.spec, self.data)

    def choices(self, states: dict) -> dict:
        """LR and headline, computed from the logs as soon as they can be (and then kept: a rerun
        must not change the config of runs already started)."""
        from megagrow.fsutil import write_json_atomic
        from megagrow.results.report import best_lr, headline

        ch = {}
        if os.path.isfile(self.choices_path):
            with open(self.choices_path) as f:
                ch = json.load(f)
        changed = False
        if "lr" not in ch:
            b = best_lr(states)
            if b:
                ch["lr"], ch["lr_run"] = b
                changed = True
        if "headline" not in ch:
            h = headline(states)
            if h:
                ch["headline"] = h
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
        if r.kind not in ("sweep",) and "lr" not in ch:
            return False
        if r.kind == "seed2-staged" and "headline" not in ch:
            return False
        return True

    def start(self, r, ch: dict) -> None:
        from megagrow.results.experiment import plan_of
        from megagrow.results.report import plan_path, run_dir

        plan = r.build(ch)
        plan_of(plan)  # validates: a bad spec is an error before anything trains
        path = plan_path(self.out, r.name)
        _write_yaml_atomic(path, plan)
        os.makedirs(os.path.join(self.out, "logs"), exist_ok=True)
        log = open(os.path.join(self.out, "logs", f"{r.name}.log"), "a")
        cmd = [sys.executable, "-m", "megagrow.cli", "run", path, "--run-dir", run_dir(self.out, r.name),
               "--data", self.data, "--max-procs", "1"]
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=REPO, start_new_session=True)
        self.procs[r.name] = (p, log, time.time())
        self.say(f"start  {r.name} ({r.kind})")

    def reload(self, name: str):
        from megagrow.results.report import load_state

        return load_state(self.out, next(r for r in self.runs if r.name == name))

    def record_time(self, name: str, seconds: float) -> None:
        """Wall seconds of this session of the run (a resumed run adds to what is recorded)."""
        from megagrow.fsutil import write_json_atomic

        path = os.path.join(self.out, "timing", f"{name}.json")
        prev = 0.0
        if os.path.isfile(path):
            with open(path) as f:
                prev = float(json.load(f).get("seconds", 0.0))
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

        only = set(self.args.only.split(",")) if self.args.only else None
        names = [r.name for r in self.runs]
        if only and not only <= set(names):
            raise UserError(f"--only: unknown run(s) {', '.join(sorted(only - set(names)))} (runs: {', '.join(names)})")
        todo = [r for r in self.runs if only is None or r.name in only]
        signal.signal(signal.SIGINT, self.on_signal)
        signal.signal(signal.SIGTERM, self.on_signal)
        states = self.states()
        bar = tqdm(total=len(todo), desc="savings runs", unit="run", file=sys.stderr,
                   initial=sum(states[r.name].done for r in todo))
        skipped = [r.name for r in todo if states[r.name].done]
        if skipped:
            self.say(f"done already (skipped): {', '.join(skipped)}")
        while True:
            states = self.states()
            ch = self.choices(states)
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
                    self.say(f"FAILED {name} (exit {rc}; see {os.path.join(self.out, 'logs', name + '.log')})")
            if self.stopping:
                if not self.procs:
                    bar.close()
                    return EXIT_PREEMPTED
                time.sleep(1)
                continue
            pending = [r for r in todo if not states[r.name].done and r.name not in self.procs and r.name not in self.failed]
            for r in pending:
                if len(self.procs) >= self.args.jobs:
                    break
                if self.ready(r, states, ch):
                    self.start(r, ch)
            if not self.procs:
                bar.close()
                left = [r.name for r in pending]
                if left:
                    why = "a dependency failed or is missing"
                    sweep = [s for s in states.values() if s.spec.kind == "sweep"]
                    if "lr" not in ch and sweep and all(s.done for s in sweep):
                        why = ("the LR sweep runs have no validation loss in their logs (eval records): "
                               "does the data have a validation split (tools/prepare_data.py --valid-fraction)?")
                    self.say(f"cannot run ({why}): {', '.join(left)}")
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
    from megagrow.results.experiment import plan_of, runs

    ctx = {"lr": spec["lr_sweep"]["lrs"][0], "headline": f"staged-{spec['ablation_base']}"}
    rows = []
    for r in runs(spec, args.data):
        plan = plan_of(r.build(ctx))
        rows.append({"run": r.name, "kind": r.kind, "after": r.deps,
                     "stages": [{"name": s.name, "model": f"{s.model.n_layers}x{s.model.d_model}", "steps": s.steps,
                                 "grow": s.grow, "stop": s.stop.rule} for s in plan.stages]})
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for x in rows:
            st = " -> ".join(f"{s['model']} x{s['steps']}{' (slope)' if s['stop'] == 'slope' else ''}" for s in x["stages"])
            print(f"{x['run']:24s} {x['kind']:15s} {st}")
        print("(LR and the headline's config are decided from the logs while the experiment runs)")
    return 0


def commands(args) -> list[str]:
    """The commands that reproduce the report from a fresh checkout (the Makefile's defaults); a
    corpus outside the checkout is named by its file name only (the report must not carry paths of
    the machine that made it)."""
    data = os.path.relpath(os.path.abspath(args.data), REPO)
    if data.startswith(".."):
        data = f"data_cache/{os.path.basename(args.data)}"
    return ["make data   # the default corpus (data_cache/stdlib), if not prepared yet",
            "make savings   # = the two commands below",
            f"python tools/savings.py run --data {data} --out runs/savings --jobs 2",
            "python tools/savings.py report --out runs/savings --md docs/results/savings.md --png docs/results/savings.png"]


def cmd_report(args, spec) -> int:
    from megagrow.results.render import markdown, plot
    from megagrow.results.report import build

    if not os.path.isdir(args.out):
        raise UserError(f"no experiment directory {args.out}: run `tools/savings.py run` first")
    res = build(os.path.abspath(args.out), spec, args.spec, os.path.abspath(args.data))
    res["out"] = args.out
    md = markdown(res, spec, commands(args))
    os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
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
