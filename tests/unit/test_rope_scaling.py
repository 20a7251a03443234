"""RoPE scaling (ModelConfig.rope_scaling: llama3, linear, dynamic, yarn): the inverse frequencies against transformers'
own functions, a transformers LlamaForCausalLM with scaled RoPE imported through megagrow's importer and
exported back (logits equal), the config field and its errors, growth keeping it, plain RoPE bitwise as
before. transformers never downloads anything: every model is built from a local config."""

from __future__ import annotations

import json

import pytest
import torch

from megagrow.config import Layout, ModelConfig, Plan, RopeScaling
from megagrow.errors import UserError

LLAMA31 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}  # Llama 3.1 / 3.3
LLAMA32 = dict(LLAMA31, factor=32.0)  # Llama 3.2 1B / 3B
TINY_LLAMA3 = {
    "rope_type": "llama3",
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}  # at head_dim 16, theta 5e5: all three bands
LINEAR = {"rope_type": "linear", "factor": 4.0}
DYNAMIC = {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 32}  # 64 positions exercise it
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}  # head_dim 16: ramp over dims 0..7
YARN_MSCALE = dict(YARN, beta_fast=16.0, beta_slow=2.0, mscale=0.8, mscale_all_dim=0.5, truncate=False)


def _old_tables(seq_len: int, head_dim: int, theta: float):
    """rope_tables as it was before rope_scaling existed (plain RoPE must stay bitwise the same)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv)
    ang = torch.cat([ang, ang], dim=-1)
    return inv, ang.cos().float(), ang.sin().float()


def _hf_inv_freq(head_dim: int, theta: float, scaling: dict, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """transformers' own inverse frequencies and attention factor (modeling_rope_utils.ROPE_INIT_FUNCTIONS) for a
    local LlamaConfig (dynamic: max_position_embeddings is the original context, seq_len the forward's length)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = dict(scaling)
    max_pos = hf.pop("original_max_position_embeddings") if scaling["rope_type"] == "dynamic" else 131072
    cfg = LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        head_dim=head_dim,
        rope_theta=theta,
        rope_scaling=hf,
        max_position_embeddings=max_pos,
    )
    inv, attention_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](cfg, None, seq_len=seq_len)
    return inv, float(attention_factor)


