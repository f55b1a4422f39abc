"""The tolerant parser's syntax-tree node, shared helpers, recovery exceptions and token sets.

See :mod:`eval.tolerant_parser` for what the trees mirror (tree-sitter-python) and why.
"""
from __future__ import annotations

from typing import Optional

_STMT_KEYWORDS = frozenset(
    "import from return pass break continue raise del global nonlocal assert if for while def "
    "class with try async".split()
)
_AUG_ASSIGN = frozenset("+= -= *= /= //= %= **= >>= <<= &= ^= |= @=".split())
_COMPARE = frozenset("< > == >= <= != <> in not is".split())
_CLOSERS = {"(": ")", "[": "]", "{": "}"}


class Node:
    """A syntax-tree node (or token): its type, source span and children."""

    __slots__ = ("type", "start", "end", "children")

    def __init__(self, type: str, start: int, end: int, children: Optional[list] = None):
        self.type = type
        self.start = start
        self.end = end
        self.children = children if children is not None else []

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Node({self.type!r}, {self.start}, {self.end}, {len(self.children)} children)"


def _span(type: str, children: list) -> Node:
    """A node covering its children. Error tokens skipped inside a child can be placed after it
    (``@x\b&``), so the span is the children's extent, not first start to last end."""
    return Node(type, min(c.start for c in children), max(c.end for c in children), children)


def _is_statement(group: list) -> bool:
    return bool(group) and bool(group[-1].children) and group[-1].type != "ERROR"


def _unwrap_closers(pieces: list) -> list:
    """Inside a broken line, a stray closing bracket is a plain token, not an ERROR of its own."""
    return [p.children[0] if p.type == "ERROR" and len(p.children) == 1 and p.children[0].type in (")", "]", "}")
            else p for p in pieces]


def _as_pattern(node: Node) -> Node:
    """An unparenthesised ``a, b`` on the left of ``=`` or after ``for`` is a pattern_list."""
    if node.type == "expression_list":
        node.type = "pattern_list"
    return node


class _Broken(Exception):
    """A bracket that was never (or wrongly) closed: the flattened pieces of its statement."""

    def __init__(self, pieces: list):
        super().__init__("unclosed bracket")
        self.pieces = pieces


class _TooDeep(Exception):
    pass


class _Unclosed(_Broken):
    """An inner bracket met an enclosing bracket's closer: it becomes an ERROR in that list.

    ``pieces`` collects what came before the bracket (as for :class:`_Broken`); ``inner`` is
    the bracket's own children.
    """

    def __init__(self, inner: list):
        super().__init__([])
        self.inner = inner


_NO_START = frozenset(") ] } , : ; = . -> += -= *= /= //= %= **= >>= <<= &= ^= |= @= := == != <= >= <> < > | ^ & << >> / // % @ **".split())
_EXPR_KEYWORDS = frozenset(("not", "lambda", "await", "True", "False", "None", "yield"))
_LITERALS = {"True": "true", "False": "false", "None": "none"}
