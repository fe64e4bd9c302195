"""Renamable identifiers of a C function (tree-sitter-c) for identifier-renaming attacks. Fast, no Ray."""

import gzip
import json
import time

import pytest

from moekd_ray.identifiers import (
    C_KEYWORDS,
    Identifiers,
    error_count,
    identifier_vocabulary,
    parse,
)

from conftest import DEVIGN_DIR, needs_real_devign


def identifier_nodes(code: str) -> list[str]:
    """Texts of all `identifier` nodes (not fields, labels, types) of the parse tree, in order."""
    out, stack = [], [parse(code).root_node]
    while stack:
        node = stack.pop()
        if node.type == "identifier":
            out.append((node.start_byte, node.text.decode()))
        stack.extend(node.children)
    return [text for _, text in sorted(out)]


def check_rename(code: str, mapping: dict[str, str], **kwargs) -> str:
    """Rename and check every invariant the attacks rely on; return the renamed code."""
    ids = Identifiers(code, **kwargs)
    out = ids.rename(mapping)
    after = identifier_nodes(out)
    for old, new in mapping.items():
        assert old not in after, f"{old!r} still an identifier after renaming"
        assert after.count(new) == ids.occurrences(old) > 0
    assert error_count(out) <= error_count(code)
    assert Identifiers(out, **kwargs).names == [mapping.get(n, n) for n in ids.names]
    return out


def test_keywords():
    for word in ["int", "char", "struct", "sizeof", "return", "size_t", "uint8_t", "int64_t", "NULL", "true",
                 "false", "bool", "_Bool", "__attribute__", "typeof", "FILE", "va_list"]:
        assert word in C_KEYWORDS
    assert "memcpy" not in C_KEYWORDS and "len" not in C_KEYWORDS


def test_error_count():
    assert error_count("int f(int a) { return a; }") == 0
    assert error_count("int f(int a) { a = ; return a }") >= 2  # one ERROR, one MISSING ';'
    assert error_count("") == 0


def test_declarator_kinds_and_what_is_not_renamable():
    code = """static int handle(struct S *p, int (*cb)(int), char **argv, int a[3], const char *src, size_t n)
{
    int i, j = 0, *q = &j;
    char buf[16];
    uint8_t *dst = malloc(n);
    unsigned long total = 0;
    for (int k = 0; k < 3; k++)
        total += cb(a[k]);
    memcpy(buf, src, sizeof(buf));
    memcpy(dst, buf, MAX(i, j));
    p->count = *q + argv[0][0];
    if (!dst)
        goto fail;
    free(dst);
    return handle(p, cb, argv, a, src, total);
fail:
    return -1;
}
"""
    ids = Identifiers(code)
    assert ids.function_name == "handle"
    assert ids.names == ["p", "cb", "argv", "a", "src", "n", "i", "j", "q", "buf", "dst", "total", "k"]
    for not_renamable in ["handle", "malloc", "memcpy", "free", "MAX", "count", "fail", "S", "int", "size_t",
                          "uint8_t", "sizeof"]:
        assert not_renamable not in ids.names
        assert not_renamable in ids.taken  # and none of them is a valid new name either
    assert ids.occurrences("j") == 3 and ids.occurrences("k") == 4 and ids.occurrences("p") == 3
    assert ids.occurrences("count") == 0  # a field, never an identifier occurrence

    out = check_rename(code, {n: f"v{i}_" for i, n in enumerate(ids.names)})
    assert "p->count" not in out and "v0_->count" in out  # field name kept, variable renamed
    assert "memcpy(v9_, v4_, sizeof(v9_));" in out and "MAX(v6_, v7_)" in out and "goto fail;" in out
    assert "int (*v1_)(int)" in out and "char **v2_" in out and "int v3_[3]" in out and "for (int v12_ = 0;" in out
    assert "return handle(" in out  # the function's own name is left alone by default

    with_name = Identifiers(code, include_function_name=True)
    assert with_name.names[0] == "handle" and with_name.occurrences("handle") == 2
    out = check_rename(code, {"handle": "process"}, include_function_name=True)
    assert "static int process(" in out and "return process(p" in out


