"""Arm registry: an arm name -> the base behaviour (`train.arm`) + config overrides (issue #15).

The six base arms are the spec's (`vanilla projected projected_nomag rebound weak route`); their
names map to themselves with no override, so the preregistered grid is untouched. Exploratory arms
are spelled from parts, joined by `_` after a base name or by `+` between parts:

    projected_svd5          basis=svd, k=5                    (vhack.basis, vhack.k)
    projected_refresh10     re-extract every 10 steps         (vhack.refresh_every)
    projected_twosided      remove the component whatever its sign (vhack.gate)
    projected_r64           adapter rank 64 (W_res added)     (model.rank)
    projected_nf25          global noise floor, 25 % quantile (vhack.noise_floor_global)
    mechanism | framing | placebo | solution                  (vhack.pair_set; base projected)
    weak_authored           today's `weak`: authored A,B pairs, projected
    weak_flagged            the spec's weak-detector arm: route on v_hack from the policy's own rollouts
                            flagged in modes A,B, re-extracted every 10 steps (vhack.from_rollouts)
    oracle                  exploratory CEILING, a cheat: projected against v_oracle, the direction built
                            from a vanilla run's own rollouts of another seed; the experiment runner fills
                            vhack_path per seed (analysis.experiment.oracle_source_seed)
    mechanism+svd5+refresh10, route+mechanism, vanilla_r64 ...

Parts without a base (svd5, mechanism, ...) imply `projected`. A part may not be given twice with
different values (`svd5+svd8`), and v_hack parts need a base that projects (vanilla and rebound have no
v_hack; rebound takes a pair set, vanilla only a rank). `arm_overrides(name)` returns the dotted
KEY=VALUE list `resolve_config` takes, `train.arm` first.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from .config import ARMS, ConfigError

PAIR_SETS = ("solution", "mechanism", "framing", "placebo")
PROJECTING = ("projected", "projected_nomag", "weak", "route")
WEAK_FLAGGED_REFRESH = 10  # the spec says "re-extracted on a schedule"; refreshN overrides it
ORACLE = "oracle"  # its vhack_path depends on the seed, so the experiment runner sets it

# name -> (base arm, overrides); checked before the part grammar, so they may contain `_`.
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "weak_authored": ("weak", {}),
    "weak_flagged": ("route", {"vhack.from_rollouts": True, "train.vhack_modes": ["A", "B"],
                               "vhack.refresh_every": WEAK_FLAGGED_REFRESH}),
    **{p: ("projected", {"vhack.pair_set": p}) for p in PAIR_SETS},
    ORACLE: ("projected", {}),  # + vhack_path=<v_oracle of vanilla seed s+1>, set per run by the runner
}

# part pattern -> overrides; every key here is a v_hack knob except model.rank.
_PARTS: list[tuple[re.Pattern, Callable[[re.Match], dict[str, Any]]]] = [
    (re.compile(r"svd(\d+)"), lambda m: {"vhack.basis": "svd", "vhack.k": int(m.group(1))}),
    (re.compile(r"meandiff"), lambda m: {"vhack.basis": "meandiff", "vhack.k": 1}),
    (re.compile(r"refresh(\d+)"), lambda m: {"vhack.refresh_every": int(m.group(1))}),
    (re.compile(r"(onesided|twosided)"), lambda m: {"vhack.gate": m.group(1)}),
    (re.compile(r"nf(\d+)"), lambda m: {"vhack.noise_floor_global": int(m.group(1)) / 100}),
    (re.compile(r"r(\d+)"), lambda m: {"model.rank": int(m.group(1))}),
    (re.compile("(" + "|".join(PAIR_SETS) + ")"), lambda m: {"vhack.pair_set": m.group(1)}),
]
PART_FORMS = "svd<k>, meandiff, refresh<N>, onesided, twosided, nf<percent>, r<rank>, " + ", ".join(PAIR_SETS)
ARM_HELP = (f"A base arm ({', '.join(ARMS)}), an alias ({', '.join(ALIASES)}), or a base followed by _part or "
            f"+part with parts {PART_FORMS}; e.g. projected_svd5+refresh10, mechanism+svd5, weak_flagged.")


@dataclass(frozen=True)
class ArmSpec:
    name: str
    base: str  # train.arm
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted config key -> value (train.arm excluded)

    @property
    def exploratory(self) -> bool:
        """True for anything but the spec's six arms (their verdicts stay preregistered)."""
        return self.name not in ARMS

    def override_list(self) -> list[str]:
        return [f"train.arm={self.base}", *(f"{k}={json.dumps(v)}" for k, v in self.overrides.items())]


