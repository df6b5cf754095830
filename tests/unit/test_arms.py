"""Arm registry (issue #15): names -> base arm + overrides, combinations, and one-line errors."""
import pytest

from shared.arms import ALIASES, ArmSpec, arm_overrides, resolve_arm
from shared.config import ARMS, ConfigError, resolve_config


@pytest.mark.parametrize("name", ARMS)
def test_preregistered_arms_are_themselves(name):
    spec = resolve_arm(name)
    assert spec == ArmSpec(name, name) and not spec.exploratory
    assert arm_overrides(name) == [f"train.arm={name}"]


@pytest.mark.parametrize("name, base, over", [
    ("projected_svd5", "projected", {"vhack.basis": "svd", "vhack.k": 5}),
    ("projected_refresh10", "projected", {"vhack.refresh_every": 10}),
    ("projected_twosided", "projected", {"vhack.gate": "twosided"}),
    ("projected_r64", "projected", {"model.rank": 64}),
    ("projected_nf25", "projected", {"vhack.noise_floor_global": 0.25}),
    ("mechanism", "projected", {"vhack.pair_set": "mechanism"}),
    ("placebo", "projected", {"vhack.pair_set": "placebo"}),
    ("framing", "projected", {"vhack.pair_set": "framing"}),
    ("weak_authored", "weak", {}),
    ("weak_flagged", "route", {"vhack.from_rollouts": True, "train.vhack_modes": ["A", "B"], "vhack.refresh_every": 10}),
    ("weak_flagged_refresh5", "route", {"vhack.from_rollouts": True, "train.vhack_modes": ["A", "B"],
                                        "vhack.refresh_every": 5}),
    ("mechanism+svd5+refresh10", "projected", {"vhack.pair_set": "mechanism", "vhack.basis": "svd", "vhack.k": 5,
                                               "vhack.refresh_every": 10}),
    ("mechanism_svd5", "projected", {"vhack.pair_set": "mechanism", "vhack.basis": "svd", "vhack.k": 5}),
    ("route+mechanism", "route", {"vhack.pair_set": "mechanism"}),
    ("projected_nomag_svd3_twosided", "projected_nomag", {"vhack.basis": "svd", "vhack.k": 3, "vhack.gate": "twosided"}),
    ("svd5", "projected", {"vhack.basis": "svd", "vhack.k": 5}),
    ("vanilla_r64", "vanilla", {"model.rank": 64}),
    ("rebound+placebo", "rebound", {"vhack.pair_set": "placebo"}),
])
def test_exploratory_names(name, base, over):
    spec = resolve_arm(name)
    assert (spec.base, spec.overrides, spec.exploratory) == (base, over, True)


def test_overrides_resolve_to_a_valid_config():
    cfg = resolve_config("toy", arm_overrides("mechanism+svd5+refresh10+twosided+r16"))
    assert cfg.train.arm == "projected" and cfg.model.rank == 16
    v = cfg.vhack
    assert (v.pair_set, v.basis, v.k, v.refresh_every, v.gate) == ("mechanism", "svd", 5, 10, "twosided")
    wf = resolve_config("toy", arm_overrides("weak_flagged"))
    assert wf.train.arm == "route" and wf.vhack.from_rollouts and wf.train.vhack_modes == ["A", "B"]
    for name in ALIASES:
        resolve_config("toy", arm_overrides(name))
    default = resolve_config("toy").vhack  # the spec's v_hack unless an arm says otherwise
    assert (default.basis, default.k, default.gate, default.refresh_every, default.pair_set, default.from_rollouts,
            default.noise_floor_global) == ("meandiff", 1, "onesided", 0, "solution", False, 0.0)


@pytest.mark.parametrize("name, message", [
    ("projected_svdx", "unknown arm part 'svdx'; parts are svd<k>"),
    ("route+rebound", "names two base arms"),
    ("svd5+svd8", r"sets vhack.k twice \(5 and 8\)"),
    ("mechanism+placebo", "sets vhack.pair_set twice"),
    ("vanilla_svd5", "base arm 'vanilla' has no v_hack to apply vhack.basis"),
    ("rebound_refresh10", "base arm 'rebound' has no v_hack to apply vhack.refresh_every"),
    ("", "empty arm name"),
])
def test_bad_names_are_one_line_errors(name, message):
    with pytest.raises(ConfigError, match=message):
        resolve_arm(name)


@pytest.mark.parametrize("name", ["projected_r0", "projected_svd0"])
def test_zero_rank_or_axes_are_rejected(name):
    with pytest.raises(ConfigError, match="must be >= 1"):
        resolve_arm(name)
