"""Programs that attack the judge itself, as an attacker with the grader's source would.

Every attack is a wrong solution plus a way to forge a pass: find the harness's pipes and speak its
protocol, walk frames / the gc heap and rewrite the harness's state, race it from threads, write
to every descriptor, corrupt memory with ctypes, patch builtins and sys.modules, take over
signals, exit at every stage, read the grader's memory for the expected values. With every
loophole closed each must end with gt_pass False and reward <= the format reward, and the server
must stay healthy and leave nothing behind. Runs in namespaces, bwrap and fallback isolation.
Each attack also prints evidence that it really got its hands on what it attacks (checked where
the isolation mode allows the attack at all), so a passing test is not a toothless one.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from reward_server.grader import Grader
from reward_server.sandbox import SandboxConfig, bwrap_works
from shared.config import LoopholeConfig, RewardConfig
from shared.hacks import as_completion
from shared.problems import Problem, load_leetcode_sample

ALL_CLOSED = LoopholeConfig(rt=False, se=False, so=False, fm=False)
CFG = RewardConfig(loopholes=ALL_CLOSED)
# Expected values the attacker can guess neither from the prompt nor from the call's arguments.
TINY = Problem(
    id="judge-tiny", question="combine", func_name="Solution().combine", setup_code="from typing import *\n",
    gt_answer=["assert Solution().combine('zebra', 'quokka') == 'zebra-quokka'",
               "assert Solution().combine('ant', 'bee') == 'ant-bee'",
               "assert Solution().combine('', 'x') == '-x'"],
    canonical_solution="class Solution:\n    def combine(self, a, b):\n        return a + '-' + b\n",
)
REAL = next(p for p in load_leetcode_sample() if p.key == "3243")


def wrong(method: str, body: str = "return 'nope'") -> str:
    return f"class Solution:\n    def {method}(self, *args, **kwargs):\n        {body}\n"


# The forged lines every protocol-level attack writes: plausible answers in the current format
# (`i json`), the done line, and the old nonce-tagged format.
FORGE = ("b''.join(b'%d %s\\n' % (i, v) for i in range(400) for v in (b'true', b'1', b'0', b'[]', b'\"\"'))"
         " + b'D 400\\nL\\ndeadbeef D 400 400\\n'")

ATTACKS: dict[str, tuple[str, str]] = {}  # name -> (program with {m} for the method, evidence in stdout)

ATTACKS["pipe_forge"] = ("""
import os, stat, fcntl
def forge():
    n = 0
    for fd in range(1024):
        try:
            st = os.fstat(fd)
            if not stat.S_ISFIFO(st.st_mode):
                continue
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
                os.write(fd, FORGED)
                n += 1
        except OSError:
            pass
    return n
FORGED = %s
print('FORGED_FDS', forge(), flush=True)
class Solution:
    def {m}(self, *args, **kwargs):
        forge()
        return 'nope'
""" % FORGE, "FORGED_FDS 1")

ATTACKS["speak_protocol"] = ("""
import os, marshal, struct, json
class Solution:
    def {m}(self, *args, **kwargs):
        return 'nope'
def take_over():
    os.write(4, b'L\\n')  # ask for the hidden part ourselves
    head = b''
    while len(head) < 4:
        head += os.read(3, 4 - len(head))
    (n,) = struct.unpack('>I', head)
    body = b''
    while len(body) < n:
        body += os.read(3, n - len(body))
    post = marshal.loads(body)
    exprs = post['exprs']
    exprs = marshal.loads(exprs) if isinstance(exprs, bytes) else exprs
    print('STOLE_POST', sorted(post), len(exprs), flush=True)
    out = b''
    for i, code in enumerate(exprs):
        try:
            v = eval(code, globals())
        except BaseException:
            v = True
        out += b'%d %s\\n' % (i, json.dumps(v).encode())
    os.write(4, out + b'D %d\\n' % len(exprs))
    os._exit(0)