def test_struct_fields_and_a_local_with_the_same_name():
    code = """int size_of(struct buf *p, struct buf s)
{
    int len = p->len + s.len;
    struct buf t = { .len = len };
    return len + t.len + p[0].len;
}
"""
    ids = Identifiers(code)
    assert ids.names == ["p", "s", "len", "t"]
    assert "buf" not in ids.names and "buf" in ids.taken  # struct tag
    assert ids.occurrences("len") == 3
    out = check_rename(code, {"len": "n_bytes", "p": "ptr"})
    assert "int n_bytes = ptr->len + s.len;" in out
    assert "{ .len = n_bytes }" in out and "return n_bytes + t.len + ptr[0].len;" in out


def test_a_struct_tag_with_the_name_of_a_local():
    code = "void f(void) { struct hwdef *hwdef = get(); hwdef->x = 1; }"
    out = check_rename(code, {"hwdef": "h"})
    assert out == "void f(void) { struct hwdef *h = get(); h->x = 1; }"


def test_shadowing_is_renamed_consistently():
    code = """int sum(int *v, int n)
{
    int i, s = 0;
    for (i = 0; i < n; i++) {
        int i2 = v[i];
        {
            int i = i2 * 2;
            s += i;
        }
    }
    return s;
}
"""
    ids = Identifiers(code)
    assert ids.names == ["v", "n", "i", "s", "i2"]
    assert ids.occurrences("i") == 7  # the outer i and the shadowing inner i
    out = check_rename(code, {"i": "idx"})
    assert "int idx = i2 * 2;" in out and "s += idx;" in out and "for (idx = 0; idx < n; idx++)" in out


def test_macros_and_define_inside_the_body():
    code = """static int clip(int x, int lo, int hi)
{
    int r = MAX(lo, MIN(x, hi));
#define SCALE(v) ((v) * factor)
    int factor = 2;
    r = SCALE(r);
#ifdef DEBUG_CLIP
    printf("clip %d -> %d\\n", x, r);
#endif
#if LIMIT > 0
    r = r > LIMIT ? LIMIT : r;
#endif
    return r;
}
"""
    ids = Identifiers(code)
    # factor is used inside the #define text, v is a macro parameter: neither can be renamed safely.
    assert ids.names == ["x", "lo", "hi", "r"]
    for word in ["SCALE", "factor", "v", "DEBUG_CLIP", "LIMIT", "MAX", "MIN", "printf"]:
        assert word in ids.taken and word not in ids.names
    out = check_rename(code, {"r": "res", "x": "val"})
    assert "#define SCALE(v) ((v) * factor)" in out and "int factor = 2;" in out
    assert 'printf("clip %d -> %d\\n", val, res);' in out and "res = res > LIMIT ? LIMIT : res;" in out


def test_goto_labels_typedefs_and_locals_in_other_namespaces():
    code = """int f(int out)
{
    typedef unsigned int myint;
    myint z = out;
    if (z > 3)
        goto out;
    return z;
out:
    return out;
}
"""
    ids = Identifiers(code)
    assert ids.names == ["out", "z"]
    assert "myint" in ids.taken and "myint" not in ids.names
    out = check_rename(code, {"out": "o", "z": "zz"})
    assert "goto out;" in out and "\nout:\n    return o;" in out and "myint zz = o;" in out


def test_strings_comments_and_non_ascii_stay():
    code = """void greet(const char *name, int count)
{
    /* count names: héllo wörld ≠ ascii */
    for (int n = 0; n < count; n++)
        printf("count=%d name=%s ünïcode\\n", count, name);  // name again
    char c = 'n';
}
"""
    ids = Identifiers(code)
    assert ids.names == ["name", "count", "n", "c"]
    out = check_rename(code, {"count": "k", "name": "who", "n": "j"})
    assert "/* count names: héllo wörld ≠ ascii */" in out and "// name again" in out
    assert 'printf("count=%d name=%s ünïcode\\n", k, who);' in out and "char c = 'n';" in out
    assert "for (int j = 0; j < k; j++)" in out


