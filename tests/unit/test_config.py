"""Config validation: one clear error per mistake, and the dict round trip recorded in checkpoints."""

from __future__ import annotations

import pytest

from megagrow.config import Layout, ModelConfig, Plan, load_plan
from megagrow.errors import UserError


def _plan(**stage_over) -> dict:
    stage = {"name": "s", "model": {"n_layers": 2, "d_model": 64, "n_heads": 4, "vocab_size": 512},
             "layout": {"tp": 1, "dp": 1}, "steps": 10}
    stage.update(stage_over)
    return {"name": "p", "stages": [stage]}


def test_round_trip_is_identity():
    """Plan.from_dict(plan.to_dict()) == plan (what a checkpoint records reloads to the same config)."""
    p = Plan.from_dict(_plan())
    assert Plan.from_dict(p.to_dict()) == p


@pytest.mark.parametrize("over,needle", [
    ({"model": {"n_layers": 2, "d_model": 96, "n_heads": 6, "vocab_size": 512}, "layout": {"tp": 4}}, "not divisible by tp"),
    ({"model": {"n_layers": 2, "d_model": 64, "n_heads": 3, "vocab_size": 512}}, "not divisible by n_heads"),
    ({"model": {"n_layer": 2}}, "unknown key(s) n_layer"),
    ({"layout": {"zero_stage": 4}}, "zero_stage must be"),
    ({"layout": {"dtype": "fp16"}}, "dtype must be one of"),
    ({"steps": 0}, "steps must be a positive integer"),
    ({"optim": {"lr": 1e-3, "min_lr": 1e-2}}, "min_lr"),
    ({"model": {"flavour": "bert"}}, "flavour must be one of"),
    ({"growth": {"optimizer_state": "kept"}}, "optimizer_state must be one of moved, reset"),
    ({"growth": {"symmetry_breaking": -1.0}}, "symmetry_breaking must be >= 0"),
    ({"growth": {"noise": 0.0}}, "unknown key(s) noise"),
])
def test_bad_stage_is_one_clear_error(over, needle):
    """Each invalid field raises UserError naming the field and the stage it is in."""
    with pytest.raises(UserError) as e:
        Plan.from_dict(_plan(**over))
    assert needle in str(e.value)
    assert "stages[0]" in str(e.value)


def test_world_size_mismatch():
    with pytest.raises(UserError, match=r"world size 3 != tp 1 x dp 2"):
        Layout(tp=1, dp=2).check_world(3)


def test_defaults_merge_under_stages(tmp_path):
    """`defaults` in a plan file apply to every stage unless the stage overrides the key."""
    f = tmp_path / "p.yaml"
    f.write_text("name: p\ndefaults:\n  layout: {zero_stage: 3, micro_batch: 2}\n  steps: 7\n"
                 "stages:\n  - {name: a, model: {n_layers: 1, d_model: 32, n_heads: 2}}\n"
                 "  - {name: b, model: {n_layers: 2, d_model: 32, n_heads: 2}, layout: {micro_batch: 4}}\n")
    p = load_plan(str(f))
    assert [s.layout.zero_stage for s in p.stages] == [3, 3]
    assert [s.layout.micro_batch for s in p.stages] == [2, 4]
    assert [s.steps for s in p.stages] == [7, 7]


def test_param_count_matches_model_formula():
    """num_params counts gpt2 12Ld^2-dominated blocks plus embeddings exactly (checked against the model
    in tests/dist); here: the non-embedding count is 12 L d^2 + small terms for gpt2 with d_ff = 4d."""
    c = ModelConfig(n_layers=3, d_model=64, n_heads=4)
    non_emb = c.num_params(embeddings=False)
    assert 12 * 3 * 64 * 64 < non_emb < 12 * 3 * 64 * 64 * 1.05


