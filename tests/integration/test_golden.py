"""Toy runs against each other and against recorded goldens: two promises, tested separately.

1. `test_train_and_up_agree` (always runs, ~1.5 min): `rankguard train` (one process) and `rankguard up`
   (services over Redis) write identical metrics.jsonl / evals.jsonl rows, timing columns (`t_*`) aside,
   ON THIS MACHINE, for two arms (vanilla, projected) over a few toy steps. Same machine, same kernels,
   same arithmetic: exact equality is the claim.

2. `test_toy_run_matches_golden`: 30 toy steps per arm in one process match tests/integration/golden/toy30 on any x86
   machine and torch build, within a per-column tolerance:
   - integer columns (step, policy_version, n, n_groups, n_train_seqs) and None/null values: exact;
   - float columns: |got - want| <= max(atol, RTOL_FLOOR * |want|), atol = MARGIN * the column's
     measured max absolute spread (over all arms, steps and settings below). MARGIN = 10: an unseen
     machine may round differently from the settings measured here. RTOL_FLOOR = 1e-6 (about 8 float32
     ulps): a column that showed no spread may still move in its last bits.
   The max relative spread is recorded too but not used: near-zero values (the loss of a step whose
   advantages cancel, kl at step 1) make it meaningless (loss: 3.0 = 300%). An absolute bound per column
   still catches a real change: all 30 rows are compared, and kl / grad_norm grow 100x over the run.
   The spread is measured by `--regenerate` and written to golden/toy30/spread.json: every golden arm is
   rerun with the kernels of other instruction sets (ATEN_CPU_CAPABILITY=avx2, and =default: scalar,
   unvectorised) instead of the machine's own (AVX-512 here) — that is what differs between x86 machines;
   toy runs use one torch thread everywhere — and, when the toy world is unchanged, compared with the
   previous goldens (recorded on another machine with the same torch). Count-ratio
   columns (pass_rate, hack_*, reward_mean...) had zero spread (no sampled token flipped), so the floor
   keeps them exact in effect: one flipped sample moves them by >= 1/128. The measured numbers (per
   column: max_abs, max_rel, the worst arm/setting, max_abs by setting) and the resulting atol are in
   spread.json ("columns"), with the machine that measured them.

Regenerate deliberately (after a change that is meant to move numbers, e.g. a new toy world); this writes
the goldens, environment.json and spread.json (12 single-threaded 30-step runs, ~6 min on 2 idle cores):
    .venv/bin/python tests/integration/test_golden.py --regenerate [--jobs 2]
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden" / "toy30"
STEPS = 30
ARMS = ("vanilla", "projected", "rebound", "route")
AGREE_ARMS = ("vanilla", "projected")
AGREE_STEPS = 6
FILES = ("metrics", "evals")
MARGIN = 10.0
RTOL_FLOOR = 1e-6
# Settings that change float rounding, not the maths: (extra environment, extra CLI arguments). The
# kernels torch picks per instruction set are what differs between x86 machines; the toy runs always use
# one torch thread (train.torch_threads), so thread count is not a cross-machine difference.
VARIANTS = {
    "avx2": ({"ATEN_CPU_CAPABILITY": "avx2"}, []),
    "scalar": ({"ATEN_CPU_CAPABILITY": "default"}, []),
}

Rows = dict[str, list[dict]]


def _environment() -> dict:
    import torch

    from shared.config import ToyConfig
    from shared.toy.build import fingerprint, resolve_warm

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "toy_fingerprint": fingerprint(ToyConfig(), resolve_warm())}


def _strip(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if not k.startswith("t_")} for r in rows]


def produce(arm: str, command: str, run_dir: Path, steps: int = STEPS, env: dict | None = None,
            args: list[str] | None = None) -> Rows:
    """Run `rankguard <command>` (train or up) for `steps` toy steps; the stripped rows of both files."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": str(ROOT), **(env or {})}
    full_env.pop("RANKGUARD_TOY_WARM", None)
    cmd = [sys.executable, "-m", "services.cli", command, "--preset", "toy", "--arm", arm, "--steps", str(steps),
           "--run-dir", str(run_dir), "--no-progress", *(args or [])]
    out = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return {name: _strip(run_dir / f"{name}.jsonl") for name in FILES}


def _golden(arm: str) -> Rows:
    return {name: _strip(GOLDEN / f"{arm}.{name}.jsonl") for name in FILES}


def _is_float(value) -> bool:
    return isinstance(value, float)


