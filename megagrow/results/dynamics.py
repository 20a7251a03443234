"""`megagrow growth-dynamics` (= tools/growth_dynamics.py): the paper's "training dynamics" check at
tiny scale, on real text (CPU, one process).

    megagrow growth-dynamics [--op width|depth] [--flavour gpt2|llama] [--json]

1. Train a small model S steps. Its eval loss at that point is L_g.
2. Train the big model (the grown shape) from scratch until past L_g, then `--after` more
   steps; R = the first step at which its eval loss reaches L_g (the equivalent step).
3. Grow the small model (megagrow.growth: moments transformed, Adam step kept), place it on
   the big model's LR schedule at R with a short re-warmup, train `--after` steps.
4. The same growth with the optimizer state reset at growth (zero moments, step 0).

Reported: the loss change over the `--after` steps after growth (and after R for the
scratch model), the mean slope d loss / d step, and how far the grown curve stays from
the scratch curve shifted by R. The paper's claim: (3) follows (2) from R on; (4) does not.
Not part of the test suite (it takes a minute or two on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import time

import torch

# the checkout megagrow is installed from (pip install -e .): the corpus goes under its data_cache/
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def prepare(work: str, vocab: int) -> tuple[str, str]:
    """A train corpus and a held-out eval corpus (other files, same tokenizer)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    train_in = [os.path.join(stdlib, d) for d in ("email", "json", "logging", "http", "xml", "importlib")]
    eval_in = [os.path.join(stdlib, f) for f in ("argparse.py", "textwrap.py", "dataclasses.py")]
    tr, ev = os.path.join(work, "train"), os.path.join(work, "eval")
    env = dict(os.environ, PYTHONPATH=REPO)
    for out, extra, inputs in ((tr, ["--vocab-size", str(vocab)], train_in), (ev, ["--tokenizer", tr + ".model"], eval_in)):
        if not os.path.exists(out + ".bin"):
            cmd = [sys.executable, "-m", "megagrow.cli", "prepare-data", "--out", out, *extra, "--no-progress", "--input", *inputs]
            subprocess.run(cmd, check=True, env=env, capture_output=True)
    return tr, ev


class Data:
    def __init__(self, train: str, evalp: str, seq: int, batch: int, seed: int = 1234):
        from megagrow.data import GlobalSampler, TokenDataset

        self.tr, self.ev = TokenDataset(train), TokenDataset(evalp)
        self.seq, self.batch = seq, batch
        self.sampler = GlobalSampler(self.tr.num_windows(seq), seed)
        ne = min(self.ev.num_windows(seq), 64)
        rows = torch.from_numpy(self.ev.windows(list(range(ne)), seq).astype("int64"))
        self.eval_batches = [(r[:, :-1], r[:, 1:]) for r in rows.split(16)]

    def train_batch(self, step: int):
        rows = self.tr.windows(self.sampler.indices(step * self.batch, (step + 1) * self.batch), self.seq)
        x = torch.from_numpy(rows.astype("int64"))
        return x[:, :-1].contiguous(), x[:, 1:].contiguous()

    @torch.no_grad()
    def eval(self, model) -> float:
        model.eval()
        loss = sum(model(x, y).item() for x, y in self.eval_batches) / len(self.eval_batches)
        model.train()
        return loss


def run(
    model,
    opt,
    data: Data,
    sched,
    first_step: int,
    n: int,
    every: int,
    sched_offset: int = 0,
    stop_below: float | None = None,
    extra_after_stop: int = 0,
) -> list[tuple[int, float]]:
    """Train n steps (data steps first_step..), eval every `every`: [(steps done, eval loss)]."""
    curve = [(0, data.eval(model))]
    stop_at = None
    i = 0
    while i < n if stop_at is None else i < stop_at:
        for g in opt.param_groups:
            g["lr"] = sched(i + sched_offset)
        x, y = data.train_batch(first_step + i)
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        i += 1
        if i % every == 0:
            curve.append((i, data.eval(model)))
            if stop_below is not None and stop_at is None and curve[-1][1] <= stop_below:
                stop_at = i + extra_after_stop
    return curve


def crossing(curve, level: float) -> float:
    """First (interpolated) step at which the curve reaches `level`."""
    for (s0, l0), (s1, l1) in zip(curve, curve[1:]):
        if l1 <= level <= l0:
            return s0 + (s1 - s0) * (l0 - level) / max(l0 - l1, 1e-12)
    raise RuntimeError("the scratch run never reached the loss at growth; raise --max-scratch")


def at(curve, step: float) -> float:
    for (s0, l0), (s1, l1) in zip(curve, curve[1:]):
        if s0 <= step <= s1:
            return l0 + (l1 - l0) * (step - s0) / (s1 - s0)
    return curve[-1][1]


def slope(curve, lo: float, hi: float) -> float:
    pts = [(s, l) for s, l in curve if lo <= s <= hi]
    n = len(pts)
    mx, my = sum(s for s, _ in pts) / n, sum(l for _, l in pts) / n
    return sum((s - mx) * (l - my) for s, l in pts) / sum((s - mx) ** 2 for s, _ in pts)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megagrow growth-dynamics", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", choices=("width", "depth"), default="width")
    p.add_argument("--flavour", choices=("gpt2", "llama"), default="gpt2")
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--small-steps", type=int, default=300)
    p.add_argument("--after", type=int, default=100)
    p.add_argument("--rewarmup", type=int, default=20)
    p.add_argument("--symmetry-breaking", type=float, default=1.0, help="Width's noise (x init_std)")
    p.add_argument("--offdiag-moments", choices=("tiled", "zero"), default="tiled")
    p.add_argument("--seed", type=int, default=1, help="model init / growth noise seed")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-scratch", type=int, default=3000)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--work", default=os.path.join(REPO, "data_cache", "growth_dynamics"))
    p.add_argument("--json", action="store_true")
    return p


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    res = experiment(a)
    print(json.dumps(res) if a.json else describe(a, res))
    return 0


