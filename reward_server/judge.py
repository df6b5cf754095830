"""The honest verdict, decided outside every process that ran program code.

Each hidden assert is split once per problem into a *plan*: its operands, each either on the
program side (mentions the solution: `Solution().f(...)`) or the expected side (everything else),
and how to combine them. The sandboxed child evaluates only the program-side operands and writes
them as plain data (sandbox/plain.py); the expected sides are evaluated once per problem, in a
sandboxed process that runs the setup code but never a program, and cached. The comparison is made
here, on decoded plain values, so a child can at worst fail a check: a pass needs the child to
write the right answers, and it never sees them.

Supported assert shapes (anything else is reported as unsupported and never passes):
    assert A <op> B [<op> C ...]       op in == != < <= > >= in, not in; `is [not]` None/True/False
    assert is_same_list(A, B)          (or is_same_tree) when setup_code defines the helper:
                                       compared as A == B on plain data (nodes by value)
    assert A / assert not A            truthiness of a plain value, A = `Solution().f(...)`
                                       (a chain starting at the solution: nothing else inside)
Any operand that the child could not write as plain data (an object of the program's own class,
an exception, the AlwaysEqual trick) fails the check.
"""
from __future__ import annotations

import ast
import dataclasses
import operator
import re

from reward_server.detector import AST_LOCK, parse
from reward_server.sandbox import plain

