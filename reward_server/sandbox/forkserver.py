"""Prewarmed fork server: one long-lived process per worker slot forks one sandboxed child per run.

Why: a fresh interpreter per execution costs ~30 ms plus the setup imports; forking a process that
has already imported them costs ~1 ms. Standard library only (it runs next to untrusted code).

Isolation, chosen once at start (`isolation` = auto | namespaces | bwrap | fallback; what each
mounts and refuses is in isolation.py):
- namespaces (root / CAP_SYS_ADMIN): the server unshares a mount and a network namespace (no
  interfaces: no network), pivots into a root built from an allow-list (interpreter, standard
  library, system libraries read-only; a private /tmp; nothing else), then becomes pid 1 of a fresh
  PID namespace with its own /proc. Each child gets fresh IPC and UTS namespaces, drops to a
  per-slot uid (so RLIMIT_NPROC bites and nothing outside its dir is writable), and after every run
  `kill(-1)` from pid 1 removes every process the run left behind, even ones that escaped with setsid().
- bwrap (not root, but bubblewrap may create user namespaces): the grader starts this server
  inside `bwrap` with the same allow-list root, no capabilities, plus the fallback's audit hook;
  after every run the server sweeps its tmp, /dev/shm and SysV IPC objects.
- fallback: no namespaces. The child runs in its own session with the same rlimits and a Python
  audit hook that refuses sockets, process creation, ctypes, signals to other processes, writes
  outside the working dir and reads outside the allow-list. Weaker (a determined native-code escape
  is possible), so a Grader refuses it unless explicitly allowed.

Control protocol: wire.py. The hidden call sides, asserts and nonces never pass through this
process (the honest check's expected values live in the grader, computed by a program-free run).
"""
from __future__ import annotations

import errno
import json
import os
import resource
import select
import shutil
import signal
import socket
import sys
import time
import traceback

from reward_server.sandbox import harness
from reward_server.sandbox import isolation as iso
from reward_server.sandbox.wire import collect, recv_frame, send_frame

PRELOAD = (
    "random", "functools", "collections", "string", "math", "datetime", "typing", "itertools",
    "heapq", "bisect", "operator", "re", "json", "copy", "fractions", "decimal", "statistics",
    "array", "dataclasses", "enum", "abc", "numbers", "cmath", "queue", "textwrap", "unicodedata",
    "io", "traceback", "time", "hashlib",
)


