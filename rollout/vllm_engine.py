"""Rollout engine on vLLM, run in a child process this object owns.

Why a child process: the pinned vLLM has no `LLM.shutdown()` and about 1 run in 8 aborted at
interpreter exit; in a child we end with `os._exit` and the parent never touches vLLM's globals.
The child dies with the parent (PR_SET_PDEATHSIG + a parent watchdog + EOF on the socket).

Wire (multiprocessing Connection over an inherited socketpair, pickled plain dicts):
    parent -> child  ("generate", [job dicts]) | ("delta", version, names, sizes, f32 bytes) | ("close",)
    child -> parent  ("ok", result) | ("error", one-line message, traceback)

delta_S push: the child writes (delta, names, sizes, version) to a safetensors file and calls
`llm.collective_rpc("rg_load_delta", args=(path,))`; the worker extension
(`rollout.vllm_worker_ext`) merges W = U diag(S + delta) Vh (+ W_res) with its own copy of the
factors and reloads those weights in place; then the prefix cache is reset (its KV came from the
old weights).

Log-probs: vLLM's `logprobs_mode="raw_logprobs"` = log_softmax of the raw logits before any
temperature/top-k/top-p/min-p, i.e. the policy's own probability of the sampled token — the same
quantity the learner's HF forward recomputes (and what HFEngine reports).
"""
from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import weakref
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from shared.config import RunConfig
from rollout.engine import generate_by_mode, stop_token_ids
from shared.schemas import Completion, DeltaSUpdate, PromptJob, RolloutGroup

WORKER_EXTENSION = "rollout.vllm_worker_ext.DeltaSWorkerExtension"
DEFAULT_CONTEXT = 4096  # prompt budget added to max_new_tokens when max_model_len is not given


class EngineError(ValueError):
    """The vLLM child failed (start, generate or update); the message is the child's one-line reason."""


def local_model_dir(model_id: str, revision: str | None = None) -> str:
    """A folder as is; an HF name -> its snapshot folder in the HF cache (downloaded unless HF_HUB_OFFLINE=1).

    vLLM and the worker extension both read that one folder (the worker reads its safetensors).
    """
    if Path(model_id).is_dir():
        return str(Path(model_id).resolve())
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model_id, revision=revision,
                                 allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"])
    except Exception as e:  # noqa: BLE001 - offline miss, bad name, network: one line for the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise EngineError(f"model {model_id!r}{f' @ {revision}' if revision else ''} is not a local folder and "
                          f"could not be fetched from the HF cache/hub: {first}") from None


def _model_max_len(model_dir: str) -> int | None:
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg)
    return cfg.get("max_position_embeddings")


def _tied(model_dir: str) -> bool:
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(cfg.get("tie_word_embeddings", cfg.get("text_config", {}).get("tie_word_embeddings", False)))