STRUCTURAL_HELPERS = ("is_same_list", "is_same_tree")  # setup helpers that mean "equal by value"
_CONSTANTS_FOR_IS = (None, True, False)
_OPS = {
    ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=",
    ast.In: "in", ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not",
}
_APPLY = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt,
    ">=": operator.ge, "in": lambda a, b: a in b, "not in": lambda a, b: a not in b,
    "is": operator.is_, "is not": operator.is_not,
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one assert is judged. operands: ("p", i) = program expression i, ("e", k) = expected
    expression k. kind: "cmp" (chain of ops), "truth" (one operand), "unsupported" (why says why)."""

    kind: str
    operands: tuple = ()
    ops: tuple = ()
    negate: bool = False
    why: str = ""


@dataclasses.dataclass
class Split:
    """All asserts of a problem: plans plus the two expression lists (compiled code objects)."""

    plans: list[Plan]
    program_exprs: list
    expected_exprs: list

    @property
    def n_unsupported(self) -> int:
        return sum(p.kind == "unsupported" for p in self.plans)


def solution_roots(func_name: str) -> frozenset[str]:
    """Names that mark the program side: the root of func_name (`Solution` in `Solution().f`)."""
    m = re.match(r"\s*([A-Za-z_]\w*)", func_name or "")
    return frozenset({"Solution"} | ({m.group(1)} if m else set()))


def setup_functions(setup_code: str) -> frozenset[str]:
    try:
        tree = parse(setup_code or "")
    except (SyntaxError, ValueError):
        return frozenset()
    return frozenset(n.name for n in tree.body if isinstance(n, ast.FunctionDef))


def _mentions(node: ast.AST, roots: frozenset[str]) -> bool:
    return any(isinstance(n, ast.Name) and n.id in roots for n in ast.walk(node))


class _Builder:
    def __init__(self, roots: frozenset[str], helpers: frozenset[str]) -> None:
        self.roots, self.helpers = roots, helpers
        self.program: list = []
        self.expected: list = []

    def operand(self, node: ast.expr) -> tuple[str, int]:
        code = compile(ast.Expression(node), "<assert>", "eval", dont_inherit=True)
        side = self.program if _mentions(node, self.roots) else self.expected
        side.append(code)
        return ("p" if side is self.program else "e", len(side) - 1)

    def plan(self, src: str) -> Plan:
        tree = parse(src)  # SyntaxError: the caller names the problem and the assert
        compile(tree, "<assert>", "exec", dont_inherit=True)  # and whatever else does not compile
        if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
            return Plan("unsupported", why="not a single assert statement")
        test, negate = tree.body[0].test, False
        while isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            test, negate = test.operand, not negate
        if isinstance(test, ast.Compare):
            ops = []
            nodes = [test.left, *test.comparators]
            for i, op in enumerate(test.ops):
                name = _OPS.get(type(op))
                if name in ("is", "is not") and not any(
                        isinstance(n, ast.Constant) and n.value in _CONSTANTS_FOR_IS and type(n.value) in
                        (type(None), bool) for n in (nodes[i], nodes[i + 1])):
                    return Plan("unsupported", why="`is` against something other than None/True/False")
                ops.append(name)
            return Plan("cmp", tuple(self.operand(n) for n in nodes), tuple(ops), negate)
        if (isinstance(test, ast.Call) and isinstance(test.func, ast.Name) and test.func.id in STRUCTURAL_HELPERS
                and test.func.id in self.helpers and len(test.args) == 2 and not test.keywords
                and not any(isinstance(a, ast.Starred) for a in test.args)):
            return Plan("cmp", (self.operand(test.args[0]), self.operand(test.args[1])), ("==",), negate)
        if _mentions(test, self.roots) and not self._rooted(test):
            # e.g. helper(Solution().f(x), expected): evaluating it whole would hand the child
            # the expected side and the decision
            return Plan("unsupported", why="the solution's result is passed to something the judge does not know")
        return Plan("truth", (self.operand(test),), (), negate)

    def _rooted(self, node: ast.expr) -> bool:
        """`Solution().f(args)`, `...[0]`, `....attr`: a chain that starts at the solution."""
        while isinstance(node, (ast.Call, ast.Attribute, ast.Subscript)):
            node = node.func if isinstance(node, ast.Call) else node.value
        return isinstance(node, ast.Name) and node.id in self.roots


def split_asserts(asserts: list[str], func_name: str, setup_code: str) -> Split:
    """Plans for every assert (raises SyntaxError/ValueError for one that does not compile)."""
    with AST_LOCK:  # compiles hand-built ASTs too (see detector.AST_LOCK)
        b = _Builder(solution_roots(func_name), setup_functions(setup_code))
        plans = [b.plan(src) for src in asserts]
    return Split(plans, b.program, b.expected)


# ---------------------------------------------------------------- reading results, deciding
class Results(dict):
    """index -> JSON text of the child's result lines; `malformed` says what was refused (a
    malformed line only ever fails its own check)."""

    def __init__(self) -> None:
        super().__init__()
        self.malformed: list[str] = []


def parse_results(verdict: bytes, n: int) -> Results:
    """index -> JSON text of result lines `i json`; only the first line for each index counts.

    Bounded whatever the child wrote: an honest child writes `L`, n result lines and `D n`, so only
    the first n + 2 lines are read; an index has at most as many digits as n - 1; a line longer than
    plain.MAX_TEXT, an index out of range or a line without a body is recorded in `malformed`. A last
    line with no newline (cut off) is ignored. Never raises for any bytes."""
    out = Results()
    width = len(str(max(n - 1, 0)))
    pos, end, seen = 0, len(verdict), 0
    while pos < end and seen < n + 2:
        nl = verdict.find(b"\n", pos)
        if nl < 0:
            if end - pos:
                out.malformed.append("unterminated last line")
            break
        start, pos, seen = pos, nl + 1, seen + 1
        sp = verdict.find(b" ", start, min(nl, start + width + 1))
        if sp < 0:
            if verdict[start:start + 1].isdigit():
                out.malformed.append(f"line {seen}: no body or index over {width} digits")
            continue  # `L`, `D n` and other non-result lines
        head = verdict[start:sp]
        if not head.isdigit():
            continue
        if nl - sp - 1 > plain.MAX_TEXT or nl == sp + 1:
            out.malformed.append(f"line {seen}: body of {nl - sp - 1} bytes")
            continue
        i = int(head)
        if i >= n:
            out.malformed.append(f"line {seen}: index {i} >= {n}")
        elif i not in out:
            out[i] = verdict[sp + 1:nl]
    if pos < end and seen >= n + 2:
        out.malformed.append(f"{end - pos} bytes after the last expected line")
    return out


def decode(text: bytes | None) -> tuple[object, bool] | None:
    """(value, opaque) for one result line, or None when it is missing, not a valid encoding or
    over the bounds of plain.loads. Never raises."""
    if text is None:
        return None
    try:
        return plain.loads(text)
    except (ValueError, TypeError, RecursionError, MemoryError, OverflowError):
        return None


@dataclasses.dataclass
class Outcome:
    passed: int = 0
    unsupported: int = 0  # asserts of a shape the judge does not take, or whose expected side failed
    missing: int = 0  # program-side results that never arrived
    malformed: int = 0  # program-side results refused (not a valid encoding, over a bound)


def judge(split: Split, results: dict[int, bytes], expected: list[tuple[object, bool] | None]) -> Outcome:
    """Count the asserts that hold on the decoded values. Each program value is decoded when its
    assert is judged and dropped after it (each is used by one assert): memory stays one value's."""
    out = Outcome()
    for plan in split.plans:
        if plan.kind == "unsupported":
            out.unsupported += 1
            continue
        values, ok = [], True
        for side, idx in plan.operands:
            if side == "e":
                got = expected[idx] if idx < len(expected) else None
                if got is None or got[1]:  # the problem's own expected side raised or is not plain data
                    out.unsupported += 1
                    ok = False
                    break
            else:
                got = decode(results.get(idx))
                if got is None:
                    if idx in results:
                        out.malformed += 1
                    else:
                        out.missing += 1
                    ok = False
                    break
                if got[1]:  # the program's value is not plain data (or it raised): fails
                    ok = False
                    break
            values.append(got[0])
        if ok and _holds(plan, values):
            out.passed += 1
        del values
    return out


def _holds(plan: Plan, values: list) -> bool:
    try:
        if plan.kind == "truth":
            result = bool(values[0])
        else:
            result = all(bool(_APPLY[op](a, b)) for op, a, b in zip(plan.ops, values, values[1:]))
    except Exception:  # e.g. `<` between a list and an int: the assert would have raised
        return False
    return result != plan.negate
