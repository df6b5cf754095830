"""Prewarmed fork server: one long-lived process per worker slot forks one sandboxed child per run.

Why: a fresh interpreter per execution costs ~30 ms plus the setup imports; forking a process that
has already imported them costs ~1 ms. Standard library only (it runs next to untrusted code).

Isolation, chosen once at start (`isolation` = auto | namespaces | bwrap | fallback):
- namespaces (root / CAP_SYS_ADMIN): the server unshares a mount and a network namespace once
  (no interfaces but a downed loopback: no network), remounts `/` read-only, hides the server's
  code, data and home directories under empty tmpfs (re-exposing only the Python install), mounts
  a private tmpfs on /tmp, then becomes pid 1 of a fresh PID namespace with its own /proc. Each
  child drops to a per-slot uid (so RLIMIT_NPROC bites and nothing outside its dir is writable),
  and after every run `kill(-1)` from pid 1 removes every process the run left behind, even ones
  that escaped with setsid().
- bwrap (not root, but bubblewrap may create user namespaces): the grader starts this server
  inside `bwrap --unshare-net --unshare-pid --as-pid-1 --ro-bind / / --tmpfs <hidden>...`; same
  network, filesystem and pid-1 sweep as above, no per-slot uid, plus the fallback's audit hook.
- fallback: no namespaces. The child runs in its own session with the same rlimits and a Python
  audit hook that refuses sockets, process creation, ctypes, signals to other processes, writes
  outside the working dir and reads of the hidden paths or of other processes' /proc entries
  (the grader's memory holds the expected values). Weaker (a determined native-code escape
  is possible), so the grader logs loudly which mode is active.

Control protocol (unix stream socket, frames = 4-byte length + marshal): the grader sends a job
header together with two fds (payload pipe read end, verdict pipe write end) via SCM_RIGHTS; the
server replies with a result dict. The hidden call sides, asserts and nonces never pass through
this process (the honest check's expected values live in the grader, computed by a program-free run).
"""
from __future__ import annotations

import errno
import json
import marshal
import os
import resource
import select
import shutil
import signal
import socket
import struct
import sys
import time
import traceback

from reward_server.sandbox import harness

_LEN = struct.Struct(">I")
PRELOAD = (
    "random", "functools", "collections", "string", "math", "datetime", "typing", "itertools",
    "heapq", "bisect", "operator", "re", "json", "copy", "fractions", "decimal", "statistics",
    "array", "dataclasses", "enum", "abc", "numbers", "cmath", "queue", "textwrap", "unicodedata",
    "io", "traceback", "time", "hashlib",
)
CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
HEAD, TAIL = 4096, 8192


# ---------------------------------------------------------------- framing (shared with the client)
def send_frame(sock: socket.socket, obj, fds: list[int] | None = None) -> None:
    body = marshal.dumps(obj)
    data = _LEN.pack(len(body)) + body
    if fds:
        sent = socket.send_fds(sock, [data], fds)
        if sent < len(data):
            sock.sendall(data[sent:])
    else:
        sock.sendall(data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("control socket closed")
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket, maxfds: int = 0):
    """One frame; with maxfds, also the fds that arrived with its first bytes."""
    fds: list[int] = []
    if maxfds:
        data, fds, _flags, _addr = socket.recv_fds(sock, 4, maxfds)
        if not data:
            raise EOFError("control socket closed")
        head = data + (_recv_exact(sock, 4 - len(data)) if len(data) < 4 else b"")
    else:
        head = _recv_exact(sock, 4)
    (n,) = _LEN.unpack(head)
    obj = marshal.loads(_recv_exact(sock, n))
    return (obj, fds) if maxfds else obj