def test_yaml_float_strings_are_read_as_floats(tmp_path):
    """YAML 1.1 (PyYAML) reads `3e-4` and `1.0e6` as strings: float fields take them as the numbers
    they spell (0.0003 exactly as float('3e-4')); int fields given an int stay ints."""
    f = tmp_path / "p.yaml"
    f.write_text("name: p\nstages:\n  - name: s\n    model: {n_layers: 2, d_model: 64, n_heads: 4, vocab_size: 512, "
                 "rope_theta: 1.0e6, dropout: '0.1'}\n    optim: {lr: 3e-4, min_lr: 3e-5, eps: 1e-8}\n"
                 "    stop: {rule: slope, threshold: -5e-2}\n")
    s = load_plan(str(f)).stages[0]
    assert (s.optim.lr, s.optim.min_lr, s.optim.eps) == (3e-4, 3e-5, 1e-8)
    assert s.model.rope_theta == 1e6 and s.model.dropout == 0.1 and s.stop.threshold == -0.05
    assert isinstance(s.model.n_layers, int) and isinstance(s.optim.lr, float)
    assert Plan.from_dict(load_plan(str(f)).to_dict()) == load_plan(str(f))


@pytest.mark.parametrize("over,needle", [
    ({"model": {"n_layers": 2, "d_model": 64, "n_heads": 4, "dropout": "ten percent"}}, "dropout must be a number, got str"),
    ({"optim": {"lr": "3e-4x"}}, "lr must be a number, got str"),
    ({"optim": {"lr": float("nan")}}, "lr must be a finite number"),
    ({"optim": {"lr": ".inf"}}, "lr must be a number"),
    ({"grow": 2}, "grow must be a string or null, got int 2"),
    ({"layout": {"ds_config": ["zero2.json"]}}, "ds_config must be a string or null, got list"),
    ({"layout": {"ds_config": {"zero": 2}}}, "ds_config must be a string or null, got dict"),
    ({"steps": "10"}, "steps must be an integer, got str '10'"),
    ({"steps": 10.0}, "steps must be an integer, got float"),
    ({"layout": {"tp": True}}, "tp must be an integer, got bool"),
    ({"model": {"n_layers": 2, "d_model": 64, "n_heads": 4, "tie_embeddings": "yes please"}}, "tie_embeddings must be true or false"),
    ({"model": {"n_layers": 2, "d_model": 64, "n_heads": 4, "d_ff": "256"}}, "d_ff must be an integer or null, got str"),
    ({"name": 7}, "name must be a string, got int"),
    ({"stop": {"rule": "slope", "window": 2.5}}, "window must be an integer, got float"),
    ({"optim": [1, 2]}, "expected a mapping, got list"),
])
def test_wrong_type_is_one_clear_error(over, needle):
    """Every field is checked against its declared type before validation: a UserError (one line)
    naming the stage, the field, the type wanted and the value given; never a TypeError."""
    with pytest.raises(UserError) as e:
        Plan.from_dict(_plan(**over))
    assert needle in str(e.value) and "stages[0]" in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_plan_level_types(tmp_path):
    """Plan fields and `defaults` are type checked too: seed as a string, defaults as a list."""
    with pytest.raises(UserError, match="seed must be an integer, got str"):
        Plan.from_dict({**_plan(), "seed": "1"})
    with pytest.raises(UserError, match="'defaults' must be a mapping, got list"):
        Plan.from_dict({**_plan(), "defaults": [1]})
    with pytest.raises(UserError, match="plan.data: prefix must be a string"):
        Plan.from_dict({**_plan(), "data": {"prefix": 3}})


def test_growth_options_default_and_round_trip():
    """A stage's growth knobs default to noise 1.0 x init_std and moved optimizer state; set ones
    survive the dict round trip a checkpoint records."""
    p = Plan.from_dict(_plan())
    assert (p.stages[0].growth.symmetry_breaking, p.stages[0].growth.optimizer_state) == (1.0, "moved")
    p = Plan.from_dict(_plan(growth={"symmetry_breaking": 0, "optimizer_state": "reset"}))
    assert p.stages[0].growth.symmetry_breaking == 0.0 and Plan.from_dict(p.to_dict()) == p
