"""Run one check of one program in isolation: a pool of prewarmed fork servers (fast path) or a
fresh interpreter per execution (the naive reference path, used by the benchmark).

Isolation (SandboxConfig.isolation, see forkserver.py for what each gives):
  auto        namespaces when root, else bwrap when bubblewrap works, else fallback
  namespaces  mount+net+pid namespaces, per-slot uid, memory cgroup (needs root / CAP_SYS_ADMIN)
  bwrap       the fork server runs inside bubblewrap (no root needed) + audit-hook guard
  fallback    audit-hook guard only (sockets, processes, ctypes, outside writes/reads refused)
  fresh       naive: a new interpreter per execution, no isolation beyond rlimits (benchmark only)

`SandboxPool.run(job) -> ExecResult` is thread-safe; each call borrows one fork-server slot.
The grader side owns two pipes per execution: it writes the `pre` frame at once and the `post`
frame (call sides / asserts / nonce) only when the harness reports the program loaded, and it reads
the result lines itself (untrusted: the grader decides, see reward_server/judge.py), so neither
ever passes through the fork server.
"""
from __future__ import annotations

import fcntl
import glob
import itertools
import json
import logging
import marshal
import math
import os
import queue
import select
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from reward_server.sandbox import forkserver, harness, isolation, plain, wire

log = logging.getLogger("rankguard.sandbox")
REPO_ROOT = Path(__file__).resolve().parents[2]
VERDICT_CAP = 32 << 20  # result lines the grader keeps from one check (more is read and dropped)
ISOLATIONS = ("auto", "namespaces", "bwrap", "fallback", "fresh")
ALLOW_FALLBACK_ENV = "RANKGUARD_ALLOW_FALLBACK"

# The fork server starts from `python -E -S -c BOOT`: its three modules arrive over a pipe, so the
# sandbox never needs (or gets) read access to the repository.
BOOT = """import os, sys, marshal, types, site
site.setquit(); site.setcopyright(); site.sethelper()  # -S skipped these: exit()/quit() must exist
fd = int(sys.argv[1]); blob = b''
while True:
    chunk = os.read(fd, 1 << 16)
    if not chunk:
        break
    blob += chunk
os.close(fd)
srcs = marshal.loads(blob)
top = types.ModuleType('reward_server'); top.__path__ = []; sys.modules['reward_server'] = top
pkg = types.ModuleType('reward_server.sandbox'); pkg.__path__ = []; sys.modules[pkg.__name__] = pkg
top.sandbox = pkg
for name in srcs:  # in import order (plain, harness, wire, isolation, forkserver)
    mod = types.ModuleType('reward_server.sandbox.' + name)
    sys.modules[mod.__name__] = mod; setattr(pkg, name, mod)
    exec(compile(srcs[name], 'reward_server/sandbox/' + name + '.py', 'exec'), mod.__dict__)
sys.argv = [sys.argv[0]] + sys.argv[2:]
sys.modules['reward_server.sandbox.forkserver'].main()
"""
_UID_SEQ = itertools.count()
_BWRAP_OK: bool | None = None
_BWRAP_LOCK = threading.Lock()


def bwrap_works() -> bool:
    """Whether bubblewrap can create the namespaces here (probed once per process)."""
    global _BWRAP_OK
    with _BWRAP_LOCK:
        if _BWRAP_OK is None:
            _BWRAP_OK = _probe_bwrap()
        return _BWRAP_OK