# ---------------------------------------------------------------------------------------------- spread


def spread(got: Rows, want: Rows) -> dict[str, dict[str, dict]]:
    """Per file and float column: the max absolute and relative difference of `got` from `want`.
    Integer and null values must be equal (a difference there is a flipped sample, not rounding)."""
    out: dict[str, dict[str, dict]] = {}
    for name in FILES:
        assert len(got[name]) == len(want[name]), f"{name}: {len(got[name])} rows vs {len(want[name])}"
        cols = out.setdefault(name, {})
        for i, (a, b) in enumerate(zip(got[name], want[name])):
            for key, w in b.items():
                g = a.get(key, "<missing>")
                if not (_is_float(w) and isinstance(g, (int, float))):
                    assert g == w, f"{name} row {i} {key}: {g!r} vs {w!r} (an exact column differs)"
                    continue
                d = abs(g - w)
                c = cols.setdefault(key, {"max_abs": 0.0, "max_rel": 0.0})
                c["max_abs"] = max(c["max_abs"], d)
                if w != 0:
                    c["max_rel"] = max(c["max_rel"], d / abs(w))
    return out


def _merge(into: dict, part: dict, label: str) -> None:
    """Fold one comparison into the per-column maxima; `by_setting` keeps each setting's own max_abs
    (arm/setting labels collapse to the setting: avx2, scalar, previous_goldens)."""
    setting = label.split("/")[-1]
    for name, cols in part.items():
        for key, c in cols.items():
            have = into.setdefault(name, {}).setdefault(key, {"max_abs": 0.0, "max_rel": 0.0, "worst": None,
                                                             "by_setting": {}})
            if c["max_abs"] > have["max_abs"]:
                have["worst"] = label
            have["max_abs"] = max(have["max_abs"], c["max_abs"])
            have["max_rel"] = max(have["max_rel"], c["max_rel"])
            have["by_setting"][setting] = max(have["by_setting"].get(setting, 0.0), c["max_abs"])


def allowed(measured: dict | None, want: float) -> float:
    """The largest |got - want| accepted for one float value: MARGIN x the column's measured max absolute
    spread, at least RTOL_FLOOR x |want| (None: a column added after the spread was measured)."""
    return max(MARGIN * (measured or {}).get("max_abs", 0.0), RTOL_FLOOR * abs(want))


def differences(got: Rows, want: Rows, columns: dict) -> list[str]:
    """Every value of `want` that `got` misses: exact for integers/None, within tolerance for floats.
    Columns added after the goldens were recorded are not compared; recorded ones may not disappear."""
    bad = []
    for name in FILES:
        if len(got[name]) != len(want[name]):
            bad.append(f"{name}: {len(got[name])} rows, golden has {len(want[name])}")
            continue
        for i, (a, b) in enumerate(zip(got[name], want[name])):
            for key, w in b.items():
                g = a.get(key, "<missing>")
                if _is_float(w) and isinstance(g, (int, float)) and not isinstance(g, bool):
                    ok = abs(g - w) <= allowed(columns.get(name, {}).get(key), w) and math.isfinite(g)
                else:
                    ok = g == w
                if not ok:
                    bad.append(f"{name} row {i} (step {b.get('step')}) {key}: got {g!r}, golden {w!r}")
    return bad


# ----------------------------------------------------------------------------------------------- tests


def test_tolerance_is_exact_for_counts_and_bounded_for_floats():
    """The comparison itself: integer columns exact, floats within max(atol, rtol*|want|)."""
    want = {"metrics": [{"step": 3, "grad_norm": 1.0e-3, "kl": 0.0, "cos_mean": None}], "evals": []}
    cols = {"metrics": {"grad_norm": {"max_abs": 1e-9, "max_rel": 1e-6}, "kl": {"max_abs": 1e-8, "max_rel": 0.0}}}
    ok = {"metrics": [{"step": 3, "grad_norm": 1.0e-3 * (1 + 9e-6), "kl": 9e-8, "cos_mean": None, "new": 1}],
          "evals": []}
    assert differences(ok, want, cols) == []
    far = {"metrics": [{"step": 4, "grad_norm": 1.0e-3 * (1 + 2e-5), "kl": 2e-7, "cos_mean": 0.0}], "evals": []}
    bad = differences(far, want, cols)
    assert [b.split(": got")[0].rsplit(" ", 1)[-1] for b in bad] == ["step", "grad_norm", "kl", "cos_mean"]
    assert differences({"metrics": [{"step": 3}], "evals": []}, want, cols)[0].endswith("got '<missing>', golden 0.001")


