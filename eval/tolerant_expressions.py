"""Expression rules of the tolerant parser: operators, calls, brackets, literals, lambdas.

A mixin of :class:`eval.tolerant_parser.Parser`, which provides the token helpers (``tok``,
``_peek``, ``_is``, ``_leaf``, ...) and the statement rules; see that module for the trees'
shape and the error-recovery rules these methods follow.
"""
from __future__ import annotations

from typing import Optional

from eval.tolerant_nodes import (_CLOSERS, _COMPARE, _EXPR_KEYWORDS, _LITERALS, Node, _as_pattern,
                                 _Broken, _span, _TooDeep, _Unclosed)
from eval.tolerant_tokenizer import _ERROR_KINDS, KEYWORDS


class ExpressionRules:
    """Recursive-descent rules for expressions (mixed into the statement-level Parser)."""

    def _can_start(self, k: int = 0) -> bool:
        t = self._peek(k) if k else self.tok
        while t.kind in _ERROR_KINDS:
            k += 1
            t = self._peek(k)
        if t.kind in ("NUMBER", "STRING"):
            return True
        if t.kind == "NAME":
            return t.value not in KEYWORDS or t.value in _EXPR_KEYWORDS
        return t.kind == "OP" and t.value in ("(", "[", "{", "-", "+", "~", "*", "**", "...")

    def _enter(self) -> None:
        self.nesting += 1
        if self.nesting > self.MAX_NESTING:
            raise _TooDeep()

    def _expression_list(self, allow_star: bool = False, no_in: bool = False) -> Node:
        first = self._star_or_expression(allow_star, no_in)
        if not self._is(","):
            return first
        children = [first]
        try:
            while self._is(","):
                children.append(self._leaf())
                if not self._can_start() or (no_in and self._is_kw("in")):
                    break
                self._lead(children)
                self._add(children, self._star_or_expression(allow_star, no_in))
        except _Broken as b:
            b.pieces[:0] = children
            raise
        return _span("expression_list", children)

    def _star_or_expression(self, allow_star: bool, no_in: bool = False) -> Node:
        if allow_star and self._is("*") and self._can_start(1):
            star = self._leaf()
            return self._wrap("list_splat", [star], self._binary, 1, no_in)
        return self._expression(no_in)

    def _wrap(self, kind: str, before: list, fn, *args) -> Node:
        """Build ``kind(before + [fn(*args)])``; an unclosed bracket inside flattens ``before``."""
        children = list(before)
        self._lead(children)
        try:
            node = fn(*args)
        except _Broken as b:
            b.pieces[:0] = children
            raise
        self._add(children, node)
        return _span(kind, children)

    def _expression(self, no_in: bool = False, allow_cond: bool = True) -> Node:
        self._enter()
        try:
            return self._expression_inner(no_in, allow_cond)
        finally:
            self.nesting -= 1

    def _expression_inner(self, no_in: bool, allow_cond: bool) -> Node:
        self._skip_errors()
        if self._is_kw("lambda"):
            return self._lambda(no_in)
        left = self._binary(1, no_in)
        if allow_cond and self._is_kw("if") and self._can_start(1):
            children = [left]
            try:
                children.append(self._leaf())
                self._lead(children)
                self._add(children, self._binary(1, no_in))
                if self._is_kw("else") and self._can_start(1):
                    children.append(self._leaf())
                    self._lead(children)
                    self._add(children, self._expression(no_in))
            except _Broken as b:
                b.pieces[:0] = children
                raise
            return _span("conditional_expression", children)
        if self._is(":=") and left.type == "identifier" and self._can_start(1):
            return self._wrap("named_expression", [left, self._leaf()], self._expression, no_in)
        return left

    def _lambda(self, no_in: bool) -> Node:
        children = [self._leaf()]
        params = []
        while not self._is(":") and not self._at_line_end() and self.tok.kind != "EOF":
            if self._is(","):
                params.append(self._leaf())
                continue
            if self.tok.kind == "NAME" or self._is("*") or self._is("**"):
                start = self.pos
                params.append(self._parameter())
                if self.pos == start:
                    break
                continue
            break
        if params:
            children.append(_span("lambda_parameters", params))
        if self._is(":") and self._can_start(1):
            children.append(self._leaf())
            return self._wrap("lambda", children, self._expression, no_in)
        return _span("lambda", children)

    _BIN_PREC = {"or": 1, "and": 2, "|": 5, "^": 6, "&": 7, "<<": 8, ">>": 8, "+": 9, "-": 9,
                 "*": 10, "/": 10, "//": 10, "%": 10, "@": 10}

    def _binary(self, min_prec: int, no_in: bool = False) -> Node:
        self._skip_errors()
        t = self.tok
        if t.kind == "NAME" and t.value == "not" and self._can_start(1):
            self._enter()
            node = self._wrap("not_operator", [self._leaf()], self._binary, 3, no_in)
            self.nesting -= 1
            left = node
        elif t.kind == "OP" and t.value in ("-", "+", "~") and self._can_start(1):
            self._enter()
            left = self._wrap("unary_operator", [self._leaf()], self._binary, 11, no_in)
            self.nesting -= 1
        else:
            left = self._power()
        while True:
            t = self.tok
            if t.kind == "OP":
                op = t.value
            elif t.kind == "NAME" and t.value in ("or", "and", "in", "not", "is"):
                op = t.value
            else:
                return left
            if op in _COMPARE and op not in ("<>",) or op == "<>":
                if min_prec > 4 or (no_in and op == "in"):
                    return left
                if op == "not" and not (self._peek().kind == "NAME" and self._peek().value == "in"):
                    return left
                children = [left]
                try:
                    while True:
                        t = self.tok
                        cur = t.value if t.kind in ("OP", "NAME") else None
                        if cur not in _COMPARE or (no_in and cur == "in"):
                            break
                        width = 2 if (cur == "not" or (cur == "is" and self._peek().kind == "NAME" and self._peek().value == "not")) else 1
                        if cur == "not" and not (self._peek().kind == "NAME" and self._peek().value == "in"):
                            break
                        if not self._can_start(width):
                            break
                        first_tok = self.toks[self.pos]
                        self.pos += width
                        children.append(Node(self.src[first_tok.start:self.toks[self.pos - 1].end], first_tok.start, self.toks[self.pos - 1].end))
                        self._lead(children)
                        self._add(children, self._binary(5, no_in))
                except _Broken as b:
                    b.pieces[:0] = children
                    raise
                if len(children) == 1:
                    return left
                left = _span("comparison_operator", children)
                continue
            prec = self._BIN_PREC.get(op)
            if prec is None or prec < min_prec or (t.kind == "NAME" and op not in ("or", "and")):
                return left
            if not self._can_start(1):
                return left
            kind = "boolean_operator" if op in ("or", "and") else "binary_operator"
            left = self._wrap(kind, [left, self._leaf()], self._binary, prec + 1, no_in)

    def _power(self) -> Node:
        if self._is_kw("await") and self._can_start(1):
            base = self._wrap("await", [self._leaf()], self._primary)
        else:
            base = self._primary()
        if self._is("**") and self._can_start(1):
            self._enter()
            node = self._wrap("binary_operator", [base, self._leaf()], self._binary, 11)
            self.nesting -= 1
            return node
        return base

    def _primary(self) -> Node:
        node = self._atom()
        while True:
            skipped = self._skip_before_trailer(node)
            t = self.tok
            if t.kind != "OP":
                return node
            head = [node, skipped] if skipped else [node]
            if t.value == "." and self._peek().kind == "NAME":
                node = _span("attribute", head + [self._leaf(), Node("identifier", self.tok.start, self.tok.end)])
                self.pos += 1
            elif t.value == "(":
                args = self._then(head, self._bracketed, "(", "argument_list", self._argument, "generator_expression")
                node = _span("call", head + [args])
            elif t.value == "[":
                inner = self._then(head, self._bracketed, "[", "subscript", self._subscript_item)
                node = _span("subscript", head + inner.children)
            else:
                return node

    def _skip_before_trailer(self, node: Node) -> Optional[Node]:
        """Tree-sitter skips up to three junk tokens between an expression and its trailer
        (``embed  hub.load(...)``, ``f(x)\\ng(y)``, ``from_pretrained)('x')``): an ERROR there."""
        k = 0
        while k < 3:
            t = self._peek(k)
            if t.kind == "ELEAF" or (t.kind == "NAME" and t.value not in KEYWORDS):
                k += 1
            elif t.kind == "OP" and t.value in (")", "]", "}") and not (self.open and self.open[-1] == t.value):
                k += 1
            else:
                break
        if k == 0:
            return None
        t = self._peek(k)
        if t.kind != "OP":
            return None
        if t.value == "." and self._peek(k + 1).kind == "NAME":
            pass
        elif t.value not in ("(", "["):
            return None
        # tree-sitter's recovery cost grows with the skipped characters: skipping the junk wins
        # only over wrapping the (longer) expression before it in an ERROR.
        if t.start - self.tok.start >= node.end - node.start + 1:
            return None
        skipped = []
        for _ in range(k):
            skipped.append(self._error_token(statement_level=True) if self.tok.kind == "ELEAF" else self._leaf())
        return _span("ERROR", skipped)

    def _then(self, before: list, fn, *args):
        try:
            return fn(*args)
        except _Broken as b:
            b.pieces[:0] = before
            raise

    def _atom(self) -> Node:
        self._skip_errors()
        t = self.tok
        if t.kind == "NAME":
            if t.value == "lambda":
                return self._lambda(False)
            if t.value == "yield":
                children = [self._leaf()]
                if self._is_kw("from"):
                    children.append(self._leaf())
                if self._can_start():
                    return self._wrap("yield", children, self._expression_list, True)
                return _span("yield", children)
            if t.value in ("not", "await") and self._can_start(1):
                return self._expression()
            return self._leaf()
        if t.kind == "NUMBER":
            return self._leaf()
        if t.kind == "STRING":
            node = self._leaf()
            if self.tok.kind != "STRING":
                return node
            parts = [node]
            while self.tok.kind == "STRING":
                parts.append(self._leaf())
            return _span("concatenated_string", parts)
        if t.kind == "OP":
            if t.value == "(":
                return self._bracketed("(", "tuple", self._paren_item, "generator_expression")
            if t.value == "[":
                return self._bracketed("[", "list", self._list_item, "list_comprehension")
            if t.value == "{":
                return self._bracketed("{", "dictionary", self._dict_item, "dictionary_comprehension")
            if t.value == "...":
                self.pos += 1
                return Node("ellipsis", t.start, t.end)
            if t.value in ("-", "+", "~", "*", "**") and self._can_start(1):
                return self._binary(11) if t.value not in ("*", "**") else self._splat()
        return self._leaf()  # a token that starts no expression: kept as it is

    def _splat(self) -> Node:
        star = self._leaf()
        kind = "list_splat" if star.type == "*" else "dictionary_splat"
        return self._wrap(kind, [star], self._expression)

    # -- bracketed lists
    def _argument(self) -> Node:
        t = self.tok
        if t.kind == "NAME" and self._peek().kind == "OP" and self._peek().value == "=" and self._can_start(2) \
                and (t.value not in KEYWORDS or t.value in _LITERALS):
            name = self._leaf()
            return self._wrap("keyword_argument", [name, self._leaf()], self._expression)
        if (self._is("*") or self._is("**")) and self._can_start(1):
            return self._splat()
        return self._expression()

    def _list_item(self) -> Node:
        if self._is("*") and self._can_start(1):
            return self._splat()
        return self._expression()

    def _paren_item(self) -> Node:
        if self._is("*") and self._can_start(1):
            return self._splat()
        if self._is_kw("yield"):
            return self._atom()
        return self._expression()

    def _dict_item(self) -> Node:
        if self._is("**") and self._can_start(1):
            return self._splat()
        key = self._star_or_expression(True)
        if self._is(":") and self._can_start(1):
            return self._wrap("pair", [key, self._leaf()], self._expression)
        return key

    def _subscript_item(self) -> Node:
        parts = []
        if not self._is(":"):
            node = self._expression()
            if not self._is(":"):
                return node
            parts.append(node)
        try:
            while self._is(":"):
                parts.append(self._leaf())
                if self._can_start():
                    self._add(parts, self._expression())
        except _Broken as b:
            b.pieces[:0] = parts
            raise
        return _span("slice", parts)

    def _comprehension_clauses(self, children: list) -> None:
        while True:
            if self._is_kw("async") and self._peek().kind == "NAME" and self._peek().value == "for":
                clause = [self._leaf(), self._leaf()]
            elif self._is_kw("for"):
                clause = [self._leaf()]
            elif self._is_kw("if") and self._can_start(1):
                children.append(self._wrap("if_clause", [self._leaf()], self._expression, False, False))
                continue
            else:
                return
            try:
                self._add(clause, _as_pattern(self._expression_list(allow_star=True, no_in=True)))
                if self._is_kw("in") and self._can_start(1):
                    clause.append(self._leaf())
                    self._add(clause, self._expression(False, False))
            except _Broken as b:
                b.pieces[:0] = children + clause
                raise
            children.append(_span("for_in_clause", clause))

    def _bracketed(self, opener: str, kind: str, item, comp_kind: Optional[str] = None) -> Node:
        closer = _CLOSERS[opener]
        self._enter()
        children = [self._leaf()]
        self.open.append(closer)
        n_items = 0
        has_comma = False
        pair_seen = False
        try:
            while True:
                self._skip_errors()
                t = self.tok
                if t.kind == "OP" and t.value == closer:
                    self._add(children, self._leaf())
                    break
                if t.kind == "EOF":
                    self._flush(children)
                    raise _Broken(children)
                if t.kind == "OP" and t.value in (")", "]", "}"):
                    if t.value in self.open[:-1]:  # closes an enclosing bracket: give up this one
                        self._flush(children)
                        raise _Unclosed(children)
                    self._add(children, _span("ERROR", [self._leaf()]))  # a stray closer: skipped
                    continue
                if t.kind == "NEWLINE":  # cannot happen inside brackets; be safe
                    self.pos += 1
                    continue
                if t.kind == "OP" and t.value == ",":
                    has_comma = True
                    self._add(children, self._leaf())
                    continue
                if not self._can_start() and not (kind == "subscript" and t.kind == "OP" and t.value == ":"):
                    self._add(children, self._junk(closer))
                    continue
                if kind != "argument_list" and t.kind == "NAME" and self._peek().kind == "OP" and self._peek().value == "=":
                    self._add(children, _span("ERROR", [self._leaf(), self._leaf()]))  # `(a, model='b')`
                    continue
                self._flush(children)
                try:
                    node = item()
                except _Unclosed as u:
                    children.extend(u.pieces)
                    children.append(_span("ERROR", u.inner))
                    continue
                n_items += 1
                pair_seen = pair_seen or node.type == "pair"
                self._add(children, node)
                if comp_kind and n_items == 1 and (self._is_kw("for") or (self._is_kw("async") and self._peek().value == "for")):
                    self._comprehension_clauses(children)
                    kind = comp_kind if not (kind == "dictionary" and node.type != "pair") else "set_comprehension"
                k = 0
                while self._peek(k).kind in _ERROR_KINDS:
                    k += 1
                t = self._peek(k)
                if t.kind == "OP" and t.value in (",", ")", "]", "}") or t.kind == "EOF":
                    self._skip_errors()
                    continue
                self._add(children, self._junk(closer))
        except _Broken as b:
            if not (isinstance(b, _Unclosed) and b.inner is children) and b.pieces is not children:
                b.pieces[:0] = children
            self.nesting -= 1
            self.open.pop()
            raise
        self.nesting -= 1
        self.open.pop()
        if kind == "tuple" and n_items == 1 and not has_comma and children[1].type not in ("list_splat",):
            kind = "parenthesized_expression"
        elif kind == "dictionary" and n_items and not pair_seen:
            kind = "set"
        return _span(kind, children)

    def _junk(self, closer: str) -> Node:
        """Tokens that cannot continue the list, up to the next comma or bracket: one ERROR."""
        parts = []
        while True:
            t = self.tok
            if t.kind == "EOF" or (t.kind == "OP" and t.value in (",", ")", "]", "}")):
                break
            if t.kind in _ERROR_KINDS:
                parts.append(Node("ERROR", t.start, t.end))
                self.pos += 1
            elif self._can_start() and parts and not (t.kind == "OP" and t.value in ("(", "[", "{")):
                parts.append(self._expression())
            else:
                parts.append(self._leaf())
        return _span("ERROR", parts)