# ---------------------------------------------------------------- the server
class Server:
    def __init__(self, cfg: dict, sock: socket.socket, isolation: str, libc: iso.Libc | None) -> None:
        self.cfg, self.sock, self.isolation, self.libc = cfg, sock, isolation, libc
        # Private uid per slot only with namespaces: there the Python install is bound into the
        # allow-list root; in fallback it may sit in a home dir only its owner can enter.
        self.root = os.geteuid() == 0 and isolation == "namespaces"
        self.pid1 = isolation in ("namespaces", "bwrap")  # we are pid 1 of a PID namespace
        self.guard = isolation != "namespaces"  # children also get the audit-hook guard
        self.uid = int(cfg["uid"])
        if self.pid1:
            self.base = "/tmp"  # our private tmpfs
        else:
            import tempfile

            self.base = tempfile.mkdtemp(prefix=f"rankguard-slot{cfg['slot']}-")
        self.outdir = os.path.join(self.base, "o")
        os.makedirs(self.outdir, mode=0o700, exist_ok=True)
        self.devnull = os.open(os.devnull, os.O_RDWR)
        # The children's environment is set here, once, for the fixed work dir: editing os.environ in
        # every child cost ~80 copy-on-write page faults (~0.5 ms on a VM) per check.
        os.environ.clear()
        os.environ.update(self.child_env(os.path.join(self.base, "w")))
        # The children's stdin/stdout/stderr objects, made once here on fd numbers 0/1/2 (which each
        # child dup2()s onto its own files) and never used by the server: building three fresh file
        # objects in every child cost ~150 copy-on-write page faults (~1 ms on a VM) per check.
        self.stdio = (open(0, "r", closefd=False),
                      open(1, "w", encoding="utf-8", errors="backslashreplace", closefd=False),
                      open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False, buffering=1))

    @staticmethod
    def child_env(workdir: str) -> dict[str, str]:
        return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8", "TMPDIR": workdir}

    def serve(self) -> None:
        while True:
            try:
                hdr, fds = recv_frame(self.sock, maxfds=2)
            except (EOFError, ConnectionError, OSError):
                self.shutdown()
            try:
                res = self.execute(hdr, fds)
            except Exception as e:  # a bug here must not take the slot down
                res = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
            finally:
                for fd in fds:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            try:
                send_frame(self.sock, res)
            except OSError:
                self.shutdown()

    def shutdown(self) -> None:
        if not self.pid1:
            shutil.rmtree(self.base, ignore_errors=True)
        os._exit(0)

    def execute(self, hdr: dict, fds: list[int]) -> dict:
        if len(fds) != 2:
            return {"error": f"expected 2 fds, got {len(fds)}"}
        workdir = os.path.join(self.base, "w")
        _clear(workdir)  # normally already gone: removed after the previous run
        os.mkdir(workdir, 0o700)
        if self.root:
            os.chown(workdir, self.uid, self.uid)
        out_path, err_path = os.path.join(self.outdir, "out"), os.path.join(self.outdir, "err")
        for path in (out_path, err_path):  # never follow anything a previous run may have planted
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        out_fd, err_fd = os.open(out_path, flags, 0o600), os.open(err_path, flags, 0o600)
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            self._child(hdr, fds, out_fd, err_fd, workdir)
        for fd in fds:
            os.close(fd)
        fds.clear()
        timed_out = not self._wait(pid, float(hdr.get("timeout_s", 3.0)), float(hdr.get("hard_s", 0.0)),
                                   float(hdr.get("cpu_s", 4)) + 1.0)
        if timed_out:
            self._signal_all(pid)
        _, status, ru = os.wait4(pid, 0)
        wall = time.perf_counter() - t0
        self._kill_all(pid)
        try:
            res = collect(status, ru, wall, timed_out, out_fd, err_fd, workdir, hdr)
        finally:
            os.close(out_fd)
            os.close(err_fd)
        _clear(workdir)
        if self.pid1:  # what the run may have left for the next one (fallback: the guard refuses it)
            iso.sweep_run_state(self.base, self.outdir, self.libc, ipc=self.isolation == "bwrap")
        return res

    def _wait(self, pid: int, timeout: float, hard: float = 0.0, cpu_cap: float = float("inf")) -> bool:
        """True if the child exited in time. The wall ceiling `timeout` is for a child that idles
        (sleeps, blocks): one still computing when it passes is given more time, slice by slice up
        to `hard`, since RLIMIT_CPU stops it at its CPU budget anyway. So a busy machine, where the
        child gets a fraction of a core, does not turn a correct answer into a timeout. As pid 1,
        "computing" is the CPU of every process of the run, and the run stops once they used
        `cpu_cap` together (RLIMIT_CPU is per process: a fork bomb would multiply it)."""
        start = time.monotonic()
        deadline, hard_end = start + timeout, start + max(hard, timeout)
        try:
            pfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pfd = None
        try:
            usage = _run_usage if self.pid1 else _child_usage
            cpu_then, t_then = usage(pid)[0], start
            while True:
                wake = min(deadline, time.monotonic() + 1.0) if self.pid1 else deadline
                if self._exited(pid, pfd, wake - time.monotonic()):
                    return True
                now = time.monotonic()
                cpu_now, procs = usage(pid)
                if cpu_now is None or cpu_then is None or cpu_now >= cpu_cap:
                    return False
                if now < deadline:
                    continue
                # past the ceiling: only a lone process still computing gets more time
                if now >= hard_end or procs > 1 or cpu_now - cpu_then < 0.05 * (now - t_then):
                    return False
                cpu_then, t_then = cpu_now, now
                deadline = min(hard_end, now + max(1.0, timeout / 4))
        finally:
            if pfd is not None:
                os.close(pfd)

    @staticmethod
    def _exited(pid: int, pfd: int | None, wait_s: float) -> bool:
        if pfd is None:
            end = time.monotonic() + max(0.0, wait_s)
            while True:
                if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                    return True
                if time.monotonic() >= end:
                    return False
                time.sleep(0.001)
        p = select.poll()
        p.register(pfd, select.POLLIN)
        return bool(p.poll(max(0, int(wait_s * 1000))))

    def _signal_all(self, pid: int) -> None:
        """SIGKILL the child and everything it started (without reaping)."""
        if self.pid1:
            try:
                os.kill(-1, signal.SIGKILL)  # from pid 1 of our PID namespace: everyone but us
            except ProcessLookupError:
                pass
        else:
            for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
                try:
                    target()
                except (ProcessLookupError, PermissionError):
                    pass

    def _kill_all(self, pid: int) -> None:
        """After the child was reaped: remove every process the run left behind, reap them too."""
        self._signal_all(pid)
        if self.pid1:
            while True:
                try:
                    if os.waitpid(-1, os.WNOHANG)[0] == 0:  # one still alive (forked as the kill went out?)
                        time.sleep(0.0005)
                        self._signal_all(pid)
                except ChildProcessError:
                    return

    def _child(self, hdr: dict, fds: list[int], out_fd: int, err_fd: int, workdir: str) -> None:
        try:
            os.setsid()
            hi = [os.dup(fd) for fd in (fds[0], fds[1], out_fd, err_fd)]  # fds >= 5 before dup2
            hi = [fcntl_dup_high(fd) for fd in hi]
            os.dup2(self.devnull, 0)
            os.dup2(hi[2], 1)
            os.dup2(hi[3], 2)
            os.dup2(hi[0], 3)
            os.dup2(hi[1], 4)
            os.closerange(5, 1 << 16)
            os.chdir(workdir)
            if self.pid1:
                try:  # first in line for the OOM killer (os-level: a Python file object costs ~1 ms here)
                    fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
                    os.write(fd, b"1000")
                    os.close(fd)
                except OSError:
                    pass
            self._limits(hdr)
            if self.root:
                self.libc.unshare(iso.CLONE_NEWIPC | iso.CLONE_NEWUTS)  # nothing shared with other runs
                os.setgroups([])
                os.setresgid(self.uid, self.uid, self.uid)
                os.setresuid(self.uid, self.uid, self.uid)
            if self.libc is not None:
                self.libc.prctl(iso.PR_SET_NO_NEW_PRIVS, 1)
                self.libc.prctl(iso.PR_SET_PDEATHSIG, signal.SIGKILL)
            # os.environ is already child_env(workdir): the server set it once (see __init__)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            sys.stdin = sys.__stdin__ = self.stdio[0]
            sys.stdout = sys.__stdout__ = self.stdio[1]
            sys.stderr = sys.__stderr__ = self.stdio[2]
            sys.argv = ["main.py"]
            if self.guard:
                iso.install_audit_guard(workdir, self.cfg.get("allow", []),
                                        self.cfg.get("hide", []) + self.cfg.get("mask", []))
            harness.run(hdr, 3, 4)
        except BaseException:
            try:
                traceback.print_exc()
                sys.stderr.flush()
            except BaseException:
                pass
            os._exit(70)
        os._exit(71)

    def _limits(self, hdr: dict) -> None:
        cpu = int(hdr.get("cpu_s", 4))
        lims = [
            (resource.RLIMIT_AS, int(hdr.get("mem_bytes", 1 << 30))),
            (resource.RLIMIT_CPU, (cpu, cpu + 1)),
            (resource.RLIMIT_FSIZE, int(hdr.get("fsize_bytes", 4 << 20))),
            (resource.RLIMIT_NOFILE, 256),
            (resource.RLIMIT_CORE, 0),
        ]
        if self.root:  # NPROC counts per real uid: only meaningful for our private slot uid
            lims.append((resource.RLIMIT_NPROC, int(hdr.get("nproc", 32))))
        for res, val in lims:
            val = val if isinstance(val, tuple) else (val, val)
            try:
                resource.setrlimit(res, val)
            except (ValueError, OSError):
                soft, hard = resource.getrlimit(res)
                if hard == resource.RLIM_INFINITY or val[0] <= hard:
                    resource.setrlimit(res, (val[0], hard))


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live (or zombie) process, from /proc; None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def _child_usage(pid: int) -> tuple[float | None, int]:
    return _cpu_seconds(pid), 1