def _probe_bwrap() -> bool:
    exe = shutil.which("bwrap")
    ok = False
    if exe:
        try:
            ok = subprocess.run(
                [exe, "--unshare-net", "--unshare-pid", "--as-pid-1", "--ro-bind", "/", "/", "--dev", "/dev",
                 "--proc", "/proc", "--", "/bin/sh", "-c", "exit 0"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                timeout=20).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
    return ok


def bwrap_argv(allow: list[str], mask: list[str], links: dict[str, str]) -> list[str]:
    """bubblewrap wrapper: no network, own pid/ipc/uts namespaces (server = pid 1), no capabilities,
    a root holding the allow-list only (read-only), site-packages masked, private /tmp and /dev/shm.

    No --die-with-parent: its PDEATHSIG fires when the spawning *thread* exits. The server leaves
    on its own when the control socket closes (grader gone), taking the namespace with it."""
    argv = [shutil.which("bwrap") or "bwrap", "--unshare-net", "--unshare-pid", "--unshare-ipc",
            "--unshare-uts", "--as-pid-1", "--cap-drop", "ALL"]
    for p in sorted({os.path.realpath(p) for p in allow if p and os.path.exists(p)}):
        argv += ["--ro-bind", p, p]
    for m in sorted(mask):
        argv += ["--tmpfs", m, "--remount-ro", m]
    for link, target in sorted(links.items()):
        argv += ["--symlink", target, link]
    return argv + ["--dev", "/dev", "--tmpfs", "/dev/shm", "--remount-ro", "/dev/shm", "--proc", "/proc",
                   "--tmpfs", "/tmp", "--remount-ro", "/", "--"]


class SandboxError(RuntimeError):
    """The sandbox machinery itself failed (not the program): a fork server died or hung."""


@dataclass
class SandboxConfig:
    workers: int = 0  # 0 = one per core
    timeout_s: float = 3.0  # CPU seconds per execution unless the job brings its own (a problem's budget)
    wall_factor: float = 3.0  # wall-clock ceiling = wall_factor x CPU budget + wall_slack_s (for a child
    wall_slack_s: float = 2.0  # that idles; one still computing is let run on to hard_wall_for, see
    hard_wall_factor: float = 10.0  # forkserver.Server._wait: RLIMIT_CPU stops it at its budget)
    memory_mb: int = 1024  # RLIMIT_AS
    fsize_mb: int = 4  # largest file (stdout, stderr, result file) a program may write
    nproc: int = 32  # processes + threads per execution (namespaces mode)
    isolation: str = "auto"  # auto | namespaces | fallback | fresh (naive: new interpreter per run)
    hide: list[str] = field(default_factory=list)  # extra paths programs must not read
    expose: list[str] = field(default_factory=list)  # extra paths programs may read (added to the allow-list)
    allow_fallback: bool = False  # a Grader may serve rewards from fallback isolation (see FALLBACK_REFUSED)

    def __post_init__(self) -> None:
        if self.isolation not in ISOLATIONS:
            raise ValueError(f"unknown sandbox isolation {self.isolation!r}; valid: {', '.join(ISOLATIONS)}")
        if self.timeout_s <= 0 or self.memory_mb < 64:
            raise ValueError(f"bad sandbox limits: timeout_s={self.timeout_s}, memory_mb={self.memory_mb} "
                             "(need timeout_s > 0, memory_mb >= 64)")

    def wall_for(self, cpu_s: float) -> float:
        """Wall-clock ceiling above a CPU budget: generous, so a busy machine (where a check gets a
        fraction of a core) does not turn slow-but-correct into a fail; CPU time is the real limit."""
        return self.wall_factor * cpu_s + self.wall_slack_s

    def hard_wall_for(self, cpu_s: float) -> float:
        """The wall-clock limit even for a child that keeps computing (a badly overloaded machine)."""
        return max(self.wall_for(cpu_s), self.hard_wall_factor * cpu_s + 10.0)

    @property
    def wall_s(self) -> float:
        return self.wall_for(self.timeout_s)

    @property
    def n_workers(self) -> int:
        return self.workers if self.workers and self.workers > 0 else (os.cpu_count() or 1)


@dataclass
class ExecJob:
    """One check: mode in eval/A/B/C/D/BCD, marshalled setup/program code, pre/post payload frames,
    and its CPU budget in seconds (None = the sandbox's timeout_s)."""

    mode: str
    setup: bytes
    program: bytes
    pre: dict
    post: dict | None
    marker: str = ""
    result_file: str = ""
    cpu_s: float | None = None
    wall_s: float | None = None  # a lower wall ceiling than the CPU budget's (what the completion has left)
    hard_s: float | None = None


@dataclass
class ExecResult:
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    wall_s: float = 0.0
    cpu_s: float = 0.0
    maxrss_kb: int = 0
    minflt: int = 0  # minor page faults of the check (copy-on-write after fork dominates its cost)
    stdout: str = ""
    stderr: str = ""
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    markers: list[str] = field(default_factory=list)
    result_file: str | None = None
    verdict: bytes = b""
    error: str | None = None  # sandbox failure (not the program's)

    @property
    def status(self) -> str:
        if self.error:
            return "sandbox_error"
        if self.timed_out:
            return "timeout"
        if self.signal:
            try:
                return f"signal:{signal.Signals(self.signal).name}"
            except ValueError:
                return f"signal:{self.signal}"
        return "ok" if self.exit_code == 0 else f"exit:{self.exit_code}"


def default_hide() -> list[str]:
    """Server code, data and home directories: refused by the audit guard even where an allow-list
    entry would cover them (fallback mode's only hiding)."""
    paths = {str(REPO_ROOT), os.getcwd(), os.path.expanduser("~"), "/root", "/home", "/var/tmp",
             "/dev/shm", "/run", "/mnt", "/media", "/srv", "/sys"}
    top = "/" + REPO_ROOT.parts[1] if len(REPO_ROOT.parts) > 2 else ""
    if top and top not in {"/usr", "/lib", "/lib64", "/bin", "/sbin", "/etc", "/opt", "/var", "/proc", "/dev"}:
        paths.add(top)
    python = _python_paths()
    return sorted(p for p in paths if p and p != "/" and not any(x.startswith(p.rstrip("/") + "/") for x in python))


def _python_paths() -> list[str]:
    """The interpreter, its shared library and its standard library (lib-dynload included)."""
    base = os.path.realpath(sys.base_prefix)
    stdlib = os.path.realpath(os.path.dirname(os.__file__))
    libdir = sysconfig.get_config_var("LIBDIR") or os.path.join(base, "lib")
    shared = [os.path.realpath(p) for p in glob.glob(os.path.join(libdir, "libpython*"))]
    extra = [os.path.realpath(p) for p in sys.path if p and os.path.realpath(p).startswith(base + "/")
             and "-packages" not in p]
    return sorted({os.path.realpath(sys.executable), stdlib, *shared, *extra})


def default_allow() -> tuple[list[str], list[str], dict[str, str]]:
    """(allow, mask, links): what a sandboxed program may read, read-only, and nothing else — the
    interpreter and its standard library (what setup_code imports), the system libraries they load,
    the loader's cache; site-/dist-packages inside them masked empty; top-level symlinks such as
    /lib -> usr/lib recreated. No problem sets, repo, home, run dirs or other mounts."""
    allow, links = _python_paths(), {}
    for top in ("/lib", "/lib64", "/lib32", "/libx32", "/usr/lib", "/usr/lib64", "/usr/lib32"):
        if os.path.islink(top) and top.count("/") == 1:
            links[top] = os.readlink(top)
        elif os.path.isdir(top):
            allow.append(os.path.realpath(top))
    if os.path.isfile("/etc/ld.so.cache"):
        allow.append("/etc/ld.so.cache")
    mask = set()
    for root in allow:
        if os.path.isdir(root):
            for pat in ("site-packages", "dist-packages", "python3*/site-packages", "python3*/dist-packages"):
                mask.update(os.path.realpath(m) for m in glob.glob(os.path.join(root, pat)) if os.path.isdir(m))
    return sorted(set(allow)), sorted(mask), links


def fallback_allowed(cfg: "SandboxConfig") -> bool:
    """Whether rewards may be served from fallback isolation (config flag or RANKGUARD_ALLOW_FALLBACK=1)."""
    return cfg.allow_fallback or os.environ.get(ALLOW_FALLBACK_ENV, "") in ("1", "true", "yes")


FALLBACK_REFUSED = (
    "the reward sandbox would run in fallback isolation ({detail}): no namespaces, so a program can "
    "read files outside the sandbox (a problem set's answers) and native code can escape the audit "
    "hook; rewards are refused. Run as root or install bubblewrap; to accept the risk set "
    f"{ALLOW_FALLBACK_ENV}=1 (or SandboxConfig.allow_fallback)")


def _header(job: ExecJob, cfg: SandboxConfig) -> dict:
    cpu = job.cpu_s if job.cpu_s else cfg.timeout_s
    wall, hard = cfg.wall_for(cpu), cfg.hard_wall_for(cpu)
    if job.wall_s is not None:
        wall = max(0.01, min(wall, job.wall_s))
    if job.hard_s is not None:
        hard = max(wall, min(hard, job.hard_s))
    return {
        "mode": job.mode, "setup": job.setup, "program": job.program,
        "timeout_s": wall, "hard_s": hard, "cpu_s": max(1, math.ceil(cpu)),
        "mem_bytes": cfg.memory_mb << 20, "fsize_bytes": cfg.fsize_mb << 20, "nproc": cfg.nproc,
        "marker": job.marker, "markers": [job.marker] if job.marker else [],
        "result_file": job.result_file,
    }


def _pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)
    except OSError:
        pass
    return r, w