@pytest.mark.parametrize(
    "head_dim,theta,scaling,seq_len",
    [
        (128, 5e5, LLAMA31, None),
        (64, 5e5, LLAMA32, None),
        (16, 5e5, TINY_LLAMA3, None),
        (128, 1e4, LINEAR, None),
        (16, 5e5, dict(LINEAR, factor=2.5), None),
        (16, 1e4, DYNAMIC, 64),
        (128, 5e5, dict(DYNAMIC, factor=2.0), 100),
        (16, 1e4, YARN, None),
        (128, 5e5, dict(YARN, factor=8.0, original_max_position_embeddings=8192), None),
        (64, 1e4, YARN_MSCALE, None),
        (64, 1e4, dict(YARN, attention_factor=1.3), None),
    ],
)
def test_inverse_frequencies_equal_transformers(head_dim, theta, scaling, seq_len):
    """rope_inv_freq (float64) and rope_attention_factor == transformers' ROPE_INIT_FUNCTIONS for the same type
    (float32) to 1e-6 relative; for llama3 and yarn every band (kept, mixed, divided) is hit where the config has it;
    dynamic at seq_len beyond the original context changes every frequency but the first, and none at or below it."""
    from megagrow.model.rope import rope_attention_factor, rope_inv_freq

    rs = RopeScaling.from_dict(scaling)
    mine = rope_inv_freq(head_dim, theta, rs, seq_len)
    theirs, their_af = _hf_inv_freq(head_dim, theta, scaling, seq_len)
    theirs = theirs.double()
    plain = rope_inv_freq(head_dim, theta)
    assert mine.shape == theirs.shape == (head_dim // 2,) and mine.dtype == torch.float64
    rel = ((mine - theirs).abs() / theirs.abs()).max().item()
    af = rope_attention_factor(rs)
    print(
        f"\n[inv_freq] {scaling['rope_type']} hd={head_dim} theta={theta:g}: max rel diff {rel:.2e}, "
        f"attention factor {af:.6f} (transformers {their_af:.6f})"
    )
    assert rel <= 1e-6, rel
    assert abs(af - their_af) <= 1e-7 * their_af and (af != 1.0) == (scaling["rope_type"] == "yarn")
    kept, divided = torch.isclose(mine, plain, rtol=1e-12), torch.isclose(mine, plain / scaling["factor"], rtol=1e-12)
    if scaling["rope_type"] == "linear":
        assert divided.all()
    elif scaling["rope_type"] == "dynamic":
        assert kept[0] and not kept[1:].any()
        assert torch.equal(rope_inv_freq(head_dim, theta, rs, scaling["original_max_position_embeddings"]), plain)
    else:
        assert kept.any() and divided.any() and (~kept & ~divided).any(), (kept, divided)


def test_plain_rope_is_bitwise_unchanged():
    """Without rope_scaling the frequencies and cos/sin tables are bitwise those of before, in the model too; the
    config's dict form has no rope_scaling key (checkpoint manifests and run directories recorded before it
    existed still compare equal)."""
    from megagrow.model.gpt import GPT
    from megagrow.model.rope import rope_inv_freq, rope_tables
    from megagrow.parallel.groups import init_distributed

    for T, hd, theta in ((128, 16, 1e4), (64, 128, 5e5), (32, 48, 1e6)):
        inv, cos, sin = _old_tables(T, hd, theta)
        assert torch.equal(rope_inv_freq(hd, theta), inv) and torch.equal(rope_inv_freq(hd, theta, None), inv)
        c2, s2 = rope_tables(T, hd, theta)
        assert torch.equal(c2, cos) and torch.equal(s2, sin)
    init_distributed(Layout())
    m = ModelConfig(flavour="llama", n_layers=1, d_model=64, n_heads=4, vocab_size=300, seq_len=40, rope_theta=5e5)
    model = GPT(m)
    _, cos, sin = _old_tables(40, 16, 5e5)
    assert torch.equal(model.rope_cos, cos) and torch.equal(model.rope_sin, sin)
    assert "rope_scaling" not in m.to_dict() and m.rope_scaling is None
    assert ModelConfig.from_dict(m.to_dict()) == m
    scaled = GPT(m.replace(rope_scaling=TINY_LLAMA3))
    assert not torch.equal(scaled.rope_cos, cos)


def test_config_field_round_trip_and_errors():
    """rope_scaling in a plan (YAML numbers as strings too) is a typed RopeScaling, round trips through to_dict
    and JSON; unknown types are one line naming the supported ones; missing or foreign keys, gpt2, bad values
    are one-line errors."""
    st = {
        "name": "a",
        "model": {
            "flavour": "llama",
            "n_layers": 1,
            "d_model": 64,
            "n_heads": 4,
            "vocab_size": 512,
            "rope_theta": 5e5,
            "rope_scaling": dict(LLAMA31, factor="8.0"),
        },
    }
    p = Plan.from_dict({"stages": [st]})
    rs = p.stages[0].model.rope_scaling
    assert isinstance(rs, RopeScaling) and rs.factor == 8.0 and rs.original_max_position_embeddings == 8192
    assert p.stages[0].model.to_dict()["rope_scaling"] == LLAMA31
    assert Plan.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    lin = ModelConfig(flavour="llama").replace(rope_scaling=LINEAR)
    assert lin.rope_scaling == RopeScaling(rope_type="linear", factor=4.0) and lin.to_dict()["rope_scaling"] == LINEAR
    assert lin.replace(rope_scaling=None).rope_scaling is None

    def err(rope, flavour="llama") -> str:
        s = dict(st, model=dict(st["model"], flavour=flavour, rope_scaling=rope))
        with pytest.raises(UserError) as e:
            Plan.from_dict({"stages": [s]})
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("plan.stages[0].model"), msg
        return msg

    for kind in ("longrope", "ntk", "default"):
        assert f"rope type '{kind}' is not supported (supported: llama3, linear, dynamic, yarn;" in err({"rope_type": kind, "factor": 2.0})
    assert "no rope_type (supported: llama3, linear, dynamic, yarn" in err({"factor": 2.0})
    assert "missing: high_freq_factor, original_max_position_embeddings" in err(
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}
    )
    assert "linear takes factor only (given: low_freq_factor)" in err(dict(LINEAR, low_freq_factor=1.0))
    assert "dynamic takes factor, original_max_position_embeddings only (given: beta_fast)" in err(dict(DYNAMIC, beta_fast=32))
    assert "llama3 takes factor, low_freq_factor, high_freq_factor, original_max_position_embeddings only (given: mscale)" in err(
        dict(LLAMA31, mscale=1.0)
    )
    assert "dynamic needs factor, original_max_position_embeddings (missing: original_max_position_embeddings)" in err(
        {"rope_type": "dynamic", "factor": 2.0}
    )
    assert "yarn needs factor, original_max_position_embeddings (missing" in err({"rope_type": "yarn", "factor": 2.0})
    assert "yarn needs factor >= 1 (it extends the context), got 0.5" in err(dict(YARN, factor=0.5))
    assert "dynamic needs factor >= 1" in err(dict(DYNAMIC, factor=0.9))
    assert "yarn's attention_factor must be positive, got -1.0" in err(dict(YARN, attention_factor=-1))
    assert "yarn needs beta_fast >= beta_slow, got 2.0 and 4.0" in err(dict(YARN, beta_fast=2, beta_slow=4))
    assert "truncate must be true or false or null, got str 'yes'" in err(dict(YARN, truncate="yes"))
    assert "original_max_position_embeddings must be a positive integer, got 0" in err(dict(YARN, original_max_position_embeddings=0))
    assert "0 < low_freq_factor < high_freq_factor" in err(dict(LLAMA31, low_freq_factor=4.0))
    assert "needs a positive factor" in err(dict(LINEAR, factor=0))
    assert "original_max_position_embeddings must be an integer" in err(dict(LLAMA31, original_max_position_embeddings=8.5))
    assert "unknown key(s) ntk_alpha" in err(dict(LINEAR, ntk_alpha=1.0))
    for rope in (DYNAMIC, YARN, YARN_MSCALE):  # every supported type round trips through a plan and JSON
        q = Plan.from_dict({"stages": [dict(st, model=dict(st["model"], rope_scaling=rope))]})
        assert q.stages[0].model.to_dict()["rope_scaling"] == rope and Plan.from_dict(json.loads(json.dumps(q.to_dict()))) == q
    assert "rope_scaling is for the llama flavour only" in err(LINEAR, flavour="gpt2")
    grown = {"name": "b", "grow": "width", "model": dict(st["model"], d_model=128, n_heads=8)}
    with pytest.raises(
        UserError,
        match=r"^plan: stage b: rope_scaling \{'rope_type': 'linear', 'factor': 4.0\} differs from "
        r"stage a's \{'rope_type': 'llama3'.*\(growth keeps it: give every stage the same",
    ):
        Plan.from_dict({"stages": [st, dict(grown, model=dict(grown["model"], rope_scaling=LINEAR))]})