class VLLMEngine:
    """rollout.engine.Engine on vLLM. `VLLMEngine(cfg)` starts the child and waits until it is ready.

    max_model_len, gpu_memory_utilization: default from the config's `vllm` section (max_model_len None =
    min(model's max_position_embeddings, 4096 + sampling.max_new_tokens); memory share None = 0.9 on
    devices of its own, 0.45 beside the learner); tensor_parallel_size comes from `vllm` too.
    log_file: where the child's stdout/stderr go (default: this process's stderr).
    """

    def __init__(self, cfg: RunConfig, *, max_model_len: int | None = None,
                 gpu_memory_utilization: float | None = None, log_file: str | Path | None = None,
                 start_timeout_s: float = 900.0, request_timeout_s: float = 3600.0,
                 llm_kwargs: dict[str, Any] | None = None):
        from shared.modeling import resolve_model_path

        self.cfg = cfg
        self.version = 0
        self.model_id = resolve_model_path(cfg)  # the learner's SVD cache key (folder path or HF name)
        self.model_dir = local_model_dir(self.model_id, cfg.model.revision)
        mpe = _model_max_len(self.model_dir)
        want = max_model_len or cfg.vllm.max_model_len or DEFAULT_CONTEXT + cfg.sampling.max_new_tokens
        self.max_model_len = int(min(want, mpe) if mpe else want)
        self.request_timeout_s = request_timeout_s
        self._update: DeltaSUpdate | None = None
        self._loaded_key: tuple | None = None  # (version, quarantine on?) currently in vLLM's weights
        self.timings: dict[str, float] = {}
        self._lock = threading.Lock()
        self._log_hint = f"see {log_file}" if log_file else "see its log on stderr"
        svd_dir = cfg.model.svd_cache_dir
        if gpu_memory_utilization is None:
            gpu_memory_utilization = cfg.vllm.memory_fraction(cfg.placement.colocate)
        self.gpu_memory_utilization = gpu_memory_utilization
        spec = {
            "model_dir": self.model_dir,
            "llm": {"model": self.model_dir, "enforce_eager": True, "max_model_len": self.max_model_len,
                    "dtype": cfg.model.dtype, "seed": cfg.train.seed, "logprobs_mode": "raw_logprobs",
                    "gpu_memory_utilization": gpu_memory_utilization, "worker_extension_cls": WORKER_EXTENSION,
                    # None (dropped in the child) unless > 1: the CPU backend keeps its own default
                    "tensor_parallel_size": cfg.vllm.tensor_parallel_size if cfg.vllm.tensor_parallel_size > 1 else None,
                    "trust_remote_code": cfg.model.trust_remote_code, **(llm_kwargs or {})},
            "worker": {"model_dir": self.model_dir, "model_id": self.model_id, "revision": cfg.model.revision,
                       "svd_cache_dir": str(Path(svd_dir).resolve()) if svd_dir else None,
                       "target_modules": list(cfg.model.target_modules), "rank": cfg.model.rank,
                       "dtype": cfg.model.dtype, "tie_word_embeddings": _tied(self.model_dir)},
            "torch_threads": cfg.train.torch_threads,
        }
        t0 = time.perf_counter()
        self._proc, self._conn = _spawn_child(log_file)
        self._finalizer = weakref.finalize(self, _stop_child, self._proc, self._conn)
        self.info = self._call(("start", spec), timeout=start_timeout_s)
        self.timings["start_s"] = time.perf_counter() - t0
        self._loaded_key = None  # checkpoint weights: the first update is always pushed

    # ------------------------------------------------------------------ plumbing
    def _call(self, msg: tuple, timeout: float | None = None) -> Any:
        with self._lock:
            if self._proc.poll() is not None:
                raise EngineError(f"vLLM child process is gone (exit code {self._proc.returncode})")
            self._conn.send(msg)
            limit = timeout or self.request_timeout_s
            deadline = time.monotonic() + limit
            while not self._conn.poll(1.0):
                if self._proc.poll() is not None:
                    raise EngineError(f"vLLM child process died during {msg[0]!r} "
                                      f"(exit code {self._proc.returncode}; {self._log_hint})")
                if time.monotonic() > deadline:
                    self.close()
                    raise EngineError(f"vLLM child did not answer {msg[0]!r} within {limit:.0f}s; stopped it")
            try:
                kind, *rest = self._conn.recv()
            except EOFError:
                raise EngineError(f"vLLM child closed the connection during {msg[0]!r}") from None
        if kind == "error":
            raise EngineError(rest[0])
        return rest[0]

    def close(self) -> None:
        """Stop the child (idempotent). Also runs at garbage collection and interpreter exit."""
        self._finalizer()

    def __enter__(self) -> "VLLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    # ------------------------------------------------------------------ weights
    def load_delta(self, update: DeltaSUpdate) -> None:
        """Merge a policy version into vLLM's weights (train mode now; eval mode lazily if it differs).

        A refused update (layout mismatch, NaN) raises EngineError and leaves the previous version live.
        """
        prev = (self._update, self.version)
        self._update, self.version = update, int(update.version)
        try:
            self._ensure_weights(quarantine=update.quarantine is not None)
        except EngineError:
            self._update, self.version = prev
            raise

    def _ensure_weights(self, quarantine: bool) -> None:
        upd = self._update
        if upd is None:
            return
        quarantine = quarantine and upd.quarantine is not None
        key = (int(upd.version), quarantine)
        if key == self._loaded_key:
            return
        data = upd.data
        if quarantine:
            from shared.codec import decode_floats, encode_floats  # torch only when a quarantine is merged

            data = encode_floats(decode_floats(upd.data) + decode_floats(upd.quarantine))
        t0 = time.perf_counter()
        res = self._call(("delta", int(upd.version), list(upd.names), [int(s) for s in upd.sizes], data))
        self.timings["last_reload_s"] = time.perf_counter() - t0
        self.timings["last_reload_worker_s"] = res["worker"]["total_s"]
        self._loaded_key = key

    # ------------------------------------------------------------------ sampling
    def generate(self, jobs: list[PromptJob]) -> list[RolloutGroup]:
        """Sample job.sampling.n completions per job; train-mode jobs see the quarantine delta (route arm)."""
        return generate_by_mode(jobs, self._sample, prepare=lambda train: self._ensure_weights(quarantine=train))

    def _sample(self, jobs: list[PromptJob], train: bool) -> list[RolloutGroup]:
        raw = self._call(("generate", [j.model_dump(mode="python") for j in jobs]))
        return [RolloutGroup(job_id=job.job_id, step=job.step, problem_id=job.problem_id,
                             policy_version=self.version, prompt_ids=list(job.prompt_ids), split=job.split,
                             completions=[Completion(**c) for c in comps])
                for job, comps in zip(jobs, raw)]