def _drive(job: ExecJob, cfg: SandboxConfig, start) -> ExecResult:
    """Run one execution: feed payload frames, collect verdict lines, wait for the reply.

    `start(header, payload_r, verdict_w)` launches it and returns an object with fileno()
    (readable when done), finish() -> reply dict, and enforce_timeout (whether we kill on time).
    """
    pr, pw = _pipe()
    vr, vw = _pipe()
    os.set_blocking(pw, False)
    os.set_blocking(vr, False)
    pending = bytearray(harness.frame(job.pre))
    post = harness.frame(job.post) if job.post is not None else None
    verdict = bytearray()
    hdr = _header(job, cfg)
    try:
        try:
            run = start(hdr, pr, vw)
        finally:
            os.close(pr)
            os.close(vw)
        poller = select.poll()
        poller.register(run.fileno(), select.POLLIN)
        poller.register(vr, select.POLLIN)
        poller.register(pw, select.POLLOUT)
        t0 = time.monotonic()
        # the fresh path kills on the wall ceiling itself; a fork server enforces its own limits and
        # may let a still-computing child run to hard_s, so wait for its reply a little beyond that
        limit = hdr["timeout_s"] if run.enforce_timeout else hdr["hard_s"] + 15.0
        killed = False
        reply = None
        pw_open = True
        while reply is None:
            left = t0 + limit - time.monotonic()
            if left <= 0:
                if run.enforce_timeout and not killed:
                    run.kill()
                    killed = True
                    limit += 10.0
                    continue
                raise SandboxError(f"no reply within {limit:.0f} s")
            for fd, ev in poller.poll(max(1, int(left * 1000))):
                if fd == vr:
                    try:
                        chunk = os.read(vr, 1 << 16)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        poller.unregister(vr)
                        continue
                    if len(verdict) < VERDICT_CAP:
                        verdict += chunk
                    if post is not None and b"L\n" in verdict:
                        pending += post
                        post = None
                        if pw_open:
                            poller.modify(pw, select.POLLOUT)
                    # Result lines keep coming (in batches, see harness._Results): keep draining.
                elif fd == pw:
                    if ev & (select.POLLERR | select.POLLHUP):
                        poller.unregister(pw)
                        pw_open = False
                        pending.clear()
                        continue
                    if pending:
                        try:
                            n = os.write(pw, pending)
                            del pending[:n]
                        except BlockingIOError:
                            pass
                        except OSError:
                            pending.clear()
                    if not pending:
                        poller.modify(pw, 0)  # idle until the post frame is due
                elif fd == run.fileno():
                    reply = run.finish(timed_out=killed)
        # Every writer of the verdict pipe is gone now (child dead, server closed its copy).
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            if not select.select([vr], [], [], max(0.0, deadline - time.monotonic()))[0]:
                break
            chunk = os.read(vr, 1 << 16)
            if not chunk:
                break
            if len(verdict) < VERDICT_CAP:
                verdict += chunk
    finally:
        os.close(pw)
        os.close(vr)
    if "error" in reply:
        raise SandboxError(reply["error"])
    fields = {k: reply[k] for k in ExecResult.__dataclass_fields__ if k in reply}
    return ExecResult(**fields, verdict=bytes(verdict))