def experiment(a) -> dict:
    """Grow a small model once and train on: the loss curves of the grown model (optimizer state
    carried, and reset) against the big model from scratch from the step of equal loss."""
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    os.makedirs(a.work, exist_ok=True)
    tr, ev = prepare(a.work, 512)

    from megagrow.config import Layout, ModelConfig, OptimConfig
    from megagrow.growth import Depth, LRPlacement, Width, grow, load_training, state_from_training
    from megagrow.model.gpt import build_model
    from megagrow.parallel.groups import init_distributed
    from megagrow.schedule.lr import LRSchedule

    init_distributed(Layout())
    data = Data(tr, ev, a.seq, a.batch)
    small = ModelConfig(flavour=a.flavour, n_layers=a.layers, d_model=a.d_model, n_heads=4, vocab_size=512, seq_len=a.seq)
    op = Width(2, a.symmetry_breaking, a.offdiag_moments) if a.op == "width" else Depth(2)
    big = op.new_config(small)
    o = OptimConfig(
        lr=a.lr, min_lr=a.lr / 10, warmup_steps=50, decay_steps=a.max_scratch * 2, beta1=0.9, beta2=0.95, weight_decay=0.1, grad_clip=0.0
    )
    sched = LRSchedule.from_optim(o, o.decay_steps)
    t0 = time.time()

    def fresh(cfg, seed):
        return load_training(state_from_training(build_model(cfg, seed), None), o, seed=seed)

    # 1. the small model
    m, opt = fresh(small, a.seed)
    c_small = run(m, opt, data, sched, 0, a.small_steps, a.every)
    L_g = c_small[-1][1]
    st = state_from_training(m, opt, sample_index=a.small_steps * a.batch, lr_position=a.small_steps, peak_lr=a.lr)
    # 2. the big model from scratch, to past L_g and `after` more
    mb, ob = fresh(big, a.seed + 1)
    c_big = run(mb, ob, data, sched, 0, a.max_scratch, a.every, stop_below=L_g, extra_after_stop=a.after + a.every)
    R = crossing(c_big, L_g)
    R_int = int(round(R))
    res = {
        "op": op.describe(),
        "rewarmup": a.rewarmup,
        "flavour": a.flavour,
        "small": small.to_dict(),
        "big": big.to_dict(),
        "small_steps": a.small_steps,
        "loss_at_growth": L_g,
        "equivalent_step_R": R,
        "measured_c": a.small_steps / R,
        "paper_c": op.paper_c,
    }
    scratch_curve = [(s - R, l) for s, l in c_big if s >= R - 1e-9]
    scratch_curve = [(0.0, L_g)] + scratch_curve
    res["scratch"] = {"delta": at(c_big, R + a.after) - L_g, "slope": slope(c_big, R, R + a.after)}
    # 3./4. grown, optimizer state carried vs reset; LR placed at R with re-warmup
    place = LRPlacement(peak_lr=a.lr, equivalent_step=R_int, rewarmup=a.rewarmup)
    for name, reset in (("grown", False), ("grown_opt_reset", True)):
        g = grow(st, op, seed=a.seed, lr=place)
        if reset:
            g.exp_avg = {k: torch.zeros_like(t) for k, t in g.exp_avg.items()}
            g.exp_avg_sq = {k: torch.zeros_like(t) for k, t in g.exp_avg_sq.items()}
            g.step = 0
        mg, og = load_training(g, o)
        gs = g.schedule(o, o.decay_steps)
        c = run(mg, og, data, gs, a.small_steps, a.after, a.every)
        gap = [abs(l - at(c_big, R + s)) for s, l in c]
        res[name] = {
            "loss_after_growth": c[0][1],
            "delta": c[-1][1] - c[0][1],
            "slope": slope(c, 0, a.after),
            "max_above_growth": max(l for _, l in c) - c[0][1],
            "mean_gap_to_scratch": sum(gap) / len(gap),
            "curve": [round(l, 4) for _, l in c],
        }
    res["scratch"]["curve"] = [round(at(c_big, R + s), 4) for s, _ in c]
    res["seconds"] = time.time() - t0
    return res


def describe(a, res: dict) -> str:
    lines = [
        f"{a.flavour} {a.op} x2: small {a.small_steps} steps -> loss {res['loss_at_growth']:.4f}; scratch big reaches "
        f"it at R={res['equivalent_step_R']:.0f} (measured c = S_small/R = {res['measured_c']:.3f}, paper {res['paper_c']})"
    ]
    for k in ("scratch", "grown", "grown_opt_reset"):
        r = res[k]
        extra = "" if k == "scratch" else f"  max rise {r['max_above_growth']:+.4f}  mean |gap to scratch| {r['mean_gap_to_scratch']:.4f}"
        lines.append(f"  {k:16s} loss change over {a.after} steps {r['delta']:+.4f}  slope {r['slope']:+.2e}/step{extra}")
        lines.append(f"  {'':16s} curve {r['curve']}")
    lines.append(f"  ({res['seconds']:.0f} s)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
