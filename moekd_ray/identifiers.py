"""Renamable identifiers of one C function, found with a real parser (tree-sitter-c).

Identifier-renaming attacks (MHM, ALERT) need, for one function, the names that can be replaced without
changing what the code does (its parameters and local variables) and a cheap way to apply many candidate
renamings. :class:`Identifiers` parses a function once, keeps the byte offsets of every occurrence of every
renamable name, and renames by splicing strings at those offsets. The same finder is the canonicalisation defence
(`canonicalize`: names to positional placeholders) that the tokenisers and tfidf-lr apply to their input, so it is a
component beside `c_parser.py`, below the attacks and the models that both use it.

Being renamable is decided conservatively, from what tree-sitter did parse (Devign functions often do not parse
cleanly: unexpanded macros, attributes, ``QTAILQ_FOREACH(...) {``):

* a name is a candidate only if a declaration in the function declares it (a parameter of the function, a
  local variable anywhere in the body, K&R parameter declarations), or it is the function's own name and
  ``include_function_name``; not ``extern`` locals nor local function prototypes (they name globals), nor the
  parameter names inside function-pointer types or prototypes (``x`` in ``int (*cb)(int x)``);
* it is dropped if the same word also occurs anywhere other than as an ``identifier`` node, a struct field
  (``field_identifier``), a goto label (``statement_identifier``), a struct/union/enum tag, a comment or a
  string: e.g. as a type name, inside a preprocessor directive's text (``#define``, ``#if`` conditions),
  inside ``__attribute__((...))``, or in tokens the parser skipped. Such occurrences could not be renamed
  consistently.
* a local whose name is the function's own name is not renamable unless ``include_function_name``.
* Devign often drops the line with the return type (``foo(int a) {`` with no ``static int`` before it): such
  a function is parsed with ``int `` put before it when that parses better (the prefix never shows in what
  :meth:`Identifiers.rename` returns).

Offsets from tree-sitter are byte offsets: everything works on the UTF-8 bytes and decodes at the end.
"""

from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache
from typing import Iterable, Iterator

from tree_sitter import Node, Query, QueryCursor

from moekd_ray.c_parser import HEADERLESS, LANGUAGE, RETURN_TYPE, parse

__all__ = ["C_KEYWORDS", "Identifiers", "canonicalize", "error_count", "identifier_vocabulary", "parse"]

_C_KEYWORDS = """
auto break case char const continue default do double else enum extern float for goto if inline int long
register restrict return short signed sizeof static struct switch typedef union unsigned void volatile while
_Alignas _Alignof _Atomic _BitInt _Bool _Complex _Decimal128 _Decimal32 _Decimal64 _Generic _Imaginary
_Noreturn _Pragma _Static_assert _Thread_local alignas alignof bool constexpr false nullptr static_assert
thread_local true typeof typeof_unqual
asm __asm __asm__ __attribute __attribute__ __extension__ __inline __inline__ __restrict __restrict__
__volatile __volatile__ __const __const__ __signed __signed__ __typeof __typeof__ __alignof __alignof__
__label__ __auto_type __thread __real__ __imag__ __int128 __int128_t __uint128_t __builtin_va_list
__builtin_offsetof __builtin_va_arg __builtin_expect __declspec __cdecl __clrcall __stdcall __fastcall
__thiscall __vectorcall __based __unaligned _unaligned __forceinline __restrict _Nonnull _Nullable
_Null_unspecified __func__ __FUNCTION__ __PRETTY_FUNCTION__ __FILE__ __LINE__ __DATE__ __TIME__ __COUNTER__
__STDC__ __STDC_VERSION__ __cplusplus __VA_ARGS__ __VA_OPT__ defined
size_t ssize_t ptrdiff_t intptr_t uintptr_t intmax_t uintmax_t max_align_t nullptr_t off_t off64_t
wchar_t wint_t char8_t char16_t char32_t _Float16 _Float32 _Float64 _Float128
int8_t int16_t int32_t int64_t uint8_t uint16_t uint32_t uint64_t
int_least8_t int_least16_t int_least32_t int_least64_t uint_least8_t uint_least16_t uint_least32_t
uint_least64_t int_fast8_t int_fast16_t int_fast32_t int_fast64_t uint_fast8_t uint_fast16_t uint_fast32_t
uint_fast64_t u_char u_short u_int u_long
FILE va_list NULL EOF
"""
C_KEYWORDS: frozenset[str] = frozenset(_C_KEYWORDS.split())
"""C keywords (C89 to C23), GNU/MSVC extension keywords, predefined names and common builtin type names: never
renamable, never a valid new name."""

