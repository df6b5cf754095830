"""Plain data on the wire: the only form in which a sandboxed child reports a value to the judge.

Standard library only (it ships into the fork server next to untrusted code).

The child turns each result into one line of JSON with `dumps`; the grader turns the text back
with `loads`, which can only ever build builtin values (int, float, complex, bool, str, bytes,
None, list, tuple, dict, set, frozenset, deque, Counter, OrderedDict, defaultdict) plus two markers
whose equality is fixed here: `Node` (a linked list or binary tree, by value: level order, like
LeetCode's own notation) and `Opaque` (anything else: an object of the program's own class, an
exception, a value too deep to write). So whatever text the child writes, a comparison made on the
decoded value can only succeed if the text encodes the right answer.

Encoding: JSON scalars, arrays and strings stand for themselves (ints beyond ~300 digits and all
other types are one-key objects: {"t": [...]} tuple, {"s": [...]} set, {"f": [...]} frozenset,
{"d": [[k, v], ...]} dict, {"C"|"O"|"D": ...} Counter / OrderedDict / defaultdict, {"q": [...]}
deque, {"c": [re, im]} complex, {"b": hex} bytes, {"i": hex} int, {"L": [vals]} linked list,
{"T": [level order]} tree, {"x": type name} opaque, {"e": exception name} raised).
"""
from __future__ import annotations

import collections
import json

MAX_DEPTH = 100
MAX_NODES = 1 << 22  # list / tree nodes walked per value
# Grader-side bounds on one value's text (loads refuses more, so decoding work and memory stay
# bounded whatever a child writes): bytes, containers ([ and {, counted in strings too), the
# estimated decoded size, and keys or members sharing one hash (a dict of N colliding keys costs
# N^2). Nesting depth is bounded by the decoder's recursion limit (RecursionError).
MAX_TEXT = 4 << 20
MAX_CONTAINERS = 1 << 18
MAX_DECODED_BYTES = 64 << 20
MAX_SHARED_HASHES = 32
_BIG_BITS = 1000  # ints wider than this travel as hex (JSON decoding caps decimal ints at 4300 digits)

_Counter, _OrderedDict, _defaultdict, _deque = (collections.Counter, collections.OrderedDict,
                                                collections.defaultdict, collections.deque)
_json_dumps = json.dumps  # bound now: a program that patches json.dumps changes nothing here


class _TooDeep(Exception):
    pass


def _node_kind(x) -> str:
    """'L' for a linked-list node (val, next), 'T' for a tree node (val, left, right), else ''."""
    try:
        if hasattr(x, "val"):
            if hasattr(x, "left") and hasattr(x, "right"):
                return "T"
            if hasattr(x, "next"):
                return "L"
    except Exception:
        pass
    return ""


def to_wire(x, depth: int = 0):
    """x as a JSON-able structure (see module doc). Exact types only: a subclass is opaque."""
    if depth > MAX_DEPTH:
        raise _TooDeep
    t = type(x)
    if t is int:
        return x if x.bit_length() <= _BIG_BITS else {"i": format(x, "x")}
    if t is str or t is float or t is bool or x is None:
        return x
    d = depth + 1
    if t is list:
        return [to_wire(v, d) for v in x]
    if t is tuple:
        return {"t": [to_wire(v, d) for v in x]}
    if t is dict:
        return {"d": [[to_wire(k, d), to_wire(v, d)] for k, v in x.items()]}
    if t is set:
        return {"s": [to_wire(v, d) for v in x]}
    if t is frozenset:
        return {"f": [to_wire(v, d) for v in x]}
    if t is bytes:
        return {"b": x.hex()}
    if t is complex:
        return {"c": [x.real, x.imag]}
    if t is _deque:
        return {"q": [to_wire(v, d) for v in x]}
    if t is _Counter or t is _OrderedDict or t is _defaultdict:
        tag = "C" if t is _Counter else "O" if t is _OrderedDict else "D"
        return {tag: [[to_wire(k, d), to_wire(v, d)] for k, v in x.items()]}
    kind = _node_kind(x)
    if kind == "L":
        return {"L": _walk_list(x, d)}
    if kind == "T":
        return {"T": _walk_tree(x, d)}
    return {"x": t.__name__ if isinstance(t.__name__, str) else "?"}


def _walk_list(node, depth: int) -> list:
    out, seen = [], set()
    while node is not None:
        if id(node) in seen or len(out) >= MAX_NODES:
            raise _TooDeep  # a cycle (is_same_list would recurse forever) or absurdly long
        seen.add(id(node))
        out.append(to_wire(node.val, depth))
        node = node.next
    return out


def _walk_tree(root, depth: int) -> list:
    """Level order with None for a missing child, trailing Nones dropped (LeetCode's notation):
    two trees have the same list exactly when they have the same shape and values."""
    out, seen = [], set()
    queue = _deque([root])
    while queue:
        node = queue.popleft()
        if node is None:
            out.append(None)
            continue
        if id(node) in seen or len(seen) >= MAX_NODES:
            raise _TooDeep
        seen.add(id(node))
        out.append(to_wire(node.val, depth))
        queue.append(node.left)
        queue.append(node.right)
    while out and out[-1] is None:
        out.pop()
    return out