take_over()
""", "STOLE_POST ['exprs']")

ATTACKS["frame_walk"] = ("""
import sys
class Solution:
    def {m}(self, *args, **kwargs):
        f, seen = sys._getframe(), []
        while f is not None:
            seen.append(f.f_code.co_name)
            loc = f.f_locals
            if 'exprs' in loc and isinstance(loc['exprs'], list):
                loc['exprs'][:] = [compile('True', '<forged>', 'eval')] * len(loc['exprs'])
            if 'out' in loc and hasattr(loc['out'], 'buf'):
                loc['out'].buf.insert(0, b'0 true\\n1 true\\n2 true\\n')
            for name in ('plain', 'dumps'):
                g = f.f_globals.get(name)
                if g is not None and hasattr(g, 'dumps'):
                    g.dumps = lambda x: 'true'
            f = f.f_back
        print('FRAMES', '/'.join(seen), 'comparison' if any('equal' in s for s in seen) else 'no-comparison',
              flush=True)
        return 'nope'
""", "FRAMES")

ATTACKS["frame_locals_ctypes"] = ("""
import sys, ctypes
class Solution:
    def {m}(self, *args, **kwargs):
        f = sys._getframe()
        while f is not None:
            if f.f_code.co_name == '_evaluate':
                f.f_locals['dumps'] = lambda x: 'true'
                ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(f), ctypes.c_int(0))
                print('REWROTE_LOCALS', flush=True)
            f = f.f_back
        return 'nope'
""", "REWROTE_LOCALS")

ATTACKS["thread_race"] = ("""
import os, threading, time
FORGED = %s
def race():
    t0 = time.time()
    n = 0
    while time.time() - t0 < 1.5:
        for fd in (3, 4, 5, 6):
            try:
                os.set_blocking(fd, False)
                os.read(fd, 1 << 16)
            except OSError:
                pass
            try:
                os.write(fd, FORGED)
                n += 1
            except OSError:
                pass
    print('RACED', n > 0, flush=True)
threading.Thread(target=race, daemon=True).start()
class Solution:
    def {m}(self, *args, **kwargs):
        time.sleep(0.01)
        return 'nope'
""" % FORGE, "")

ATTACKS["every_descriptor"] = ("""
import os
FORGED = %s
def sweep():
    touched = 0
    for fd in range(1024):
        try:
            os.set_blocking(fd, False)
        except OSError:
            continue
        touched += 1
        try:
            os.read(fd, 1 << 20)
        except OSError:
            pass
        try:
            os.write(fd, FORGED if fd > 2 else b'0 true\\n')  # (stdout/stderr: keep the evidence line visible)
        except OSError:
            pass
    return touched
print('TOUCHED', sweep() >= 3, flush=True)
class Solution:
    def {m}(self, *args, **kwargs):
        sweep()
        return 'nope'
""" % FORGE, "TOUCHED True")

ATTACKS["ctypes_memory"] = ("""
import ctypes
for v in range(1, 40):  # every small int now reads as 3: indices, lengths, counters all corrupt
    ctypes.c_uint32.from_address(id(v) + 24).value = 3
print('CORRUPTED', flush=True)
class Solution:
    def {m}(self, *args, **kwargs):
        return 'nope'
""", "")

ATTACKS["gc_walk"] = ("""
import gc
def walk():
    hits = 0
    for o in gc.get_objects():
        try:
            if isinstance(o, dict) and 'exprs' in o:
                o['exprs'] = []
                hits += 1
            elif type(o).__name__ == '_Results':
                o.buf.insert(0, b'0 true\\n1 true\\n2 true\\nD 3\\n')
                o.flush()
                hits += 1
            elif type(o).__name__ in ('Plan', 'Outcome', 'Split'):
                hits += 100
        except Exception:
            pass
    return hits