def test_extern_locals_prototypes_and_attributes():
    code = """int f(int a)
{
    extern int global_counter;
    int helper(int);
    static int (*hook)(int) = 0;
    int unused_var __attribute__((unused));
    int __attribute__((aligned(a_align))) b = a;
    return helper(a) + global_counter + hook(b);
}
"""
    ids = Identifiers(code)
    # tree-sitter-c does not know attributes after a declarator: `unused_var` comes out of a doubtful parse
    # (a MISSING `;`) and, being used nowhere else, is not renamable.
    assert ids.names == ["a", "hook", "b"]
    assert "a_align" in ids.taken and "unused" in ids.taken
    check_rename(code, {"a": "x", "hook": "h", "b": "c"})


@pytest.mark.parametrize("code, names", [
    # attribute-like macros between type and name, or after the name: error recovery decides which word is
    # the declarator by the words' lengths, so the name is the candidate used elsewhere
    ("void f(int n) { int nb_frames, i, av_unused changed; nb_frames = n; for (i = 0; i < n; i++) changed = i; }",
     ["n", "nb_frames", "i", "changed"]),
    ("static float64 round_pack(flag zSign, uint64_t zSig STATUS_PARAM) { return pack(zSign, zSig); }",
     ["zSign", "zSig"]),
    ("int f(QCryptoHashAlgorithm hash G_GNUC_UNUSED, const uint8_t *key G_GNUC_UNUSED, size_t nkey) "
     "{ return nkey; }", ["nkey"]),
    ("void f(void) { register vector unsigned char pa, pb; pa = vec_avg(pa, pb); }", ["pa", "pb"]),
    # a macro before the function name must not be taken for a variable
    ("static void QEMU_NORETURN help(void)\n{\n    const char *msg = \"usage\";\n    puts(msg);\n    exit(1);\n}\n",
     ["msg"]),
    ("int f(int fd) { struct { uint64_t off; } QEMU_PACKED hdr; hdr.off = 1; return write(fd, &hdr, sizeof(hdr)); }",
     ["fd", "hdr"]),
])
def test_macros_next_to_declarators(code, names):
    assert error_count(code) > 0
    ids = Identifiers(code)
    assert ids.names == names
    check_rename(code, {n: f"v{i}_" for i, n in enumerate(names)})


def test_knr_parameters():
    code = "int f(a, p)\n    int a;\n    char *p;\n{\n    return a + *p;\n}\n"
    ids = Identifiers(code)
    assert ids.names == ["a", "p"]
    out = check_rename(code, {"a": "x", "p": "q"})
    assert out == "int f(x, q)\n    int x;\n    char *q;\n{\n    return x + *q;\n}\n"


def test_function_without_return_type_line():
    # Devign often drops the `static int` line: the function still parses (with a hidden `int `), and the
    # hidden prefix never shows in the result.
    code = "build_header(GArray *linker, AcpiTableHeader *h, int len)\n{\n    h->length = cpu_to_le32(len);\n}\n"
    assert error_count(code) > 0  # as it is, tree-sitter cannot make a function definition of it
    ids = Identifiers(code)
    assert ids.function_name == "build_header"
    assert ids.names == ["linker", "h", "len"]
    out = check_rename(code, {"h": "hdr", "len": "size"})
    assert out == ("build_header(GArray *linker, AcpiTableHeader *hdr, int size)\n"
                   "{\n    hdr->length = cpu_to_le32(size);\n}\n")
    # A macro that generates a function is not mistaken for a K&R definition.
    assert Identifiers("PPC_OP(slw)\n{\n    T0 = T0 << T1;\n    RETURN();\n}\n").names == []