# ---------------------------------------------------------------- fast path: fork servers
class _ServerRun:
    enforce_timeout = False

    def __init__(self, server: "ForkServer") -> None:
        self.server = server

    def fileno(self) -> int:
        return self.server.sock.fileno()

    def finish(self, timed_out: bool) -> dict:
        return wire.recv_frame(self.server.sock)

    def kill(self) -> None:  # pragma: no cover - the server enforces its own timeout
        pass


class ForkServer:
    """One slot: a long-lived prewarmed process (see forkserver.py) and its control socket."""

    def __init__(self, slot: int, cfg: SandboxConfig) -> None:
        self.slot, self.cfg = slot, cfg
        # A uid no other slot on this host uses (RLIMIT_NPROC and file ownership are per uid).
        self.uid = 100_000 + (os.getpid() % 100_000) * 1024 + next(_UID_SEQ) % 1024
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}
        self._spawn()

    def _isolation(self) -> str:
        want = self.cfg.isolation
        if want == "auto" and os.geteuid() != 0 and bwrap_works():
            return "bwrap"
        if want == "bwrap" and not bwrap_works():
            raise SandboxError("isolation='bwrap' requested but bubblewrap cannot create namespaces here")
        return want

    def _spawn(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        boot_r, boot_w = os.pipe()
        mode = self._isolation()
        allow, mask, links = default_allow()
        allow += [os.path.realpath(p) for p in self.cfg.expose]
        hide = default_hide() + list(self.cfg.hide)
        conf = {
            "fd": theirs.fileno(), "slot": self.slot, "uid": self.uid, "isolation": mode,
            "allow": allow, "mask": mask, "links": links, "hide": hide,
            "tmpfs_mb": max(64, 4 * self.cfg.fsize_mb + 16),
            # whole slot (server + the run's processes + its tmpfs files) under one memory cap
            "cgroup_bytes": (self.cfg.memory_mb + 192 + max(64, 4 * self.cfg.fsize_mb + 16)) << 20,
        }
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
        python = os.path.realpath(sys.executable)  # the venv's symlink may sit in a hidden folder
        argv = [python, "-E", "-S", "-c", BOOT, str(boot_r), json.dumps(conf)]
        if mode == "bwrap":
            argv = bwrap_argv(allow, mask, links) + argv
        try:
            self.proc = subprocess.Popen(argv, pass_fds=[theirs.fileno(), boot_r], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, env=env, cwd="/", start_new_session=True)
        finally:
            theirs.close()
            os.close(boot_r)
        try:
            with os.fdopen(boot_w, "wb") as f:
                f.write(marshal.dumps({m.__name__.rsplit(".", 1)[1]: Path(m.__file__).read_text()
                                       for m in (plain, harness, wire, isolation, forkserver)}))
        except OSError:
            pass  # it died at once; the hello read below reports it
        self.sock = ours
        ours.settimeout(60)
        try:
            hello = wire.recv_frame(ours)
        except (EOFError, OSError) as e:
            self._reap()
            raise SandboxError(f"fork server {self.slot} did not start: {e}") from None
        ours.settimeout(None)
        if "error" in hello:
            self._reap()
            raise SandboxError(f"fork server {self.slot}: {hello['error']}")
        self.info = hello

    def run(self, job: ExecJob) -> ExecResult:
        def start(hdr: dict, pr: int, vw: int) -> _ServerRun:
            wire.send_frame(self.sock, hdr, [pr, vw])
            return _ServerRun(self)

        try:
            return _drive(job, self.cfg, start)
        except (SandboxError, EOFError, OSError) as e:
            log.warning("fork server slot %d failed (%s); restarting it", self.slot, e)
            self._reap()
            try:
                self._spawn()
            except SandboxError as e2:
                log.error("%s", e2)
            return ExecResult(error=f"sandbox failure: {e}")

    def _reap(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    self.proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None

    close = _reap


class SandboxPool:
    """N fork-server slots; run() blocks until a slot is free. Thread-safe."""

    def __init__(self, cfg: SandboxConfig) -> None:
        self.cfg = cfg
        n = cfg.n_workers
        with ThreadPoolExecutor(n) as ex:
            self.servers = list(ex.map(lambda i: ForkServer(i, cfg), range(n)))
        self._idle: queue.Queue[ForkServer] = queue.Queue()
        for s in self.servers:
            self._idle.put(s)
        self.info = dict(self.servers[0].info)
        self.info["workers"] = n
        self._closed = False

    def run(self, job: ExecJob) -> ExecResult:
        if self._closed:
            raise SandboxError("sandbox pool is closed")
        server = self._idle.get()
        try:
            return server.run(job)
        finally:
            self._idle.put(server)

    def close(self) -> None:
        self._closed = True
        for s in self.servers:
            s.close()


# ---------------------------------------------------------------- naive path: fresh interpreter per run
class _FreshRun:
    enforce_timeout = True

    def __init__(self, proc: subprocess.Popen, tmp: str, hdr: dict) -> None:
        self.proc, self.tmp, self.hdr = proc, tmp, hdr
        self.t0 = time.perf_counter()
        self.pidfd = os.pidfd_open(proc.pid)

    def fileno(self) -> int:
        return self.pidfd

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def finish(self, timed_out: bool) -> dict:
        _, status, ru = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - self.t0
        self.kill()  # leftovers in its session
        os.close(self.pidfd)
        work = os.path.join(self.tmp, "w")
        res = wire.collect(status, ru, wall, timed_out, os.path.join(self.tmp, "out"),
                                 os.path.join(self.tmp, "err"), work, self.hdr)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return res


class FreshExecutor:
    """A new `python harness.py` per execution (what the reference does): slow, for comparison."""

    info = {"isolation": "fresh", "network": "none (naive reference path)", "detail": "new interpreter per run"}

    def __init__(self, cfg: SandboxConfig) -> None:
        self.cfg = cfg
        self.info = dict(self.info, workers=cfg.n_workers)
        self._sem = threading.Semaphore(cfg.n_workers)

    def run(self, job: ExecJob) -> ExecResult:
        def start(hdr: dict, pr: int, vw: int) -> _FreshRun:
            tmp = tempfile.mkdtemp(prefix="rankguard-fresh-")
            os.mkdir(os.path.join(tmp, "w"))
            with open(os.path.join(tmp, "out"), "wb") as out, open(os.path.join(tmp, "err"), "wb") as err:
                proc = subprocess.Popen(
                    [sys.executable, harness.__file__, str(pr), str(vw)], stdin=subprocess.PIPE,
                    stdout=out, stderr=err, pass_fds=(pr, vw), cwd=os.path.join(tmp, "w"),
                    env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, start_new_session=True)
            try:
                proc.stdin.write(marshal.dumps(hdr))
                proc.stdin.close()
            except OSError:
                pass
            return _FreshRun(proc, tmp, hdr)

        with self._sem:
            try:
                return _drive(job, self.cfg, start)
            except (SandboxError, OSError) as e:
                return ExecResult(error=f"sandbox failure: {e}")

    def close(self) -> None:
        pass


def make_executor(cfg: SandboxConfig):
    """The fork-server pool, or the naive fresh-process executor when isolation='fresh'."""
    return FreshExecutor(cfg) if cfg.isolation == "fresh" else SandboxPool(cfg)
