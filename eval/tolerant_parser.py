"""An error-tolerant Python parser that builds tree-sitter-python-shaped syntax trees.

Gorilla's AST evaluation (``gorilla/eval/eval-scripts/ast_eval_{hf,tf,th}.py``) parses model
output with tree-sitter's Python grammar and then looks only at a few properties of the tree:
which nodes have children, the source text of each node, and the source text of each node's
first child. This module rebuilds exactly those properties in pure Python, without a compiled
grammar and without ever executing the text: a tolerant tokenizer and a recursive-descent
parser whose node types, nesting and spans follow tree-sitter-python's (the 2023 grammar that
Gorilla's ``codebleu/parser`` used; strings have the anonymous ``"`` start/end children and no
``string_content`` node).

Every input, however malformed, yields a tree: the parser never raises on text and never
recurses deeper than ``Parser.MAX_NESTING`` levels (a statement nested deeper is kept as one flat
ERROR node: tree-sitter would keep its structure; model output never nests that deep).

How tree-sitter and Python's view of the code differ, and how this parser matches tree-sitter
------------------------------------------------------------------------------------------------
Python's ``ast`` rejects the whole input at its first error; tree-sitter keeps going, puts what
it cannot place into ``ERROR`` nodes, and its trees differ from ``ast``'s even on valid code.
Each rule below was established by running tree-sitter-python on the same inputs (the test
file ``tests/test_ast_match.py`` holds tree-sitter's trees for them).

Valid code:

* Parentheses are nodes (``parenthesized_expression``, ``tuple``); ``ast`` drops them. Kept.
* ``keyword_argument`` (name, ``=``, value); ``call(function, argument_list)``; ``attribute(a,
  ".", b)``; one flat ``comparison_operator`` for ``a < b < c``; ``pattern_list`` on the left of
  ``a, b = ...``, ``expression_list`` on the right, and no wrapper for ``a, b`` as a statement;
  ``type`` around annotations; ``dotted_name`` in imports. Mirrored.
* Strings have children (quote tokens, ``escape_sequence``, f-string ``interpolation``);
  adjacent strings form a ``concatenated_string``. Mirrored.
* tree-sitter's scanner emits a NEWLINE only where a statement can end: ``x = a.`` + newline +
  ``b`` is one attribute. Same here (:mod:`eval.tolerant_tokenizer`).

Text that is not valid Python (what models write):

* An unterminated string (``"model = torch.hub.load(...)`` in TorchHub's dict layout, escaped
  quotes ``\\'x\\'``): the lone quote becomes an ``ERROR`` node and the rest is parsed as code.
* Outside strings a backslash vanishes and the next character is an ``ERROR`` leaf: a literal
  ``\\n`` between statements gives an error ``n``, not an identifier ``nmodel``. ``$``, ``?``
  and backticks are error leaves too. ``.4`` after an expression is a dot and a number.
* Recovery after an error leaf: in an assignment the value before it is wrapped in an ERROR
  and a new value follows (``a = f(x)\\nb = g(y)`` is ``a = ERROR(f(x) n) b = g(y)``, a chained
  assignment); in an import the names after it are skipped up to the next name that can end
  the import (``import torch\\nmodel = torch.hub.load('a')`` imports ``torch.hub.load`` and
  leaves ``('a')`` as a statement: no call node).
* Junk between an expression and its trailer is skipped when it is shorter than the expression
  (tree-sitter's recovery cost counts skipped characters): ``embed  hub.load(x)`` is
  ``attribute(embed ERROR(hub) . load)``, ``f(x) g(y)`` is ``call(call(f(x)) ERROR(g) (y))``,
  but in ``the pipeline('a')`` the longer ``pipeline`` is kept and ``the`` becomes the ERROR.
* Juxtaposed pieces on a line (prose): all but the last are wrapped in one ERROR and the last
  is the statement; when the last piece is no statement (a stray ``)`` after a call, an error
  leaf), the whole line is that ERROR.
* An unclosed bracket at the end of the text: the whole statement becomes one ERROR whose
  children are the statement's pieces, flattened along the path to the bracket (``model``,
  ``=``, the function, ``(``, the arguments so far). An unclosed bracket inside a closed one
  (``f(a, b[c)``) becomes an ERROR child of the outer list; a stray closer inside a list
  (``f(a], b)``) is an ERROR child and the list goes on.

Known divergences (measured on 24,990 responses: the three hubs' reference outputs and six
seeded mutations of each, verdicts compared with Gorilla's procedure on tree-sitter; 53
differ, 0.21%, while two tree-sitter versions differ from each other on 5): long English prose
(tree-sitter builds binary operators across words and keeps ``from``/``import`` as plain tokens
mid-sentence; here statements start at those keywords), random junk characters inside names,
and an unterminated string whose content is full of escape sequences (tree-sitter keeps it as
one ERROR string, here its quote is dropped). Statements nested deeper than ``MAX_NESTING``
are kept flat. None of these occur in well-formed model output.
"""
from __future__ import annotations

