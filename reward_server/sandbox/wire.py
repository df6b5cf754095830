"""Wire format between the grader and a fork server: control frames and a run's outputs.

Standard library only (it ships into the fork server next to untrusted code).

Control frames (unix stream socket): 4-byte big-endian length + marshal body; the job header
travels with two fds (payload pipe read end, verdict pipe write end) via SCM_RIGHTS, the reply is a
result dict. A run's stdout / stderr / result file are read back here with hard caps (head + tail
text, size, markers found anywhere), from fds the server kept open itself.
"""
from __future__ import annotations

import marshal
import os
import signal
import socket
import stat
import struct

_LEN = struct.Struct(">I")
HEAD, TAIL = 4096, 8192
MAX_FRAME = 64 << 20  # a control frame larger than this is a broken peer


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
    if n > MAX_FRAME:
        raise EOFError(f"control frame of {n} bytes")
    obj = marshal.loads(_recv_exact(sock, n))
    return (obj, fds) if maxfds else obj


# ---------------------------------------------------------------- outputs (shared with the naive path)
def read_capped(src: str | int, markers: list[str]) -> tuple[str, int, list[str]]:
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
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, cap).decode("utf-8", "replace")
    finally:
        os.close(fd)


def collect(pid_status: int, rusage, wall: float, timed_out: bool, out_path: str | int, err_path: str | int,
            workdir: str, hdr: dict) -> dict:
    stdout, out_bytes, found = read_capped(out_path, hdr.get("markers", []))
    stderr, err_bytes, _ = read_capped(err_path, [])
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
