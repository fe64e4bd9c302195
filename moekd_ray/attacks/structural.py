"""Semantics-preserving structural edits of one C function, found with tree-sitter: the second attack family.

A renaming defence (identifier canonicalisation) makes every renaming attack fail by construction; these edits
change the code's shape instead, keeping what it does, its identifiers and its calls:

  dead_code       after an expression statement S, insert ``if (0) { S }`` (a dead copy: same names, same calls)
  swap            swap two adjacent declarations, or two adjacent assignment statements, that are independent
                  (no calls, neither mentions a name the other declares or writes)
  for_to_while    ``for (I; C; U) B``  ->  ``{ I; while (C) { B U; } }``  (only when B has no ``continue``)
  while_to_for    ``while (C) B``      ->  ``for (; C; ) B``
  braces          a lone statement under if/else/for/while/do gets ``{ }``; a block holding one expression, return,
                  break or goto statement loses them (never an ``if``: that could move an ``else``)
  parens          ``return E;`` -> ``return (E);``, ``x = E;`` -> ``x = (E);``; a doubled ``((E))`` loses a pair
  split_decl      ``int a = 1, *b;`` -> ``int a = 1; int *b;``
  merge_decl      ``int a; int b;``  -> ``int a, b;``  (the same specifiers, no initialisers)

Edits are only proposed where tree-sitter parsed the statement cleanly (Devign is full of unexpanded macros), and a
candidate that parses with more errors than the code it came from is dropped. Byte offsets throughout, as in
identifiers.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from tree_sitter import Node

from moekd_ray.c_parser import HEADERLESS, RETURN_TYPE, parse

TRANSFORMS = ("dead_code", "swap", "for_to_while", "while_to_for", "braces", "parens", "split_decl", "merge_decl")

_BODY_OWNERS = {"if_statement": ("consequence",), "else_clause": (), "for_statement": ("body",),
                "while_statement": ("body",), "do_statement": ("body",)}
_SIMPLE = {"expression_statement", "return_statement", "break_statement", "goto_statement"}


@dataclass(frozen=True)
class Edit:
    kind: str
    splices: tuple[tuple[int, int, bytes], ...]  # (start, end, replacement) in the parsed bytes, non-overlapping

    def describe(self) -> str:
        return f"{self.kind}@{self.splices[0][0]}"


def _errors(root: Node) -> int:
    if not root.has_error:
        return 0
    count, stack = 0, [root]
    while stack:
        node = stack.pop()
        if node.type == "ERROR" or node.is_missing:
            count += 1
        if node.has_error:
            stack.extend(node.children)
    return count


def _walk(node: Node):
    stack = [node]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(node.children))


def _has(node: Node, kinds: set[str]) -> bool:
    return any(n.type in kinds for n in _walk(node))


def _names(node: Node) -> set[bytes]:
    return {n.text for n in _walk(node) if n.type == "identifier"}


def _misparsed_declaration(stmt: Node) -> bool:
    """``T *x = v;`` after an unexpanded macro parses as an expression statement assigning to ``T * x``: a
    declaration in disguise, which must not be moved into a new block."""
    expr = stmt.named_children[0] if stmt.type == "expression_statement" and stmt.named_child_count else None
    if expr is None or expr.type not in ("assignment_expression", "binary_expression"):
        return False
    left, right = expr.child_by_field_name("left"), expr.child_by_field_name("right")
    if expr.type == "assignment_expression":  # (T * x) = v
        return left is not None and left.type == "binary_expression"
    return right is not None and right.type == "assignment_expression"  # T * (x = v), as tree-sitter also reads it


def _declared(decl: Node) -> set[bytes]:
    out = set()
    for d in decl.children_by_field_name("declarator"):
        while d is not None and d.type != "identifier":
            d = d.child_by_field_name("declarator") or next((c for c in d.named_children if c.type == "identifier"),
                                                             None)
        if d is not None:
            out.add(d.text)
    return out


class Structure:
    """Parse one function once; list the structural edits it admits (`edits`); `apply(edit)` gives the new code."""

    def __init__(self, code: str):
        self.code = code
        data = code.encode("utf-8", "surrogatepass")
        root = parse(data).root_node
        self._start = 0
        if root.has_error and HEADERLESS.match(data):  # as in identifiers.py: a dropped return type
            alt = parse(RETURN_TYPE + data).root_node
            if _errors(alt) < _errors(root):
                data, root, self._start = RETURN_TYPE + data, alt, len(RETURN_TYPE)
        self._bytes, self.errors = data, _errors(root)
        self.edits: list[Edit] = []
        for node in _walk(root):
            if node.has_error:
                continue
            kind = node.type
            if kind == "compound_statement":
                self._block_edits(node)
            elif kind == "for_statement":
                self._for_to_while(node)
            elif kind == "while_statement":
                cond = node.child_by_field_name("condition")
                if cond is not None and cond.type == "parenthesized_expression" and cond.named_child_count == 1:
                    inner = cond.named_children[0].text
                    self._add("while_to_for", (node.start_byte, cond.end_byte, b"for (; " + inner + b"; )"))
            elif kind == "return_statement" and node.named_child_count == 1:
                expr = node.named_children[0]
                if expr.type != "parenthesized_expression":
                    self._add("parens", (expr.start_byte, expr.end_byte, b"(" + expr.text + b")"))
            elif kind == "assignment_expression" and node.parent is not None \
                    and node.parent.type == "expression_statement":
                right = node.child_by_field_name("right")
                if right is not None and right.type != "parenthesized_expression":
                    self._add("parens", (right.start_byte, right.end_byte, b"(" + right.text + b")"))
            elif kind == "parenthesized_expression" and node.parent is not None \
                    and node.parent.type == "parenthesized_expression":
                self._add("parens", (node.parent.start_byte, node.parent.end_byte, node.text))
            elif kind == "declaration" and len(node.children_by_field_name("declarator")) > 1 \
                    and node.parent is not None and node.parent.type == "compound_statement":
                self._split(node)
            if kind in _BODY_OWNERS:
                self._brace_edits(node)

    # ------------------------------------------------------------------------------------------ edit finders
    def _add(self, kind: str, *splices: tuple[int, int, bytes]) -> None:
        self.edits.append(Edit(kind, tuple(splices)))

    def _block_edits(self, block: Node) -> None:
        stmts = [c for c in block.named_children if c.type != "comment"]
        for s in stmts:
            if s.type == "expression_statement" and s.named_child_count == 1 and not _misparsed_declaration(s):
                self._add("dead_code", (s.end_byte, s.end_byte, b" if (0) { " + s.text + b" }"))
        for a, b in zip(stmts, stmts[1:]):
            if a.next_named_sibling is None or a.next_named_sibling.id != b.id:
                continue  # a comment between them: leave it where it is
            if self._independent(a, b):
                self._add("swap", (a.start_byte, a.end_byte, b.text), (b.start_byte, b.end_byte, a.text))
            if a.type == b.type == "declaration" and self._mergeable(a, b):
                rest = b", ".join(d.text for d in b.children_by_field_name("declarator"))
                self._add("merge_decl", (a.end_byte - 1, b.end_byte, b", " + rest + b";"))

    @staticmethod
    def _independent(a: Node, b: Node) -> bool:
        if a.type == b.type == "declaration":
            if _has(a, {"call_expression"}) or _has(b, {"call_expression"}):
                return False
            return not (_declared(a) & _names(b)) and not (_declared(b) & _names(a))
        if a.type == b.type == "expression_statement":
            ea, eb = a.named_children, b.named_children
            if len(ea) != 1 or len(eb) != 1 or ea[0].type != "assignment_expression" \
                    or eb[0].type != "assignment_expression":
                return False
            if any(_has(e, {"call_expression", "update_expression", "assignment_expression"}) for e in
                   (ea[0].child_by_field_name("right"), eb[0].child_by_field_name("right"))):
                return False
            la, lb = ea[0].child_by_field_name("left"), eb[0].child_by_field_name("left")
            if la is None or lb is None or la.type != "identifier" or lb.type != "identifier":
                return False  # `p->x = ...` may alias anything: only plain variables
            return not (_names(a) & _names(b))
        return False

    def _prefix(self, decl: Node) -> bytes:
        first = decl.children_by_field_name("declarator")[0]
        return self._bytes[decl.start_byte:first.start_byte]

    def _mergeable(self, a: Node, b: Node) -> bool:
        if any(d.type == "init_declarator" for d in a.children_by_field_name("declarator") +
               b.children_by_field_name("declarator")):
            return False
        return self._prefix(a).strip() == self._prefix(b).strip() and b";" == a.text[-1:] == b.text[-1:]

    def _split(self, decl: Node) -> None:
        if decl.text[-1:] != b";":
            return
        prefix = self._prefix(decl)
        parts = [prefix + d.text + b";" for d in decl.children_by_field_name("declarator")]
        self._add("split_decl", (decl.start_byte, decl.end_byte, b" ".join(parts)))

    def _for_to_while(self, loop: Node) -> None:
        body = loop.child_by_field_name("body")
        if body is None or _has(body, {"continue_statement"}):
            return  # `continue` would skip the moved update
        init = loop.child_by_field_name("initializer")
        cond = loop.child_by_field_name("condition")
        update = loop.child_by_field_name("update")
        head = b""
        if init is not None:
            head = init.text if init.type == "declaration" else init.text + b";"
        inner = body.text[1:-1] if body.type == "compound_statement" else body.text
        tail = b" " + update.text + b";" if update is not None else b""
        text = b"{ " + head + b" while (" + (cond.text if cond is not None else b"1") + b") {" + inner + tail + b" } }"
        self._add("for_to_while", (loop.start_byte, loop.end_byte, text))

    def _brace_edits(self, owner: Node) -> None:
        fields = _BODY_OWNERS[owner.type]
        bodies = [owner.child_by_field_name(f) for f in fields] if fields else \
            [c for c in owner.named_children if c.type != "comment"][-1:]
        for body in bodies:
            if body is None:
                continue
            if body.type == "compound_statement":
                inner = [c for c in body.named_children]
                if len(inner) == 1 and inner[0].type in _SIMPLE:
                    self._add("braces", (body.start_byte, body.end_byte, inner[0].text))
            elif (body.type in _SIMPLE or body.type in ("for_statement", "while_statement")) \
                    and not _misparsed_declaration(body):
                self._add("braces", (body.start_byte, body.end_byte, b"{ " + body.text + b" }"))

    # ------------------------------------------------------------------------------------------------- apply
    def apply(self, edit: Edit) -> str:
        data = self._bytes
        for start, end, text in sorted(edit.splices, reverse=True):
            data = data[:start] + text + data[end:]
        return data[self._start:].decode("utf-8", "surrogatepass")

    def valid(self, code: str) -> bool:
        """`code` (an edit's result) parses with no more errors than the code it came from."""
        data = code.encode("utf-8", "surrogatepass")
        return _errors(parse(RETURN_TYPE + data if self._start else data).root_node) <= self.errors


def names_and_calls(code: str) -> tuple[set[bytes], set[bytes]]:
    """Every identifier and every called name of `code`: what each edit keeps (tests and docs/robustness_probe.py
    check it)."""
    ids, calls = set(), set()
    for node in _walk(parse(code).root_node):
        if node.type == "identifier":
            ids.add(node.text)
        elif node.type == "call_expression":
            calls.add(node.child_by_field_name("function").text)
    return ids, calls


def random_edits(code: str, n: int, rng) -> tuple[str, list[str]]:
    """`code` after up to `n` random valid edits (one at a time, each on the result of the last), and their names:
    the structural copies robust training learns from."""
    done: list[str] = []
    for _ in range(n):
        structure = Structure(code)
        for j in rng.permutation(len(structure.edits)):
            new = structure.apply(structure.edits[j])
            if new != code and structure.valid(new):
                code = new
                done.append(structure.edits[j].kind)
                break
        else:
            break
    return code, done
