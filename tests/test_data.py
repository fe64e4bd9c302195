"""Devign loading: row validation with file:line errors, the data-folder rule, subsets, and the real data."""

import gzip
import json
from pathlib import Path

import pytest

from moekd_ray import data
from moekd_ray.config import DataConfig
from moekd_ray.data import DataError, load_devign, read_jsonl, resolve_data_dir, take_subset, validate_row

from conftest import DEVIGN_DIR, needs_real_devign

GOOD = {"func": "int f(void) { return 0; }", "target": 0, "project": "FFmpeg"}


def write_rows(path: Path, lines: list[str], prefix: bytes = b"") -> Path:
    raw = prefix + "".join(line + "\n" for line in lines).encode("utf-8")
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def test_reads_valid_rows_and_skips_blank_lines(tmp_path):
    path = write_rows(tmp_path / "t.jsonl", [json.dumps(GOOD), "", json.dumps({"func": "x", "target": 1})])
    rows = read_jsonl(path, 1000)
    assert rows == [GOOD, {"func": "x", "target": 1, "project": ""}]


def test_malformed_json_reports_its_line(tmp_path):
    path = write_rows(tmp_path / "t.jsonl", [json.dumps(GOOD), "", json.dumps(GOOD), '{"func": "x", "target": '])
    with pytest.raises(DataError, match="malformed JSON") as exc:
        read_jsonl(path, 1000)
    assert f"{path}:4:" in str(exc.value)