_QUERY = Query(LANGUAGE, """
(identifier) @id
[(field_identifier) (statement_identifier)] @other_namespace
(struct_specifier name: (type_identifier) @other_namespace)
(union_specifier name: (type_identifier) @other_namespace)
(enum_specifier name: (type_identifier) @other_namespace)
[(comment) (string_literal) (char_literal) (system_lib_string)] @opaque
[(preproc_def) (preproc_function_def) (preproc_call) (preproc_include)
 (attribute_specifier) (attribute_declaration) (ms_declspec_modifier)] @directive
(preproc_ifdef name: (_) @directive)
(preproc_elifdef name: (_) @directive)
(preproc_if condition: (_) @directive)
(preproc_elif condition: (_) @directive)
[(declaration) (parameter_declaration)] @decl
(function_definition) @function
""")
_ERROR_QUERY = Query(LANGUAGE, "(ERROR) @e (MISSING) @m")

_WORD = re.compile(rb"(?<![\w$])[A-Za-z_$][\w$]*")  # identifier-like words (not suffixes of numbers like 0x1f)
_C_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_RESERVED = re.compile(r"__|_[A-Z]")  # reserved for the implementation: macros like __align8, never locals
_FIELD_ACCESS = re.compile(rb"(?:\.|->)[ \t\r\n]*\Z")  # an identifier right after `.`/`->` is a member name
# Declarator wrappers that lead (through their `declarator` field) to the declared identifier.
_WRAPPERS = frozenset({"init_declarator", "pointer_declarator", "array_declarator", "function_declarator",
                       "parenthesized_declarator", "attributed_declarator"})

def _encode(code: str) -> bytes:
    return code.encode("utf-8", "surrogatepass")  # a lone surrogate from a JSON file must not crash us


def _errors(root: Node) -> int:
    if not root.has_error:
        return 0
    return sum(len(nodes) for nodes in QueryCursor(_ERROR_QUERY).captures(root).values())


def error_count(code: str) -> int:
    """Number of ERROR and MISSING nodes in the parse tree of ``code`` (0: it parsed cleanly)."""
    return _errors(parse(code).root_node)


def _declared_identifier(declarator: Node | None) -> tuple[Node | None, bool]:
    """The identifier a declarator declares, and whether it declares a function (``int f(int)``, not
    ``int (*f)(int)``). (None, False) for abstract declarators and anything the parser could not make sense of."""
    innermost = ""  # innermost wrapper that changes the declared type (parentheses and attributes do not)
    node = declarator
    while node is not None:
        kind = node.type
        if kind == "identifier":
            return node, innermost == "function_declarator"
        if kind not in _WRAPPERS:
            return None, False
        if kind not in ("parenthesized_declarator", "attributed_declarator"):
            innermost = kind
        inner = node.child_by_field_name("declarator")
        if inner is None:  # parenthesized/attributed declarators hold it as an unnamed-field child
            inner = next((c for c in node.named_children if c.type == "identifier" or c.type in _WRAPPERS), None)
        node = inner
    return None, False


def _error_declarator(node: Node | None) -> Node | None:
    """The identifier in ``node`` if ``node`` is an ERROR holding one identifier or one declarator
    (``(ERROR (identifier))``, ``(ERROR (array_declarator (identifier) ...))``)."""
    if node is None or node.type != "ERROR" or node.named_child_count != 1:
        return None
    return _declared_identifier(node.named_children[0])[0]