# ====================================================================== parent side of the child
def _spawn_child(log_file: str | Path | None) -> tuple[subprocess.Popen, Connection]:
    ours, theirs = socket.socketpair()
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # the child's stdout joins stderr (fd 2, even under pytest's capture): the parent's stdout stays clean
    out = open(log_file, "ab") if log_file else 2  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen([sys.executable, "-m", "rollout.vllm_engine", "--child", str(theirs.fileno())],
                                pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=out)
    finally:
        theirs.close()
        if log_file:
            out.close()
    conn = Connection(ours.detach())
    _CHILDREN.add(proc)
    return proc, conn


def _stop_child(proc: subprocess.Popen, conn: Connection) -> None:
    try:
        if proc.poll() is None:
            try:
                conn.send(("close",))
            except OSError:
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    finally:
        try:
            conn.close()
        except OSError:
            pass
        _CHILDREN.discard(proc)


_CHILDREN: "weakref.WeakSet[subprocess.Popen]" = weakref.WeakSet()


@atexit.register
def _kill_children() -> None:
    for p in list(_CHILDREN):
        if p.poll() is None:
            p.kill()


# ====================================================================== the child
def _die_with_parent() -> None:
    """SIGKILL this process when the parent dies (Linux prctl), plus a polling fallback."""
    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # parent already gone between fork and prctl
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


class _Child:
    def __init__(self, spec: dict):
        import torch

        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process
        from vllm import LLM

        llm_kwargs = {k: v for k, v in spec["llm"].items() if v is not None}
        if not on_gpu:
            llm_kwargs.pop("gpu_memory_utilization", None)
        t0 = time.perf_counter()
        self.llm = LLM(**llm_kwargs)
        t_llm = time.perf_counter() - t0
        self.setup = self.llm.collective_rpc("rg_setup", args=(json.dumps(spec["worker"]),))
        self.tokenizer = self.llm.get_tokenizer()
        self.stop_ids = stop_token_ids(self.tokenizer)
        self.tmp = tempfile.mkdtemp(prefix="rankguard-delta-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        self.info = {"llm_s": round(t_llm, 3), "setup": self.setup[0], "stop_ids": self.stop_ids,
                     "workers": len(self.setup), "device": "cuda" if on_gpu else "cpu"}

    def generate(self, jobs: list[dict]) -> list[list[dict]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts, params = [], []
        for j in jobs:
            s = j["sampling"]
            if not j["prompt_ids"]:
                raise ValueError(f"job {j['job_id']!r} has no prompt_ids")
            prompts.append(TokensPrompt(prompt_token_ids=list(j["prompt_ids"])))
            params.append(SamplingParams(
                n=s["n"], temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"] if s["top_k"] > 0 else 0,
                min_p=s["min_p"], max_tokens=s["max_new_tokens"], seed=s["seed"], logprobs=0,
                stop_token_ids=self.stop_ids, skip_special_tokens=True))
        outs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        result = []
        for j, ro in zip(jobs, outs):
            comps = []
            for c in sorted(ro.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                lps = [float(c.logprobs[t][tok].logprob) for t, tok in enumerate(ids)]
                comps.append({"rollout_id": f"{j['job_id']}-{c.index}", "text": c.text, "token_ids": ids,
                              "logprobs": lps, "finish_reason": "stop" if c.finish_reason == "stop" else "length"})
            result.append(comps)
        return result

    def load_delta(self, version: int, names: list[str], sizes: list[int], data: bytes) -> dict:
        from safetensors.torch import save_file

        from shared.codec import decode_floats

        path = os.path.join(self.tmp, f"delta-{version}.safetensors")
        t0 = time.perf_counter()
        delta = decode_floats(data)
        save_file({"delta": delta}, path, metadata={"names": json.dumps(names), "sizes": json.dumps(sizes),
                                                    "version": str(version)})
        try:
            res = self.llm.collective_rpc("rg_load_delta", args=(path,))
        finally:
            os.unlink(path)
        self.llm.reset_prefix_cache()
        return {"worker": res[0], "total_s": round(time.perf_counter() - t0, 4)}


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


def child_main(fd: int) -> None:
    _die_with_parent()
    conn = Connection(fd)
    child: _Child | None = None
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            os._exit(0)
        kind = msg[0]
        if kind == "close":
            os._exit(0)
        try:
            if kind == "start":
                spec = msg[1]
                import torch

                torch.set_num_threads(int(spec.get("torch_threads") or 1))
                child = _Child(spec)
                result: Any = child.info
            elif child is None:
                raise RuntimeError(f"{kind!r} before 'start'")
            elif kind == "generate":
                result = child.generate(msg[1])
            elif kind == "delta":
                result = child.load_delta(*msg[1:])
            else:
                raise ValueError(f"unknown request {kind!r}; valid: start, generate, delta, close")
            conn.send(("ok", result))
        except Exception as e:  # noqa: BLE001 - reported to the parent, which raises EngineError
            conn.send(("error", _one_line(e), traceback.format_exc()))
            if kind == "start":
                os._exit(1)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child_main(int(sys.argv[2]))
    else:
        sys.exit("usage: python -m rollout.vllm_engine --child FD  (started by VLLMEngine, not by hand)")
