"""Child-side harness: setup + program + one check, inside the sandbox. Standard library only.

Checks, each in its own fresh process (forked from the fork server, or a fresh interpreter for the
naive reference path):

  eval  the honest check's child half: program loaded first, then the *call side* of every hidden
        assert arrives over a pipe; each is evaluated (helpers from a fresh exec of setup_code, so
        the program cannot redefine them), turned into plain data (plain.py) and written out as one
        line `index json`. The expected values never enter this process and it decides nothing: the
        grader compares the lines against expected values computed in a process that never ran
        program code (the same routine with an empty program and the expected sides).
  A     rt: setup + run_tests() (the asserts) + program, then the test call (`run_tests()`, or
        `Cls().run_tests()` when the program defines it as a method) is made; verdict = it
        returned (nonce-tagged line on the private pipe). Meant to be exploitable.
  B     se: setup + program + asserts as one script; verdict = exit status 0.
  C     so: ... then print the pass marker; verdict = marker on stdout.
  D     fm: ... then write {"passed": true} to the result file; verdict = the file says so.
  BCD   the three above observed on one run (exit status, stdout, file): the same script up to the
        asserts, so the same verdicts as three runs, for 1/3 of the process overhead.

Wire: the job header (a marshal dict) carries setup/program as marshalled code objects. The
payload pipe delivers a `pre` frame before the program runs and a `post` frame only after the
harness asks for it with b"L\\n" on the verdict pipe, i.e. after the program has been loaded.
"""
from __future__ import annotations

import builtins
import marshal
import os
import signal
import struct
import sys
import time
import traceback

try:
    from reward_server.sandbox import plain
except ImportError:  # run as a script (naive path): plain.py sits next to this file
    import plain  # type: ignore[no-redef]

_LEN = struct.Struct(">I")
EXIT_SETUP_ERROR = 4
EXIT_LOAD_ERROR = 3
FLUSH_BYTES, FLUSH_S = 1 << 16, 0.05  # result lines go out in batches: few wake-ups for the grader