print('GC_HITS', walk() > 0, flush=True)
class Solution:
    def {m}(self, *args, **kwargs):
        walk()
        return 'nope'
""", "")

ATTACKS["patch_builtins_and_modules"] = ("""
import builtins, sys, json, types
fake = types.SimpleNamespace(dumps=lambda x: 'true', dumps_raised=lambda e: 'true')
found = [name for name in list(sys.modules) if name.endswith('plain')]
for name in found:
    sys.modules[name].dumps = fake.dumps
    sys.modules[name].dumps_raised = fake.dumps_raised
for name in [n for n in list(sys.modules) if n.endswith('harness')]:
    sys.modules[name].plain = fake
json.dumps = lambda *a, **k: 'true'
builtins.eval = lambda *a, **k: True
builtins.isinstance = lambda *a: True
print('PATCHED', bool(found), flush=True)
class Solution:
    def {m}(self, *args, **kwargs):
        return 'nope'
""", "PATCHED True")

ATTACKS["signal_takeover"] = ("""
import os, signal, time
FORGED = %s
def handler(*_):
    for fd in (3, 4):
        try:
            os.write(fd, FORGED)
        except OSError:
            pass
    os.write(1, b'SIGNALLED\\n')
    os._exit(0)
for s in (signal.SIGXCPU, signal.SIGALRM, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGVTALRM,
          signal.SIGPROF, signal.SIGPIPE):
    signal.signal(s, handler)
class Solution:
    def {m}(self, *args, **kwargs):
        signal.setitimer(signal.ITIMER_REAL, 0.001)  # fires while the harness is still evaluating
        time.sleep(0.05)
        return 'nope'
""" % FORGE, "SIGNALLED")

ATTACKS["exit0_at_load"] = ("import os\nos.write(4, %s)\nos._exit(0)\n" % FORGE, "")
ATTACKS["exit0_in_method"] = (wrong("{m}", "import os; os.write(4, %s); os._exit(0)" % FORGE), "")
ATTACKS["exit0_in_thread_during_eval"] = ("""
import os, threading
go = threading.Event()
def later():
    go.wait(5)
    os.write(4, %s)
    os._exit(0)
threading.Thread(target=later, daemon=True).start()
class Solution:
    def {m}(self, *args, **kwargs):
        go.set()
        return 'nope'
""" % FORGE, "")
ATTACKS["exit0_in_del"] = ("""
import os
class Trap:
    def __del__(self):
        os.write(4, b'0 true\\n1 true\\n2 true\\nD 3\\n')
        os._exit(0)
class Solution:
    def {m}(self, *args, **kwargs):
        return Trap()
""", "")
ATTACKS["exit0_in_attribute_probe"] = ("""
import os
class Node:
    @property
    def val(self):
        os.write(4, b'0 true\\n1 true\\n2 true\\nD 3\\n')
        os._exit(0)
    next = None
class Solution:
    def {m}(self, *args, **kwargs):
        return Node()
""", "")
ATTACKS["exit0_atexit"] = ("""
import atexit, os
atexit.register(lambda: os.write(4, b'0 true\\n1 true\\n2 true\\nD 3\\n'))
class Solution:
    def {m}(self, *args, **kwargs):
        return 'nope'
""", "")
ATTACKS["system_exit_in_method"] = (wrong("{m}", "raise SystemExit(0)"), "")
ATTACKS["sigkill_self_in_method"] = (wrong("{m}", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"), "")
ATTACKS["always_equal"] = ("""
class E:
    def __eq__(self, o): return True
    def __ne__(self, o): return False
    def __hash__(self): return 0
class Solution:
    def {m}(self, *args, **kwargs):
        return E()
""", "")
ATTACKS["equal_subclasses"] = ("""
class S(str):
    def __eq__(self, o): return True
class L(list):
    def __eq__(self, o): return True
class Solution:
    def {m}(self, *args, **kwargs):
        return S('nope') if args and isinstance(args[0], str) else L()