@pytest.mark.parametrize("rope", [TINY_LLAMA3, DYNAMIC, YARN_MSCALE], ids=["llama3", "dynamic", "yarn"])
def test_growth_keeps_rope_scaling_and_the_function(rope):
    """Every growth operator copies rope_scaling unchanged (and a plan's grown stage, rope_scaling given once in
    `defaults`, is the target it reaches); width x2 and depth x2 of a llama3- / dynamic- (48 positions, beyond its
    original 32) / yarn-scaled model (2 K/V heads) give the same logits (fp32, within 1e-5) as the model they grew from."""
    from megagrow.growth import FFN, Depth, Heads, Width, grow, load_training, plan_growth, state_from_training
    from megagrow.model.gpt import build_model
    from megagrow.parallel.groups import init_distributed

    init_distributed(Layout())
    m = ModelConfig(
        flavour="llama", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, vocab_size=300, seq_len=48, rope_theta=5e5, tie_embeddings=False
    ).replace(rope_scaling=rope)
    for op in (Width(2), Depth(2), FFN(d_ff=256), Heads(6)):
        assert op.new_config(m).rope_scaling == m.rope_scaling
    small = {k: v for k, v in m.to_dict().items() if k != "rope_scaling"}
    plan = Plan.from_dict(
        {
            "defaults": {"model": {"rope_scaling": rope}},
            "stages": [
                {"name": "a", "model": small},
                {"name": "b", "grow": "width", "model": dict(small, d_model=128, n_heads=8, n_kv_heads=4)},
            ],
        }
    )
    assert plan.stages[0].model == m and plan_growth(Width(2), m, plan.stages[1].model).new.rope_scaling == m.rope_scaling
    x = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    state = state_from_training(build_model(m, seed=5), None)
    with torch.no_grad():
        before = load_training(state)[0].eval().logits(x)[..., :300]
        for op in (Width(2), Depth(2)):
            grown = grow(state, op, seed=3)
            assert grown.config.rope_scaling == m.rope_scaling
            after = load_training(grown)[0].eval().logits(x)[..., :300]
            print(f"\n[growth] {rope['rope_type']} {op.name}: max |logit diff| {(after - before).abs().max().item():.2e}")
            assert (after - before).abs().max().item() < 1e-5