from typing import Optional

from eval.tolerant_expressions import ExpressionRules
from eval.tolerant_nodes import (_AUG_ASSIGN, _EXPR_KEYWORDS, _LITERALS, _NO_START, _STMT_KEYWORDS,
                                 Node, _as_pattern, _Broken, _is_statement, _span, _TooDeep,
                                 _unwrap_closers)
from eval.tolerant_tokenizer import _ERROR_KINDS, KEYWORDS, Token, tokenize

__all__ = ["Node", "Parser", "parse"]


class Parser(ExpressionRules):
    """Recursive descent over :func:`tokenize`'s tokens, building tree-sitter-shaped nodes."""

    MAX_NESTING = 40  # expressions/brackets/blocks deep; a deeper statement is kept flat

    def __init__(self, src: str, start: int = 0, end: Optional[int] = None):
        self.src = src
        self.toks = tokenize(src, start, end)
        self.pos = 0
        self.nesting = 0
        self.open: list = []  # closers of the brackets being parsed, innermost last
        self.pending: list = []  # ERROR nodes for lone quotes, placed before the next child
        self.start = start
        self.end = len(src) if end is None else end

    # -- token helpers
    @property
    def tok(self) -> Token:
        return self.toks[self.pos]

    def _peek(self, k: int = 1) -> Token:
        return self.toks[min(self.pos + k, len(self.toks) - 1)]

    def _is(self, value: str) -> bool:
        t = self.toks[self.pos]
        return t.kind == "OP" and t.value == value

    def _is_kw(self, value: str) -> bool:
        t = self.toks[self.pos]
        return t.kind == "NAME" and t.value == value

    def _leaf(self) -> Node:
        t = self.toks[self.pos]
        if t.kind == "EOF":  # never consumed: a zero-width placeholder (only on broken input)
            return Node("MISSING", t.start, t.start)
        self.pos += 1
        if t.kind == "STRING":
            return self._string_node(t)
        if t.kind == "NAME":
            if t.value in _LITERALS:
                return Node(_LITERALS[t.value], t.start, t.end)
            return Node("identifier" if t.value not in KEYWORDS else t.value, t.start, t.end)
        if t.kind == "NUMBER":
            v = t.value.lower()
            is_float = ("." in v or ("e" in v and not v.startswith("0x"))) and not v.startswith(("0x", "0b", "0o"))
            return Node("float" if is_float or v.endswith("j") and "." in v else "integer", t.start, t.end)
        return Node(t.value, t.start, t.end)

    def _string_node(self, t: Token) -> Node:
        """tree-sitter's string: quote tokens, escape sequences, f-string interpolations."""
        prefix = len(t.value) - len(t.value.lstrip("rRbBuUfF"))
        children = [Node('"', t.start, t.start + prefix + t.quote_len)]
        for a, b, kind in t.parts:
            if kind == "interpolation":
                inner = Parser(self.src, a + 1, b - 1).parse_fragment()
                children.append(Node("interpolation", a, b, [Node("{", a, a + 1)] + inner + [Node("}", b - 1, b)]))
            else:
                children.append(Node("escape_sequence", a, b))
        children.append(Node('"', t.end - t.quote_len, t.end))
        return Node("string", t.start, t.end, children)

    def _error_token(self, statement_level: bool = False) -> Node:
        """An error token as tree-sitter shapes it: a lone quote is an ERROR holding the quote; an
        escaped character is a bare ERROR leaf at statement level, else wrapped in an ERROR."""
        t = self.toks[self.pos]
        self.pos += 1
        if t.kind == "EQUOTE":
            return Node("ERROR", t.start, t.end, [Node('"', t.start, t.end)])
        leaf = Node("ERROR", t.start, t.end)
        return leaf if statement_level else Node("ERROR", t.start, t.end, [leaf])

    def _skip_errors(self) -> None:
        while self.toks[self.pos].kind in _ERROR_KINDS:
            self.pending.append(self._error_token())

    def _lead(self, children: list) -> None:
        """Lone-quote ERROR tokens before the next child belong to the node being built."""
        self._skip_errors()
        self._flush(children)

    def _add(self, children: list, node: Node) -> None:
        if self.pending:
            children.extend(self.pending)
            self.pending = []
        children.append(node)

    def _at_line_end(self) -> bool:
        t = self.toks[self.pos]
        return t.kind in ("NEWLINE", "EOF") or (t.kind == "OP" and t.value == ";")

    # -- entry points
    def parse_module(self) -> Node:
        body = self._statements(block_indent=-1)
        while self.tok.kind != "EOF":  # stray dedent-level junk cannot remain, but be safe
            self.pos += 1
        self._flush(body)
        return Node("module", self.start, self.end, body)

    def parse_fragment(self) -> list:
        """The expression(s) of an f-string interpolation."""
        out: list = []
        try:
            while self.tok.kind != "EOF":
                if self.tok.kind in ("NEWLINE",) or self._starts_nothing():
                    self._add(out, self._leaf())
                    continue
                self._add(out, self._expression_list(allow_star=True))
        except _Broken as b:
            out.append(_span("ERROR", b.pieces))
        except _TooDeep:
            out.extend(self._flat_rest())
        self._flush(out)
        return out

    def _flush(self, out: list) -> None:
        if self.pending:
            out.extend(self.pending)
            self.pending = []

    def _flat_rest(self, stop_at_newline: bool = False) -> list:
        rest = []
        while self.tok.kind != "EOF" and not (stop_at_newline and self.tok.kind == "NEWLINE"):
            rest.append(self._error_token() if self.tok.kind in _ERROR_KINDS else self._leaf())
        return rest

    # -- statements
    def _statements(self, block_indent: int) -> list:
        out: list = []
        while True:
            t = self.tok
            if t.kind == "EOF":
                break
            if t.kind == "NEWLINE" or (t.kind == "OP" and t.value == ";"):
                self.pos += 1
                continue
            if block_indent >= 0 and t.line_start and t.indent <= block_indent:
                break
            out.extend(self._statement_line())
        return out

    def _statement_line(self) -> list:
        """The statements of one logical line, with tree-sitter's recovery for extra pieces.

        When several pieces are juxtaposed, all but the last are wrapped in one ERROR
        (single-child expression statements and escaped characters unwrapped); if the last
        piece is no statement (a stray ``)``, an error token) or a bracket broke, the whole line
        is that ERROR. Error tokens that open a line which then holds a statement stand alone.
        An import statement closes a group: what follows it starts afresh.
        """
        out: list = []
        lead: list = []
        while self.tok.kind in _ERROR_KINDS:
            lead.append([self._error_token(statement_level=self.tok.kind == "EQUOTE")])
        pieces: list = []
        broken = False
        while not self._at_line_end() and not (self.tok.line_start and (pieces or out)):
            group, broken = self._guarded_statement()
            if group and group[-1].type in ("import_statement", "import_from_statement"):
                out.extend(self._merge(lead + pieces, group, broken=False))
                lead, pieces = [], []
                continue
            pieces.append(group)
            if broken:
                break
        if not pieces:
            return out + self._merge(lead[:-1], lead[-1], False) if lead else out
        if lead and not broken and _is_statement(pieces[-1]) and len(pieces) == 1:
            return out + [g[0] for g in lead] + pieces[0]
        return out + self._merge(lead + pieces[:-1], pieces[-1], broken)

    @staticmethod
    def _merge(before: list, last: list, broken: bool) -> list:
        if not before and not broken:
            return last
        whole = broken or not _is_statement(last)
        flat: list = []
        for group in before + ([last] if whole else []):
            for node in group:
                if node.type == "expression_statement" and len(node.children) == 1:
                    flat.append(node.children[0])
                elif node.type == "ERROR" and len(node.children) == 1 and node.children[0].type == "ERROR":
                    flat.append(node.children[0])  # an escaped character: a bare error leaf
                elif broken and node is group[-1] and group is last:
                    flat.extend(node.children)  # the broken line's own ERROR: one level
                else:
                    flat.append(node)
        if not flat:
            return last
        return [_span("ERROR", flat)] if whole else [_span("ERROR", flat)] + last

    def _guarded_statement(self):
        """(nodes, broken): one statement, or the ERROR pieces of a line with a broken bracket."""
        start, nesting, n_open = self.pos, self.nesting, len(self.open)
        try:
            nodes = self._statement()
        except _Broken as b:
            self._flush(b.pieces)
            return [_span("ERROR", _unwrap_closers(b.pieces))], True
        except _TooDeep:
            self.pos = start
            self.pending = []
            del self.open[n_open:]
            self.nesting = nesting
            return [_span("ERROR", self._flat_rest(stop_at_newline=True) or [self._leaf()])], True
        self._flush(nodes)
        return nodes, False

    def _starts_nothing(self) -> bool:
        t = self.tok
        if t.kind == "OP":
            return t.value in _NO_START
        if t.kind == "NAME":
            return t.value in KEYWORDS and t.value not in _EXPR_KEYWORDS and t.value not in _STMT_KEYWORDS
        return False

    def _statement(self) -> list:
        t = self.tok
        if t.kind in _ERROR_KINDS:
            return [self._error_token()]
        if t.kind in ("NEWLINE", "EOF"):
            return []
        if t.kind == "NAME" and t.value in _STMT_KEYWORDS:
            return [self._keyword_statement(t.value)]
        if t.kind == "OP" and t.value == "@":
            return [self._decorated()]
        if self._starts_nothing():
            return [self._leaf()]
        return [self._expression_statement()]

    def _expression_statement(self) -> Node:
        children: list = []
        first = self._expression_list(allow_star=True)
        t = self.tok
        if t.kind == "OP" and (t.value == "=" or t.value in _AUG_ASSIGN or t.value == ":") and self._can_start(1):
            return _span("expression_statement", [self._assignment(_as_pattern(first))])
        if first.type == "expression_list":  # `a, b` as a statement has no wrapper node
            children.extend(first.children)
        else:
            self._add(children, first)
        return _span("expression_statement", children)

    def _assignment(self, left: Node) -> Node:
        children = [left]
        op = self.tok.value
        try:
            if op == ":":
                self._add(children, self._leaf())
                self._add(children, _span("type", [self._expression()]))
                if not self._is("=") or not self._can_start(1):
                    return _span("assignment", children)
                op = "="
            self._add(children, self._leaf())
            self._lead(children)
            right = self._expression_list(allow_star=True)
            while True:
                if op == "=" and self.tok.kind == "OP" and (self.tok.value == "=" or self.tok.value in _AUG_ASSIGN) \
                        and self._can_start(1):
                    right = self._assignment(_as_pattern(right))
                    break
                k = 0
                while self._peek(k).kind == "ELEAF":
                    k += 1
                if not k or not self._can_start(k):
                    break
                # `a = f(x)\\nb = g(y)`: the value and the escape become an ERROR, a new value follows
                demoted = [right] + [self._error_token(statement_level=True) for _ in range(k)]
                children.append(_span("ERROR", demoted))
                self._lead(children)
                right = self._expression_list(allow_star=True)
        except _Broken as b:
            b.pieces[:0] = children
            raise
        self._add(children, right)
        return _span("assignment" if op == "=" else "augmented_assignment", children)

    def _keyword_statement(self, kw: str) -> Node:
        if kw == "import":
            return self._import()
        if kw == "from":
            return self._from_import()
        if kw in ("if", "while", "for", "def", "class", "with", "try", "async"):
            return self._compound(kw)
        kind = {
            "return": "return_statement", "pass": "pass_statement", "break": "break_statement",
            "continue": "continue_statement", "raise": "raise_statement", "del": "delete_statement",
            "global": "global_statement", "nonlocal": "nonlocal_statement", "assert": "assert_statement",
        }[kw]
        children = [self._leaf()]
        try:
            if not self._at_line_end() and not self._starts_nothing():
                self._add(children, self._expression_list(allow_star=True))
                if kw == "raise" and self._is_kw("from"):
                    self._add(children, self._leaf())
                    self._add(children, self._expression())
        except _Broken as b:
            b.pieces[:0] = children
            raise
        return _span(kind, children)

    def _dotted_name(self) -> Node:
        parts = [self._leaf()]
        while self._is(".") and self._peek().kind == "NAME":
            parts.append(self._leaf())
            parts.append(self._leaf())
        return _span("dotted_name", parts)

    def _import_names(self, children: list) -> None:
        junk: list = []
        while self.tok.kind == "NAME" and self.tok.value not in KEYWORDS:
            name = self._dotted_name()
            if self._is_kw("as") and self._peek().kind == "NAME":
                name = _span("aliased_import", [name, self._leaf(), self._leaf()])
            t = self.tok
            ok = self._is(",") or self._at_line_end() or (t.kind not in _ERROR_KINDS and self._can_start()
                                                          and not junk) or (junk and self._can_start() and not self._is("="))
            if not ok:
                # `import torch\\nmodel = torch.hub.load(...)`: tree-sitter skips to the next name
                junk.extend(name.children if name.type == "dotted_name" else [name])
                while not self._at_line_end() and not (self.tok.kind == "NAME" and self.tok.value not in KEYWORDS):
                    junk.append(self._error_token(statement_level=True) if self.tok.kind in _ERROR_KINDS else self._leaf())
                if self._at_line_end():
                    children.append(_span("ERROR", junk))
                    return
                continue
            if junk:
                children.append(_span("ERROR", junk))
                junk = []
            children.append(name)
            if not self._is(","):
                break
            children.append(self._leaf())
        if junk:
            children.append(_span("ERROR", junk))

    def _import(self) -> Node:
        children = [self._leaf()]
        self._import_names(children)
        return _span("import_statement", children)

    def _from_import(self) -> Node:
        children = [self._leaf()]
        if self._is(".") or self._is("..."):
            prefix = []
            while self._is(".") or self._is("..."):
                prefix.append(self._leaf())
            rel = [_span("import_prefix", prefix)]
            if self.tok.kind == "NAME" and self.tok.value not in KEYWORDS:
                rel.append(self._dotted_name())
            children.append(_span("relative_import", rel))
        elif self.tok.kind == "NAME" and self.tok.value not in KEYWORDS:
            children.append(self._dotted_name())
        if self._is_kw("import"):
            children.append(self._leaf())
            if self._is("*"):
                children.append(_span("wildcard_import", [self._leaf()]))
            elif self._is("("):
                children.append(self._leaf())
                self._import_names(children)
                if self._is(")"):
                    children.append(self._leaf())
            else:
                self._import_names(children)
        return _span("import_from_statement", children)

    def _block(self, header_indent: int) -> Node:
        if self.tok.kind == "NEWLINE":
            self.pos += 1
            body = self._statements(block_indent=header_indent)
        else:
            body = self._statement_line()
        self._flush(body)
        if not body:
            return Node("block", self.tok.start, self.tok.start, [])
        return _span("block", body)

    def _colon_block(self, children: list, indent: int) -> None:
        if self._is(":"):
            children.append(self._leaf())
            children.append(self._block(indent))

    def _clause(self, kind: str, indent: int, header: bool) -> Node:
        children = [self._leaf()]
        try:
            if header and not self._is(":"):
                self._add(children, self._expression_list(allow_star=True))
                if self._is_kw("as"):
                    children.append(self._leaf())
                    self._add(children, self._expression())
        except _Broken as b:
            b.pieces[:0] = children
            raise
        self._colon_block(children, indent)
        return _span(kind, children)

    def _compound(self, kw: str) -> Node:
        self._enter()
        node = self._compound_inner(kw)
        self.nesting -= 1
        return node

    def _compound_inner(self, kw: str) -> Node:
        indent = self.tok.indent
        if kw == "async":
            first = self._leaf()
            inner = self._compound(self.tok.value) if self.tok.value in ("def", "for", "with") else None
            return _span(inner.type, [first] + inner.children) if inner else first
        if kw in ("if", "while"):
            node = self._clause(kw + "_statement", indent, True)
            children = node.children
            while self.tok.kind == "NAME" and self.tok.value in ("elif", "else") and self.tok.indent == indent:
                kind = "elif_clause" if self.tok.value == "elif" else "else_clause"
                children.append(self._clause(kind, indent, kind == "elif_clause"))
            return _span(node.type, children)
        if kw == "try":
            children = self._clause("try_statement", indent, False).children
            while self.tok.kind == "NAME" and self.tok.value in ("except", "else", "finally") and self.tok.indent == indent:
                kind = {"except": "except_clause", "else": "else_clause", "finally": "finally_clause"}[self.tok.value]
                children.append(self._clause(kind, indent, kind == "except_clause"))
            return _span("try_statement", children)
        if kw == "for":
            children = [self._leaf()]
            try:
                self._add(children, _as_pattern(self._expression_list(allow_star=True, no_in=True)))
                if self._is_kw("in"):
                    children.append(self._leaf())
                    self._add(children, self._expression_list(allow_star=True))
            except _Broken as b:
                b.pieces[:0] = children
                raise
            self._colon_block(children, indent)
            while self._is_kw("else") and self.tok.indent == indent:
                children.append(self._clause("else_clause", indent, False))
            return _span("for_statement", children)
        if kw == "with":
            children = [self._leaf()]
            items = []
            try:
                while not self._is(":") and not self._at_line_end():
                    item = [self._expression()]
                    if self._is_kw("as"):
                        item.append(self._leaf())
                        item.append(self._expression())
                    self._add(items, _span("with_item", item))
                    if not self._is(","):
                        break
                    items.append(self._leaf())
            except _Broken as b:
                b.pieces[:0] = children + items
                raise
            if items:
                children.append(_span("with_clause", items))
            self._colon_block(children, indent)
            return _span("with_statement", children)
        # def / class
        children = [self._leaf()]
        if self.tok.kind == "NAME" and self.tok.value not in KEYWORDS:
            children.append(self._leaf())
        try:
            if self._is("("):
                if kw == "def":
                    children.append(self._parameters())
                else:
                    children.append(self._bracketed("(", "argument_list", self._argument))
            if kw == "def" and self._is("->"):
                children.append(self._leaf())
                self._add(children, _span("type", [self._expression()]))
        except _Broken as b:
            b.pieces[:0] = children
            raise
        self._colon_block(children, indent)
        return _span("function_definition" if kw == "def" else "class_definition", children)

    def _parameters(self) -> Node:
        return self._bracketed("(", "parameters", self._parameter)

    def _parameter(self) -> Node:
        if self._is("*") or self._is("**"):
            star = self._leaf()
            if self.tok.kind == "NAME" and self.tok.value not in KEYWORDS:
                kind = "list_splat_pattern" if star.type == "*" else "dictionary_splat_pattern"
                return _span(kind, [star, self._leaf()])
            return star
        if self._is("/"):
            return _span("positional_separator", [self._leaf()])
        if self.tok.kind != "NAME" or self.tok.value in KEYWORDS:
            return self._expression()
        name = self._leaf()
        if self._is(":"):
            node = _span("typed_parameter", [name, self._leaf(), _span("type", [self._expression()])])
            if self._is("="):
                return _span("typed_default_parameter", node.children + [self._leaf(), self._expression()])
            return node
        if self._is("="):
            return _span("default_parameter", [name, self._leaf(), self._expression()])
        return name

    def _decorated(self) -> Node:
        children = []
        while self._is("@"):
            at = self._leaf()
            try:
                children.append(_span("decorator", [at, self._expression()]))
            except _Broken as b:
                b.pieces[:0] = children + [at]
                raise
            while self.tok.kind == "NEWLINE":
                self.pos += 1
        if self.tok.kind == "NAME" and self.tok.value in ("def", "class", "async"):
            children.append(self._compound(self.tok.value))
        return _span("decorated_definition", children)


def parse(text: str) -> Node:
    """The tree-sitter-shaped syntax tree of ``text``; never raises, never executes anything."""
    return Parser(text).parse_module()