def test_partial_parses_never_crash():
    code = """static void QEMU_NORETURN worker(void *opaque)
{
    State *s = opaque;
    Item *it;
    QTAILQ_FOREACH(it, &s->items, next) {
        it->done = true
    }
    FF_DISABLE_DEPRECATION_WARNINGS
    s->count++;
}
"""
    assert error_count(code) > 0
    ids = Identifiers(code)
    assert {"opaque", "s", "it"} <= set(ids.names)
    assert "next" not in ids.names and "items" not in ids.names
    check_rename(code, {n: f"v{i}_" for i, n in enumerate(ids.names)})
    for junk in ["", "   ", "@@@ }}} {", "int", "{ int x; ", "#define X 1\n", "\ud800 int f(int a) {}"]:
        ids = Identifiers(junk)
        assert isinstance(ids.names, list)
        assert ids.rename({}) == junk


def test_invalid_renames_raise():
    code = "int f(int a, int b) { int tmp = a; a = b; b = tmp; return g(a, NULL); }"
    ids = Identifiers(code)
    assert ids.names == ["a", "b", "tmp"]
    for bad, message in [({"c": "x"}, "not a renamable"), ({"g": "x"}, "not a renamable"),
                         ({"f": "x"}, "not a renamable"), ({"a": "int"}, "keyword"), ({"a": "NULL"}, "keyword"),
                         ({"a": "tmp"}, "already used"), ({"a": "g"}, "already used"),
                         ({"a": "2x"}, "not a C identifier"), ({"a": "x-y"}, "not a C identifier"),
                         ({"a": "é"}, "not a C identifier"), ({"a": ""}, "not a C identifier"),
                         ({"a": "x", "b": "x"}, "several")]:
        with pytest.raises(ValueError, match=message):
            ids.rename(bad)
    assert not ids.is_valid_new_name("b") and not ids.is_valid_new_name("size_t")
    assert ids.is_valid_new_name("x_1") and ids.is_valid_new_name("_y")
    assert ids.rename({"a": "a"}) == code  # a no-op, allowed
    assert ids.rename({"a": "b2", "b": "a2"}) == (
        "int f(int b2, int a2) { int tmp = b2; b2 = a2; a2 = tmp; return g(b2, NULL); }")


def test_identifier_vocabulary():
    funcs = [
        "int f(int len, char *buf) { return len + buf[0]; }",
        "int g(int len, int i) { for (int j = 0; j < i; j++) len++; return len; }",
        "void h(char *buf, int i) { buf[i] = 0; }",
        "void k(void) { int i = 0; (void)i; }",
    ]
    assert identifier_vocabulary(funcs) == ["i", "buf", "len"]  # i in 3 functions, buf and len in 2
    assert identifier_vocabulary(funcs, min_count=1) == ["i", "buf", "len", "j"]
    assert identifier_vocabulary(funcs, max_size=1) == ["i"]
    assert identifier_vocabulary([]) == []


@pytest.mark.slow  # parses and renames all 2,732 test functions
@needs_real_devign  # real FFmpeg/QEMU C (macros, K&R quirks): the synthetic stand-in is far more regular
def test_renaming_every_identifier_of_devign_test_functions():
    with gzip.open(DEVIGN_DIR / "test.jsonl.gz", "rt", encoding="utf-8") as fh:
        funcs = [json.loads(line)["func"] for line in fh]
    assert len(funcs) == 2732
    t0 = time.perf_counter()
    without, total_names = 0, 0
    for code in funcs:
        ids = Identifiers(code)
        if not ids.names:
            without += 1
            continue
        total_names += len(ids.names)
        mapping, k = {}, 0
        for name in ids.names:
            while not ids.is_valid_new_name(f"v{k}_"):
                k += 1
            mapping[name] = f"v{k}_"
            k += 1
        out = ids.rename(mapping)
        assert error_count(out) <= error_count(code), code
        # the same identifiers stay renamable (so their number is unchanged), in the same order
        assert Identifiers(out).names == [mapping[n] for n in ids.names], code
    seconds = time.perf_counter() - t0
    print(f"\nDevign test split: {len(funcs)} functions, {without} ({without / len(funcs):.1%}) without a "
          f"renamable identifier, {len(funcs) - without} ({1 - without / len(funcs):.1%}) with >=1, "
          f"{total_names / len(funcs):.1f} renamable identifiers per function on average; {seconds:.1f} s")
    assert without / len(funcs) < 0.05
