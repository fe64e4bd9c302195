"""Config schema: defaults, YAML files, key=value overrides and the errors a user sees."""

import re
from pathlib import Path
from typing import get_args

import pytest
from pydantic import BaseModel, ValidationError

from moekd_ray.config import (ArchConfig, ChoiceDist, ConfigError, MoEKDConfig, NgramConfig, PretrainedConfig, Schedule,
                              PredictConfig, format_validation_error, load_config)

REPO = Path(__file__).resolve().parents[1]
JOB_FILES = sorted(REPO.glob("jobs/**/*.yaml"))


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_defaults_load():
    cfg = load_config()
    assert isinstance(cfg, MoEKDConfig)
    assert cfg.experts.k == 2
    assert isinstance(cfg.experts.model, ArchConfig)
    assert cfg.distill.arch().hidden_size == 96  # the "3mb" preset


def test_yaml_values_override_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "name: t\nexperts:\n  k: 4\ndistill:\n  temperature: 2.5\n"))
    assert (cfg.name, cfg.experts.k, cfg.distill.temperature) == ("t", 4, 2.5)
    assert cfg.router.epochs == 30  # untouched defaults stay


def test_empty_yaml_means_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == load_config()


def test_override_applies_and_is_parsed_as_yaml(tmp_path):
    cfg = load_config(write(tmp_path, "experts:\n  k: 2\n"), ["experts.k=3", "router.top_k=2", "data.dir=null"])
    assert cfg.experts.k == 3 and type(cfg.experts.k) is int
    assert cfg.router.top_k == 2
    assert cfg.data.dir is None


@pytest.mark.parametrize(
    "yaml_text, overrides, key",
    [
        ("experts:\n  modle: {}\n", [], "experts.modle"),
        ("colour: red\n", [], "colour"),
        ("", ["distill.temperature=-1"], "distill.temperature"),
        ("", ["experts.k=0"], "experts.k"),
        ("experts:\n  k: 2\nrouter:\n  top_k: 3\n", [], "router.top_k"),
        ("distill:\n  student: huge\n", [], "huge"),
        ("experts:\n  model:\n    hidden_size: 128\n    num_heads: 3\n", [], "num_heads"),
        ("", ["experts.k"], "experts.k"),
        ("", ["experts.k.x=1"], "experts.k"),
    ],
)
def test_bad_config_is_config_error_naming_the_key(tmp_path, yaml_text, overrides, key):
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, yaml_text), overrides)
    assert key in str(exc.value)


def test_unknown_student_preset_names_the_section():
    with pytest.raises(ConfigError, match=r"distill.*unknown student preset 'huge'"):
        load_config(None, ["distill.student=huge"])


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found") as exc:
        load_config(missing)
    assert str(missing) in str(exc.value)


@pytest.mark.parametrize("text", ["experts: [k: 2\n", "a: b: c\n"])
def test_invalid_yaml(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match="not valid YAML") as exc:
        load_config(path)
    assert str(path) in str(exc.value)


def test_top_level_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_non_mapping_model_block_is_config_error():
    with pytest.raises(ConfigError, match="experts.model"):
        load_config(None, ["experts.model=foo"])


def test_model_block_without_source_is_architecture(tmp_path):
    cfg = load_config(write(tmp_path, "experts:\n  model:\n    hidden_size: 64\n    num_heads: 2\n"))
    assert isinstance(cfg.experts.model, ArchConfig)
    assert (cfg.experts.model.hidden_size, cfg.experts.model.num_heads) == (64, 2)


def test_pretrained_model_block(tmp_path):
    text = "experts:\n  model:\n    source: pretrained\n    name_or_path: microsoft/codebert-base\n"
    model = load_config(write(tmp_path, text)).experts.model
    assert isinstance(model, PretrainedConfig)
    assert model.name_or_path == "microsoft/codebert-base"
    assert model.max_length == 400


def test_pretrained_rejects_architecture_keys(tmp_path):
    text = "experts:\n  model:\n    source: pretrained\n    name_or_path: x\n    hidden_size: 64\n"
    with pytest.raises(ConfigError, match="hidden_size"):
        load_config(write(tmp_path, text))