# ---------------------------------------------------------------- outputs (shared with the naive path)
def _read_capped(src: str | int, markers: list[str]) -> tuple[str, int, list[str]]:
    """(head+tail text, size in bytes, markers found anywhere): from a path, or from an fd we kept
    open ourselves (immune to the program swapping the file for a FIFO or a symlink)."""
    if isinstance(src, int):
        fd = os.dup(src)
        os.lseek(fd, 0, os.SEEK_SET)
    else:
        try:
            fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return "", 0, []
    import stat

    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:  # nothing written: the usual case, no file object
        os.close(fd)
        return "", 0, []
    with os.fdopen(fd, "rb") as f:
        size = st.st_size
        found: set[str] = set()
        enc = [(m, m.encode()) for m in markers]
        keep = max((len(b) for _, b in enc), default=1)
        prev = b""
        while enc:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            window = prev + chunk
            for m, b in enc:
                if b in window:
                    found.add(m)
            prev = window[-keep:]
        if size <= HEAD + TAIL:
            f.seek(0)
            text = f.read().decode("utf-8", "replace")
        else:
            f.seek(0)
            head = f.read(HEAD)
            f.seek(size - TAIL)
            tail = f.read(TAIL)
            text = (head.decode("utf-8", "replace") + f"\n...[{size - HEAD - TAIL} bytes cut]...\n"
                    + tail.decode("utf-8", "replace"))
    return text, size, sorted(found)


def read_result_file(workdir: str, name: str, cap: int = 65536) -> str | None:
    """The result file the program or the D harness wrote; a symlink or non-file is ignored."""
    try:
        fd = os.open(os.path.join(workdir, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        import stat

        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, cap).decode("utf-8", "replace")
    finally:
        os.close(fd)


def collect(pid_status: int, rusage, wall: float, timed_out: bool, out_path: str | int, err_path: str | int,
            workdir: str, hdr: dict) -> dict:
    stdout, out_bytes, found = _read_capped(out_path, hdr.get("markers", []))
    stderr, err_bytes, _ = _read_capped(err_path, [])
    exit_code = os.waitstatus_to_exitcode(pid_status) if pid_status is not None else None
    sig = -exit_code if exit_code is not None and exit_code < 0 else None
    cpu = (rusage.ru_utime + rusage.ru_stime) if rusage is not None else 0.0
    # RLIMIT_CPU ran out: SIGXCPU at the soft limit, SIGKILL at the hard one (if SIGXCPU was ignored)
    timed_out = timed_out or sig == signal.SIGXCPU or (
        sig == signal.SIGKILL and cpu >= float(hdr.get("cpu_s", float("inf"))) - 0.05)
    return {
        "exit_code": exit_code if sig is None else None,
        "signal": sig,
        "timed_out": timed_out,
        "wall_s": wall,
        "cpu_s": cpu,
        "maxrss_kb": rusage.ru_maxrss if rusage is not None else 0,
        "minflt": rusage.ru_minflt if rusage is not None else 0,  # page faults: what a check costs on a VM
        "stdout": stdout[-(HEAD + TAIL + 64):],
        "stderr": stderr[-TAIL:],
        "stdout_bytes": out_bytes,
        "stderr_bytes": err_bytes,
        "markers": found,
        "result_file": read_result_file(workdir, hdr["result_file"]) if hdr.get("result_file") else None,
    }


# ---------------------------------------------------------------- isolation set-up
class _Libc:
    def __init__(self) -> None:
        import ctypes

        self.ct = ctypes
        self.lib = ctypes.CDLL(None, use_errno=True)
        self.lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                                   ctypes.c_char_p]

    def _check(self, r: int, what: str) -> None:
        if r != 0:
            e = self.ct.get_errno()
            raise OSError(e, f"{what}: {os.strerror(e)}")

    def unshare(self, flags: int) -> None:
        self._check(self.lib.unshare(flags), f"unshare({flags:#x})")

    def mount(self, src, target, fstype, flags, data=None) -> None:
        enc = lambda s: s.encode() if isinstance(s, str) else s  # noqa: E731
        self._check(self.lib.mount(enc(src), enc(target), enc(fstype), flags, enc(data)),
                    f"mount {target}")

    def prctl(self, op: int, arg: int) -> None:
        self.lib.prctl(op, arg, 0, 0, 0)


