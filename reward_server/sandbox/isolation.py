"""Isolation of the fork server and its children: what a sandboxed program can see and keep.

Standard library only (it ships into the fork server next to untrusted code).

    build_root          namespaces mode: a fresh root made of an allow-list (interpreter, standard
                        library, system libraries, read-only; a private /tmp; a minimal /dev; a /proc
                        of our own PID namespace), pivoted into, the host's tree unmounted
    join_memory_cgroup  one memory cap for a slot (server + the run's processes + its tmpfs files)
    install_audit_guard bwrap / fallback: an audit hook in the child that refuses sockets, processes,
                        ctypes, writes outside the working dir and reads outside the same allow-list
    sweep_run_state     after every run: what a run may have left for the next one (files in the
                        server's tmp, /dev/shm, SysV IPC objects) is removed

Nothing carries from one run to the next: in namespaces mode each child gets fresh IPC and UTS
namespaces (SysV shm / semaphores / message queues and POSIX mqueues die with it), its only
writable place is its working dir (removed after the run), and pid 1 kills every process it left.
"""
from __future__ import annotations

import errno
import os
import shutil
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
IPC_RMID = 0
DEV_NODES = ("null", "zero", "full", "random", "urandom")
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}


class Libc:
    def __init__(self) -> None:
        import ctypes

        self.ct = ctypes
        self.lib = ctypes.CDLL(None, use_errno=True)
        self.lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                                   ctypes.c_char_p]
        self.lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

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

    def umount2(self, target: str, flags: int) -> None:
        self._check(self.lib.umount2(target.encode(), flags), f"umount {target}")

    def pivot_root(self, new: str, old: str) -> None:
        nr = _SYS_PIVOT_ROOT.get(os.uname().machine)
        if nr is None:
            raise OSError(errno.ENOSYS, f"pivot_root: unknown syscall number on {os.uname().machine}")
        self._check(self.lib.syscall(nr, new.encode(), old.encode()), "pivot_root")

    def prctl(self, op: int, arg: int) -> None:
        self.lib.prctl(op, arg, 0, 0, 0)

    def ipc_remove(self, kind: str, ident: int) -> None:
        fn = {"shm": self.lib.shmctl, "msg": self.lib.msgctl, "sem": self.lib.semctl}[kind]
        if kind == "sem":
            fn(ident, 0, IPC_RMID, 0)
        else:
            fn(ident, IPC_RMID, None)


def under(path: str, roots) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


# ---------------------------------------------------------------- namespaces: an allow-list root
def _bind_ro(libc: Libc, src: str, dst: str) -> None:
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if not os.path.exists(dst):
            os.close(os.open(dst, os.O_WRONLY | os.O_CREAT, 0o644))
    libc.mount(src, dst, None, MS_BIND | MS_REC)
    libc.mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def build_root(libc: Libc, allow: list[str], mask: list[str], links: dict[str, str], tmpfs_mb: int) -> None:
    """Private mount + network namespace whose root holds the allow-list only (see module doc).

    allow: paths (dirs or files) bound read-only at the same place; mask: dirs inside them covered
    by an empty read-only tmpfs (site-packages); links: symlinks to recreate (/lib -> usr/lib)."""
    libc.unshare(CLONE_NEWNS | CLONE_NEWNET)
    libc.mount(None, "/", None, MS_REC | MS_PRIVATE)
    # the new root is built on a private tmpfs over /tmp (in our namespace only: the host sees nothing)
    libc.mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=700,size=1m")
    new = "/tmp/root"
    os.mkdir(new)
    libc.mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m")
    for path in sorted({os.path.realpath(p) for p in allow if p and os.path.exists(p)}):
        _bind_ro(libc, path, new + path)
    for path in sorted(mask):
        if os.path.isdir(new + path):
            libc.mount("tmpfs", new + path, "tmpfs", MS_NOSUID | MS_NODEV | MS_RDONLY, "mode=755,size=4k")
    for link, target in links.items():
        os.symlink(target, new + link)
    os.mkdir(new + "/dev", 0o755)
    libc.mount("tmpfs", new + "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=64k")
    for node in DEV_NODES:
        if os.path.exists("/dev/" + node):
            os.close(os.open(new + "/dev/" + node, os.O_WRONLY | os.O_CREAT, 0o666))
            libc.mount("/dev/" + node, new + "/dev/" + node, None, MS_BIND)
    libc.mount(None, new + "/dev", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC, "mode=755,size=64k")
    os.mkdir(new + "/proc", 0o555)
    os.mkdir(new + "/tmp", 0o711)
    libc.mount("tmpfs", new + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"mode=711,size={tmpfs_mb}m")
    os.mkdir(new + "/.old")
    os.chdir(new)
    try:
        libc.pivot_root(new, new + "/.old")
        os.chdir("/")
        libc.umount2("/.old", MNT_DETACH)
        os.rmdir("/.old")
    except OSError as e:
        if e.errno != errno.ENOSYS:
            raise
        os.chroot(new)  # unknown architecture: the children drop every capability, so chroot holds
        os.chdir("/")
    libc.mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def mount_proc(libc: Libc) -> None:
    """/proc of our PID namespace, showing each child only its own processes where the kernel can."""
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    for opts in ("hidepid=invisible,subset=pid", "hidepid=2", None):
        try:
            libc.mount("proc", "/proc", "proc", flags, opts)
            return
        except OSError:
            if opts is None:
                raise


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