def read_exact(fd: int, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        b = os.read(fd, n - got)
        if not b:
            raise EOFError("payload pipe closed")
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def read_frame(fd: int):
    (n,) = _LEN.unpack(read_exact(fd, 4))
    return marshal.loads(read_exact(fd, n))


def frame(obj) -> bytes:
    body = marshal.dumps(obj)
    return _LEN.pack(len(body)) + body


def _flush() -> None:
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except BaseException:
            pass


def _exit_code(e: SystemExit) -> int:
    """CPython's exit status for an uncaught SystemExit (a non-int code is printed, status 1)."""
    code = e.code
    if code is None:
        return 0
    if isinstance(code, int):
        return int(code) & 0xFF
    try:
        print(code, file=sys.stderr)
    except BaseException:
        pass
    return 1


def _die(code: int) -> None:
    _flush()
    os._exit(code)


def print_exc(exc: BaseException) -> None:
    """Python's uncaught-exception report on stderr, without the source lines.

    Why: `traceback.print_exception` reads source through linecache and walks the traceback
    machinery, which in a freshly forked child costs ~2.5 ms of copy-on-write faults per failing
    check (most checks fail) — a third of a check's cost. Frames (file, line, function) and the
    exception line are the same text Python prints.
    """
    try:
        lines = ["Traceback (most recent call last):\n"]
        tb = exc.__traceback__
        while tb is not None:
            co = tb.tb_frame.f_code
            lines.append(f'  File "{co.co_filename}", line {tb.tb_lineno}, in {co.co_name}\n')
            tb = tb.tb_next
        lines.extend(traceback.format_exception_only(type(exc), exc))
        sys.stderr.write("".join(lines))
    except BaseException:
        pass


def _script_failed(exc: BaseException) -> None:
    """End the process the way `python script.py` would for an uncaught exception."""
    if isinstance(exc, SystemExit):
        _die(_exit_code(exc))
    print_exc(exc)
    _die(1)


def _code(obj):
    """Payload items arrive pre-marshalled (bytes) so the grader marshals each problem once."""
    return marshal.loads(obj) if isinstance(obj, bytes) else obj


class _Results:
    """Result lines of the eval check, written in batches (and once more if the CPU limit hits)."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buf, self.size, self.t_last = fd, [], 0, time.perf_counter()

    def add(self, line: bytes) -> None:
        self.buf.append(line)
        self.size += len(line)
        if self.size >= FLUSH_BYTES or time.perf_counter() - self.t_last >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        data, self.buf, self.size = b"".join(self.buf), [], 0
        self.t_last = time.perf_counter()
        while data:
            try:
                n = os.write(self.fd, data)
            except OSError:
                return
            data = data[n:]

    def on_cpu_limit(self, signum, _frame) -> None:
        """SIGXCPU (soft CPU limit): send what is done, then die of the signal as before."""
        self.flush()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _evaluate(exprs: list, G: dict, out: _Results) -> None:
    """Evaluate each expression, write `i json` per result (an exception is a result too)."""
    dumps, dumps_raised = plain.dumps, plain.dumps_raised
    for i, code in enumerate(exprs):
        try:
            text = dumps(eval(code, G))
        except BaseException as e:  # noqa: B036 - a program's SystemExit is a failed call, not an exit
            text = dumps_raised(e)
        out.add(b"%d %s\n" % (i, text.encode("ascii", "backslashreplace")))
    out.add(b"D %d\n" % len(exprs))
    out.flush()


def run(header: dict, payload_fd: int, verdict_fd: int) -> None:
    """Run one check; never returns (exits the process with the script's status)."""
    # Capture everything the verdict path needs before any program code runs.
    _write, _exec, _exit, _set_blocking = os.write, exec, os._exit, os.set_blocking
    _BaseException = BaseException
    mode = header["mode"]
    setup = marshal.loads(header["setup"])
    program = marshal.loads(header["program"])
    pre = read_frame(payload_fd)
    G = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(setup, G)
    except BaseException:
        traceback.print_exc()
        _die(EXIT_SETUP_ERROR)
    if mode == "A" and pre.get("run_tests") is not None:
        exec(_code(pre["run_tests"]), G)  # grader's run_tests(), defined before the program (reference layout)
    try:
        exec(program, G)
    except BaseException as e:
        if mode == "eval":
            print_exc(e)
            _die(EXIT_LOAD_ERROR)
        _script_failed(e)
    # Program loaded: only now ask for the hidden part (call sides, asserts and/or nonce).
    _set_blocking(payload_fd, True)  # the program may have flipped it
    _write(verdict_fd, b"L\n")
    post = read_frame(payload_fd)

    if mode == "eval":
        G2 = {"__name__": "__main__", "__builtins__": builtins}
        _exec(setup, G2)
        fresh = set(G2)
        for k, v in list(G.items()):
            if k not in fresh:
                G2[k] = v
        out = _Results(verdict_fd)
        try:
            signal.signal(signal.SIGXCPU, out.on_cpu_limit)
        except (ValueError, OSError):
            pass
        _evaluate(_code(post["exprs"]), G2, out)
        _flush()
        _exit(0)

    if mode == "A":
        try:
            _exec(_code(post["call"]), G)
        except _BaseException as e:
            _script_failed(e)
        _write(verdict_fd, b"%s A 1\n" % post["nonce"])
        _die(0)

    # B / C / D: the asserts run as the tail of the script, then the reference's pass actions
    # (script code in the program's namespace, as in a single script file).
    marker_src = "print(%r)" % header.get("marker", "")
    file_src = "with open(%r, 'w') as _rg_f:\n    _rg_f.write('{\"passed\": true}')" % header.get("result_file", "")
    try:
        _exec(_code(post["asserts"]), G)
        if mode == "C":
            _exec(marker_src, G)
        elif mode == "D":
            _exec(file_src, G)
    except BaseException as e:
        _script_failed(e)
    if mode == "BCD":
        # B, C and D observed on one run: exit status, stdout, result file. Each pass action runs
        # on its own so one failing cannot change what the others (or the exit status) show.
        for src in (marker_src, file_src):
            try:
                _exec(src, G)
            except _BaseException:
                pass
    _die(0)


def apply_limits(header: dict) -> None:
    """rlimits for the naive fresh-process path (the fork server sets them itself)."""
    import resource

    cpu = int(header.get("cpu_s", 4))
    for res, val in (
        (resource.RLIMIT_AS, header.get("mem_bytes")),
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_FSIZE, header.get("fsize_bytes")),
        (resource.RLIMIT_CORE, 0),
    ):
        if val is not None:
            try:
                resource.setrlimit(res, val if isinstance(val, tuple) else (val, val))
            except (ValueError, OSError):
                pass


if __name__ == "__main__":  # naive path: `python harness.py PAYLOAD_FD VERDICT_FD < header`
    _hdr = marshal.loads(sys.stdin.buffer.read())
    apply_limits(_hdr)
    sys.stdin = open(os.devnull)
    run(_hdr, int(sys.argv[1]), int(sys.argv[2]))