def _under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def setup_namespaces(libc: _Libc, hide: list[str], expose: list[str], tmpfs_mb: int) -> None:
    """Private mount + network namespace for this server and its children (see module doc)."""
    libc.unshare(CLONE_NEWNS | CLONE_NEWNET)
    libc.mount(None, "/", None, MS_REC | MS_PRIVATE)
    hide = [os.path.realpath(h) for h in hide if h and os.path.isdir(h)]
    hide = sorted({h for h in hide if h != "/" and not _under(h, [o for o in hide if o != h])})
    expose = [os.path.realpath(e) for e in expose if e and os.path.isdir(e)]
    expose_fds = [(e, os.open(e, os.O_PATH | os.O_DIRECTORY)) for e in expose if _under(e, hide)]
    for h in hide:
        libc.mount("tmpfs", h, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m")
    for e, fd in expose_fds:
        os.makedirs(e, exist_ok=True)
        libc.mount(f"/proc/self/fd/{fd}", e, None, MS_BIND | MS_REC)
        libc.mount(None, e, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.close(fd)
    for h in hide:
        libc.mount(None, h, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "mode=755,size=1m")
    libc.mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    libc.mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"mode=711,size={tmpfs_mb}m")


# ---------------------------------------------------------------- memory cgroup (best effort)
def join_memory_cgroup(name: str, limit_bytes: int) -> tuple[int, int, str]:
    """Move this process (and so every child it forks) into a fresh memory cgroup capped at
    limit_bytes: RLIMIT_AS is per process, so without it a fork bomb of 1 GiB processes could
    still exhaust the host. Returns fds to leave it later (see leave_cgroup) even once /sys is
    hidden; raises OSError when unavailable."""
    mine = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            for c in ctrls.split(",") if ctrls else [""]:
                mine[c] = path
    if "memory" in mine and os.path.isdir("/sys/fs/cgroup/memory"):  # cgroup v1
        parent = "/sys/fs/cgroup/memory" + mine["memory"].rstrip("/")
        files = {"memory.limit_in_bytes": str(limit_bytes)}
    elif "" in mine and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):  # cgroup v2
        parent = "/sys/fs/cgroup" + mine[""].rstrip("/")
        files = {"memory.max": str(limit_bytes), "memory.swap.max": "0"}
    else:
        raise OSError(errno.ENOENT, "no memory cgroup controller")
    path = os.path.join(parent, name)
    os.makedirs(path, exist_ok=True)
    try:
        for fname, value in files.items():
            try:
                with open(os.path.join(path, fname), "w") as f:
                    f.write(value)
            except OSError:
                if fname != "memory.swap.max":
                    raise
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        back = os.open(os.path.join(parent, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
        parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        try:
            os.rmdir(path)
        except OSError:
            pass
        raise
    return back, parent_fd, name


def leave_cgroup(back: int, parent_fd: int, name: str) -> None:
    """Move back to the parent cgroup and remove ours (it must be empty by now)."""
    try:
        os.write(back, str(os.getpid()).encode())
        os.rmdir(name, dir_fd=parent_fd)
    except OSError:
        pass


# ---------------------------------------------------------------- fallback guard (no namespaces)
_DENY_EVENTS = frozenset({
    "socket.__new__", "socket.bind", "socket.connect", "socket.getaddrinfo", "socket.sendto",
    "socket.sendmsg", "socket.gethostbyname", "socket.gethostbyaddr",
    "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "os.startfile",
    "subprocess.Popen", "pty.spawn",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.cdata", "ctypes.cdata/buffer",
    "ctypes.call_function", "ctypes.addressof", "ctypes.string_at", "ctypes.wstring_at",
    "ctypes.create_string_buffer", "mmap.__new__", "sys.addaudithook", "os.chroot", "os.mknod",
    "os.setxattr", "os.removexattr", "sys.setprofile", "sys.settrace", "sys._current_frames",
})
_PATH_WRITE_EVENTS = frozenset({
    "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.symlink",
    "os.link", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move",
    "os.chflags", "os.lchown", "os.lchmod",
})
_DENY_IMPORTS = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "mmap"})  # no audit events inside
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def install_audit_guard(workdir: str, hide: list[str], expose: list[str]) -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in _DENY_IMPORTS:
            del sys.modules[name]
    wd = os.path.realpath(workdir)
    hide = [os.path.realpath(h) for h in hide if h]
    expose = [os.path.realpath(e) for e in expose if e]
    realpath, fspath, getpid, isdir = os.path.realpath, os.fspath, os.getpid, os.path.isdir

    def blocked(what: str):
        return PermissionError(errno.EACCES, f"sandbox: {what} is not allowed")

    def resolve(p) -> str:
        p = fspath(p)
        if isinstance(p, bytes):
            p = p.decode("utf-8", "surrogateescape")
        return realpath(p)

    def inside_wd(p: str) -> bool:
        return p == wd or p.startswith(wd + "/")

    def _foreign_proc(p: str) -> bool:
        """/proc/<pid>/... of another process (mem, environ, fds: the grader's among them), or a
        directory under /proc at all: a directory fd would let a relative path (dir_fd=, which this
        hook cannot see) reach another process's entries."""
        if p != "/proc" and not p.startswith("/proc/"):
            return False
        head = p[6:].split("/", 1)[0]
        if head.isdigit() and int(head) != getpid():
            return True
        return isdir(p)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            if path is None or isinstance(path, int):
                return
            p = resolve(path)
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS)
            if writing and not inside_wd(p):
                raise blocked(f"writing {p}")
            if _under(p, hide) and not _under(p, expose):
                raise blocked(f"reading {p}")
            if _foreign_proc(p):
                raise blocked(f"reading {p}")
        elif event in ("os.listdir", "os.scandir"):
            p = resolve(args[0] if args[0] is not None else ".")
            if _under(p, hide) and not _under(p, expose):
                raise blocked(f"listing {p}")
        elif event in _DENY_EVENTS:
            raise blocked(event)
        elif event in _PATH_WRITE_EVENTS:
            for a in args[:2]:
                if isinstance(a, (str, bytes)) or hasattr(a, "__fspath__"):
                    if not inside_wd(resolve(a)):
                        raise blocked(f"{event} outside the working directory")
        elif event in ("os.kill", "os.killpg"):
            if args[0] not in (0, getpid()):
                raise blocked("signalling other processes")
        elif event == "import":
            if args[0].split(".")[0] in _DENY_IMPORTS:
                raise blocked(f"import {args[0]}")

    sys.addaudithook(hook)