# ---------------------------------------------------------------- nothing carried over
def sweep_dir(root: str, keep: tuple[str, ...] = ()) -> None:
    """Remove every entry of root but `keep` (never following a symlink)."""
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        if name in keep:
            continue
        p = os.path.join(root, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                os.unlink(p)
            except OSError:
                pass


def sweep_run_state(base: str, outdir: str, libc: Libc | None, ipc: bool) -> None:
    """Remove what a run may have left for the next one: every entry of the server's private tmp
    but its output dir, that dir's files, /dev/shm's (a private one: pid-1 modes only) and
    (ipc=True) every SysV IPC object of this IPC namespace. Cheap when there is nothing."""
    sweep_dir(base, (os.path.basename(outdir),))
    sweep_dir(outdir)
    sweep_dir("/dev/shm")
    if ipc and libc is not None:
        for kind in ("shm", "msg", "sem"):
            try:
                with open(f"/proc/sysvipc/{kind}", "rb") as f:
                    rows = f.read().splitlines()[1:]
            except OSError:
                continue
            for row in rows:
                parts = row.split()
                if len(parts) > 1:
                    libc.ipc_remove(kind, int(parts[1]))


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
# no audit events inside these: refused at import (POSIX shm and FIFOs would outlive the run)
_DENY_IMPORTS = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "mmap", "_posixshmem", "_multiprocessing"})
_DENY_FUNCS = ("mkfifo", "mknod")  # os functions without audit events that create lasting files
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_DEV_READABLE = tuple("/dev/" + n for n in DEV_NODES) + ("/dev/fd", "/dev/stdin", "/dev/stdout", "/dev/stderr")


def install_audit_guard(workdir: str, allow: list[str], hide: list[str]) -> None:
    """The child's audit hook (bwrap and fallback): see the module doc. Reads outside `allow`,
    the working dir, a few /dev nodes and this process's own /proc entries are refused, and so
    is anything under `hide` (the server's code, data and home) even inside `allow`."""
    for name in list(sys.modules):
        if name.split(".")[0] in _DENY_IMPORTS:
            del sys.modules[name]
    import posix

    for mod in (os, posix):
        for fn in _DENY_FUNCS:
            try:
                delattr(mod, fn)
            except AttributeError:
                pass
    wd = os.path.realpath(workdir)
    allow = [os.path.realpath(a) for a in allow if a]
    hide = [os.path.realpath(h) for h in hide if h]
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

    def own_proc(p: str) -> bool:
        """/proc/self/... (resolved to /proc/<our pid>/...), but no directory under /proc at all:
        a directory fd would let a relative path (dir_fd=, which this hook cannot see) reach
        another process's entries (mem, environ, fds: the grader's among them)."""
        if p == "/proc" or not p.startswith("/proc/"):
            return False
        head = p[6:].split("/", 1)[0]
        return head.isdigit() and int(head) == getpid() and not isdir(p)

    def readable(p: str) -> bool:
        if inside_wd(p):
            return True
        if under(p, hide):
            return False
        return under(p, allow) or p in _DEV_READABLE or own_proc(p)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            if path is None or isinstance(path, int):
                return
            p = resolve(path)
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS)
            if writing and not inside_wd(p) and p not in ("/dev/null", "/dev/stdout", "/dev/stderr"):
                raise blocked(f"writing {p}")
            if not readable(p):
                raise blocked(f"reading {p}")
        elif event in ("os.listdir", "os.scandir"):
            p = resolve(args[0] if args[0] is not None else ".")
            if not readable(p) or p.startswith("/proc"):
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