def _neighbours(node: Node, parent: Node | None) -> list[Node | None]:
    """The previous and next sibling of ``node`` (Node.next_sibling skips a MISSING token after it)."""
    if parent is None:
        return [None, None]
    kids = parent.children
    for i, kid in enumerate(kids):
        if kid.id == node.id:
            return [kids[i - 1] if i > 0 else None, kids[i + 1] if i + 1 < len(kids) else None]
    return [None, None]


def _declaration_sites(decl: Node) -> Iterator[tuple[list[Node], list[Node]]]:
    """For each variable (or parameter) one declaration / parameter_declaration declares: the identifier nodes
    that may be its name, and the nodes (besides ``decl``) an error in the parse around it touches; when the
    latter is empty the declaration parsed cleanly and the former is just the declared identifier.

    Error recovery around unexpanded macros makes declarations doubtful, and which word tree-sitter then calls
    the declarator depends on the words' lengths, so renaming could flip it: ``int av_unused x = 0;`` gives
    (ERROR av_unused) + declarator x, ``uint64_t zSig STATUS_PARAM)`` gives (ERROR zSig) + declarator
    STATUS_PARAM, ``const uint8_t *key G_GNUC_UNUSED`` gives (pointer_declarator (ERROR key) G_GNUC_UNUSED),
    ``vector unsigned char x;`` gives declarator ``char`` + (ERROR x), ``struct {...} QEMU_PACKED x;`` gives
    declarator QEMU_PACKED, a MISSING ``;``, then an expression statement ``x;``, and ``c->f = f;`` after a
    lost brace can come out as a declaration of ``f`` with type ``c`` and an ERROR ``->``."""
    is_param = decl.type == "parameter_declaration"
    if not is_param and any(c.type == "storage_class_specifier" and c.text == b"extern" for c in decl.children):
        return  # `extern int x;` refers to a global: renaming it would change the linkage
    for declarator in decl.children_by_field_name("declarator"):
        ident, is_function = _declared_identifier(declarator)
        if ident is None or (is_function and not is_param):
            continue  # a local prototype `int g(int);` names a function defined elsewhere
        # Errors right next to the declarator (not across a comma: in `int a, b, av_unused c;` only c is
        # doubtful), inside its declarator chain, or, for a parameter, right next to the parameter.
        near = _neighbours(declarator, decl)
        if declarator.type == "init_declarator":
            inner = declarator.child_by_field_name("declarator")
            if inner is not None:
                near += _neighbours(inner, declarator)
        if is_param:
            near += _neighbours(decl, decl.parent)
        node = declarator
        while node is not None and node.type in _WRAPPERS:
            near.extend(c for c in node.children if c.type == "ERROR")
            node = node.child_by_field_name("declarator") or next(
                (c for c in node.named_children if c.type == "identifier" or c.type in _WRAPPERS), None)
        errors = [n for n in near if n is not None and (n.type == "ERROR" or n.is_missing)]
        if not errors:
            yield [ident], []
            continue
        site = [ident]
        for error in errors:
            alt = _error_declarator(error)
            if alt is not None and alt not in site:
                site.append(alt)
        following = _neighbours(decl, decl.parent)[1] if any(e.is_missing for e in errors) else None
        if following is not None and following.type == "expression_statement" \
                and following.named_child_count == 1 and following.named_children[0].type == "identifier":
            site.append(following.named_children[0])  # `struct {...} QEMU_PACKED x;`
            errors.append(following)
        yield site, errors


def _function_name(fn: Node) -> str | None:
    """The name a function_definition defines. (K&R parameters need no special case: their declarations,
    between the declarator and the body, are ordinary `declaration` nodes.)"""
    ident, is_function = _declared_identifier(fn.child_by_field_name("declarator"))
    return ident.text.decode("utf-8", "surrogatepass") if ident is not None and is_function else None


