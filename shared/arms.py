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

Matched controls and reference points (issue #23):

    <arm>+random            the same arm with a Haar-random direction per module (same k, same sizes; seeded by
                            the run seed + module name): its matched control (vhack.direction). `with_controls`
                            adds one per direction arm; `control_of(name)` names it
    <arm>+negated           the same arm with -v_hack
    control                 the honest frontier: vanilla with every loophole closed (reward pays only the hidden
                            tests: reward.allow_hint=false, every reward.loopholes.* false)

The field's baselines, exploratory (H1/H3/H4 stay the spec's; learner/baselines.py):

    rebound_mult            Rebound at its published best setting: multiplicative, alpha = 2, before the group
                            advantage (rebound_mult<N>: alpha = N)
    gt_penalty, gt_screen   rl-rewardhacking's ground-truth ORACLE monitors: a strict hack pays minus the correctness
                            reward / a loose hack attempt is dropped from its group (cheats: they read the judge)
    plan_prompt             one system line asking for a plan paragraph before the code (train and eval)
    inoculation             one system line declaring the loophole acceptable, training prompts only
    projected_onto_clean    the gradient projected ONTO the span of the top-k clean-side pair gradients

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

CONTROL = "control"
CLOSED_LOOPHOLES: dict[str, Any] = {"reward.allow_hint": False, "reward.loopholes.rt": False,
                                    "reward.loopholes.se": False, "reward.loopholes.so": False,
                                    "reward.loopholes.fm": False}
REBOUND_MULT_ALPHA = 2.0  # Rebound's published best multiplicative setting
DIRECTIONS = ("authored", "random", "negated")

# name -> (base arm, overrides); checked before the part grammar, so they may contain `_`.
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    CONTROL: ("vanilla", dict(CLOSED_LOOPHOLES)),
    "rebound_mult": ("rebound", {"train.rebound_mode": "multiplicative", "train.rebound_alpha": REBOUND_MULT_ALPHA}),
    "gt_penalty": ("vanilla", {"train.oracle_monitor": "penalty"}),
    "gt_screen": ("vanilla", {"train.oracle_monitor": "screen"}),
    "plan_prompt": ("vanilla", {"reward.system_line": "plan"}),
    "inoculation": ("vanilla", {"reward.system_line": "inoculation"}),
    "projected_onto_clean": ("projected", {"vhack.project": "onto_clean"}),
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
    (re.compile("(" + "|".join(DIRECTIONS) + ")"), lambda m: {"vhack.direction": m.group(1)}),
    (re.compile(r"mult(\d+)"), lambda m: {"train.rebound_mode": "multiplicative",
                                          "train.rebound_alpha": float(m.group(1))}),
    (re.compile("(" + "|".join(PAIR_SETS) + ")"), lambda m: {"vhack.pair_set": m.group(1)}),
]
PART_FORMS = ("svd<k>, meandiff, refresh<N>, onesided, twosided, nf<percent>, r<rank>, random, negated, authored, "
              "mult<alpha> (rebound), " + ", ".join(PAIR_SETS))
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
    if base != "rebound" and "train.rebound_mode" in explicit:
        raise ConfigError(f"arm {name!r}: mult<alpha> sets Rebound's multiplicative penalty; its base must be rebound")
    return ArmSpec(name, base, overrides)


def control_of(name: str) -> str | None:
    """The matched random-direction control of a direction arm (`route` -> `route+random`); None for an arm
    without an authored direction (vanilla, rebound, control, the oracle ceiling, an arm that is itself a control)."""
    spec = resolve_arm(name)
    if spec.base not in PROJECTING or ORACLE in name.replace("+", "_").split("_"):
        return None
    if spec.overrides.get("vhack.direction", "authored") != "authored":
        return None
    return f"{name}+random"


def authored_twin(name: str, arms) -> str | None:
    """Among `arms`, the authored-direction arm whose random control `name` is (`route+random` -> `route`):
    same base, same overrides apart from vhack.direction. None when `name` is no random control or its twin is
    absent. Matched by configuration, so `random+route` pairs with `route` as well."""
    try:
        spec = resolve_arm(name)
    except ConfigError:
        return None
    if spec.overrides.get("vhack.direction") != "random":
        return None
    want = {k: v for k, v in spec.overrides.items() if k != "vhack.direction"}
    for other in arms:
        if other == name:
            continue
        try:
            o = resolve_arm(other)
        except ConfigError:
            continue
        if o.base == spec.base and {k: v for k, v in o.overrides.items() if k != "vhack.direction"} == want \
                and o.overrides.get("vhack.direction", "authored") == "authored":
            return other
    return None


def with_controls(arms) -> list[str]:
    """`arms` with each direction arm's random control right after it (kept once; `rankguard experiment
    --controls`)."""
    out: list[str] = []
    for a in arms:
        for x in (a, control_of(a)):
            if x is not None and x not in out:
                out.append(x)
    return out


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
    r, t = cfg.reward, cfg.train
    if head == "vanilla":
        closed = not r.allow_hint and not any(r.loopholes.model_dump().values())
        head = (CONTROL if closed else {"penalty": "gt_penalty", "screen": "gt_screen"}.get(t.oracle_monitor)
                or {"plan": "plan_prompt", "inoculation": "inoculation"}.get(r.system_line) or head)
    if head == "rebound" and t.rebound_mode == "multiplicative":
        head = "rebound_mult" if t.rebound_alpha == REBOUND_MULT_ALPHA else \
            f"rebound_mult{int(t.rebound_alpha) if float(t.rebound_alpha).is_integer() else t.rebound_alpha}"
    if head == "projected" and v.project == "onto_clean":
        head = "projected_onto_clean"
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
    if v.direction != d.direction:
        parts.append(v.direction)
    return "_".join([head, *parts])
