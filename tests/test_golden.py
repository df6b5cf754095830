"""Golden-file equality: 30 toy steps per arm, in one process and through the services, must produce
byte-identical metrics.jsonl / evals.jsonl rows (timing columns aside) to the files recorded at the
commit before the one-loop refactor. The toy world is deterministic (single thread, seeded); floats can
differ on another CPU instruction set or torch build, so those are skipped with the reason, not failed.

Regenerate deliberately (after a change that is meant to move numbers, e.g. a new toy world):
    python tests/test_golden.py --regenerate
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "toy30"
STEPS = 30
INPROC_ARMS = ("vanilla", "projected", "rebound", "route")
SERVICE_ARMS = ("vanilla", "projected")


def _environment() -> dict:
    import torch

    from shared.toy.build import fingerprint, resolve_warm
    from shared.config import ToyConfig

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "toy_fingerprint": fingerprint(ToyConfig(), resolve_warm())}


def _strip(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if not k.startswith("t_")} for r in rows]


def produce(arm: str, command: str, run_dir: Path) -> dict[str, list[dict]]:
    """Run `rankguard <command>` (train or up) for STEPS toy steps; the stripped rows of both files."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}
    env.pop("RANKGUARD_TOY_WARM", None)
    cmd = [sys.executable, "-m", "services.cli", command, "--preset", "toy", "--arm", arm, "--steps", str(STEPS),
           "--run-dir", str(run_dir), "--no-progress"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return {name: _strip(run_dir / f"{name}.jsonl") for name in ("metrics", "evals")}


def _golden(arm: str) -> dict[str, list[dict]]:
    return {name: _strip(GOLDEN / f"{arm}.{name}.jsonl") for name in ("metrics", "evals")}


def _check_environment() -> None:
    want = json.loads((GOLDEN / "environment.json").read_text())
    have = _environment()
    assert have["toy_fingerprint"] == want["toy_fingerprint"], (
        f"the default toy world changed ({want['toy_fingerprint']} -> {have['toy_fingerprint']}): "
        "regenerate the golden files deliberately (python tests/test_golden.py --regenerate)")
    for key in ("torch", "cpu_capability"):
        if have[key] != want[key]:
            pytest.skip(f"golden files were recorded with {key}={want[key]}, this machine has {have[key]}")


def _golden_keys_only(got: dict, want: dict) -> dict:
    """Columns added after the golden files were recorded (new diagnostics) are not compared; every
    recorded column must match exactly, and no recorded column may disappear."""
    out = {}
    for name in ("metrics", "evals"):
        out[name] = [{k: a.get(k, "<missing>") for k in b} for a, b in zip(got[name], want[name])]
        out[name] += got[name][len(want[name]):]
    return out


def _first_difference(got: dict, want: dict) -> str:
    for name in ("metrics", "evals"):
        if len(got[name]) != len(want[name]):
            return f"{name}: {len(got[name])} rows, golden has {len(want[name])}"
        for i, (a, b) in enumerate(zip(got[name], want[name])):
            diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
            if diff:
                return f"{name} row {i} (step {b.get('step')}): (got, golden) {diff}"
    return ""


@pytest.mark.slow
@pytest.mark.parametrize("command,arm", [("train", a) for a in INPROC_ARMS] + [("up", a) for a in SERVICE_ARMS])
def test_toy_run_matches_golden(tmp_path, command, arm):
    _check_environment()
    got = _golden_keys_only(produce(arm, command, tmp_path / f"{command}-{arm}"), _golden(arm))
    assert got == _golden(arm), _first_difference(got, _golden(arm))


def regenerate() -> None:
    import tempfile

    GOLDEN.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for arm in INPROC_ARMS:
            rows = produce(arm, "train", Path(tmp) / arm)
            for name, data in rows.items():
                (GOLDEN / f"{arm}.{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
            print(f"{arm}: {len(rows['metrics'])} metric rows, {len(rows['evals'])} eval rows")
        for arm in SERVICE_ARMS:
            rows = _golden_keys_only(produce(arm, "up", Path(tmp) / f"up-{arm}"), _golden(arm))
            assert rows == _golden(arm), f"services differ from in-process for {arm}: {_first_difference(rows, _golden(arm))}"
    (GOLDEN / "environment.json").write_text(json.dumps(_environment(), indent=1) + "\n")


if __name__ == "__main__":
    if "--regenerate" in sys.argv:
        sys.path.insert(0, str(ROOT))
        regenerate()
    else:
        print(__doc__)
