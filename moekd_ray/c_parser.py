"""The one tree-sitter-c parser setup, shared by the attacks (identifiers), `moekd predict` and the pretraining corpus
(`extract_functions`: the function definitions of a C file)."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

import tree_sitter_c
from tree_sitter import Language, Node, Parser, Query, QueryCursor

LANGUAGE = Language(tree_sitter_c.language())
# Devign often drops the line with the return type (`foo(int a) {`): such code parses better with `int ` before it.
HEADERLESS = re.compile(rb"\s*[A-Za-z_]\w*\s*\(")
RETURN_TYPE = b"int "

_local = threading.local()  # tree-sitter parsers are not thread-safe: one per thread


def parse(code: str | bytes):
    """The tree-sitter-c tree of ``code`` (a str is parsed as its UTF-8 bytes; a lone surrogate does not crash)."""
    parser = getattr(_local, "parser", None)
    if parser is None:
        parser = _local.parser = Parser(LANGUAGE)
    return parser.parse(code if isinstance(code, bytes) else code.encode("utf-8", "surrogatepass"))


_FUNCTIONS = Query(LANGUAGE, "(function_definition) @f")

_SPECIFIERS = frozenset({"storage_class_specifier", "type_qualifier", "primitive_type", "sized_type_specifier",
                         "type_identifier", "struct_specifier", "union_specifier", "enum_specifier",
                         "attribute_specifier", "ms_declspec_modifier", "macro_type_specifier"})


# ------------------------------------------------------------------------------------------ splitting a file

@dataclass(frozen=True)
class Function:
    name: str
    start_line: int  # 1-based, inclusive
    end_line: int
    source: str


def _declared_name(declarator: Node | None) -> tuple[str | None, bool]:
    """The identifier at the bottom of a declarator chain (`f` in `int (*f(int x))(void)`), and whether the
    chain holds a function declarator."""
    node, is_function = declarator, False
    while node is not None:
        if node.type == "identifier":
            return node.text.decode("utf-8", "replace"), is_function
        is_function = is_function or node.type == "function_declarator"
        inner = node.child_by_field_name("declarator")
        if inner is None:  # parenthesized/attributed declarators hold it as an unnamed child
            inner = next((c for c in node.named_children
                          if c.type == "identifier" or c.type.endswith("_declarator")), None)
        node = inner
    return None, is_function


def _definition_name(fn: Node) -> str:
    name, is_function = _declared_name(fn.child_by_field_name("declarator"))
    kind = fn.child_by_field_name("type")
    if not is_function and kind is not None and kind.type == "type_identifier":
        # `void QEMU_NORETURN h(void) {`: tree-sitter takes `h` for the type and `(void)` for the declarator.
        name = kind.text.decode("utf-8", "replace")
    return name or "?"


def _definition_start(fn: Node) -> Node:
    """Where a definition's text starts. An unknown macro before the name (`void QEMU_NORETURN h(void)`) can
    leave the start of the header in the previous node, an ERROR or a declaration missing its `;`, ending on
    the line where the function_definition starts: it belongs to the function."""
    prev = fn.prev_sibling
    if prev is not None and (prev.type == "ERROR" or prev.has_error) \
            and prev.end_point.row == fn.start_point.row and fn.start_point.row - prev.start_point.row <= 2:
        return prev
    return fn


def _recovered(root: Node) -> list[tuple[str, int, int]]:
    """Definitions tree-sitter gave up on (an unmatched brace, an unknown macro in the body): an ERROR node
    holding ``specifiers function_declarator {``. Each runs to the next such header or to the end of the ERROR."""
    found = []
    for error in [root] if root.type == "ERROR" else [c for c in root.children if c.type == "ERROR"]:
        kids = error.children
        heads = []
        for i, kid in enumerate(kids[:-1]):
            if kid.type == "function_declarator" and kids[i + 1].type == "{":
                j = i
                while j > 0 and kids[j - 1].type in _SPECIFIERS:
                    j -= 1
                heads.append((kids[j].start_byte, _declared_name(kid)[0] or "?"))
        for k, (start, name) in enumerate(heads):
            end = heads[k + 1][0] if k + 1 < len(heads) else error.end_byte
            found.append((name, start, end))
    return found


def _error_lines(root: Node) -> list[tuple[int, int]]:
    """Line ranges (1-based, inclusive) of the outermost ERROR and MISSING nodes, in source order."""
    spans, stack = [], [root]
    while stack:
        node = stack.pop()
        if node.type == "ERROR" or node.is_missing:
            spans.append((node.start_point.row + 1, node.end_point.row + 1))
        elif node.has_error:
            stack.extend(node.children)
    return sorted(spans)


def _functions_in(data: bytes, skip: int = 0) -> tuple[list[Function], list[tuple[int, int]]]:
    """The functions of ``data`` (its first ``skip`` bytes are a prefix we added) and the line ranges of its
    syntax errors (empty when it parsed cleanly)."""
    root = parse(data).root_node
    spans = []
    for fn in sorted(QueryCursor(_FUNCTIONS).captures(root).get("f", ()), key=lambda n: n.start_byte):
        spans.append((_definition_name(fn), _definition_start(fn).start_byte, fn.end_byte))
    if not spans:
        spans = _recovered(root)
    functions = []
    for name, start, end in spans:
        start = max(start, skip)
        text = data[start:end].rstrip()
        if not text.strip():
            continue
        # Lines: a prefix we added has no newline, so counting newlines in the original bytes is exact.
        start_line = data.count(b"\n", skip, start) + 1
        functions.append(Function(name, start_line, start_line + text.count(b"\n"), text.decode("utf-8", "replace")))
    return functions, _error_lines(root) if root.has_error else []


def extract_functions(data: bytes) -> tuple[list[Function], list[tuple[int, int]]]:
    """Every function definition in the C source ``data`` (UTF-8 bytes), in source order, at any depth
    (inside ``#ifdef``, ``extern "C" {}``, GNU nested functions), and the line ranges (1-based, inclusive) of the
    file's syntax errors as tree-sitter sees them (empty when the file parsed without errors).

    A function's source is the definition's own text (return type through closing brace, comments before it
    excluded); its name comes from its declarator. When tree-sitter finds no definition at all, two repairs are
    tried, as for Devign functions: a definition wrapped in an ERROR node is recovered from its header, and a
    header without a return type (``foo(int a) {``) is parsed with ``int`` before it (never shown).
    """
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark: same lines, no stray token
        data = data[3:]
    functions, errors = _functions_in(data)
    if not functions and errors and HEADERLESS.match(data):
        functions, _ = _functions_in(RETURN_TYPE + data, skip=len(RETURN_TYPE))
    return functions, errors
