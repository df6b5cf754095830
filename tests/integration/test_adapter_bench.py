"""bench/adapter.py runs end to end on the toy shape (tiny token count) and reports every number."""
import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "adapter.py"


def test_bench_adapter_toy_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_adapter", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--batch", "2", "--seq", "16", "--repeats", "1", "--warmup", "0", "--baseline", "frozen",
                    "--layers", "2", "--json", str(tmp_path / "r.json")])
    assert res["modules"] == 14 and res["delta_s_params"] == 14 * 128 - 2 * 2 * 64  # k/v: 128 -> 64
    assert res["cache_loaded"] == 14 and res["cache_rebuilt"] == 0
    assert res["wrapped"]["saved_gb"] > res["unwrapped_frozen"]["saved_gb"]  # h = x Vh^T per module
    assert res["time_ratio_vs_frozen"] > 0 and res["mem_ratio_vs_frozen"] > 1
    assert (tmp_path / "r.json").exists()