def test_digest_tracks_fields():
    base = load_config()
    assert base.digest() == load_config().digest()
    assert base.digest() != load_config(None, ["distill.temperature=4"]).digest()
    assert base.digest() != load_config(None, ["experts.model.hidden_size=64"]).digest()


@pytest.mark.parametrize("path", JOB_FILES or [None], ids=lambda p: str(p.relative_to(REPO)) if p else "none")
def test_job_files_validate(path):
    """Each job file validates, and every value it sets is the value the config holds (none dropped, renamed or
    silently replaced by a default)."""
    import yaml

    if path is None:
        pytest.skip("no YAML files under jobs/ yet")
    held = load_config(path).model_dump(mode="json")
    wrong = list(differences(yaml.safe_load(path.read_text()), held, ""))
    assert not wrong, f"{path.name}: set in the file but not held so by the config: {wrong}"


def differences(given, held, where: str):
    """Dotted paths where `given` (a YAML tree) is not contained in `held` (the config's dump)."""
    if isinstance(given, dict):
        if not isinstance(held, dict):
            yield where
            return
        for key, value in given.items():
            if key not in held:
                yield f"{where}.{key}".lstrip(".")
            else:
                yield from differences(value, held[key], f"{where}.{key}".lstrip("."))
    elif isinstance(given, list) and isinstance(held, list) and len(given) == len(held):
        for i, (a, b) in enumerate(zip(given, held)):
            yield from differences(a, b, f"{where}[{i}]")
    elif given != held:
        yield f"{where}: {given!r} != {held!r}"


def test_differences_finds_a_dropped_or_changed_value():
    held = {"a": {"b": 1, "c": [{"d": 2}]}, "e": "x"}
    assert list(differences({"a": {"b": 1, "c": [{"d": 2}]}}, held, "")) == []
    assert list(differences({"a": {"b": 2}, "f": 1, "e": "x"}, held, "")) == ["a.b: 2 != 1", "f"]
    assert list(differences({"a": {"c": [{"d": 3}]}}, held, "")) == ["a.c[0].d: 3 != 2"]


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_job_files_name_their_command(path):
    """Each job file's header (its leading comment lines) gives the command that runs it."""
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("# ").rstrip("\\ "))
    command = rf"\bmoekd (run|tune|attack|benchmark|search-student) {re.escape(str(path.relative_to(REPO)))}(\s|$)"
    assert re.search(command, " ".join(header)), f"{path.name}: its header does not say `moekd <command> {path.name}`"


