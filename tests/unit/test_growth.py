"""Growth operators (megagrow.growth): every property checked on tiny models TRAINED a few
AdamW steps on real text (the conftest dataset), never on a fresh init.

Numbers (loss before/after, symmetry-breaking divergence, post-growth curves) are printed;
run with `pytest -s tests/unit/test_growth.py` to see them.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from megagrow.config import Layout, ModelConfig, OptimConfig
from megagrow.errors import UserError
from megagrow.growth import (
    FFN,
    Copy,
    Depth,
    Fill,
    GrowthState,
    Heads,
    Identity,
    LRPlacement,
    Noise,
    Stack,
    TensorMap,
    Width,
    apply_map,
    apply_tensor,
    grow,
    heads_tensors,
    kaplan_peak_lr,
    load_training,
    logical_tensors,
    noise_values,
    operator_between,
    operator_from_dict,
    plan_growth,
    state_from_training,
)

SEQ, B, D, H = 32, 8, 32, 4
PRE_STEPS = 15
OPT = OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=5, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=0.0)
EVAL_AT = 1_000_000  # eval batches: fixed batches from far along the sample stream


class Env:
    def __init__(self, prefix: str):
        from megagrow.data import GlobalSampler, TokenDataset
        from megagrow.parallel.groups import init_distributed

        init_distributed(Layout())
        self.ds = TokenDataset(prefix)
        self.sampler = GlobalSampler(self.ds.num_windows(SEQ), 1234)
        self.cache: dict = {}

    def batch(self, i: int, b: int = B):
        rows = self.ds.windows(self.sampler.indices(i * b, (i + 1) * b), SEQ)
        x = torch.from_numpy(rows.astype("int64"))
        return x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def cfg(self, flavour="gpt2", tie=True, **kw) -> ModelConfig:
        if flavour == "llama_gqa":  # grouped-query attention: 4 query heads in 2 groups
            flavour, kw = "llama", {"n_kv_heads": 2, **kw}
        return ModelConfig(flavour=flavour, n_layers=2, d_model=D, n_heads=H, vocab_size=512, seq_len=SEQ, tie_embeddings=tie, **kw)

    def train(self, model, opt, start: int, n: int, sched=None, offset: int = 0) -> list[float]:
        out = []
        for i in range(start, start + n):
            if sched is not None:
                for g in opt.param_groups:
                    g["lr"] = sched(i - offset)
            x, y = self.batch(i)
            loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            out.append(loss.item())
        return out

    @torch.no_grad()
    def eval(self, model, n: int = 2) -> float:
        was = model.training
        model.eval()
        tot = sum(model(*self.batch(EVAL_AT + j, 16)).item() for j in range(n)) / n
        model.train(was)
        return tot

    def trained(self, flavour="gpt2", tie=True, steps=PRE_STEPS) -> GrowthState:
        """A model trained `steps` AdamW steps (cached), as a GrowthState."""
        key = (flavour, tie, steps)
        if key not in self.cache:
            from megagrow.model.gpt import build_model
            from megagrow.schedule.lr import LRSchedule

            fresh = state_from_training(build_model(self.cfg(flavour, tie), seed=7), None)
            model, opt = load_training(fresh, OPT)  # AdamW with megagrow's param groups
            sched = LRSchedule.from_optim(OPT, 200)
            self.train(model, opt, 0, steps, sched)
            self.cache[key] = state_from_training(model, opt, sample_index=steps * B, lr_position=steps, peak_lr=OPT.lr)
        return self.cache[key]


@pytest.fixture(scope="module")
def env(data_prefix) -> Env:
    return Env(data_prefix)


def model_of(state: GrowthState, lr: float | None = None):
    model, opt = load_training(state, OPT, seed=3, lr=lr)
    return model, opt


# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour,tie", [("gpt2", True), ("gpt2", False), ("llama", True), ("llama", False), ("llama_gqa", False)])
def test_logical_tensor_table_matches_the_model(env, flavour, tie):
    """logical_tensors(config) (what maps are declared against) == the model's parameter names and shapes."""
    from megagrow.model.gpt import build_model

    c = env.cfg(flavour, tie)
    model = build_model(c, 0)
    assert [(n, tuple(p.shape)) for n, p in model.named_parameters()] == list(logical_tensors(c).items())


OPS = {
    "width2": Width(2),
    "width3": Width(3),
    "width2_nobreak": Width(2, symmetry_breaking=0.0),
    "width2_zero_offdiag": Width(2, offdiag_moments="zero"),
    "width2_fresh": Width(2, new_units="init"),
    "width3_fresh": Width(3, new_units="init"),
    "depth_interleave": Depth(2, "interleave"),
    "depth_append": Depth(2, "append"),
    "depth_x3_init": Depth(3, "interleave", "init"),
    "ffn": FFN(d_ff=200),
    "heads": Heads(6),  # 4 -> 6 heads, head_dim kept: attention width 48 > d_model 32
    "identity": Identity(),
}
LOSS_TABLE: list = []


