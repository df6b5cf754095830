"""load_policy / load_problem_sets and `rankguard adapter report`."""
import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from shared.adapter import adapter_modules, get_delta
from shared.adapter_cli import register
from shared.config import resolve_config
from shared.modeling import ModelLoadError, load_policy, load_problem_sets, resolve_model_path, split_problems
from shared.problems import ProblemFormatError, load_leetcode_sample


def _cfg(tmp_path, model_dir, *extra):
    return resolve_config("toy", [f"model.name_or_path={model_dir}", f"model.svd_cache_dir={tmp_path / 'svd'}",
                                  f"run_dir={tmp_path / 'run'}", *extra])


def test_load_policy_from_folder_wraps_and_caches(tiny_qwen3_dir, tmp_path):
    cfg = _cfg(tmp_path, tiny_qwen3_dir)
    pol = load_policy(cfg, device="cpu", progress=False)
    assert len(pol.module_names) == 14 and list(adapter_modules(pol.model)) == pol.module_names
    assert pol.cache_stats.built == 14 and pol.model_id == str(tiny_qwen3_dir.resolve())
    assert get_delta(pol.model, flat=True).numel() == 896
    ids = pol.tokenizer("def f(x):\n    return x", return_tensors="pt").input_ids
    plain = load_policy(cfg, wrap=False, device="cpu")
    assert plain.module_names == [] and not adapter_modules(plain.model)
    with torch.no_grad():
        diff = (pol.model(ids).logits - plain.model(ids).logits).abs().max().item()
    assert diff < 1e-3
    again = load_policy(cfg, device="cpu", progress=False)
    assert again.cache_stats.loaded == 14 and again.cache_stats.built == 0


def test_bf16_and_gradient_checkpointing(tiny_qwen3_dir, tmp_path):
    cfg = _cfg(tmp_path, tiny_qwen3_dir, "model.dtype=bfloat16", "model.gradient_checkpointing=true")
    pol = load_policy(cfg, device="cpu", progress=False)
    assert next(iter(adapter_modules(pol.model).values())).U.dtype == torch.bfloat16
    assert pol.model.is_gradient_checkpointing
    pol.model.train()
    ids = torch.arange(2, 30).reshape(1, -1)
    pol.model(ids, labels=ids).loss.backward()
    grads = [m.delta_S.grad for m in adapter_modules(pol.model).values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_toy_model_missing_says_how_to_build(tmp_path):
    cfg = resolve_config("toy", [f"toy.dir={tmp_path / 'nowhere'}"])
    with pytest.raises(ModelLoadError, match="run `rankguard toy build` first"):
        resolve_model_path(cfg)


def test_missing_path_and_unknown_offline_name(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="model path not found: ./no/such/model"):
        load_policy(resolve_config("toy", ["model.name_or_path=./no/such/model"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as e:
        load_policy(resolve_config("toy", ["model.name_or_path=nobody-xyz/not-a-model"]))
    msg = str(e.value)
    assert "\n" not in msg and "'nobody-xyz/not-a-model'" in msg and "HF_HUB_OFFLINE=1" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        resolve_model_path(resolve_config("toy", [f"model.name_or_path={tmp_path / 'empty'}"]))


def test_problem_sets_leetcode_split_is_deterministic_and_disjoint():
    cfg = resolve_config("toy", ["problems=leetcode"])
    train, held = load_problem_sets(cfg)
    allp = load_leetcode_sample()
    assert {p.key for p in train} | {p.key for p in held} == {p.key for p in allp}
    assert not {p.key for p in train} & {p.key for p in held}
    assert 0.1 < len(held) / len(allp) < 0.4
    train2, held2 = split_problems(list(reversed(allp)))
    assert {p.key for p in held2} == {p.key for p in held}


def test_problem_sets_from_path_and_errors(tmp_path):
    from shared.problems import save_problems

    src = load_leetcode_sample()[:12]
    save_problems(src, tmp_path / "p.jsonl")
    train, held = load_problem_sets(resolve_config("toy", [f"problems={tmp_path / 'p.jsonl'}"]))
    assert len(train) + len(held) == 12
    with pytest.raises(ProblemFormatError, match="not found; use 'toy', 'leetcode' or a jsonl path"):
        load_problem_sets(resolve_config("toy", [f"problems={tmp_path / 'nope.jsonl'}"]))
    with pytest.raises(ProblemFormatError, match="rankguard toy build"):
        load_problem_sets(resolve_config("toy", [f"toy.dir={tmp_path / 'nowhere'}"]))


@pytest.fixture()
def cli():
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        pass

    register(app)
    return app


def test_adapter_report_cli(cli, tiny_qwen3_dir, tmp_path):
    args = ["adapter", "report", "--set", f"model.name_or_path={tiny_qwen3_dir}",
            "--set", f"model.svd_cache_dir={tmp_path / 'svd'}", "--set", f"run_dir={tmp_path / 'run'}"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "run" / "adapter_report.json").read_text())
    assert rep["modules_wrapped"] == 14 and rep["delta_s_params"] == 896
    assert rep["per_target"] == {k: 2 for k in ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"]}
    assert rep["svd_modules_built"] == 14 and rep["cache_modules_loaded"] == 14
    assert rep["max_abs_dlogit_at_zero"] < 1e-3
    assert "delta_S params" in res.output
    res2 = CliRunner().invoke(cli, args)  # warm cache: nothing rebuilt
    rep2 = json.loads((tmp_path / "run" / "adapter_report.json").read_text())
    assert res2.exit_code == 0 and rep2["svd_modules_built"] == 0 and rep2["svd_build_s"] is None


@pytest.mark.parametrize("args,expect", [
    (["--preset", "nope"], "error: unknown preset 'nope'"),
    (["--set", "model.name_or_path=./missing/model"], "error: model path not found: ./missing/model"),
    (["--set", "model.target_modules=[\"foo\"]"], "error: module name 'foo' matches no nn.Linear"),
])
def test_adapter_report_bad_input(cli, tiny_qwen3_dir, tmp_path, args, expect):
    base = [] if "model.name_or_path" in " ".join(args) else ["--set", f"model.name_or_path={tiny_qwen3_dir}"]
    res = CliRunner().invoke(cli, ["adapter", "report", *base, "--set", f"run_dir={tmp_path}",
                                   "--set", f"model.svd_cache_dir={tmp_path / 'svd'}", *args])
    assert res.exit_code == 2, res.output
    assert expect in res.output and "Traceback" not in res.output