def _parameter_list(fn: Node) -> tuple[Node | None, bool]:
    """The parameter list of the function a function_definition defines (of `f` in `int *f(int a)`), and
    whether the function's name is made by a macro: ``RENAME(foo)(int a)``, ``HELPER(add)(CPUState *env)``
    (directly nested function declarators; the parameters are the outer list)."""
    found, macro_name, previous = None, False, None
    node = fn.child_by_field_name("declarator")
    while node is not None and node.type in _WRAPPERS:
        if node.type == "function_declarator":
            if previous is not None and previous.type == "function_declarator":
                macro_name = True  # keep the outer list
            else:
                found = node.child_by_field_name("parameters")
        previous = node
        node = node.child_by_field_name("declarator") or next(
            (c for c in node.named_children if c.type == "identifier" or c.type in _WRAPPERS), None)
    return found, macro_name


def _parse_function(data: bytes) -> tuple[bytes, dict[str, list[Node]], int]:
    """The function's bytes as parsed, the query's captures on them, and where the function's own bytes begin in
    them (after ``int `` put before a function whose return type Devign dropped, when that parses better)."""
    root = parse(data).root_node
    captures = QueryCursor(_QUERY).captures(root)
    if root.has_error and HEADERLESS.match(data):
        # Devign often drops a `static int` line before `foo(...)`; a return type makes it parse.
        alt_root = parse(RETURN_TYPE + data).root_node
        alt_captures = QueryCursor(_QUERY).captures(alt_root)
        first = min(alt_captures.get("function", ()), key=lambda n: n.start_byte, default=None)
        params = first.child_by_field_name("declarator") if first is not None else None
        params = params.child_by_field_name("parameters") if params is not None else None
        if (params is not None and not any(c.type == "identifier" for c in params.named_children)
                and _errors(alt_root) < _errors(root)):  # (not `PPC_OP(slw) {`: a macro, not a function)
            return RETURN_TYPE + data, alt_captures, len(RETURN_TYPE)
    return data, captures, 0


def _byte_classes(data: bytes, captures: dict[str, list[Node]]) -> bytearray:
    """A class per byte: 1 = comment/string (words there are not code), 2 = directive text (never renamable)."""
    mask = bytearray(len(data))
    for node in captures.get("opaque", ()):
        mask[node.start_byte:node.end_byte] = b"\x01" * (node.end_byte - node.start_byte)
    for node in captures.get("directive", ()):
        mask[node.start_byte:node.end_byte] = b"\x02" * (node.end_byte - node.start_byte)
    return mask


def _words(data: bytes, captures: dict[str, list[Node]]) -> tuple[set[str], set[str], list[tuple[int, int, str]]]:
    """Every identifier-like word of the code, outside comments and strings: all of them plus :data:`C_KEYWORDS`
    (taken), those with an occurrence we must not (or could not) rename (blocked), and the identifier nodes that a
    renaming may change, as (start, end, name) (occurrences)."""
    mask = _byte_classes(data, captures)
    ident_at: dict[int, Node] = {n.start_byte: n for n in captures.get("id", ())}
    other_namespace_at = {n.start_byte: n.end_byte for n in captures.get("other_namespace", ())}

    taken: set[str] = set(C_KEYWORDS)
    blocked: set[str] = set()
    occurrences: list[tuple[int, int, str]] = []
    for match in _WORD.finditer(data):
        start, end = match.span()
        cls = mask[start]
        if cls == 1:
            continue
        word = match.group().decode("ascii")
        taken.add(word)
        if cls == 2:
            blocked.add(word)
            continue
        ident = ident_at.get(start)
        if ident is not None and ident.end_byte == end:
            if _FIELD_ACCESS.search(data, max(0, start - 64), start):
                continue  # error recovery sometimes leaves `p->len`'s member as a plain identifier
            occurrences.append((start, end, word))
        elif other_namespace_at.get(start) != end:  # fields, labels and struct tags: other namespaces
            blocked.add(word)  # type names, keywords, tokens the parser skipped, words glued to non-ASCII...
    return taken, blocked, occurrences