@pytest.mark.parametrize("opname", list(OPS))
@pytest.mark.parametrize("flavour,tie", [("gpt2", True), ("gpt2", False), ("llama", True), ("llama", False), ("llama_gqa", False)])
def test_operator_preserves_eval_loss(env, flavour, tie, opname):
    """Eval loss (dropout 0) on a real batch of a trained model: before == after growth within 1e-5 (fp32)."""
    st = env.trained(flavour, tie)
    old, _ = model_of(st)
    before = env.eval(old)
    new_state = grow(st, OPS[opname], seed=11)
    new, _ = model_of(new_state)
    after = env.eval(new)
    LOSS_TABLE.append((flavour, tie, opname, before, after))
    print(f"\n[loss] {flavour:5s} tied={tie!s:5s} {opname:20s} before {before:.7f} after {after:.7f} diff {after - before:+.2e}")
    assert abs(after - before) < 1e-5
    assert new_state.config == OPS[opname].new_config(st.config)


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_stack_runs_and_is_not_loss_preserving(env, flavour):
    """G_stack (layers [0..L) twice) is documented as NOT loss preserving: it runs, doubles the depth, the loss differs."""
    st = env.trained(flavour, True)
    before = env.eval(model_of(st)[0])
    g = grow(st, Stack(2), seed=11)
    assert g.config.n_layers == 2 * st.config.n_layers
    new, opt = model_of(g)
    after = env.eval(new)
    print(f"\n[loss] {flavour} stack x2: before {before:.6f} after {after:.6f} (differs by {after - before:+.2e})")
    assert math.isfinite(after) and abs(after - before) > 1e-5
    assert not Stack(2).exact
    losses = env.train(new, opt, PRE_STEPS, 3)
    assert all(math.isfinite(x) for x in losses)
    # the stacked copies carry the moments of their source layer, unscaled
    assert torch.equal(g.exp_avg["blocks.3.attn.q.weight"], st.exp_avg["blocks.1.attn.q.weight"])


def _grads(model, x, y) -> dict:
    model.zero_grad(set_to_none=True)
    model(x, y).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("flavour,tie", [("gpt2", True), ("gpt2", False), ("llama", True), ("llama", False), ("llama_gqa", False)])
def test_width_gradients_match_the_moment_rule(env, flavour, tie, k):
    """After width growth (no symmetry noise) the grown model's gradient on a batch equals the old gradient
    pushed through the map with the exp_avg factors: repeated blocks AND off-diagonal blocks g/k, final norm g
    (tied), untied head g. So m*s, v*s^2 leave Adam's per-element step unchanged."""
    st = env.trained(flavour, tie)
    x, y = env.batch(EVAL_AT + 5)
    g_old = _grads(model_of(st)[0], x, y)
    op = Width(k, symmetry_breaking=0.0)
    g_new = _grads(model_of(grow(st, op))[0], x, y)
    pred = apply_map(plan_growth(op, st.config).tensors, g_old, "m", 0)
    scale = max(t.abs().max().item() for t in g_old.values())
    worst = 0.0
    for n in g_new:
        err = (g_new[n] - pred[n]).abs().max().item()
        worst = max(worst, err / scale)
        # atol: gradients that are exactly 0 in exact arithmetic (attn k bias) are pure rounding
        torch.testing.assert_close(g_new[n], pred[n], rtol=2e-4, atol=2e-6 * scale, msg=lambda m: f"{n}: {m}")
    # the rule is not vacuous: the off-diagonal blocks' gradient is g/k, not 0
    q = g_new["blocks.0.attn.q.weight"]
    torch.testing.assert_close(q[:D, D : 2 * D], g_old["blocks.0.attn.q.weight"] / k, rtol=2e-4, atol=2e-6 * scale)
    print(f"\n[grad] {flavour} tied={tie} width x{k}: max |g_new - rule(g_old)| / max|g| = {worst:.1e}")


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("flavour,tie", [("gpt2", True), ("llama_gqa", False)])
def test_width_fresh_units_gradients(env, flavour, tie, k):
    """Width growth with fresh units (`width:init`): the grown model's gradient equals the old gradient pushed
    through the map with the exp_avg factors everywhere except the fresh units' output columns (declared
    moments 0); those have a non-zero gradient at once (the fresh units learn from the first step), and the
    fresh units' input rows have exactly zero gradient (their output weights are 0)."""
    st = env.trained(flavour, tie)
    x, y = env.batch(EVAL_AT + 5)
    g_old = _grads(model_of(st)[0], x, y)
    op = Width(k, new_units="init")
    g_new = _grads(model_of(grow(st, op, seed=4))[0], x, y)
    pred = apply_map(plan_growth(op, st.config).tensors, g_old, "m", 0)
    scale = max(t.abs().max().item() for t in g_old.values())
    for n in g_new:
        if n.endswith(("attn.o.weight", "mlp.fc2.weight", "mlp.down.weight")):
            units = g_old[n].shape[1]
            torch.testing.assert_close(g_new[n][:, :units], pred[n][:, :units], rtol=2e-4, atol=2e-6 * scale)
            fresh = g_new[n][:, units:]
            assert fresh.abs().max().item() > 1e-3 * scale, n  # learns at once
        else:
            torch.testing.assert_close(g_new[n], pred[n], rtol=2e-4, atol=2e-6 * scale, msg=lambda m: f"{n}: {m}")
    q_old = g_old["blocks.0.attn.q.weight"]
    q = g_new["blocks.0.attn.q.weight"]
    assert q[q_old.shape[0] :].abs().max().item() == 0.0
    for c in range(k):  # each copy's input block of the old units: exactly the old gradient
        torch.testing.assert_close(q[: q_old.shape[0], c * D : (c + 1) * D], q_old, rtol=2e-4, atol=2e-6 * scale)