def test_hf_config_import_both_forms_and_export_both_forms():
    """Import reads transformers 5.x's rope_parameters and 4.x's rope_scaling (rope_type or the older `type`)
    beside a top-level rope_theta; dynamic and yarn stay one-line errors naming what is supported; the export
    writes rope_scaling (4.x) and rope_parameters (5.x) and reads back to the same model; plain RoPE's export
    is unchanged (no rope_scaling key)."""
    from transformers import LlamaConfig

    from megagrow.hf import hf_config, model_fields_from_hf, portable_config

    base = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=256).to_dict()
    for rope in (LLAMA31, LINEAR):
        rs = RopeScaling.from_dict(rope)
        five = dict(base, rope_parameters=dict(rope, rope_theta=5e5))
        five.pop("rope_scaling", None)
        four = dict(base, rope_theta=5e5, rope_scaling=dict(rope))
        four.pop("rope_parameters", None)
        for cfg in (five, four):
            got = model_fields_from_hf(cfg, "x")
            assert got["rope_scaling"] == rs and got["rope_theta"] == 5e5, (cfg, got)
    old_linear = dict(base, rope_theta=1e4, rope_scaling={"type": "linear", "factor": 2.0})
    old_linear.pop("rope_parameters", None)
    assert model_fields_from_hf(old_linear, "x")["rope_scaling"] == RopeScaling(rope_type="linear", factor=2.0)
    no_original = {k: v for k, v in LLAMA31.items() if k != "original_max_position_embeddings"}
    got = model_fields_from_hf(dict(base, rope_parameters=dict(no_original, rope_theta=5e5)), "x")
    assert got["rope_scaling"].original_max_position_embeddings == 256  # transformers' fallback
    assert model_fields_from_hf(base, "x")["rope_scaling"] is None
    for kind in ("longrope", "proportional"):
        with pytest.raises(UserError) as e:
            model_fields_from_hf(dict(base, rope_parameters={"rope_type": kind, "rope_theta": 1e4, "factor": 2.0}), "x")
        assert str(e.value) == f"x: rope type '{kind}' is not supported (supported: default, llama3, linear, dynamic, yarn)"
    dyn = model_fields_from_hf(dict(base, rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}), "x")
    assert dyn["rope_scaling"] == RopeScaling(rope_type="dynamic", factor=2.0, original_max_position_embeddings=256)
    yarn = model_fields_from_hf(
        dict(base, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0, "beta_fast": 16, "truncate": False}), "x"
    )
    assert yarn["rope_scaling"] == RopeScaling(
        rope_type="yarn", factor=2.0, original_max_position_embeddings=256, beta_fast=16.0, truncate=False
    )
    with pytest.raises(UserError, match=r"^x: rope scaling: llama3 needs factor.*missing: low_freq_factor"):
        model_fields_from_hf(dict(base, rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}), "x")
    with pytest.raises(UserError, match="partial_rotary_factor 0.5 is not supported"):
        model_fields_from_hf(dict(base, rope_parameters=dict(LINEAR, rope_theta=1e4, partial_rotary_factor=0.5)), "x")

    for rope in (LLAMA31, LINEAR, DYNAMIC, YARN_MSCALE):
        m = ModelConfig(flavour="llama", n_layers=2, d_model=64, n_heads=4, vocab_size=300, rope_theta=5e5, rope_scaling=rope)
        d = json.loads(json.dumps(portable_config(hf_config(m), m)))
        if rope is DYNAMIC:  # transformers' dynamic reads its original context from max_position_embeddings
            rope = {k: v for k, v in rope.items() if k != "original_max_position_embeddings"}
            assert d["max_position_embeddings"] == 32
        assert d["rope_scaling"] == rope and d["rope_parameters"] == dict(rope, rope_theta=5e5) and d["rope_theta"] == 5e5
        assert model_fields_from_hf(d, "x")["rope_scaling"] == m.rope_scaling
        four = {k: v for k, v in d.items() if k != "rope_parameters"}  # what transformers 4.x reads
        assert model_fields_from_hf(four, "x")["rope_scaling"] == m.rope_scaling
        assert LlamaConfig.from_dict(d).rope_parameters == dict(rope, rope_theta=5e5)
    plain = ModelConfig(flavour="llama", n_layers=2, d_model=64, n_heads=4, vocab_size=300, rope_theta=5e5)
    d = portable_config(hf_config(plain), plain)
    assert "rope_scaling" not in d and d["rope_parameters"] == {"rope_type": "default", "rope_theta": 5e5}


