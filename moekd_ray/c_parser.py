"""The one tree-sitter-c parser setup, shared by the attacks (identifiers) and `moekd predict` (functions)."""

from __future__ import annotations

import re
import threading

import tree_sitter_c
from tree_sitter import Language, Parser

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
