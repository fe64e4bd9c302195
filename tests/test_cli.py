"""`moekd validate` and `moekd config` through cli.main (no Ray, no MLflow)."""

import argparse

import pytest

from moekd_ray.cli import build_parser, main


@pytest.fixture(autouse=True)
def no_debug_env(monkeypatch):
    monkeypatch.delenv("MOEKD_DEBUG", raising=False)


def job(tmp_path, text: str) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return str(path)


def test_validate_good_config(tmp_path, capsys):
    path = job(tmp_path, "experts:\n  k: 3\n")
    assert main(["validate", path]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: valid") and "3 experts" in out


def test_validate_applies_overrides(tmp_path, capsys):
    assert main(["validate", job(tmp_path, ""), "experts.k=4", "distill.student=25mb"]) == 0
    out = capsys.readouterr().out
    assert "4 experts" in out and "student 25mb" in out


@pytest.mark.parametrize(
    "text, overrides, key",
    [
        ("experts:\n  modle: {}\n", [], "experts.modle"),
        ("distill:\n  temperature: -1\n", [], "distill.temperature"),
        ("", ["experts.k=0"], "experts.k"),
        (None, [], "not found"),
    ],
)
def test_validate_error_is_short_and_has_no_traceback(tmp_path, capsys, text, overrides, key):
    path = job(tmp_path, text) if text is not None else str(tmp_path / "missing.yaml")
    assert main(["validate", path, *overrides]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("moekd: error:")
    assert "Traceback" not in captured.err
    assert key in captured.err
    assert len(captured.err.strip().splitlines()) <= 3  # a header and one line per problem


def test_unknown_option_suggests_the_closest(tmp_path, capsys):
    path = job(tmp_path, "data:\n  train_row: 100\n")
    assert main(["validate", path]) == 2
    assert capsys.readouterr().err == (f"moekd: error: {path}: unknown option data.train_row: did you mean "
                                       "data.train_rows?\n")
    assert main(["validate", job(tmp_path, ""), "experts.model.hidden_sise=64"]) == 2
    err = capsys.readouterr().err
    assert "unknown option experts.model.hidden_sise: did you mean experts.model.hidden_size?" in err


def test_debug_flag_raises(tmp_path):
    with pytest.raises(Exception, match="distill.temperature"):
        main(["--debug", "validate", job(tmp_path, "distill:\n  temperature: -1\n")])


def test_config_lists_options(capsys):
    assert main(["config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    temp = [line for line in lines if line.startswith("distill.temperature = ")]
    assert len(temp) == 1 and "10.0" in temp[0] and "# Distillation temperature" in temp[0]
    assert any(line.startswith("experts.k = 2") for line in lines)
    assert any(line.startswith("data.subset = 'random'") for line in lines)


def test_config_shows_the_effective_defaults(capsys):
    import ast

    from moekd_ray.config import load_config

    main(["config"])
    defaults = load_config().model_dump(mode="json")
    wrong = []
    from moekd_ray.config import PredictConfig

    predict = PredictConfig().model_dump(mode="json")
    shown_predict = 0
    for line in capsys.readouterr().out.splitlines():
        key, shown = line.split("  # ")[0].split(" = ", 1)
        if key.startswith("moekd predict --"):  # its command-line options, from the same schema
            option = key.removeprefix("moekd predict --").replace("-", "_")
            assert ast.literal_eval(shown) == predict[option], line
            shown_predict += 1
            continue
        value = defaults
        for part in key.split("."):
            value = value[part]
        if ast.literal_eval(shown) != value:
            wrong.append(f"{key}: shows {shown}, default is {value!r}")
    assert not wrong, wrong
    assert shown_predict == len(predict)


def test_config_describes_every_option(capsys):
    assert main(["config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    bare = [line.split(" = ")[0] for line in lines if not line.split("  # ", 1)[1].strip()]
    assert not bare, f"options without a description: {bare}"


def _parsers(parser, name="moekd"):
    """Every (sub)command's parser, by its command line: moekd, moekd run, ..., moekd registry promote."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def _help_entries(text: str) -> dict[str, str]:
    """--help's option entries, each joined onto one line, by the option's first flag."""
    entries, current = {}, None
    for line in text.splitlines():
        if line.startswith("  -"):  # an option's first line; its wrapped text is indented further
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif current and line.startswith("   "):
            entries[current] += line
        else:
            current = None
    return {flag: " ".join(entry.split()) for flag, entry in entries.items()}


def test_every_option_help_shows_its_default(capsys):
    """Every option that takes a value and is not required says its default in --help; flags need none."""
    missing, checked = [], 0
    for command, parser in _parsers(build_parser()):
        with pytest.raises(SystemExit):
            main([*command.split()[1:], "--help"])
        entries = _help_entries(capsys.readouterr().out)
        for action in parser._actions:
            if not action.option_strings or action.required or action.nargs == 0:  # positional, required, a flag
                continue
            checked += 1
            entry = entries.get(action.option_strings[0], "")
            wanted = "(default: " if action.default is None else f"(default: {action.default})"
            if wanted not in entry:
                missing.append(f"{command} {action.option_strings[0]}: {entry!r}")
    assert checked > 15
    assert not missing, missing


def test_predict_help_shows_the_threshold_default(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    assert _help_entries(capsys.readouterr().out)["--threshold"].endswith("(default: 0.5)")