def test_per_expert_models_and_schedules(tmp_path):
    cfg = load_config(write(tmp_path, "experts:\n  k: 2\n  models: [{source: ngram, buckets: 1024}, {hidden_size: 32, "
                                      "num_heads: 2}]\n  schedules: [{lr: 0.005, batch_size: 64}, {lr: 0.001}]\n"))
    assert [s.source for s in cfg.experts.specs()] == ["ngram", "config"]
    assert (cfg.experts.schedule_of(0).lr, cfg.experts.schedule_of(0).batch_size) == (0.005, 64)
    assert cfg.experts.schedule_of(1).batch_size == 16  # Schedule's default, not experts.schedule's
    with pytest.raises(ConfigError, match="experts.schedules lists 1 entries for k=2"):
        load_config(write(tmp_path, "experts:\n  k: 2\n  schedules: [{lr: 0.005}]\n"))
    with pytest.raises(ConfigError, match="experts.models.0: unknown source 'lstm'"):
        load_config(write(tmp_path, "experts:\n  k: 1\n  models: [{source: lstm}]\n"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.train_row=5"], "unknown option data.train_row: did you mean data.train_rows?"),
        (["dta.train_rows=5"], "unknown option dta: did you mean data?"),
        (["experts.schedule.warmup=0.1"], "did you mean experts.schedule.warmup_ratio?"),
        (["pretrain.schedule.keep_bestby=loss"], "did you mean pretrain.schedule.keep_best_by?"),  # a subclass
        # a union member: the architecture when `source` is left out, else the member `source` names
        (["experts.model.hidden_sise=64"], "unknown option experts.model.hidden_sise: did you mean "
                                           "experts.model.hidden_size?"),
        (["experts.model={source: pretrained, name_or_path: x, max_lenght: 9}"],
         "did you mean experts.model.max_length?"),
        (["experts.model={source: pretrain, max_lenght: 64}"], "unknown option experts.model.max_lenght: did you mean "
                                                               "experts.model.max_length?"),
        # list items, union members inside a list, an optional section, a mapping's values
        (["experts.k=1", "experts.models=[{source: ngram, bucket: 64}]"], "unknown option experts.models.0.bucket: "
                                                                           "did you mean experts.models.0.buckets?"),
        (["experts.k=1", "experts.schedules=[{lrr: 0.1}]"], "did you mean experts.schedules.0.lr?"),
        (["distill.student_arch={num_layer: 2}"], "did you mean distill.student_arch.num_layers?"),
        (["tune.space={distill.alpha: {dist: uniform, low: 0, high: 1, hihg: 1}}"],
         "unknown option tune.space.distill.alpha.hihg: did you mean tune.space.distill.alpha.high?"),
        # nothing close: the options at that level
        (["experts.model.zzz=1"], "unknown option experts.model.zzz: use one of source, vocab_size, hidden_size, "),
        (["experts.model={source: pretrained, name_or_path: x, zzz: 1}"],
         "unknown option experts.model.zzz: use one of source, name_or_path, max_length"),
    ],
)
def test_unknown_key_suggests_the_closest_one(overrides, message):
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_unknown_keys_in_a_yaml_file_are_all_named(tmp_path):
    path = write(tmp_path, "data:\n  train_row: 100\nrouter:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value) == (f"{path}: unknown option data.train_row: did you mean data.train_rows?; "
                              "unknown option router.epoch: did you mean router.epochs?")


def test_errors_of_a_section_model_are_located_in_that_model():
    """The student search validates ArchConfig alone: its keys are compared with ArchConfig's, not the top level's."""
    with pytest.raises(ValidationError) as exc:
        ArchConfig(hidden_sise=64)
    assert format_validation_error(exc.value, "student", ArchConfig) == (
        "student: unknown option hidden_sise: did you mean hidden_size?")


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold: itself, Optional/Union/discriminated-union members, list items,
    dict values."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def test_every_field_has_a_description():
    """`moekd config` and the docs read these; walks every model reachable from MoEKDConfig."""
    missing, todo, seen = [], [MoEKDConfig, PredictConfig], set()
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            if not (field.description or "").strip():
                missing.append(f"{model.__name__}.{name}")
            todo.extend(_models_in(field.annotation))
    # the walk reached union members (experts.model), list items (experts.schedules) and dict values (tune.space)
    assert {ArchConfig, NgramConfig, PretrainedConfig, ChoiceDist, Schedule} <= seen
    assert not missing, f"fields without a description: {sorted(missing)}"


def test_router_kind_is_a_union():
    """A uniform router is the plain mean: the learned router's fields are not options of it, and the default tune
    space leaves out the router dimensions it cannot use (an explicit one is an error)."""
    assert load_config(None, []).router.kind == "learned"
    assert load_config(None, ["router.epochs=5"]).router.epochs == 5  # kind left out: learned
    uniform = load_config(None, ["router.kind=uniform"])
    assert uniform.router.model_dump() == {"kind": "uniform"}
    assert not [key for key in uniform.tune.space if key.startswith("router.")]
    assert uniform.with_values({"distill.alpha": 0.5}).router.kind == "uniform"
    with pytest.raises(ConfigError, match="unknown option router.temperature: use one of kind"):
        load_config(None, ["router.kind=uniform", "router.temperature=2"])
    with pytest.raises(ConfigError, match=r"tune the learned router, but router.kind is uniform"):
        load_config(None, ["router.kind=uniform",
                           "tune.space={router.temperature: {dist: loguniform, low: 0.5, high: 2}}"])