def _own_parameter_list(captures: dict[str, list[Node]], functions: list[Node]) -> tuple[Node | None, bool]:
    """The parameter list of the function itself and whether a macro makes its name (:func:`_parameter_list`).
    Not those of function-pointer types or local prototypes (their names mean nothing outside them), nor
    `if (ctx->x & FLAG)` misparsed as a function declarator."""
    own_params, macro_name = _parameter_list(functions[0]) if functions else (None, False)
    if own_params is None and not functions:  # no function definition parsed: the first parameter list
        lists = [d.parent for d in captures.get("decl", ()) if d.type == "parameter_declaration" and d.parent]
        own_params = min(lists, key=lambda n: n.start_byte, default=None)
    return own_params, macro_name


def _declared_names(captures: dict[str, list[Node]], own_params: Node | None,
                    occurrences: list[tuple[int, int, str]], size: int) -> set[str]:
    """The names the function's own parameters and its locals declare (:func:`_declaration_sites`); a doubtfully
    parsed declaration declares the one candidate that is used elsewhere, if exactly one is."""
    own_params_id = own_params.id if own_params is not None else None
    declared: set[str] = set()
    doubtful: list[list[str]] = []
    doubt = bytearray(size)  # 1 on the bytes of doubtfully parsed declarations
    for decl in captures.get("decl", ()):
        if decl.type == "parameter_declaration" and (decl.parent is None or decl.parent.id != own_params_id):
            continue
        for site, errors in _declaration_sites(decl):
            candidates = [n.text.decode("utf-8", "surrogatepass") for n in site]
            # (a type word lexed as an identifier, `char` in `vector unsigned char x`, is never the name)
            candidates = [t for t in candidates if t not in C_KEYWORDS and not _RESERVED.match(t)]
            if not errors:
                declared.update(candidates)
                continue
            doubtful.append(candidates)
            for node in [decl, *site, *errors]:
                doubt[node.start_byte:node.end_byte] = b"\x01" * (node.end_byte - node.start_byte)
    if doubtful:
        # A doubtful declaration declares the one candidate that is used elsewhere: `TYPE A B;` with a macro
        # A or B declares the other word, `void QEMU_NORETURN` declares nothing, `c->f = f;` declares nothing.
        used = Counter(word for start, _, word in occurrences if not doubt[start])
        for candidates in doubtful:
            in_use = [t for t in candidates if used[t]]
            if len(in_use) == 1:
                declared.add(in_use[0])
    return declared