def _part(token: str) -> dict[str, Any]:
    for pattern, make in _PARTS:
        m = pattern.fullmatch(token)
        if m:
            out = make(m)
            for key in ("vhack.k", "model.rank"):
                if key in out and out[key] < 1:
                    raise ConfigError(f"arm part {token!r}: {key} must be >= 1")
            return out
    raise ConfigError(f"unknown arm part {token!r}; parts are {PART_FORMS} (after a base arm: "
                      f"{', '.join(ARMS)}, or an alias: {', '.join(ALIASES)}; e.g. projected_svd5+refresh10)")


def _split_head(part: str) -> tuple[str | None, list[str]]:
    """'projected_nomag_svd5' -> ('projected_nomag', ['svd5']); 'svd5' -> (None, ['svd5'])."""
    heads = sorted([*ARMS, *ALIASES], key=len, reverse=True)
    for head in heads:
        if part == head:
            return head, []
        if part.startswith(head + "_"):
            return head, [t for t in part[len(head) + 1:].split("_") if t]
    return None, [t for t in part.split("_") if t]


def resolve_arm(name: str) -> ArmSpec:
    """Parse an arm name (see the module docstring) into its base arm and overrides; ConfigError if bad."""
    name = name.strip()
    if not name:
        raise ConfigError("empty arm name")
    if name in ARMS:
        return ArmSpec(name, name)
    base: str | None = None
    defaults: dict[str, Any] = {}  # from aliases; explicit parts may override them
    explicit: dict[str, Any] = {}
    for part in name.split("+"):
        head, tokens = _split_head(part.strip())
        if not tokens and head is None:
            raise ConfigError(f"arm {name!r} has an empty part; valid arms: {ARM_HELP}")
        if head is not None:
            head_base, head_over = ALIASES.get(head, (head, {}))
            if head in PAIR_SETS:  # a pair-set alias is a part like any other
                tokens = [head, *tokens]
            else:
                if base is not None and base != head_base:
                    raise ConfigError(f"arm {name!r} names two base arms ({base}, {head_base}); give one")
                base = head_base
                defaults.update(head_over)
        for token in tokens:
            for key, value in _part(token).items():
                if key in explicit and explicit[key] != value:
                    raise ConfigError(f"arm {name!r} sets {key} twice ({explicit[key]!r} and {value!r})")
                explicit[key] = value
    base = base or "projected"
    overrides = {**defaults, **explicit}
    vhack_keys = [k for k in explicit if k.startswith("vhack.")]
    if base not in PROJECTING:
        allowed = {"vhack.pair_set"} if base == "rebound" else set()
        bad = [k for k in vhack_keys if k not in allowed]
        if bad:
            raise ConfigError(f"arm {name!r}: base arm {base!r} has no v_hack to apply {bad[0]} to "
                              f"(v_hack parts need one of {', '.join(PROJECTING)})")
    return ArmSpec(name, base, overrides)


def arm_overrides(name: str) -> list[str]:
    """Dotted KEY=VALUE overrides for `resolve_config`: train.arm=<base> first, then the arm's knobs."""
    return resolve_arm(name).override_list()


def cli_overrides(arm: str | None) -> list[str]:
    """What an `--arm NAME` flag means for the config (none for no flag); names the arm on a bad name."""
    if arm is None:
        return []
    try:
        return arm_overrides(arm)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if repr(arm.strip()) in msg else f"arm {arm!r}: {msg}") from None


def arm_name(cfg) -> str:
    """The registry name of what a RunConfig does: its base arm and the registry knobs that differ from the
    defaults, in one canonical spelling (resolve_arm(arm_name(cfg)) gives back those knobs). Derived from
    the config rather than stored beside it, so the name can never disagree with what the run did.
    Knobs the grammar has no part for (vhack.min_axis_ratio, train.vhack_modes, ...) are not named."""
    from .config import VhackConfig

    v, d = cfg.vhack, VhackConfig()
    head = cfg.train.arm
    refresh_default = 0
    if v.from_rollouts and head == "route" and sorted(cfg.train.vhack_modes) == ["A", "B"]:
        head, refresh_default = "weak_flagged", WEAK_FLAGGED_REFRESH
    parts = []
    if v.pair_set != d.pair_set:
        parts.append(v.pair_set)
    if v.basis == "svd":
        parts.append(f"svd{v.k}")
    if v.refresh_every != refresh_default:
        parts.append(f"refresh{v.refresh_every}")
    if v.gate != d.gate:
        parts.append(v.gate)
    if v.noise_floor_global and float(v.noise_floor_global * 100).is_integer():
        parts.append(f"nf{int(v.noise_floor_global * 100)}")
    if cfg.model.rank is not None:
        parts.append(f"r{cfg.model.rank}")
    return "_".join([head, *parts])