def test_spread_file_covers_every_float_column():
    """spread.json was measured for the goldens on disk: each recorded float column has a measurement."""
    measured = json.loads((GOLDEN / "spread.json").read_text())["columns"]
    for arm in ARMS:
        for name, rows in _golden(arm).items():
            floats = {k for r in rows for k, v in r.items() if _is_float(v)}
            assert floats <= set(measured[name]), f"{arm}.{name}: no spread measured for {floats - set(measured[name])}"


@pytest.mark.parametrize("arm", AGREE_ARMS)
def test_train_and_up_agree(tmp_path, arm):
    inproc = produce(arm, "train", tmp_path / "train", steps=AGREE_STEPS)
    services = produce(arm, "up", tmp_path / "up", steps=AGREE_STEPS)
    assert [r["step"] for r in inproc["metrics"]] == list(range(AGREE_STEPS))
    assert services == inproc, differences(services, inproc, {}) or "column sets differ"


@pytest.mark.slow
@pytest.mark.parametrize("arm", ARMS)
def test_toy_run_matches_golden(tmp_path, arm):
    want_env = json.loads((GOLDEN / "environment.json").read_text())
    have_env = _environment()
    assert have_env["toy_fingerprint"] == want_env["toy_fingerprint"], (
        f"the default toy world changed ({want_env['toy_fingerprint']} -> {have_env['toy_fingerprint']}): "
        "regenerate the golden files deliberately (.venv/bin/python tests/integration/test_golden.py --regenerate)")
    columns = json.loads((GOLDEN / "spread.json").read_text())["columns"]
    bad = differences(produce(arm, "train", tmp_path / arm), _golden(arm), columns)
    assert not bad, (f"recorded with {want_env}, this machine {have_env}; {len(bad)} values outside the "
                     "tolerance:\n" + "\n".join(bad[:20]))


# ------------------------------------------------------------------------------------------ regenerate


def regenerate(jobs: int = 1) -> None:
    """Record the goldens on this machine, measure the rounding spread, write both with the environment.
    `jobs` runs go at once (each is single-threaded)."""
    from concurrent.futures import ThreadPoolExecutor

    env = _environment()
    previous = None
    if (GOLDEN / "environment.json").exists():
        old_env = json.loads((GOLDEN / "environment.json").read_text())
        if old_env["toy_fingerprint"] == env["toy_fingerprint"]:
            previous = ({arm: _golden(arm) for arm in ARMS}, old_env)
    measured: dict = {}
    GOLDEN.mkdir(parents=True, exist_ok=True)
    settings = {"default": ({}, []), **VARIANTS}
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(jobs) as pool:
        runs = {(arm, label): pool.submit(produce, arm, "train", Path(tmp) / f"{arm}-{label}", env=e, args=a)
                for arm in ARMS for label, (e, a) in settings.items()}
        for arm in ARMS:
            base = runs[arm, "default"].result()
            for label in VARIANTS:
                _merge(measured, spread(runs[arm, label].result(), base), f"{arm}/{label}")
            if previous:
                _merge(measured, spread(base, previous[0][arm]), f"{arm}/previous_goldens")
            for name, data in base.items():
                (GOLDEN / f"{arm}.{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
            print(f"{arm}: {len(base['metrics'])} metric rows, {len(base['evals'])} eval rows", flush=True)
    for cols in measured.values():
        for c in cols.values():
            c["atol"] = MARGIN * c["max_abs"]
    variants = {label: {"env": e, "args": a} for label, (e, a) in VARIANTS.items()}
    if previous:
        variants["previous_goldens"] = {"recorded_with": previous[1]}
    (GOLDEN / "environment.json").write_text(json.dumps(env, indent=1) + "\n")
    (GOLDEN / "spread.json").write_text(json.dumps(
        {"measured_on": env, "steps": STEPS, "arms": list(ARMS), "variants": variants, "margin": MARGIN,
         "rtol_floor": RTOL_FLOOR, "columns": measured}, indent=1) + "\n")


if __name__ == "__main__":
    if "--regenerate" in sys.argv:
        sys.path.insert(0, str(ROOT))
        regenerate(int(sys.argv[sys.argv.index("--jobs") + 1]) if "--jobs" in sys.argv else 1)
    else:
        print(__doc__)
