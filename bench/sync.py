"""Policy-sync benchmark: bytes and latency from the end of a learner step until an engine samples with
the new version.

    python bench/sync.py                      # toy model on CPU, HFEngine (load_delta -> first token)
    python bench/sync.py --shape qwen3-4b     # CUDA, Qwen3-4B shape (random weights, no download):
                                              # 252 modules merged W = U diag(S+delta) Vh, copied into
                                              # a Qwen3-4B-shaped model, then its first token

Stages (median of --repeats): encode (flat delta_S -> fp32 bytes) -> pack (DeltaSUpdate msgpack) ->
publish (Redis SET + notify, a private redis-server) -> fetch (GET) -> unpack -> load (toy:
HFEngine.load_delta; 4B: DeltaMerger merge + weight copy) -> first token (one greedy token).
Bytes on the wire are compared with the bytes of the full weights the update replaces.
Goal for 4B: <= 3 MB and <= 50 ms per step (merge reference: 34 ms on one H200).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                max_position_embeddings=4096, rope_theta=1_000_000.0)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _sync_cuda() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    _sync_cuda()
    t0 = time.perf_counter()
    out = fn()
    _sync_cuda()
    return out, time.perf_counter() - t0


class Rig:
    """Learner side (makes the update), Redis (private server), engine side (loads it, samples)."""

    def __init__(self, queues):
        self.q = queues

    def run_once(self, version: int) -> dict:
        from shared.schemas import DeltaSUpdate

        t: dict[str, float] = {}
        flat = self.new_delta()
        data, t["encode"] = timed(lambda: flat.numpy().astype("<f4").tobytes())
        upd = DeltaSUpdate(version=version, names=self.names, sizes=self.sizes, data=data)
        wire, t["pack"] = timed(upd.pack)
        _, t["publish"] = timed(lambda: self.q.publish_policy(f"1:{version}", wire))
        (tag, got), t["fetch"] = timed(self.q.fetch_policy)
        upd2, t["unpack"] = timed(lambda: DeltaSUpdate.unpack(got))
        _, t["load"] = timed(lambda: self.load(upd2))
        _, t["first_token"] = timed(self.first_token)
        t["total"] = sum(t.values())
        t["bytes"] = len(wire)
        return t


class ToyRig(Rig):
    def __init__(self, queues, toy_dir: str):
        super().__init__(queues)
        from rollout.hf_engine import HFEngine
        from shared.adapter import adapter_modules, delta_s_layout
        from shared.config import resolve_config
        from shared.modeling import load_policy
        from shared.schemas import PromptJob, SamplingParams

        cfg = resolve_config("toy", [f"toy.dir={toy_dir}"])
        policy = load_policy(cfg, progress=False)
        self.engine = HFEngine(policy.model, policy.tokenizer)
        self.names, self.sizes = delta_s_layout(policy.model)
        mods = adapter_modules(policy.model)
        elem = next(policy.model.parameters()).element_size()
        wrapped = sum(m.U.shape[0] * m.Vh.shape[1] for m in mods.values())
        other = sum(p.numel() for n, p in policy.model.named_parameters() if "delta_" not in n)
        self.full_bytes = (wrapped + other) * elem
        self.wrapped_bytes = wrapped * elem
        ids = policy.tokenizer("def f(a, b):", add_special_tokens=False)["input_ids"]
        self.job = PromptJob(job_id="bench", step=0, problem_id="p", prompt_text="def f(a, b):", prompt_ids=ids,
                             sampling=SamplingParams(n=1, max_new_tokens=1, temperature=0.0, seed=0))
        self.device = "cpu"

    def new_delta(self) -> torch.Tensor:
        return torch.randn(sum(self.sizes)) * 1e-3

    def load(self, upd) -> None:
        self.engine.load_delta(upd)

    def first_token(self) -> None:
        self.engine.generate([self.job])


class Qwen4BRig(Rig):
    """Random Qwen3-4B-shaped model on CUDA plus random full-rank factors for its 252 linears."""

    def __init__(self, queues, layers: int | None = None, device: str = "cuda"):
        super().__init__(queues)
        from transformers import Qwen3Config, Qwen3ForCausalLM

        from rollout.merge import DeltaMerger

        shape = dict(QWEN3_4B)
        if layers:
            shape["num_hidden_layers"] = layers
        dev = torch.device(device)
        cfg = Qwen3Config(**shape, torch_dtype="bfloat16")
        torch.set_default_dtype(torch.bfloat16)
        with dev:
            self.model = Qwen3ForCausalLM(cfg).eval()
        torch.set_default_dtype(torch.float32)
        self.params = dict(self.model.named_parameters())
        factors = {}
        g = torch.Generator(device=dev).manual_seed(0)
        for name, mod in self.model.named_modules():
            if name.split(".")[-1] in TARGETS:
                d_out, d_in = mod.weight.shape
                r = min(d_out, d_in)
                factors[name] = (torch.randn(d_out, r, device=dev, dtype=torch.bfloat16, generator=g) / d_out ** 0.5,
                                 torch.rand(r, device=dev, generator=g) + 0.5,
                                 torch.randn(r, d_in, device=dev, dtype=torch.bfloat16, generator=g) / d_in ** 0.5)
        self.merger = DeltaMerger(factors, device=dev, out_dtype=torch.bfloat16)
        self.names, self.sizes = list(factors), [f[1].numel() for f in factors.values()]
        self.full_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.wrapped_bytes = sum(self.params[n + ".weight"].numel() * 2 for n in self.names)
        self.ids = torch.randint(0, shape["vocab_size"], (1, 32), device=dev)
        self.device = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
        self.depth = shape["num_hidden_layers"]
        self.merge_s: list[float] = []

    def new_delta(self) -> torch.Tensor:
        return torch.randn(sum(self.sizes)) * 1e-3

    @torch.no_grad()
    def load(self, upd) -> None:
        t0 = time.perf_counter()
        for name, W in self.merger.merged(upd.data, upd.names, upd.sizes):
            self.params[name].copy_(W)
        _sync_cuda()
        self.merge_s.append(time.perf_counter() - t0)

    @torch.no_grad()
    def first_token(self) -> None:
        self.model(self.ids).logits[:, -1].argmax(-1).item()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["toy", "qwen3-4b"], default="toy")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--layers", type=int, default=None, help="qwen3-4b only: cut the depth (quick look)")
    ap.add_argument("--device", default=None, help="qwen3-4b: cuda (default) or cpu with --layers for a smoke run")
    ap.add_argument("--toy-dir", default=".cache/toy", help="toy world (rankguard toy build)")
    ap.add_argument("--redis-url", default=None, help="use this Redis instead of a private one")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1 if args.shape == "toy" else torch.get_num_threads())

    from services.queues import Queues
    from services.redis_server import RedisServer

    server = None
    url = args.redis_url
    tmp = tempfile.TemporaryDirectory(prefix="bench-sync-")
    if url is None:
        server = RedisServer(Path(tmp.name) / "redis")
        url = server.start()
    try:
        q = Queues(url, "bench-sync")
        if args.shape == "toy":
            rig = ToyRig(q, args.toy_dir)
        else:
            device = args.device or "cuda"
            if device == "cuda" and not torch.cuda.is_available():
                print("error: --shape qwen3-4b needs CUDA (or --device cpu --layers 1 for a smoke run)",
                      file=sys.stderr)
                return 2
            rig = Qwen4BRig(q, args.layers, device)
        runs = [rig.run_once(v) for v in range(args.warmup + args.repeats)][args.warmup:]
    finally:
        if server:
            server.stop()
        tmp.cleanup()

    stages = ["encode", "pack", "publish", "fetch", "unpack", "load", "first_token", "total"]
    med = {k: statistics.median(r[k] for r in runs) for k in stages}
    wire = runs[-1]["bytes"]
    res = {"shape": args.shape, "device": getattr(rig, "device", "cpu"), "modules": len(rig.names),
           "delta_values": sum(rig.sizes), "bytes": wire, "full_weight_bytes": rig.full_bytes,
           "wrapped_weight_bytes": rig.wrapped_bytes, "ratio_full_over_wire": rig.full_bytes / wire,
           "median_ms": {k: v * 1e3 for k, v in med.items()},
           "sync_ms_excl_first_token": (med["total"] - med["first_token"]) * 1e3, "repeats": args.repeats}
    print(f"policy sync, {args.shape} ({res['device']}): {res['modules']} modules, {res['delta_values']:,} delta_S values")
    print(f"  bytes on the wire  {wire:,} ({wire / 2**20:.2f} MiB) vs full weights {rig.full_bytes:,} "
          f"({rig.full_bytes / 2**20:.1f} MiB): 1/{res['ratio_full_over_wire']:,.0f}"
          f"  [wrapped linears alone {rig.wrapped_bytes / 2**20:.1f} MiB: 1/{rig.wrapped_bytes / wire:,.0f}]")
    for k in stages:
        print(f"  {k:<12} {med[k] * 1e3:9.3f} ms")
    print(f"  sync (end of step -> weights live) {res['sync_ms_excl_first_token']:.2f} ms; "
          f"to first token {med['total'] * 1e3:.2f} ms")
    if args.shape == "qwen3-4b" and rig.depth != QWEN3_4B["num_hidden_layers"]:
        full = QWEN3_4B["num_hidden_layers"] / rig.depth
        print(f"  (cut to {rig.depth} layers: a full-depth update is ~{wire * full / 2**20:.2f} MiB, "
              f"merge time scales ~x{full:.0f})")
    elif args.shape == "qwen3-4b":
        ok = wire <= 3e6 and res["sync_ms_excl_first_token"] <= 50
        print(f"  goal <= 3 MB and <= 50 ms: {'met' if ok else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
