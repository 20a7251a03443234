"""Config validation: one clear error per mistake, and the dict round trip recorded in checkpoints."""

from __future__ import annotations

import pytest

from megagrow.config import Layout, ModelConfig, Plan, load_plan
from megagrow.errors import UserError


def _plan(**stage_over) -> dict:
    stage = {
        "name": "s",
        "model": {"n_layers": 2, "d_model": 64, "n_heads": 4, "vocab_size": 512},
        "layout": {"tp": 1, "dp": 1},
        "steps": 10,
    }
    stage.update(stage_over)
    return {"name": "p", "stages": [stage]}


def test_round_trip_is_identity():
    """Plan.from_dict(plan.to_dict()) == plan (what a checkpoint records reloads to the same config)."""
    p = Plan.from_dict(_plan())
    assert Plan.from_dict(p.to_dict()) == p


@pytest.mark.parametrize(
    "over,needle",
    [
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
    ],
)
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
    f.write_text(
        "name: p\ndefaults:\n  layout: {zero_stage: 3, micro_batch: 2}\n  steps: 7\n"
        "stages:\n  - {name: a, model: {n_layers: 1, d_model: 32, n_heads: 2}}\n"
        "  - {name: b, model: {n_layers: 2, d_model: 32, n_heads: 2}, layout: {micro_batch: 4}}\n"
    )
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
    f.write_text(
        "name: p\nstages:\n  - name: s\n    model: {n_layers: 2, d_model: 64, n_heads: 4, vocab_size: 512, "
        "rope_theta: 1.0e6, dropout: '0.1'}\n    optim: {lr: 3e-4, min_lr: 3e-5, eps: 1e-8}\n"
        "    stop: {rule: slope, threshold: -5e-2}\n"
    )
    s = load_plan(str(f)).stages[0]
    assert (s.optim.lr, s.optim.min_lr, s.optim.eps) == (3e-4, 3e-5, 1e-8)
    assert s.model.rope_theta == 1e6 and s.model.dropout == 0.1 and s.stop.threshold == -0.05
    assert isinstance(s.model.n_layers, int) and isinstance(s.optim.lr, float)
    assert Plan.from_dict(load_plan(str(f)).to_dict()) == load_plan(str(f))


@pytest.mark.parametrize(
    "over,needle",
    [
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
    ],
)
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


# ---- `--set` overrides (megagrow.config.apply_overrides / load_plan(path, overrides))

TINY = "recipes/tiny.yaml"


def _edited(tmp_path, edit) -> str:
    """recipes/tiny.yaml with `edit(d)` applied to its dict, written to a file of the same name."""
    import os

    import yaml
    from conftest import REPO

    d = yaml.safe_load(open(os.path.join(REPO, TINY)))
    edit(d)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(d))
    return str(path)


def _set_wide_lr(d):
    d["stages"][1]["optim"]["lr"] = 2e-3


def _set_small_lr(d):
    d["stages"][0]["optim"] = {"lr": 1e-3}


def _set_every_log(d):
    for s in d["stages"]:
        s["log_every"] = 5


@pytest.mark.parametrize(
    "overrides,edit",
    [
        (["stages.wide.optim.lr=2e-3"], _set_wide_lr),
        (["stages.1.optim.lr=0.002"], _set_wide_lr),
        (["stages.small.optim.lr=1e-3"], _set_small_lr),  # the stage has no optim of its own: merged over defaults
        (["stages.*.log_every=5"], _set_every_log),
        (["defaults.save_every=40"], lambda d: d["defaults"].__setitem__("save_every", 40)),
        (
            ["reliability.keep_last=3", "reliability.verify_on_resume=false"],
            lambda d: d.__setitem__("reliability", {"keep_last": 3, "verify_on_resume": False}),
        ),
        (["data.prefix=elsewhere/corpus", "seed=7"], lambda d: d.update(seed=7, data={"prefix": "elsewhere/corpus"})),
        (["stages.deep.model.rope_scaling=null"], lambda d: None),  # null: the key as if left out
    ],
)
def test_an_override_equals_the_value_written_in_the_yaml(tmp_path, overrides, edit):
    """load_plan(TINY, overrides) == load_plan of the YAML with the same values written in it (dataclass
    equality: every field of every stage; each edit but the last changes the plan, so an override that
    was not applied, or applied elsewhere, fails)."""
    import os

    from conftest import REPO

    got = load_plan(os.path.join(REPO, TINY), overrides)
    assert got == load_plan(_edited(tmp_path, edit))


@pytest.mark.parametrize(
    "override,needle",
    [
        ("stages.wide.optim.lrr=1", "--set stages.wide.optim.lrr=1: unknown key 'lrr' in optim (allowed: lr,"),
        ("foo=1", "--set foo=1: unknown key 'foo' at the top level (allowed: name, seed, data, stages, reliability, defaults)"),
        ("stages.2.steps.x=3", "--set stages.2.steps.x=3: steps is a value, not a section"),
        ("stages.nope.steps=3", "--set stages.nope.steps=3: the plan has no stage 'nope' (stages: small, wide, deep"),
        ("stages.7.steps=3", "--set stages.7.steps=3: the plan has no stage '7'"),
        ("stages.wide=3", "--set stages.wide=3: name a key of the stage"),
        ("stages=3", "--set stages=3: name a stage"),
        ("noequals", "--set noequals: expected KEY=VALUE"),
        ("reliability.keep_last=-1", "--set reliability.keep_last=-1: tiny.yaml.reliability: keep_last must be >= 0, got -1"),
        ("reliability.keep_last=abc", "--set reliability.keep_last=abc: tiny.yaml.reliability: keep_last must be an integer, got str"),
        ("stages.wide.layout.tp=3", "--set stages.wide.layout.tp=3: tiny.yaml.stages[1].layout: n_heads 8 is not divisible by tp 3"),
        ("stages.wide.optim.lr=[1", "--set stages.wide.optim.lr=[1: the value is not valid YAML"),
    ],
)
def test_a_bad_override_is_one_error_naming_it(override, needle):
    """Unknown keys are refused before anything is applied; bad values by the plan's own validation;
    either way one UserError line that starts with the override."""
    import os

    from conftest import REPO

    with pytest.raises(UserError) as e:
        load_plan(os.path.join(REPO, TINY), [override])
    assert str(e.value).startswith(needle) and "\n" not in str(e.value), str(e.value)


def test_the_bad_one_of_several_overrides_is_named():
    """With a valid and an invalid override, the message names the invalid one alone."""
    import os

    from conftest import REPO

    with pytest.raises(UserError) as e:
        load_plan(os.path.join(REPO, TINY), ["reliability.keep_last=3", "stages.deep.steps=0"])
    assert str(e.value).startswith("--set stages.deep.steps=0: ") and "keep_last" not in str(e.value), str(e.value)