def _hf_rope(rope: dict) -> tuple[dict, int]:
    """(transformers' rope_scaling dict, max_position_embeddings) of megagrow's `rope`: dynamic's original context
    is transformers' max_position_embeddings."""
    if rope["rope_type"] == "dynamic":
        return {k: v for k, v in rope.items() if k != "original_max_position_embeddings"}, rope["original_max_position_embeddings"]
    return dict(rope), 64 if rope["rope_type"] != "yarn" else int(rope["factor"] * rope["original_max_position_embeddings"])


def _hf_model(path, rope: dict, theta: float):
    """A random transformers Llama (2 K/V heads, untied, rms eps 1e-6) with RoPE scaling `rope`, saved at `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf_rope, max_pos = _hf_rope(rope)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_pos,
        rms_norm_eps=1e-6,
        rope_theta=theta,
        rope_scaling=hf_rope,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(path))
    return model


@pytest.mark.parametrize(
    "rope,theta",
    [(TINY_LLAMA3, 5e5), (LINEAR, 1e4), (DYNAMIC, 1e4), (YARN, 1e4), (YARN_MSCALE, 5e5)],
    ids=["llama3", "linear", "dynamic", "yarn", "yarn-mscale"],
)
def test_import_and_export_give_transformers_logits(tmp_path, rope, theta):
    """A random transformers LlamaForCausalLM with RoPE scaling, saved locally, read through megagrow's importer
    (read_hf_dir -> ModelConfig fields, HFCheckpoint.tensors_for): megagrow's model gives transformers' logits to
    1e-5 over 64 positions (without the scaling it would not; dynamic's original context is 32, so 64 positions
    exercise it, and a fresh transformers model at 48 and 24 positions matches too); a stage without the scaling
    is refused; exported back (hf_config + write_config + to_hf) and reloaded by transformers, the logits are the
    original's again and config.json carries the same scaling."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from megagrow.hf import HFCheckpoint, check_init_from, hf_config, read_hf_dir, to_hf, write_config
    from megagrow.model.gpt import GPT
    from megagrow.parallel.groups import init_distributed

    src = tmp_path / "hf"
    theirs_model = _hf_model(src, rope, theta)
    _, fields, _ = read_hf_dir(str(src))
    m = ModelConfig(**{k: v for k, v in fields.items() if not k.startswith("_")}, seq_len=64)
    assert m.rope_scaling == RopeScaling.from_dict(rope) and m.rope_theta == theta and m.n_kv_heads == 2
    P = HFCheckpoint(str(src)).tensors_for(m, "s")
    init_distributed(Layout())
    x = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(2))

    def logits(cfg):
        model = GPT(cfg)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(P[n])
            return model.eval().logits(x)[..., :300]

    with torch.no_grad():
        theirs = theirs_model(x).logits
    mine = logits(m)
    diff = (mine - theirs).abs().max().item()
    unscaled = (logits(m.replace(rope_scaling=None)) - theirs).abs().max().item()
    print(
        f"\n[import] {rope['rope_type']}: max |logit diff| {diff:.2e} (max |logit| {theirs.abs().max().item():.2f}; "
        f"plain RoPE instead: {unscaled:.2e})"
    )
    assert diff < 1e-5 and unscaled > 1e-2
    if rope["rope_type"] == "dynamic":  # the forward's own length picks the base, as in a fresh transformers model
        for T in (48, 24):
            fresh = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
            model = GPT(m)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(P[n])
                d = (model.eval().logits(x[:, :T])[..., :300] - fresh(x[:, :T]).logits).abs().max().item()
            print(f"[import] dynamic at {T} positions: max |logit diff| {d:.2e}")
            assert d < 1e-5

    st = {"name": "s", "init_from": f"hf:{src}", "model": {**{k: v for k, v in m.to_dict().items() if k != "rope_scaling"}}}
    check_init_from(Plan.from_dict({"stages": [dict(st, model=m.to_dict())]}).stages[0])
    with pytest.raises(UserError, match=r"does not match the model of stage 's': rope_scaling \{'rope_type'"):
        check_init_from(Plan.from_dict({"stages": [st]}).stages[0])

    out = tmp_path / "export"
    out.mkdir()
    cfg = hf_config(m)
    write_config(cfg, m, str(out))
    save_file({n: t.contiguous() for n, t in to_hf(m, P.__getitem__)}, str(out / "model.safetensors"))
    back = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        again = back(x).logits
    print(f"[export] {rope['rope_type']}: max |logit diff| after the round trip {(again - theirs).abs().max().item():.2e}")
    assert (again - theirs).abs().max().item() < 1e-5
    assert json.loads((out / "config.json").read_text())["rope_scaling"] == _hf_rope(rope)[0]
    _, back_fields, _ = read_hf_dir(str(out))
    assert back_fields["rope_scaling"] == m.rope_scaling