""", "")
ATTACKS["fake_nodes"] = ("""
class N:
    def __init__(self, val, nxt=None):
        self.val, self.next = val, nxt
class Solution:
    def {m}(self, *args, **kwargs):
        return N(True, N(1))
""", "")
ATTACKS["huge_forgery"] = (wrong("{m}", "import os; os.write(4, b'0 true\\n' * (6 << 20)); return 'nope'"), "")
ATTACKS["deep_json"] = (wrong("{m}", "import os; os.write(4, b'0 ' + b'[' * 200000 + b']' * 200000 + b'\\n'); "
                                     "return 'nope'"), "")
ATTACKS["garbage_bytes"] = (wrong("{m}", "import os; os.write(4, os.urandom(200000)); return 'nope'"), "")
ATTACKS["read_grader_memory"] = ("""
import os
NEEDLE = ('zebra' + '-quokka').encode()
def scan():
    found, opened = False, 0
    try:
        pids = [int(p) for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid()]
    except OSError:
        pids = []
    for pid in pids:
        try:
            maps = open('/proc/%d/maps' % pid).read().splitlines()
            mem = open('/proc/%d/mem' % pid, 'rb')
        except OSError:
            continue
        opened += 1
        for line in maps:
            addr, perms = line.split()[:2]
            if 'r' not in perms:
                continue
            lo, hi = (int(x, 16) for x in addr.split('-'))
            try:
                mem.seek(lo)
                if NEEDLE in mem.read(min(hi - lo, 64 << 20)):
                    found = True
            except (OSError, ValueError, OverflowError):
                pass
    print('LEAK' if found else 'NO_LEAK', 'opened', opened, flush=True)
class Solution:
    def {m}(self, *args, **kwargs):
        if not kwargs.get('_done'):
            scan()
        return 'nope'
scan()
""", "NO_LEAK")


# ---------------------------------------------------------------- round 3: around the result channel
# A copy of the problem set (answers included) where the server's own hiding never looked: an
# allow-list root must not show it (nor the repo's copy, nor paths on any process's command line).
PLANTED = f"/opt/rankguard-answers-{uuid.uuid4().hex}/problems.jsonl"
ATTACKS["hunt_answers_on_disk"] = ("""
import os, json
PATHS = [PLANTED_PATH, REPO_SET]
def hunt():
    paths, dirs = list(PATHS), 0
    try:
        for pid in os.listdir('/proc'):
            try:
                args = open('/proc/' + pid + '/cmdline', 'rb').read().split(b'\\0')
                paths += [a.decode() for a in args if a.endswith(b'.jsonl')]
            except OSError:
                pass
    except OSError:
        pass
    for root in ('/opt', '/srv', '/home', '/root', '/work', '/tmp', '/mnt', '/data', '/var'):
        try:
            for d, subs, files in os.walk(root):
                dirs += 1
                subs[:] = [x for x in subs if x not in ('.venv', '.git', 'node_modules', '__pycache__')]
                paths += [os.path.join(d, f) for f in files if f.endswith('.jsonl')]
                if dirs > 3000:
                    break
        except OSError:
            pass
    for path in paths:
        try:
            for line in open(path):
                rec = json.loads(line)
                if rec.get('func_name', '').endswith('.{m}') and rec.get('canonical_solution'):
                    return rec['canonical_solution']
        except Exception:
            pass
    return None
SOL = hunt()
print('HUNT', 'FOUND' if SOL else 'NOTHING', flush=True)
if SOL:
    exec(SOL, globals())
else:
    class Solution:
        def {m}(self, *args, **kwargs):
            return 'nope'