def dumps(x) -> str:
    """One line of JSON for x; a value that cannot be written becomes an opaque marker."""
    try:
        return _json_dumps(to_wire(x), separators=(",", ":"))
    except BaseException:  # too deep, a cycle, the program's own __getattr__ raising, ...
        return '{"x":"unwritable"}'


def dumps_raised(exc: BaseException) -> str:
    try:
        name = type(exc).__name__
        name = name if isinstance(name, str) else "?"
    except BaseException:
        name = "?"
    return _json_dumps({"e": name})


# ---------------------------------------------------------------- grader side
class Opaque:
    """A value the child could not express as plain data (or an exception): equal to nothing."""

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __eq__(self, other) -> bool:
        return False

    def __ne__(self, other) -> bool:
        return True

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"Opaque({self.what!r})"


class Node:
    """A linked list ('L') or binary tree ('T') by value; equal only to the same kind and values."""

    __slots__ = ("kind", "data")

    def __init__(self, kind: str, data: tuple) -> None:
        self.kind, self.data = kind, data

    def __eq__(self, other) -> bool:
        return type(other) is Node and self.kind == other.kind and self.data == other.data

    def __ne__(self, other) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:
        return hash((self.kind, self.data))

    def __repr__(self) -> str:
        return f"Node({self.kind!r}, {list(self.data)!r})"


def _list(v) -> list:
    if type(v) is not list:
        raise ValueError("tag payload must be a list")
    return v


def _pairs(v) -> list:
    v = _list(v)
    for p in v:
        if type(p) is not list or len(p) != 2:
            raise ValueError("mapping entries must be [key, value] pairs")
    return v


def _float(v) -> float:
    if type(v) not in (int, float):
        raise ValueError("complex parts must be numbers")
    return float(v)


def _str(v) -> str:
    if type(v) is not str:
        raise ValueError("tag payload must be a string")
    return v


def decoded_size_bound(text: bytes) -> int:
    """An upper bound of the memory decoding `text` takes: ~16 bytes per byte of scalars (a
    5-byte `"ab",` is a 59-byte str plus an 8-byte slot) and ~256 per container."""
    return 16 * len(text) + 256 * (text.count(b"[") + text.count(b"{"))


def _check_hashes(keys: list) -> None:
    """Refuse a mapping or set whose keys pile up on few hash values (an int k and k + 2**61 - 1
    hash alike, so an attacker can make every insertion walk all earlier ones)."""
    if len(keys) > MAX_SHARED_HASHES and len(keys) - len({hash(k) for k in keys}) > MAX_SHARED_HASHES:
        raise ValueError("keys share too many hash values")


def loads(text: str | bytes) -> tuple[object, bool]:
    """(value, opaque): the decoded value and whether any part of it is an Opaque marker.

    Raises ValueError (or RecursionError / TypeError) for text that is not a valid encoding or
    exceeds the bounds above."""
    data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else bytes(text)
    if len(data) > MAX_TEXT:
        raise ValueError(f"value of {len(data)} bytes (max {MAX_TEXT})")
    if data.count(b"[") + data.count(b"{") > MAX_CONTAINERS:
        raise ValueError(f"more than {MAX_CONTAINERS} containers")
    if decoded_size_bound(data) > MAX_DECODED_BYTES:
        raise ValueError(f"decodes to more than {MAX_DECODED_BYTES >> 20} MiB")
    seen_opaque = []

    def hook(obj: dict):
        if len(obj) != 1:
            raise ValueError("a tagged value has exactly one key")
        (tag, v), = obj.items()
        if tag == "t":
            return tuple(_list(v))
        if tag in ("d", "C", "O", "D"):
            _check_hashes([p[0] for p in _pairs(v)])
        elif tag in ("s", "f"):
            _check_hashes(_list(v))
        if tag == "d":
            return dict((k, x) for k, x in _pairs(v))
        if tag == "s":
            return set(_list(v))
        if tag == "f":
            return frozenset(_list(v))
        if tag == "q":
            return _deque(_list(v))
        if tag == "C":
            return _Counter(dict((k, x) for k, x in _pairs(v)))
        if tag == "O":
            return _OrderedDict((k, x) for k, x in _pairs(v))
        if tag == "D":
            return _defaultdict(None, ((k, x) for k, x in _pairs(v)))
        if tag == "c":
            re_im = _list(v)
            if len(re_im) != 2:
                raise ValueError("complex needs [re, im]")
            return complex(_float(re_im[0]), _float(re_im[1]))
        if tag == "b":
            return bytes.fromhex(_str(v))
        if tag == "i":
            return int(_str(v), 16)
        if tag in ("L", "T"):
            return Node(tag, tuple(_list(v)))
        if tag in ("x", "e"):
            seen_opaque.append(True)
            return Opaque(("raised " if tag == "e" else "") + str(v)[:80])
        raise ValueError(f"unknown tag {tag[:20]!r}")

    value = json.loads(data, object_hook=hook)
    return value, bool(seen_opaque)