def _run_usage(_pid: int) -> tuple[float | None, int]:
    """(CPU seconds, processes) of every process in our PID namespace but us (pid 1), their reaped
    children's CPU included."""
    total, n = 0.0, 0
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit() and p != "1"]
    except OSError:
        return None, 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15]) / _CLK_TCK
            n += 1
        except (OSError, IndexError, ValueError):
            pass
    return total, n


def _clear(workdir: str) -> None:
    """Remove a run's working directory: one rmdir when the program left nothing (the usual case)."""
    try:
        os.rmdir(workdir)
    except FileNotFoundError:
        pass
    except OSError:
        shutil.rmtree(workdir, ignore_errors=True)
        if os.path.lexists(workdir):  # e.g. a planted symlink named like the dir: never follow it
            try:
                os.unlink(workdir)
            except OSError:
                pass


def fcntl_dup_high(fd: int, low: int = 10) -> int:
    import fcntl

    new = fcntl.fcntl(fd, fcntl.F_DUPFD, low)
    os.close(fd)
    return new


def main() -> None:
    cfg = json.loads(sys.argv[1])
    sock = socket.socket(fileno=int(cfg["fd"]))
    for mod in PRELOAD:
        try:
            __import__(mod)
        except ImportError:
            pass
    import fcntl  # noqa: F401  (used in children; import before any hiding)
    import stat  # noqa: F401

    want = cfg.get("isolation", "auto")
    isolation, detail, libc, memcap = "fallback", "", None, ""
    if want in ("auto", "namespaces"):
        try:
            libc = iso.Libc()
            if os.geteuid() != 0:
                raise PermissionError(errno.EPERM, "not root: cannot create namespaces")
            cgroup = None
            if cfg.get("cgroup_bytes"):
                try:
                    cgroup = iso.join_memory_cgroup(f"rankguard-{os.getpid()}-slot{cfg['slot']}", int(cfg["cgroup_bytes"]))
                    memcap = f", memory cgroup {int(cfg['cgroup_bytes']) >> 20} MiB per slot"
                except OSError as e:
                    memcap = f", no memory cgroup ({e.strerror or e})"
            iso.build_root(libc, cfg.get("allow", []), cfg.get("mask", []), cfg.get("links", {}),
                           int(cfg.get("tmpfs_mb", 64)))
            libc.unshare(iso.CLONE_NEWPID)
            pid = os.fork()
            if pid:  # outer: just hold on until the namespace's pid 1 (the real server) exits
                sock.close()
                _, status = os.waitpid(pid, 0)
                if cgroup:
                    iso.leave_cgroup(*cgroup)
                os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
            libc.prctl(iso.PR_SET_PDEATHSIG, signal.SIGKILL)
            if cgroup:
                os.close(cgroup[0])
                os.close(cgroup[1])
            iso.mount_proc(libc)
            try:
                with open("/proc/self/oom_score_adj", "w") as f:  # the OOM killer takes the child, not us
                    f.write("-1000")
            except OSError:
                pass  # needs CAP_SYS_RESOURCE; children still raise theirs to 1000
            isolation = "namespaces"
            detail = ("mount+net+pid namespaces, allow-list root (interpreter + stdlib + system libraries, "
                      "read-only), fresh ipc+uts namespaces per run, per-slot uid" + memcap)
        except OSError as e:
            if want == "namespaces":
                send_frame(sock, {"error": f"namespaces unavailable: {e}"})
                os._exit(2)
            detail = f"namespaces unavailable ({e}); audit-hook guard"
            libc = libc if libc is not None else None
    elif want == "bwrap":  # started inside bubblewrap: namespaces already in place, no privileges
        try:
            libc = iso.Libc()
        except OSError:
            libc = None
        isolation = "bwrap"
        detail = ("bubblewrap: mount+net+pid+ipc+uts namespaces without root or capabilities, allow-list "
                  "root (read-only), state swept after every run, plus the audit-hook guard")
    else:
        detail = "audit-hook guard (requested)"
    if isolation == "fallback":
        detail = detail or "audit-hook guard"
    network = {"namespaces": "netns (no interfaces)", "bwrap": "netns via bubblewrap (no interfaces)"}.get(
        isolation, "socket-block (audit hook)")
    if libc is not None:  # no one (a child with our uid included) may read this process's memory
        libc.prctl(iso.PR_SET_DUMPABLE, 0)
    send_frame(sock, {"ok": True, "isolation": isolation, "network": network, "detail": detail,
                      "pid": os.getpid(), "uid": cfg["uid"]})
    server = Server(cfg, sock, isolation, libc)
    import gc

    gc.collect()
    gc.freeze()  # children's GC then never walks (and copy-on-write-faults) the server's heap
    server.serve()


if __name__ == "__main__":
    main()