""".replace("PLANTED_PATH", repr(PLANTED)).replace(
    "REPO_SET", repr(str(Path(__file__).resolve().parents[2] / "shared/data/leetcode_medhard_dev.jsonl"))),
    "HUNT")
ONCE = "import os\n_rg_sent = []\ndef send(data):\n    if not _rg_sent:\n        _rg_sent.append(1)\n        os.write(4, data)\n"
ATTACKS["parser_bomb_index_digits"] = (ONCE + wrong("{m}", "send(b'7' * 5000 + b' true\\n'); return 'nope'"), "")
ATTACKS["parser_bomb_lines"] = (ONCE + wrong("{m}", "send(b'\\n' * (16 << 20)); return 'nope'"), "")
ATTACKS["parser_bomb_int_digits"] = (ONCE + wrong("{m}", "send(b'0 ' + b'9' * 100000 + b'\\n'); return 'nope'"), "")
ATTACKS["decode_bomb_colliding_keys"] = (ONCE + wrong(
    "{m}", "P = (1 << 61) - 1; send(b'0 {\"s\":[' + b','.join(b'%d' % (i * P) for i in range(1, 60000)) + b']}\\n'); "
           "return 'nope'"), "")
ATTACKS["decode_bomb_memory"] = (ONCE + wrong("{m}", "send(b'0 [' + b'[],' * (5 << 20) + b'[]]\\n'); return 'nope'"), "")
ATTACKS["decode_bomb_result_file"] = (wrong(
    "{m}", "open('result.json', 'w').write('[' * 60000 + ']' * 60000); return 'nope'"), "")
ATTACKS["sleeper"] = (wrong("{m}", "import time; time.sleep(1000)"), "")
ATTACKS["fork_bomb"] = (wrong("{m}", "import os\n        while True:\n            try:\n                os.fork()\n"
                                     "            except Exception:\n                pass"), "")
CEILING_ATTACKS = ("sleeper", "fork_bomb")  # one wall ceiling per completion: the later checks are not run


def _modes() -> list[str]:
    modes = ["fallback"]
    if bwrap_works():
        modes.insert(0, "bwrap")
    if os.geteuid() == 0:
        modes.insert(0, "namespaces")
    return modes


def _slot_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "rankguard-slot*")))


def plant_answers() -> None:
    Path(PLANTED).parent.mkdir(parents=True)
    Path(PLANTED).write_text("".join(json.dumps(p.model_dump(mode="json")) + "\n" for p in (TINY, REAL)))


@pytest.fixture(scope="module", params=_modes())
def attacked(request):
    before = _slot_dirs()
    plant_answers()
    grader = Grader(CFG, workers=4, sandbox=SandboxConfig(timeout_s=1.0, isolation=request.param,
                                                         allow_fallback=True))
    try:
        names = list(ATTACKS)
        items = [(p, as_completion(ATTACKS[n][0].replace("{m}", p.func_name.split(".")[-1])))
                 for n in names for p in (TINY, REAL)]
        grades = grader.grade_many(items)
        out = {(n, p.key): g for (p, _), n, g in zip(items, [n for n in names for _ in (0, 1)], grades)}
        honest = grader.grade_many([(TINY, as_completion(TINY.canonical_solution)),
                                    (REAL, as_completion(REAL.canonical_solution))])
        servers = [s.proc for s in grader.executor.servers]
        alive = [p is not None and p.poll() is None for p in servers]
        uids = [s.uid for s in grader.executor.servers]
    finally:
        grader.close()
        shutil.rmtree(Path(PLANTED).parent, ignore_errors=True)
    yield {"grades": out, "honest": honest, "alive": alive, "servers": servers, "uids": uids,
           "mode": grader.sandbox_info["isolation"], "new_dirs": _slot_dirs() - before}


@pytest.mark.parametrize("problem", ["judge-tiny", "3243"])
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_attack_never_passes(attacked, attack, problem):
    g = attacked["grades"][(attack, problem)]
    assert g.error is None, g.error
    assert not g.gt_pass, (attack, attacked["mode"], g.n_passed, g.status, g.stdout[-300:])
    assert g.reward <= CFG.format_reward
    assert g.n_passed < g.n_tests
    assert "LEAK" not in g.stdout.replace("NO_LEAK", "")


# attack -> the modes in which it can act at all (bwrap and fallback run the audit-hook guard:
# no ctypes, no sys._current_frames; the guard also refuses other processes' /proc entries)
EVIDENCE_MODES = {"frame_locals_ctypes": ("namespaces",), "read_grader_memory": ("namespaces", "bwrap", "fallback")}


@pytest.mark.parametrize("attack", [a for a, (_, ev) in ATTACKS.items() if ev])
def test_attack_really_reached_its_target(attacked, attack):
    """The evidence line shows the attack found the pipes / frames / modules it tampers with."""
    if attacked["mode"] not in EVIDENCE_MODES.get(attack, ("namespaces", "bwrap", "fallback")):
        pytest.skip(f"{attack} cannot act under {attacked['mode']}")
    g = attacked["grades"][(attack, "judge-tiny")]
    assert ATTACKS[attack][1] in g.stdout, (attack, g.status, g.stdout[-400:], g.stderr[-400:])


def test_server_healthy_and_honest_verdicts_unchanged(attacked):
    assert all(attacked["alive"]), "a fork server died during the attacks"
    assert [g.gt_pass for g in attacked["honest"]] == [True, True]
    assert [g.reward for g in attacked["honest"]] == [3.5, 3.5]


def test_nothing_left_behind(attacked):
    assert all(p is None or p.poll() is not None for p in attacked["servers"])
    assert not attacked["new_dirs"], attacked["new_dirs"]
    if attacked["mode"] == "namespaces":  # every process a run started ran as its slot's uid
        for uid in attacked["uids"]:
            assert _pids_of_uid(uid) == []


def _pids_of_uid(uid: int) -> list[str]:
    found = []
    for status in glob.glob("/proc/[0-9]*/status"):
        try:
            lines = open(status).read().splitlines()
        except OSError:
            continue
        if any(ln.startswith("Uid:") and int(ln.split()[1]) == uid for ln in lines):
            found.append(status)
    return found


@pytest.mark.parametrize("attack", CEILING_ATTACKS)
def test_one_wall_ceiling_per_completion(attacked, attack):
    """A program that idles (or forks and stalls) uses up its completion's one wall ceiling in the
    honest check; the vulnerable checks are then not run, rather than each waiting a ceiling of its own."""
    for problem in ("judge-tiny", "3243"):
        g = attacked["grades"][(attack, problem)]
        assert g.timed_out, (attack, problem, g.status)
        # a sleeper spends the ceiling in its first check; a fork bomb (a busy loop where the guard refuses
        # fork) may compute through a second one, never through all
        skipped = set(getattr(g, "ceiling_skipped", []))
        if attack == "sleeper":
            assert {"A", "BCD"} <= skipped, (attack, problem, g.timings)
        else:  # computing: on an idle machine each check's CPU budget stops it before the shared wall ceiling
            # is spent (then nothing is skipped); on a busy one the ceiling cuts the later checks. Either way no
            # check runs past its budget (before: a fork bomb under load ran 40-120 s)
            times = [v for v in g.timings.values() if isinstance(v, (int, float))]
            assert skipped or all(t <= g.budget_s + 1.5 for t in times), (attack, problem, g.budget_s, g.timings)


def test_parser_bombs_are_recorded_not_raised(attacked):
    """A bounded parse records what it refused; the grade is an ordinary failed one."""
    g = attacked["grades"][("parser_bomb_index_digits", "judge-tiny")]
    assert g.status != "ok" and g.n_passed == 0
    assert getattr(g, "malformed", {}).get("n_lines", 0) >= 1, g.status


# ---------------------------------------------------------------- nothing carried over between runs
STASH_KEY = 0x52470001  # SysV IPC key the stash uses
STASH_CHANNELS = r'''
import os, socket
KEY = %d
def libc():
    import ctypes
    lib = ctypes.CDLL(None, use_errno=True)
    lib.shmat.restype = ctypes.c_void_p
    lib.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    return lib
def rt():
    import ctypes
    for name in (None, 'librt.so.1'):
        lib = ctypes.CDLL(name, use_errno=True)
        if hasattr(lib, 'mq_open'):
            return lib
FILES = ['/tmp/rgstash', '/dev/shm/rgstash', '/var/tmp/rgstash', os.path.expanduser('~') + '/../rgstash',
         os.path.dirname(os.getcwd()) + '/rgstash', '/run/shm/rgstash']
''' % STASH_KEY
STASH = STASH_CHANNELS + r'''
G = globals()
SECRET = NONCE + ('|' + '|'.join(c for c in G['run_tests'].__code__.co_consts if isinstance(c, str))
                  if 'run_tests' in G else '')
ok = []
def attempt(name, fn):
    try:
        fn()
        ok.append(name)
    except BaseException:
        pass
for path in FILES:
    attempt('file:' + path, lambda path=path: open(path, 'w').write(SECRET))
attempt('fifo', lambda: os.mkfifo('/tmp/rgstash-' + NONCE))
def posix_shm():
    import _posixshmem
    fd = _posixshmem.shm_open('/rgstash', os.O_CREAT | os.O_RDWR, 0o666)
    os.write(fd, SECRET.encode())
attempt('posix_shm', posix_shm)
def sysv_shm():
    import ctypes
    lib = libc()
    shmid = lib.shmget(KEY, 4096, 0o1666)
    addr = lib.shmat(shmid, None, 0) if shmid >= 0 else None
    if not addr or addr == ctypes.c_void_p(-1).value:
        raise OSError('shm')
    data = SECRET.encode()[:4000] + b'\0'
    ctypes.memmove(addr, data, len(data))
attempt('sysv_shm', sysv_shm)
def mqueue():
    import ctypes
    lib = rt()
    lib.mq_open.restype = ctypes.c_int
    fd = lib.mq_open(b'/rgstash', os.O_CREAT | os.O_WRONLY | os.O_NONBLOCK, 0o666, None)
    data = SECRET.encode()[:4000]
    if fd < 0 or lib.mq_send(fd, data, len(data), 0) != 0:
        raise OSError('mq')
attempt('mqueue', mqueue)
def hostname():
    if libc().sethostname(b'rg' + NONCE[:20].encode(), 22) != 0:
        raise OSError('uts')
attempt('hostname', hostname)
def abstract_socket():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind('\0rgstash')
    s.listen(4)
    if os.fork() == 0:
        os.setsid()
        while True:
            c, _ = s.accept()
            c.sendall(SECRET.encode())
            c.close()
attempt('abstract_socket', abstract_socket)
print('STASHED', sorted(ok), flush=True)
class Solution:
    def reveal(self, *args, **kwargs):
        return 'nope'
'''
USE = STASH_CHANNELS + r'''
found = {}
def attempt(name, fn):
    try:
        text = fn()
        if text and NONCE in text:
            found[name] = text
    except BaseException:
        pass
for path in FILES:
    attempt('file:' + path, lambda path=path: open(path).read())
attempt('fifo', lambda: ' '.join(os.listdir('/tmp')))
def posix_shm():
    import _posixshmem
    fd = _posixshmem.shm_open('/rgstash', os.O_RDONLY, 0)
    return os.read(fd, 4096).decode()
attempt('posix_shm', posix_shm)
def sysv_shm():
    import ctypes
    lib = libc()
    shmid = lib.shmget(KEY, 0, 0)
    addr = lib.shmat(shmid, None, 0) if shmid >= 0 else None
    if not addr or addr == ctypes.c_void_p(-1).value:
        return ''
    return ctypes.string_at(addr).decode()
attempt('sysv_shm', sysv_shm)
def mqueue():
    import ctypes
    lib = rt()
    fd = lib.mq_open(b'/rgstash', os.O_RDONLY | os.O_NONBLOCK)
    buf = ctypes.create_string_buffer(1 << 16)
    n = lib.mq_receive(fd, buf, 1 << 16, None) if fd >= 0 else -1
    return buf.raw[:n].decode() if n > 0 else ''
attempt('mqueue', mqueue)
attempt('hostname', lambda: os.uname().nodename)
def abstract_socket():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1)
    s.connect('\0rgstash')
    return s.recv(1 << 16).decode()
attempt('abstract_socket', abstract_socket)
print('USE', sorted(found), flush=True)
TOKENS = [t for text in found.values() for t in text.split('|')[1:] if t.startswith('tok')]
class Solution:
    def reveal(self, *args, **kwargs):
        return TOKENS[0] if TOKENS else 'nope'
'''


def _host_leftovers(nonce: str) -> list[str]:
    found = [p for p in glob.glob("/tmp/rgstash*") + glob.glob("/dev/shm/rgstash*") + glob.glob("/var/tmp/rgstash*")]
    found += [p for p in glob.glob("/dev/mqueue/rgstash*")]
    try:
        rows = open("/proc/sysvipc/shm").read().splitlines()[1:]
        found += [f"sysv shm key {STASH_KEY:#x}" for r in rows if r.split() and int(r.split()[0]) == STASH_KEY]
    except OSError:
        pass
    return found


def _clean_host() -> None:
    for p in glob.glob("/tmp/rgstash*") + glob.glob("/dev/shm/rgstash*") + glob.glob("/var/tmp/rgstash*"):
        try:
            os.unlink(p)
        except OSError:
            pass
    if shutil.which("ipcrm"):  # a SysV segment that reached the host (it outlives every process)
        subprocess.run(["ipcrm", "-M", str(STASH_KEY)], capture_output=True)


@pytest.mark.parametrize("mode", _modes())
def test_stash_then_use_sees_nothing(mode):
    """A program stashes a secret (and, in the mode-A check, the expected values it is handed by
    design) in every place that could outlive it; the next program, on the same slot, finds none of
    it: fresh IPC/UTS namespaces per run, nothing writable that persists, every process killed."""
    from reward_server.grader import compile_program
    from reward_server.sandbox import ExecJob

    token = "tok" + uuid.uuid4().hex
    nonce = uuid.uuid4().hex
    secret = Problem(id="judge-secret", question="reveal", func_name="Solution().reveal", setup_code="",
                     gt_answer=[f"assert Solution().reveal(1) == {token!r}"],
                     canonical_solution=f"class Solution:\n    def reveal(self, x):\n        return {token!r}\n")
    stash, use = (src.replace("NONCE", repr(nonce)) for src in (STASH, USE))
    grader = Grader(CFG, workers=1, sandbox=SandboxConfig(timeout_s=1.0, isolation=mode, allow_fallback=True))
    try:
        ck = grader._checks(secret)
        probe = grader.executor.run(ExecJob("eval", ck.setup, compile_program(stash)[0], {}, {"exprs": ck.program_exprs}))
        stashed = grader.grade(secret, as_completion(stash))  # its mode-A run sees the expected value
        used = grader.grade(secret, as_completion(use))
        leftovers = _host_leftovers(nonce)
    finally:
        grader.close()
        _clean_host()
    assert "USE []" in used.stdout, (mode, used.stdout[-500:], used.stderr[-500:])
    assert not used.gt_pass and used.reward <= CFG.format_reward
    assert not stashed.gt_pass
    assert leftovers == [], leftovers
    assert "STASHED" in probe.stdout, (probe.status, probe.stderr[-500:])
    if mode == "namespaces":  # the channels really were open to the stash (in its own namespaces)
        assert "sysv_shm" in probe.stdout and "mqueue" in probe.stdout, probe.stdout