def test_width_fresh_units_spec():
    """`width:init` names the fresh-units width operator; anything else after `width:` is a user error."""
    c = ModelConfig(vocab_size=64, seq_len=16, n_layers=2, d_model=32, n_heads=4)
    assert operator_between("width:init", c, c.replace(d_model=64, n_heads=8)) == Width(2, new_units="init")
    assert operator_between("width:copy", c, c.replace(d_model=64, n_heads=8)) == Width(2)
    with pytest.raises(UserError, match="width:init"):
        operator_between("width:fresh", c, c.replace(d_model=64, n_heads=8))


@pytest.mark.parametrize("op", [Depth(2, "interleave"), Depth(2, "append"), FFN(d_ff=200)], ids=["interleave", "append", "ffn"])
def test_depth_and_ffn_keep_the_old_gradients(env, op):
    """Depth (identity layers) and FFN growth leave the gradient of every old tensor unchanged (moments kept
    unscaled); inserted layers get a gradient only on their zero output projections."""
    st = env.trained("gpt2", True)
    x, y = env.batch(EVAL_AT + 5)
    g_old = _grads(model_of(st)[0], x, y)
    g_new = _grads(model_of(grow(st, op))[0], x, y)
    gp = plan_growth(op, st.config)
    scale = max(t.abs().max().item() for t in g_old.values())
    for n, t in gp.tensors.items():
        for p in t.pieces:
            if isinstance(p, Copy) and p.factor("m") == 1.0:
                sl = tuple(slice(a, b) for a, b in p.dst)
                src = tuple(slice(a, b) for a, b in p.src_box)
                torch.testing.assert_close(g_new[n][sl], g_old[p.src][src], rtol=2e-4, atol=2e-6 * scale)
    if isinstance(op, Depth):
        inserted = 1 if op.placement == "interleave" else 2
        assert g_new[f"blocks.{inserted}.attn.o.weight"].abs().max() > 0
        assert g_new[f"blocks.{inserted}.attn.q.weight"].abs().max() == 0  # behind a zero output projection