class Identifiers:
    """Parse one function once; rename many times cheaply (string splicing at stored byte offsets).

    Attributes:
        code: the function's source.
        names: renamable identifiers ordered by first occurrence: parameters and local variables (plus the
            function's own name if ``include_function_name``), minus anything that cannot be renamed safely.
        taken: every identifier-like word of the function plus :data:`C_KEYWORDS`; a new name must not be in it.
        function_name: the name of the function as parsed (None if the parser did not find its declarator).
    """

    def __init__(self, code: str, include_function_name: bool = False):
        self.code = code
        # _start: where the function's own bytes begin in self._bytes (after a return type put before it)
        self._bytes, captures, self._start = _parse_function(_encode(code))
        taken, blocked, occurrences = _words(self._bytes, captures)
        functions = sorted(captures.get("function", ()), key=lambda n: n.start_byte)
        own_params, macro_name = _own_parameter_list(captures, functions)
        declared = _declared_names(captures, own_params, occurrences, len(self._bytes))
        self.function_name: str | None = _function_name(functions[0]) if functions else None
        if self.function_name is not None:
            if include_function_name and not macro_name:  # not RENAME in `RENAME(foo)(int a)`
                declared.add(self.function_name)
            else:  # a local with the function's name cannot be renamed without renaming the function
                declared.discard(self.function_name)

        renamable = {n for n in declared - blocked - C_KEYWORDS if _C_IDENTIFIER.match(n) and not _RESERVED.match(n)}
        self._occurrences = [o for o in occurrences if o[2] in renamable]
        self._counts = Counter(o[2] for o in occurrences)
        self.names: list[str] = list(dict.fromkeys(o[2] for o in self._occurrences))
        self.taken: set[str] = taken
        self._names_set = frozenset(self.names)

    def __repr__(self) -> str:
        return f"Identifiers(function_name={self.function_name!r}, names={self.names!r})"

    def occurrences(self, name: str) -> int:
        """How many identifier nodes spell ``name`` (outside directives and member accesses): for a name in
        :attr:`names`, the number of places :meth:`rename` changes."""
        return self._counts.get(name, 0)

    def is_valid_new_name(self, new: str) -> bool:
        """``new`` is C identifier syntax (ASCII), not a keyword/builtin type, and not already used here."""
        return isinstance(new, str) and bool(_C_IDENTIFIER.match(new)) and new not in self.taken

    def rename(self, mapping: dict[str, str]) -> str:
        """The code with every occurrence of each mapped name replaced (consistently, shadowed re-declarations
        included); field names, labels, strings and comments stay as they are. Mapping a name to itself is a
        no-op. Raises ValueError if a key is not in :attr:`names`, a new name is invalid or taken, or two keys
        map to the same new name."""
        mapping = {old: new for old, new in mapping.items() if old != new}
        for old, new in mapping.items():
            if old not in self._names_set:
                raise ValueError(f"{old!r} is not a renamable identifier of this function")
            if not self.is_valid_new_name(new):
                why = "not a C identifier" if not (isinstance(new, str) and _C_IDENTIFIER.match(new)) else (
                    "a C keyword or builtin name" if new in C_KEYWORDS else "already used in this function")
                raise ValueError(f"cannot rename {old!r} to {new!r}: {why}")
        if len(set(mapping.values())) != len(mapping):
            dup = [n for n, c in Counter(mapping.values()).items() if c > 1]
            raise ValueError(f"several identifiers would be renamed to {dup[0]!r}")
        if not mapping:
            return self.code
        data, pieces, last = self._bytes, [], self._start
        for start, end, name in self._occurrences:
            new = mapping.get(name)
            if new is not None:
                pieces.append(data[last:start])
                pieces.append(new.encode("ascii"))
                last = end
        pieces.append(data[last:])
        return b"".join(pieces).decode("utf-8", "surrogatepass")

    def canonical(self) -> str:
        """The code with its renamable identifiers renamed to placeholders by order of first occurrence: v0, v1, ...
        (a placeholder the function already uses as a non-renamable word is skipped). Any renaming the attacks can
        make (they rename exactly :attr:`names`, to names not in :attr:`taken`) gives the same canonical code."""
        fixed = self.taken - self._names_set  # words a renaming never touches: placeholders must avoid them
        mapping, i = {}, 0
        for name in self.names:
            while f"v{i}" in fixed:
                i += 1
            mapping[name] = f"v{i}"
            i += 1
        data, pieces, last = self._bytes, [], self._start
        for start, end, name in self._occurrences:  # splice directly: rename() refuses swaps like a->v1, v1->v0
            pieces += [data[last:start], mapping[name].encode("ascii")]
            last = end
        pieces.append(data[last:])
        return b"".join(pieces).decode("utf-8", "surrogatepass")


@lru_cache(maxsize=65536)
def canonicalize(code: str) -> str:
    """``code`` with parameters and locals renamed to positional placeholders (:meth:`Identifiers.canonical`): the
    identifier-canonicalisation defence, the same finder the renaming attacks use. Cached: training encodes every
    function once per tokenizer, and an attack scores many near-copies."""
    return Identifiers(code).canonical()


def identifier_vocabulary(funcs: Iterable[str], max_size: int = 5000, min_count: int = 2) -> list[str]:
    """Renamable identifiers across a corpus (e.g. the training split), most frequent first: the candidate
    pool that MHM samples substitutes from.

    A name's frequency is the number of functions in which it is renamable; names renamable in fewer than
    ``min_count`` functions are left out; ties are broken alphabetically, so the result is deterministic."""
    counts: Counter[str] = Counter()
    for code in funcs:
        counts.update(Identifiers(code).names)
    ranked = sorted((n for n, c in counts.items() if c >= min_count), key=lambda n: (-counts[n], n))
    return ranked[:max_size]