@pytest.mark.parametrize(
    "row, expect",
    [
        ({"target": 0}, "missing field 'func'"),
        ({"func": "int x;"}, "missing field 'target'"),
        ({"func": "int x;", "target": 2}, "'target' must be 0 or 1"),
        ({"func": "int x;", "target": "yes"}, "'target' must be 0 or 1"),
        ({"func": "int x;", "target": True}, "'target' must be 0 or 1"),
        ({"func": "  \n", "target": 0}, "'func' is empty"),
        ({"func": 5, "target": 0}, "'func' must be a string"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_bad_row_names_file_and_line(tmp_path, row, expect):
    path = write_rows(tmp_path / "t.jsonl", [json.dumps(GOOD), json.dumps(row)])
    with pytest.raises(DataError, match=expect) as exc:
        read_jsonl(path, max_chars=100)
    assert f"{path}:2:" in str(exc.value)


def test_validate_row_keeps_func_at_the_limit():
    assert validate_row({"func": "x" * 100, "target": 1}, "f:1", 100)["target"] == 1


def test_long_function_is_truncated_and_counted(tmp_path, caplog):
    path = write_rows(tmp_path / "t.jsonl", [json.dumps(GOOD), json.dumps({"func": "x" * 1_000_000, "target": 1})])
    with caplog.at_level("WARNING", logger="moekd.data"):
        rows = read_jsonl(path, max_chars=100)
    assert len(rows[1]["func"]) == 100 and rows[1]["target"] == 1
    assert "1 functions longer than data.max_chars=100" in caplog.text


def test_empty_file(tmp_path):
    path = write_rows(tmp_path / "t.jsonl", ["", "  "])
    with pytest.raises(DataError, match="empty") as exc:
        read_jsonl(path, 1000)
    assert str(path) in str(exc.value)


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(DataError, match="folder, not a file"):
        read_jsonl(tmp_path, 1000)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="cannot be read"):
        read_jsonl(tmp_path / "absent.jsonl", 1000)


def test_bom_is_accepted(tmp_path):
    path = write_rows(tmp_path / "t.jsonl", [json.dumps(GOOD)], prefix=b"\xef\xbb\xbf")
    assert read_jsonl(path, 1000) == [GOOD]


def test_gzip_with_bom(tmp_path):
    path = write_rows(tmp_path / "t.jsonl.gz", [json.dumps(GOOD)] * 3, prefix=b"\xef\xbb\xbf")
    assert read_jsonl(path, 1000) == [GOOD] * 3


def test_truncated_gzip(tmp_path):
    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(gzip.compress((json.dumps(GOOD) + "\n").encode() * 50)[:-12])
    with pytest.raises(DataError, match="cannot be read"):
        read_jsonl(path, 1000)


def test_invalid_utf8(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"func": "int \xff;", "target": 0}\n')
    with pytest.raises(DataError, match="not valid UTF-8") as exc:
        read_jsonl(path, 1000)
    assert str(path) in str(exc.value)


def test_invalid_utf8_reports_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes((json.dumps(GOOD) + "\n").encode() * 999 + b'{"func": "\xff", "target": 0}\n')
    with pytest.raises(DataError) as exc:
        read_jsonl(path, 1000)
    assert f"{path}:1000" in str(exc.value)


def test_lone_surrogate_is_replaced(tmp_path):
    path = write_rows(tmp_path / "t.jsonl", ['{"func": "a\\ud800b", "target": 1}'])
    func = read_jsonl(path, 1000)[0]["func"]
    func.encode("utf-8")  # would raise on a lone surrogate
    assert func == "a?b"


# ------------------------------------------------------------------------------------- data folder rule
def test_config_dir_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKD_DATA_DIR", str(tmp_path / "env"))
    (tmp_path / "cfg").mkdir()
    assert resolve_data_dir(DataConfig(dir=str(tmp_path / "cfg"))) == tmp_path / "cfg"


def test_config_dir_must_exist(tmp_path):
    with pytest.raises(DataError, match="data.dir"):
        resolve_data_dir(DataConfig(dir=str(tmp_path / "absent")))


def test_env_is_second(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKD_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(DataConfig()) == tmp_path
    monkeypatch.setenv("MOEKD_DATA_DIR", str(tmp_path / "absent"))
    with pytest.raises(DataError, match="MOEKD_DATA_DIR"):
        resolve_data_dir(DataConfig())


def test_default_folder_then_hub(tmp_path, monkeypatch):
    monkeypatch.delenv("MOEKD_DATA_DIR", raising=False)
    assert data.default_data_dir() == Path(data.__file__).resolve().parents[2] / "shared" / "data" / "devign"
    monkeypatch.setattr(data, "default_data_dir", lambda: tmp_path)
    assert resolve_data_dir(DataConfig()) == tmp_path
    monkeypatch.setattr(data, "default_data_dir", lambda: tmp_path / "absent")
    assert resolve_data_dir(DataConfig()) is None


def test_split_file_prefers_gzip_and_names_missing_split(tmp_path):
    (tmp_path / "train.jsonl").touch()
    (tmp_path / "train.jsonl.gz").touch()
    assert data.split_file(tmp_path, "train").name == "train.jsonl.gz"
    with pytest.raises(DataError, match="no valid.jsonl"):
        data.split_file(tmp_path, "valid")


# ----------------------------------------------------------------------------------------------- subsets
ROWS = [{"i": i} for i in range(100)]


def test_subset_first():
    assert take_subset(ROWS, 5, "first", seed=3) == ROWS[:5]


def test_subset_random_is_seeded_and_sorted():
    a = take_subset(ROWS, 10, "random", seed=1)
    assert a == take_subset(ROWS, 10, "random", seed=1)
    assert a != take_subset(ROWS, 10, "random", seed=2)
    idx = [r["i"] for r in a]
    assert len(set(idx)) == 10 and idx == sorted(idx)
    assert idx != list(range(10))


def test_subset_without_limit_or_above_size():
    assert take_subset(ROWS, None, "random", 0) == ROWS
    assert take_subset(ROWS, 500, "first", 0) == ROWS


# ----------------------------------------------------------------- the suite's Devign (real, or its stand-in)
def test_load_devign_subsets(monkeypatch):
    monkeypatch.delenv("MOEKD_DATA_DIR", raising=False)
    ds = load_devign(DataConfig(dir=str(DEVIGN_DIR), train_rows=50, eval_rows=20), seed=0)
    assert {k: len(v) for k, v in ds.items()} == {"train": 50, "valid": 20, "test": 20}
    for split in ds.values():
        assert split.column_names == ["func", "target", "project"]
        assert set(split["target"]) <= {0, 1}
        assert all(f.strip() for f in split["func"])


def test_the_suite_reads_its_devign_by_the_documented_rule():
    """Without data.dir the tests' loads go where $MOEKD_DATA_DIR or ../shared/data/devign points: the real data
    where it is there, else the stand-in conftest wrote (whose rows are tests/synthetic.py's functions)."""
    assert resolve_data_dir(DataConfig()) == DEVIGN_DIR
    first = read_jsonl(DEVIGN_DIR / "test.jsonl.gz", DataConfig().max_chars)[0]
    assert load_devign(DataConfig(train_rows=5, eval_rows=5, subset="first"), seed=0)["test"][0] == first


@needs_real_devign
def test_real_test_split_size():
    rows = read_jsonl(DEVIGN_DIR / "test.jsonl.gz", DataConfig().max_chars)
    assert len(rows) == 2732
    assert sum(r["target"] for r in rows) == 1255  # README.txt of the data folder