def test_moments_follow_the_declared_rule_exactly(env):
    """Grown exp_avg / exp_avg_sq equal the declared rule: bitwise for copies, exact fp32 scales."""
    for tie in (True, False):
        st = env.trained("gpt2", tie)
        g = grow(st, Width(2))
        m, v = st.exp_avg, st.exp_avg_sq
        q, q2 = m["blocks.0.attn.q.weight"], g.exp_avg["blocks.0.attn.q.weight"]
        for r in range(2):
            for c in range(2):  # diagonal and off-diagonal blocks alike: m/2, v/4 (power-of-2 scales: exact)
                assert torch.equal(q2[r * D : (r + 1) * D, c * D : (c + 1) * D], q * 0.5)
                assert torch.equal(
                    g.exp_avg_sq["blocks.0.attn.q.weight"][r * D : (r + 1) * D, c * D : (c + 1) * D], v["blocks.0.attn.q.weight"] * 0.25
                )
        assert torch.equal(g.exp_avg["tok_emb.weight"], torch.cat([m["tok_emb.weight"] * 0.5] * 2, 1))
        if tie:  # final norm halved in the weights, moments unscaled
            assert torch.equal(g.params["ln_f.weight"], torch.cat([st.params["ln_f.weight"] * 0.5] * 2))
            assert torch.equal(g.exp_avg["ln_f.weight"], torch.cat([m["ln_f.weight"]] * 2))
            assert torch.equal(g.exp_avg_sq["ln_f.bias"], torch.cat([v["ln_f.bias"]] * 2))
        else:  # the untied head carries the 1/2 instead; its moments unscaled, final norm's m/2, v/4
            assert torch.equal(g.exp_avg["lm_head.weight"], torch.cat([m["lm_head.weight"]] * 2, 1))
            assert torch.equal(g.exp_avg["ln_f.weight"], torch.cat([m["ln_f.weight"] * 0.5] * 2))
        assert g.step == st.step and g.sample_index == st.sample_index
    st = env.trained("gpt2", True)
    g3 = grow(st, Width(3, offdiag_moments="zero"))
    q3 = g3.exp_avg["blocks.1.mlp.fc1.weight"]
    F = st.config.ffn_dim
    assert torch.equal(q3[F : 2 * F, D : 2 * D], st.exp_avg["blocks.1.mlp.fc1.weight"] * (1 / 3))
    assert torch.equal(g3.exp_avg_sq["blocks.1.mlp.fc1.weight"][2 * F :, 2 * D :], st.exp_avg_sq["blocks.1.mlp.fc1.weight"] * (1 / 9))
    assert torch.count_nonzero(q3[:F, D:]) == 0  # "zero" variant: off-diagonal moments 0
    dp = grow(st, Depth(2, "interleave"))
    for n in ("attn.q.weight", "mlp.fc2.bias", "ln1.weight"):
        assert torch.equal(dp.exp_avg[f"blocks.2.{n}"], st.exp_avg[f"blocks.1.{n}"])
        assert torch.equal(dp.exp_avg_sq[f"blocks.2.{n}"], st.exp_avg_sq[f"blocks.1.{n}"])
        assert torch.count_nonzero(dp.exp_avg[f"blocks.3.{n}"]) == 0 and torch.count_nonzero(dp.exp_avg_sq[f"blocks.3.{n}"]) == 0
    assert torch.count_nonzero(dp.params["blocks.3.attn.o.weight"]) == 0 and torch.count_nonzero(dp.params["blocks.3.mlp.fc2.bias"]) == 0
    assert torch.equal(dp.params["blocks.3.attn.q.weight"], st.params["blocks.1.attn.q.weight"])  # copied neighbour
    ff = grow(st, FFN(d_ff=200))
    w = ff.params["blocks.0.mlp.fc2.weight"]
    assert torch.equal(w[:, :F], st.params["blocks.0.mlp.fc2.weight"]) and torch.count_nonzero(w[:, F:]) == 0
    assert torch.equal(ff.exp_avg["blocks.0.mlp.fc1.weight"][:F], st.exp_avg["blocks.0.mlp.fc1.weight"])
    assert torch.count_nonzero(ff.exp_avg["blocks.0.mlp.fc1.weight"][F:]) == 0
    assert ff.params["blocks.0.mlp.fc1.weight"][F:].std() > 0.5 * st.config.init_std  # new rows: seeded noise


