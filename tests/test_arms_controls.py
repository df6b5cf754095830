"""Issue #23 arm grammar: matched random/negated controls, the honest `control` arm, the field's baselines."""
import pytest
from typer.testing import CliRunner

from shared.arms import (CLOSED_LOOPHOLES, arm_name, arm_overrides, authored_twin, control_of, resolve_arm,
                         with_controls)
from shared.config import ConfigError, resolve_config


@pytest.mark.parametrize("name, base, over", [
    ("route+random", "route", {"vhack.direction": "random"}),
    ("projected+random", "projected", {"vhack.direction": "random"}),
    ("route+negated", "route", {"vhack.direction": "negated"}),
    ("mechanism+random", "projected", {"vhack.pair_set": "mechanism", "vhack.direction": "random"}),
    ("control", "vanilla", CLOSED_LOOPHOLES),
    ("rebound_mult", "rebound", {"train.rebound_mode": "multiplicative", "train.rebound_alpha": 2.0}),
    ("rebound+mult2", "rebound", {"train.rebound_mode": "multiplicative", "train.rebound_alpha": 2.0}),
    ("gt_penalty", "vanilla", {"train.oracle_monitor": "penalty"}),
    ("gt_screen", "vanilla", {"train.oracle_monitor": "screen"}),
    ("plan_prompt", "vanilla", {"reward.system_line": "plan"}),
    ("inoculation", "vanilla", {"reward.system_line": "inoculation"}),
    ("projected_onto_clean", "projected", {"vhack.project": "onto_clean"}),
])
def test_new_arms_resolve(name, base, over):
    spec = resolve_arm(name)
    assert (spec.base, spec.overrides, spec.exploratory) == (base, over, True)


def test_configs_differ_as_intended_and_names_round_trip():
    van = resolve_config("toy", arm_overrides("vanilla"))
    ctl = resolve_config("toy", arm_overrides("control"))
    assert van.reward.allow_hint and any(van.reward.loopholes.model_dump().values())
    assert not ctl.reward.allow_hint and not any(ctl.reward.loopholes.model_dump().values())
    assert resolve_config("toy", arm_overrides("route+random")).vhack.direction == "random"
    assert van.vhack.direction == "authored" and van.train.oracle_monitor == "none"
    assert van.train.rebound_mode == "additive" and van.reward.system_line == "none"
    for name in ("control", "route+random", "route+negated", "rebound_mult", "rebound+mult3", "gt_penalty",
                 "gt_screen", "plan_prompt", "inoculation", "projected_onto_clean", "weak_flagged+random"):
        cfg = resolve_config("toy", arm_overrides(name))
        again = resolve_arm(arm_name(cfg))
        assert (again.base, again.overrides) == (resolve_arm(name).base, resolve_arm(name).overrides), name


@pytest.mark.parametrize("name, message", [
    ("control+random", "base arm 'vanilla' has no v_hack"),
    ("rebound+random", "base arm 'rebound' has no v_hack"),
    ("route+mult2", "its base must be rebound"),
    ("route+random+negated", "sets vhack.direction twice"),
])
def test_bad_combinations(name, message):
    with pytest.raises(ConfigError, match=message):
        resolve_arm(name)


def test_controls_are_added_for_direction_arms_only():
    assert control_of("route") == "route+random" and control_of("mechanism+svd5") == "mechanism+svd5+random"
    for name in ("vanilla", "control", "rebound", "rebound_mult", "oracle", "route+random", "route+negated",
                 "gt_penalty"):
        assert control_of(name) is None, name
    got = with_controls(["vanilla", "control", "projected", "route", "route+random", "rebound"])
    assert got == ["vanilla", "control", "projected", "projected+random", "route", "route+random", "rebound"]
    assert authored_twin("route+random", got) == "route"
    assert authored_twin("random+route", ["route"]) == "route"  # matched by configuration, not spelling
    assert authored_twin("route+random", ["projected"]) is None
    assert authored_twin("route", got) is None


def test_experiment_cli_controls_flag(monkeypatch, tmp_path):
    import analysis.experiment as ex
    from services.cli import app

    seen = {}

    def fake(**kw):
        seen.update(kw)
        return {"status": "done", "wall_s": 0.0, "out": str(tmp_path), "runs": []}

    monkeypatch.setattr(ex, "run_experiment", fake)
    res = CliRunner().invoke(app, ["experiment", "--arms", "vanilla,route", "--controls", "--seeds", "1",
                                   "--out", str(tmp_path), "--no-report"])
    assert res.exit_code == 0, res.output
    assert seen["arms"] == "vanilla,route,route+random"