# ---------------------------------------------------------------- the server
class Server:
    def __init__(self, cfg: dict, sock: socket.socket, isolation: str, libc: _Libc | None) -> None:
        self.cfg, self.sock, self.isolation, self.libc = cfg, sock, isolation, libc
        # Private uid per slot only with namespaces: there the Python install stays reachable via
        # the re-exposed bind mount; in fallback it may sit in a home dir only its owner can enter.
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
        timed_out = not self._wait(pid, float(hdr.get("timeout_s", 3.0)), float(hdr.get("hard_s", 0.0)))
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
        return res

    def _wait(self, pid: int, timeout: float, hard: float = 0.0) -> bool:
        """True if the child exited in time. The wall ceiling `timeout` is for a child that idles
        (sleeps, blocks): one still computing when it passes is given more time, slice by slice up
        to `hard`, since RLIMIT_CPU stops it at its CPU budget anyway. So a busy machine, where the
        child gets a fraction of a core, does not turn a correct answer into a timeout."""
        start = time.monotonic()
        deadline, hard_end = start + timeout, start + max(hard, timeout)
        try:
            pfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pfd = None
        try:
            cpu_then, t_then = _cpu_seconds(pid), start
            while True:
                if self._exited(pid, pfd, deadline - time.monotonic()):
                    return True
                now = time.monotonic()
                cpu_now = _cpu_seconds(pid)
                if now >= hard_end or cpu_now is None or cpu_then is None:
                    return False
                if cpu_now - cpu_then < 0.05 * (now - t_then):  # idle: the ceiling holds
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
                    if os.waitpid(-1, os.WNOHANG)[0] == 0:
                        time.sleep(0.0005)
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
                os.setgroups([])
                os.setresgid(self.uid, self.uid, self.uid)
                os.setresuid(self.uid, self.uid, self.uid)
            if self.libc is not None:
                self.libc.prctl(PR_SET_NO_NEW_PRIVS, 1)
                self.libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            # os.environ is already child_env(workdir): the server set it once (see __init__)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            sys.stdin = sys.__stdin__ = self.stdio[0]
            sys.stdout = sys.__stdout__ = self.stdio[1]
            sys.stderr = sys.__stderr__ = self.stdio[2]
            sys.argv = ["main.py"]
            if self.guard:
                install_audit_guard(workdir, self.cfg.get("hide", []), self.cfg.get("expose", []))
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
            libc = _Libc()
            if os.geteuid() != 0:
                raise PermissionError(errno.EPERM, "not root: cannot create namespaces")
            cgroup = None
            if cfg.get("cgroup_bytes"):
                try:
                    cgroup = join_memory_cgroup(f"rankguard-{os.getpid()}-slot{cfg['slot']}", int(cfg["cgroup_bytes"]))
                    memcap = f", memory cgroup {int(cfg['cgroup_bytes']) >> 20} MiB per slot"
                except OSError as e:
                    memcap = f", no memory cgroup ({e.strerror or e})"
            setup_namespaces(libc, cfg.get("hide", []), cfg.get("expose", []), int(cfg.get("tmpfs_mb", 64)))
            libc.unshare(CLONE_NEWPID)
            pid = os.fork()
            if pid:  # outer: just hold on until the namespace's pid 1 (the real server) exits
                sock.close()
                _, status = os.waitpid(pid, 0)
                if cgroup:
                    leave_cgroup(*cgroup)
                os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if cgroup:
                os.close(cgroup[0])
                os.close(cgroup[1])
            libc.mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            try:
                with open("/proc/self/oom_score_adj", "w") as f:  # the OOM killer takes the child, not us
                    f.write("-1000")
            except OSError:
                pass  # needs CAP_SYS_RESOURCE; children still raise theirs to 1000
            isolation = "namespaces"
            detail = "mount+net+pid namespaces, read-only /, hidden server paths, per-slot uid" + memcap
        except OSError as e:
            if want == "namespaces":
                send_frame(sock, {"error": f"namespaces unavailable: {e}"})
                os._exit(2)
            detail = f"namespaces unavailable ({e}); audit-hook guard"
            libc = libc if libc is not None else None
    elif want == "bwrap":  # started inside bubblewrap: namespaces already in place, no privileges
        try:
            libc = _Libc()
        except OSError:
            libc = None
        isolation = "bwrap"
        detail = ("bubblewrap: mount+net+pid namespaces without root, read-only /, hidden server paths, "
                  "plus the audit-hook guard")
    else:
        detail = "audit-hook guard (requested)"
    if isolation == "fallback":
        detail = detail or "audit-hook guard"
    network = {"namespaces": "netns (no interfaces)", "bwrap": "netns via bubblewrap (no interfaces)"}.get(
        isolation, "socket-block (audit hook)")
    send_frame(sock, {"ok": True, "isolation": isolation, "network": network, "detail": detail,
                      "pid": os.getpid(), "uid": cfg["uid"]})
    server = Server(cfg, sock, isolation, libc)
    import gc

    gc.collect()
    gc.freeze()  # children's GC then never walks (and copy-on-write-faults) the server's heap
    server.serve()


if __name__ == "__main__":
    main()