def _halves(P: dict, d: int):
    """(copy A, copy B) views of width-x2 tensors, for the divergence measures."""
    return {
        n: (
            (t[:, :d], t[:, d:])
            if "emb" in n or "lm_head" in n
            else (t[: t.shape[0] // 2, : t.shape[1] // 2], t[t.shape[0] // 2 :, t.shape[1] // 2 :])
            if t.dim() == 2
            else (t[: t.shape[0] // 2], t[t.shape[0] // 2 :])
        )
        for n, t in P.items()
        if not n.startswith("ln_f")
    }


def _divergence(env, flavour: str, sb: float, steps: int = 20):
    st = env.trained(flavour, True)
    g = grow(st, Width(2, symmetry_breaking=sb), seed=11)
    model, opt = model_of(g, lr=1e-3)
    p0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    env.train(model, opt, PRE_STEPS, steps)
    p1 = {n: p.detach().clone() for n, p in model.named_parameters()}
    upd = {n: p1[n] - p0[n] for n in p0}
    # update cosine between the copies of a widened matrix, and relative difference of the embedding halves
    a, b = _halves(upd, D)["blocks.0.attn.q.weight"]
    cos_q = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0).item()
    a, b = _halves(upd, D)["blocks.1.mlp.fc1.weight" if flavour == "gpt2" else "blocks.1.mlp.up.weight"]
    cos_f = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0).item()
    e = p1["tok_emb.weight"]
    rel_e = ((e[:, :D] - e[:, D:]).norm() / e[:, :D].norm()).item()
    # activations: the residual stream halves at the final norm's input
    x, _ = env.batch(EVAL_AT)
    acts = {}
    h = model.ln_f.register_forward_hook(lambda mod, inp, out: acts.setdefault("h", inp[0].detach()))
    with torch.no_grad():
        model.eval()
        model.logits(x)
    h.remove()
    hA, hB = acts["h"][..., :D], acts["h"][..., D:]
    rel_h = ((hA - hB).norm() / hA.norm()).item()
    return cos_q, cos_f, rel_e, rel_h


def test_symmetry_breaking_makes_the_halves_diverge(env):
    """Width x2, dropout 0, 20 AdamW steps after growth, same data: with symmetry breaking ON the two copies
    diverge (update cosine < 1, embedding and residual halves differ); with it OFF they stay equal (to float
    rounding). Only the noise differs between the two runs, so breaking is what makes the difference."""
    rows = {}
    for flavour in ("gpt2", "llama"):
        for sb in (0.0, Width().symmetry_breaking):
            rows[(flavour, sb)] = _divergence(env, flavour, sb)
            cq, cf, re, rh = rows[(flavour, sb)]
            print(
                f"\n[sym] {flavour:5s} breaking={sb}: cos(dQ_A, dQ_B) {cq:.6f}  cos(dFFN_A, dFFN_B) {cf:.6f}  "
                f"|E_A-E_B|/|E_A| {re:.2e}  |h_A-h_B|/|h_A| {rh:.2e}"
            )
    on_sb = Width().symmetry_breaking
    off, on = rows[("gpt2", 0.0)], rows[("gpt2", on_sb)]
    assert off[0] > 1 - 1e-6 and off[1] > 1 - 1e-6 and off[2] < 1e-6 and off[3] < 1e-5
    assert on[0] < 0.999 and on[1] < 0.999 and on[2] > 100 * max(off[2], 1e-7) and on[3] > 100 * max(off[3], 1e-7)
    # llama: fp32 rounding alone slowly breaks the symmetric subspace (it is unstable there); the noise breaks
    # it decisively more
    l_off, l_on = rows[("llama", 0.0)], rows[("llama", on_sb)]
    assert l_on[2] > 2 * l_off[2] and l_on[3] > 2 * l_off[3] and l_on[0] < 0.99


def test_symmetry_breaking_is_exact_at_growth(env):
    """The breaking noise sums to zero over each row of blocks: loss unchanged even with a large noise."""
    st = env.trained("llama", False)
    before = env.eval(model_of(st)[0])
    for sb in (0.1, 1.0, 4.0):
        after = env.eval(model_of(grow(st, Width(2, symmetry_breaking=sb), seed=3))[0])
        assert abs(after - before) < 1e-5, (sb, before, after)


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
@pytest.mark.parametrize("opname", ["width2", "depth_interleave"])
def test_training_continues_after_growth(env, flavour, opname):
    """50 steps after growth (paper LR placement + 10-step re-warmup): eval loss ends below the loss at growth
    and never rises more than 0.05 above the pre-growth loss."""
    from megagrow.schedule.lr import LRSchedule

    st = env.trained(flavour, True, steps=30)
    pre = env.eval(model_of(st)[0])
    g = grow(st, OPS[opname], seed=11, lr=LRPlacement(peak_lr=OPT.lr, equivalent_step="paper", rewarmup=10))
    model, opt = model_of(g)
    sched = g.schedule(OPT, 200)
    assert isinstance(sched, LRSchedule) and sched.offset == g.lr_offset == math.floor(30 / OPS[opname].paper_c)
    at = env.eval(model)
    curve = [at]
    for i in range(5):
        env.train(model, opt, 30 + 10 * i, 10, sched, offset=30)
        curve.append(env.eval(model))
    print(
        f"\n[post-growth] {flavour} {opname}: pre {pre:.4f} at-growth {at:.4f} every 10 steps: " + " ".join(f"{c:.4f}" for c in curve[1:])
    )
    assert abs(at - pre) < 1e-5
    assert curve[-1] < at
    assert max(curve) < pre + 0.05


def test_user_errors_for_violated_preconditions(env):
    """Bad growth requests are one clear UserError each."""
    c = env.cfg()
    cases = [
        (lambda: plan_growth(Width(1), c), "integer >= 2"),
        (lambda: plan_growth(Width(2.5), c), "integer >= 2"),
        (lambda: plan_growth(Depth(0), c), "integer >= 2"),
        (lambda: plan_growth(Depth(2, "middle"), c), "placement"),
        (lambda: plan_growth(FFN(d_ff=64), c), "larger than the current 128"),
        (lambda: plan_growth(FFN(d_ff=128), c), "shrinking is not growth"),
        (lambda: operator_between("width", c, c.replace(d_model=64, n_heads=4)), "target model"),
        (lambda: operator_between("width", c, c.replace(d_model=48, n_heads=4)), "not a multiple"),
        (lambda: operator_between("depth", c, c.replace(n_layers=3)), "not a multiple of 2"),
        (lambda: plan_growth(Depth(2), c, target=c.replace(n_layers=6)), "n_layers"),
        (lambda: operator_between("grow", c, c), "unknown growth operator"),
        (lambda: plan_growth(Heads(2), c), "needs more than the current"),
        (lambda: plan_growth(Width(2, symmetry_breaking=-1), c), "symmetry_breaking"),
        (
            lambda: (
                grow(env.trained(), Width(2), lr=LRPlacement(equivalent_step="paper"))
                and grow(env.trained(), Width(3), lr=LRPlacement(equivalent_step="paper"))
            ),
            "no equivalent-step constant",
        ),
        (
            lambda: grow(
                GrowthState(c.replace(n_layers=3), env.trained().params, env.trained().exp_avg, env.trained().exp_avg_sq), Depth(2)
            ),
            "do not match the model config",
        ),
    ]
    for fn, needle in cases:
        with pytest.raises(UserError, match=needle.replace("(", r"\(")):
            fn()
    assert isinstance(operator_between("depth:append", c, c.replace(n_layers=4)), Depth)
    assert operator_between("width", c, c.replace(d_model=96, n_heads=12)) == Width(3)


@pytest.mark.parametrize("opname", ["width3", "depth_x3_init", "ffn", "width2", "width3_fresh"])
def test_sharded_application_gives_the_same_bytes(env, opname):
    """Applying a map fragment by fragment (uneven row x column fragments, as TP/ZeRO shards would) produces
    bitwise the full application, noise included; each fragment reads only the source boxes it needs."""
    st = env.trained("llama", False)
    gp = plan_growth(OPS[opname], st.config)
    full = {s: apply_map(gp.tensors, src, s, 5) for s, src in (("w", st.params), ("m", st.exp_avg), ("v", st.exp_avg_sq))}
    for name, t in gp.tensors.items():
        shape = t.shape
        cuts = [sorted({0, n, n // 3, (2 * n) // 3 + 1} - {n + 1}) for n in shape]
        for s, src in (("w", st.params), ("m", st.exp_avg), ("v", st.exp_avg_sq)):
            out = torch.empty(shape)
            for idx in itertools.product(*[range(len(c) - 1) for c in cuts]):
                box = tuple((cuts[d][i], cuts[d][i + 1]) for d, i in enumerate(idx))
                if any(a >= b for a, b in box):
                    continue
                need = t.sources(box)
                # a reader that only has the needed source boxes
                masked = {}
                for sname, boxes in need.items():
                    z = torch.full(src[sname].shape, float("nan"))
                    for bx in boxes:
                        sl = tuple(slice(a, b) for a, b in bx)
                        z[sl] = src[sname][sl]
                    masked[sname] = z
                frag = apply_tensor(t, masked, s, 5, box=box)
                out[tuple(slice(a, b) for a, b in box)] = frag
            assert torch.equal(out, full[s][name]), (name, s)


def test_noise_is_keyed_by_seed_key_and_index():
    """Seeded noise depends only on (seed, key, index in its key box): sub-boxes agree, keys/seeds differ,
    the standard deviation is as declared."""
    kb = ((0, 64), (0, 48))
    a = noise_values(1, "k", kb, kb, 0.02)
    assert a.dtype == torch.float32 and abs(a.std().item() - 0.02) < 0.002 and abs(a.mean().item()) < 0.002
    assert torch.equal(noise_values(1, "k", kb, ((10, 30), (5, 47)), 0.02), a[10:30, 5:47])
    assert not torch.equal(noise_values(2, "k", kb, kb, 0.02), a)
    assert not torch.equal(noise_values(1, "k2", kb, kb, 0.02), a)
    # the same key and key-box shape elsewhere gives the same values (what the zero-sum breaking relies on)
    kb2 = ((64, 128), (48, 96))
    assert torch.equal(noise_values(1, "k", kb2, kb2, 0.02), a)
    t = TensorMap(
        "x",
        (4, 6),
        (
            Fill(((0, 4), (0, 6)), 1.0),
            Noise(((0, 4), (0, 3)), "n", 0.1, add=True),
            Noise(((0, 4), (3, 6)), "n", 0.1, w=-1.0, add=True, key_box=((0, 4), (3, 6))),
            Fill(((0, 4), (0, 4)), 2.0, kind="eye", add=True),
        ),
    )
    t.check({})
    w = apply_tensor(t, {}, "w", 0)
    assert torch.allclose(w.sum(1), torch.full((4,), 6.0) + 2.0, atol=1e-6)  # noise +n / -n cancel per row
    assert torch.count_nonzero(apply_tensor(t, {}, "m", 0)) == 0
    with pytest.raises(ValueError, match="written by no piece"):
        TensorMap("y", (2, 2), (Fill(((0, 1), (0, 2)), 0.0),)).check({})


def test_identity_growth_round_trip_continues_bitwise(env):
    """state_from_training -> grow(Identity) -> load_training continues training bitwise like the original
    (the TP=1 bridges carry weights, both moments and Adam's step exactly)."""
    st0 = env.trained("gpt2", False)
    m1, o1 = model_of(st0)
    g = grow(st0, Identity())
    assert (g.lr_offset, g.lr_position, g.rewarmup, g.peak_lr, g.step) == (st0.lr_offset, st0.lr_position, 0, st0.peak_lr, st0.step)
    m2, o2 = model_of(g)
    a = env.train(m1, o1, 100, 4)
    b = env.train(m2, o2, 100, 4)
    assert a == b
    for (n, p), (_, q) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(p, q), n


def test_lr_placement_and_carried_positions(env):
    """LR: the big model's peak (config or Kaplan), placed at the equivalent step with re-warmup; Adam step kept;
    data position carried over (dropout seeds derive from it, so that is all the RNG there is)."""
    st = env.trained("gpt2", True)
    g = grow(st, Width(2), lr=LRPlacement(peak_lr="kaplan", equivalent_step="paper", rewarmup=8, rewarmup_from=1e-5))
    N = 12 * 2 * 64**2
    assert g.peak_lr == pytest.approx(0.003239 - 0.0001395 * math.log10(N)) == kaplan_peak_lr(g.config)
    assert g.lr_offset == g.lr_position == math.floor(PRE_STEPS / 1.776) and g.rewarmup == 8
    assert g.step == st.step and g.sample_index == st.sample_index == PRE_STEPS * B
    s = g.schedule(OPT, 200)
    assert s.peak == g.peak_lr and s(0) == pytest.approx(1e-5 + (s.base(g.lr_offset + 8) - 1e-5) / 8)
    assert s(8) == s.base(g.lr_offset + 8)
    d = grow(g, Depth(2), lr=LRPlacement(equivalent_step=40, rewarmup=0))
    assert d.lr_offset == 40 and d.peak_lr == g.peak_lr and d.step == st.step and len(d.history) == 2
    k = grow(st, Depth(2), lr=LRPlacement(equivalent_step="paper"))
    assert k.lr_offset == math.floor(PRE_STEPS / 1.412)


def _functional_loss(c, P: dict, x, y) -> torch.Tensor:
    """The megagrow GPT forward written over a params dict, with attention inner dim n_heads * head_dim."""
    import torch.nn.functional as F

    from megagrow.model.rope import apply_rope, rope_tables

    gpt2 = c.flavour == "gpt2"
    Bn, T = x.shape
    d = c.d_model

    def norm(t, pre):
        if gpt2:
            return F.layer_norm(t, (d,), P[pre + ".weight"], P[pre + ".bias"], c.norm_eps)
        return F.rms_norm(t, (d,), P[pre + ".weight"], c.norm_eps)

    def lin(t, pre):
        return F.linear(t, P[pre + ".weight"], P.get(pre + ".bias"))

    h = F.embedding(x, P["tok_emb.weight"])
    if gpt2:
        h = h + P["pos_emb.weight"][:T]
    else:
        rope = rope_tables(c.seq_len, c.head_dim, c.rope_theta)
    for i in range(c.n_layers):
        b = f"blocks.{i}."
        a = norm(h, b + "ln1")
        q, k, v = (lin(a, b + f"attn.{n}").view(Bn, T, -1, c.head_dim).transpose(1, 2) for n in "qkv")
        if not gpt2:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # grouped-query attention: query head j reads K/V head j // (n_heads / n_kv_heads)
        k, v = (t[:, torch.arange(c.n_heads) // (c.n_heads // c.kv_heads)] for t in (k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(Bn, T, -1)
        h = h + lin(att, b + "attn.o")
        a = norm(h, b + "ln2")
        if gpt2:
            h = h + lin(F.gelu(lin(a, b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
        else:
            h = h + lin(F.silu(lin(a, b + "mlp.gate")) * lin(a, b + "mlp.up"), b + "mlp.down")
    h = norm(h, "ln_f")
    logits = F.linear(h, P["tok_emb.weight" if c.tie_embeddings else "lm_head.weight"])
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


@pytest.mark.parametrize("flavour,tie", [("gpt2", True), ("llama", False), ("llama_gqa", True)])
def test_heads_only_map_is_exact_on_a_functional_model(env, flavour, tie):
    """The heads-only map (4 -> 6 heads, head_dim 8 kept, inner dim 48 != d_model 32), checked on an independent
    functional copy of megagrow's forward: it agrees with the model, the loss is unchanged, old heads' moments
    are copied, new heads' moments zero, new o columns zero."""
    st = env.trained(flavour, tie)
    x, y = env.batch(EVAL_AT)
    with torch.no_grad():
        ref = model_of(st)[0].eval()(x, y).item()
        before = _functional_loss(st.config, st.params, x, y).item()
        new_cfg = Heads(6).new_config(st.config)
        tm = heads_tensors(st.config, 6)
        want = logical_tensors(new_cfg)
        old_shapes = logical_tensors(st.config)
        for n, t in tm.items():
            assert tuple(t.shape) == want[n]
            t.check(old_shapes)
        P = apply_map(tm, st.params, "w", 5)
        after = _functional_loss(new_cfg, P, x, y).item()
        grown_model = model_of(grow(st, Heads(6), seed=5))[0].eval()
        after_model = grown_model(x, y).item()
    m = apply_map(tm, st.exp_avg, "m", 5)
    print(f"\n[loss] {flavour} heads 4->6 (functional model): model {ref:.7f} functional {before:.7f} grown {after:.7f}")
    assert abs(before - ref) < 1e-5 and abs(after - before) < 1e-5 and abs(after_model - after) < 1e-5
    q = "blocks.0.attn.q.weight"
    assert torch.equal(m[q][:D], st.exp_avg[q]) and torch.count_nonzero(m[q][D:]) == 0
    assert torch.count_nonzero(P["blocks.1.attn.o.weight"][:, D:]) == 0 and P[q][D:].std() > 0


def test_operator_descriptions_round_trip():
    """Operator.describe() -> operator_from_dict gives the same operator (what a manifest records)."""
    for op in list(OPS.values()) + [Stack(3), Heads(8)]:
        assert operator_from_dict(op.describe()) == op
    with pytest.raises(UserError, match="unknown growth operator"):
        operator_from_dict({"op": "shrink"})


def test_grouped_query_attention_configs_and_operators():
    """n_kv_heads: n_kv_heads == n_heads is plain multi-head attention (one spelling); llama only; width keeps the
    group size (n_kv_heads x k), heads growth keeps it too (n_heads' must be a multiple of it); a TP size must divide
    n_kv_heads or be a multiple of it; every bad request is one UserError."""
    c = ModelConfig(flavour="llama", n_layers=1, d_model=32, n_heads=4, n_kv_heads=2)
    assert ModelConfig(flavour="llama", n_heads=4, n_kv_heads=4) == ModelConfig(flavour="llama", n_heads=4)
    assert (c.kv_heads, c.kv_dim) == (2, 16) and ModelConfig(flavour="llama", n_heads=4).kv_heads == 4
    assert Width(2).new_config(c).n_kv_heads == 4 and Heads(8).new_config(c).n_kv_heads == 4
    assert Depth(2).new_config(c).n_kv_heads == 2 and FFN(d_ff=256).new_config(c).n_kv_heads == 2
    assert c.num_params() == sum(math.prod(s) for s in logical_tensors(c).values())
    Layout(tp=2).check_model(c)
    Layout(tp=4).check_model(c)  # tp > n_kv_heads: each rank computes its group's K/V head
    cases = [
        (lambda: plan_growth(Heads(5), c), "query-group size 2"),
        (lambda: ModelConfig.from_dict({"flavour": "gpt2", "n_heads": 4, "n_kv_heads": 2}), "llama flavour only"),
        (lambda: ModelConfig.from_dict({"flavour": "llama", "n_heads": 4, "n_kv_heads": 3}), "not a multiple of n_kv_heads"),
        (lambda: ModelConfig.from_dict({"flavour": "llama", "n_heads": 4, "n_kv_heads": 0}), "positive integer"),
        (lambda: Layout(tp=4).check_model(ModelConfig(flavour="llama", d_model=96, n_heads=12, n_kv_heads=6)), "n_kv_heads 6 and tp 4"),
    ]
    for fn, needle in cases:
        with pytest.raises(UserError, match=needle):
            fn()
