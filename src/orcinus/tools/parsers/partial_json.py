"""A growing JSON text read as far as it goes: which values are complete, and what the part that
is written says for certain. Tool calls are streamed from it: `dumps_prefix` is a prefix of
`json.dumps(final value, ensure_ascii=False)` (what the parsers send as arguments) for every
valid continuation of the text, so argument fragments concatenate to the final string.

Complete values are decoded by json's C scanner; only the open containers along the end of the
text are walked here, so reading a text again after each token stays cheap."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

_DECODER = json.JSONDecoder()
_WS = " \t\n\r"
_NUMBER_GOES_ON = set("0123456789.eE+-")
# permissive on purpose: calling a broken number "incomplete" only delays a decision
_NUMBER_PREFIX = re.compile(r"-?\d*\.?\d*(?:[eE][-+]?\d*)?")
_LITERALS = ("true", "false", "null", "NaN", "Infinity", "-Infinity")
_HEX = set("0123456789abcdefABCDEF")
MAX_DEPTH = 200  # deeper, this reader gives up (TooDeep) and the finished text decides


class Invalid(ValueError):
    """No continuation makes this text valid JSON."""


class TooDeep(Exception):
    """Nested deeper than this reader follows: nothing can be said before the text is finished."""


@dataclass
class Node:
    kind: str  # "object" | "array" | "string" | "scalar"
    complete: bool
    value: Any = None  # complete: the decoded value; an open string: its decoded prefix
    end: int = 0  # complete: the index just after the value
    # open object: (key, value node or None before the value starts); open array: nodes
    children: list = field(default_factory=list)
    key: str | None = None  # open object: the decoded prefix of a key being written
    comma: bool = False  # open container: the text ends after a ',' (another member follows)

    def member(self, key: str) -> tuple[bool, Node | None]:
        """(present, value node) of an open object's first member named key."""
        for k, child in self.children:
            if k == key:
                return True, child
        return False, None


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def parse(text: str, i: int, depth: int = 0) -> Node | None:
    """The value starting at text[i:] (after blanks); None when the text ends before it starts.
    Raises Invalid when no continuation can make it valid."""
    if depth > MAX_DEPTH:
        raise TooDeep()
    i = skip_ws(text, i)
    if i == len(text):
        return None
    c = text[i]
    try:
        value, end = _DECODER.raw_decode(text, i)
    except RecursionError:
        raise TooDeep() from None
    except ValueError:
        pass  # open (or invalid): read below
    else:
        if not _is_number(value) or (end < len(text) and text[end] not in _NUMBER_GOES_ON):
            kind = "object" if c == "{" else "array" if c == "[" else "string" if c == '"' else "scalar"
            return Node(kind, True, value, end)
        # a number at the end of the text (or followed by '.', 'e', ...) may go on
    if c == "{":
        return _object(text, i, depth)
    if c == "[":
        return _array(text, i, depth)
    if c == '"':
        return Node("string", False, _open_string(text, i))
    rest = text[i:]
    if _NUMBER_PREFIX.fullmatch(rest) or any(lit.startswith(rest) for lit in _LITERALS):
        return Node("scalar", False)
    raise Invalid(f"not JSON at {i}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value \
        and value not in (float("inf"), float("-inf"))


def _open_string(text: str, i: int) -> str:
    """The decoded prefix of a string that the text ends inside (raw_decode failed on it)."""
    body = text[i + 1:len(text) - _cut_escape(text)]
    try:
        decoded = json.loads('"' + body + '"')
    except ValueError:  # a closing quote after invalid content, a bad escape, a control character
        raise Invalid(f"bad string at {i}") from None
    if decoded and "\ud800" <= decoded[-1] <= "\udbff":
        decoded = decoded[:-1]  # a \u escape of a high surrogate: its pair may follow
    return decoded


def _cut_escape(text: str) -> int:
    """Length of an escape cut short at the end of text ('\\', '\\u0', ...): it waits for the rest."""
    n = len(text)
    start = n
    while start > n - 3 and start > 0 and text[start - 1] in _HEX:  # up to 3 hex digits of a \uXXXX
        start -= 1
    if start > 0 and text[start - 1] == "u":
        start -= 1
    elif start < n:  # digits not after a 'u': only a lone backslash can be cut
        start = n
    backslashes = start
    while backslashes > 0 and text[backslashes - 1] == "\\":
        backslashes -= 1
    if (start - backslashes) % 2 == 1:  # the last backslash is not itself escaped: an escape begins there
        return n - start + 1
    return 0


def _object(text: str, i: int, depth: int) -> Node:
    node = Node("object", False)
    j = skip_ws(text, i + 1)
    while j < len(text):
        if text[j] != '"':
            raise Invalid(f"expected a key at {j}")
        try:
            key, j = _DECODER.raw_decode(text, j)
        except ValueError:
            node.key = _open_string(text, j)
            return node
        j = skip_ws(text, j)
        if j == len(text):
            node.children.append((key, None))
            return node
        if text[j] != ":":
            raise Invalid(f"expected ':' at {j}")
        child = parse(text, j + 1, depth + 1)
        node.children.append((key, child))
        if child is None or not child.complete:
            return node
        j = _after_member(text, child.end, "}")
        if j == len(text):
            node.comma = text[skip_ws(text, child.end):].startswith(",")
            return node
    return node


def _array(text: str, i: int, depth: int) -> Node:
    node = Node("array", False)
    j = skip_ws(text, i + 1)
    while j < len(text):
        child = parse(text, j, depth + 1)
        if child is None:
            return node
        node.children.append(child)
        if not child.complete:
            return node
        j = _after_member(text, child.end, "]")
        if j == len(text):
            node.comma = text[skip_ws(text, child.end):].startswith(",")
            return node
    return node


def _after_member(text: str, j: int, close: str) -> int:
    """Where the next member starts after a complete one (len(text) when the text ends first)."""
    j = skip_ws(text, j)
    if j == len(text):
        return j
    if text[j] != ",":
        # a closing bracket here would have made the container complete for raw_decode
        raise Invalid(f"expected ',' or {close!r} at {j}")
    return skip_ws(text, j + 1)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def dumps_prefix(node: Node | None) -> str:
    """What json.dumps(ensure_ascii=False) of the finished value certainly starts with."""
    if node is None or node.kind == "scalar" and not node.complete:
        return ""
    if node.complete:
        return _dumps(node.value)
    if node.kind == "string":
        return _dumps(node.value)[:-1]
    out = "{" if node.kind == "object" else "["
    for k, child in enumerate(node.children):
        if k:
            out += ", "
        if node.kind == "object":
            key, child = child
            out += _dumps(key) + ": "
        if child is None or not child.complete:
            return out + dumps_prefix(child)
        out += _dumps(child.value)
    if node.key is not None:
        out += (", " if node.children else "") + _dumps(node.key)[:-1]
    elif node.comma:
        out += ", "
    return out
