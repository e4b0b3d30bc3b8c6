"""The configs as pydantic reads them: JSON's types exactly, YAML's `1e-3` as a number, every
field with its help, and the configs still plain dataclasses (pickled to Ray workers, saved as
cfg.json)."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from sae.config import SaeConfig, TrainConfig, field_help, from_dict
from sweeps.config import (
    AnalyzeOptions,
    Config,
    ConfigError,
    config_help,
    from_mapping,
    load_config,
)


def _load(*sets: str) -> Config:
    return load_config(None, ["data.path=some/dataset", *sets])


def test_every_field_of_every_section_has_help_and_is_listed():
    listed = config_help()
    for section in dataclasses.fields(Config):
        cls = type(getattr(Config(), section.name))
        helps = field_help(cls)
        for f in dataclasses.fields(cls):
            assert helps.get(f.name), f"{section.name}.{f.name} has no docstring"
            assert f"  {section.name}.{f.name} = " in listed
    assert all(field_help(AnalyzeOptions).get(f.name) for f in dataclasses.fields(AnalyzeOptions))
    # inherited fields keep theirs (SweepTrainConfig extends TrainConfig)
    assert field_help(type(Config().train))["lr"] == field_help(TrainConfig)["lr"]


@pytest.mark.parametrize("value, want", [("1e-3", 0.001), ("'2e-1'", 0.2), ("3", 3.0)])
def test_a_number_field_takes_yamls_numeric_strings_and_integers(value, want):
    # YAML 1.1 reads 1e-3 (no dot) as a string
    cfg = load_config(None, ["data.path=x", f"train.jumprelu_init_threshold={value}"])
    assert cfg.train.jumprelu_init_threshold == want
    assert type(cfg.train.jumprelu_init_threshold) is float


@pytest.mark.parametrize(
    "value, want",
    [
        ("tune.num_samples=true", "tune.num_samples: expected an integer, got True"),
        ("tune.num_samples='3'", "tune.num_samples: expected an integer, got '3'"),
        ("tune.num_samples=3.0", "tune.num_samples: expected an integer, got 3.0"),
        ("tune.asha=1", "tune.asha: expected true or false, got 1"),
        ("tune.asha='yes'", "tune.asha: expected true or false, got 'yes'"),
        ("train.epochs=true", "train.epochs: expected a number, got True"),
        ("sweep.name=3", "sweep.name: expected a string, got 3"),
        ("tune.pick_l0=[1, x]", "tune.pick_l0[1]: expected a number, got 'x'"),
        ("tune.objectives=val/fvu:min", "tune.objectives: expected a list of strings"),
        ("search.points_to_evaluate=[3]", "search.points_to_evaluate[0]: expected a mapping"),
        ("model.dtype=half", "model.dtype: expected one of auto, float32, float16, bfloat16"),
        ("tune.verbose=true", "tune.verbose: expected an integer, got True"),
    ],
)
def test_nothing_else_is_converted(value, want):
    with pytest.raises(ConfigError) as error:
        _load(value)
    assert want in str(error.value) and "\n" not in str(error.value)


def test_unknown_fields_are_named_together_with_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown train field\(s\): nope, zz; valid: .*lr"):
        _load("train.zz=1", "train.nope=2")
    with pytest.raises(ConfigError, match=r"unknown search field\(s\): kk; valid: "):
        from_mapping({"data": {"path": "x"}, "search": {"kk": 1}})


def test_an_sae_config_reads_back_from_its_own_dict():
    cfg = SaeConfig(k=4, matryoshka_fractions=[0.25, 0.5], jumprelu_bandwidth=0.1)
    assert from_dict(SaeConfig, dataclasses.asdict(cfg)) == cfg
    with pytest.raises(ValueError, match=r"^SaeConfig\.k: expected an integer, got '4'$"):
        from_dict(SaeConfig, {"k": "4"})


def test_a_loaded_config_is_plain_dataclasses_that_pickle():
    cfg = _load("train.epochs=2", "search.lr=1e-3")
    assert type(cfg) is Config and dataclasses.is_dataclass(cfg.train)
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert dataclasses.replace(cfg.sae, k=3).k == 3


def test_the_searched_hyperparameters_are_declared_once():
    """sweeps.vocabulary.Hyperparams declares them: the search section holds one field per
    searched hyperparameter (beside its switch auxk and its points), the space's dimensions
    are the numeric ones, and a config may fix none of them."""
    from sweeps.config import SEARCHED
    from sweeps.space import PARAMS, SearchConfig
    from sweeps.vocabulary import NUMERIC_PARAMS, SEARCHED_PARAMS

    search = {f.name for f in dataclasses.fields(SearchConfig)}
    assert search - {"auxk", "points_to_evaluate"} == set(SEARCHED_PARAMS)
    assert tuple(PARAMS) == NUMERIC_PARAMS
    fixed_nowhere = {name for names in SEARCHED.values() for name in names}
    assert fixed_nowhere == set(SEARCHED_PARAMS) - {"layer"} | {"num_latents"}


@pytest.mark.parametrize(
    "build, want",
    [
        (lambda: Config(), "data.path (got ''): set the dataset name"),
        (lambda: _load("data.image_column=''"), "data.image_column (got ''): name the image"),
        (lambda: _load("extract.layers=[9, 9]"), "extract.layers (got [9, 9]): give distinct"),
        (lambda: _load("tune.pick_l0=[200, 20]"), "tune.pick_l0 (got [200, 20]): give [low"),
        (lambda: _load("tune.gpus_per_trial=2"), "tune.gpus_per_trial (got 2): use 0 (CPU)"),
        (lambda: _load("tune.objectives=[]"), "tune.objectives (got []): give at least one"),
        (lambda: _load("data.seed=-1"), "data.seed (got -1): use a seed in 0..4294967295"),
        (lambda: _load("train.steps=1e30"), "train.steps: expected an integer, got '1e30'"),
        (lambda: _load("train.steps=10**19"), "train.steps: expected an integer"),
        (lambda: _load("data.limit=10000000000000000000"), "data.limit (got 10000000000000000000)"),
        (lambda: _load("tune.objectives=[val/fvu:min, lr:max]"), "tune.objectives (got 'lr:max')"),
        (
            lambda: _load("train.lr_warmup_steps=9223372036854775808"),
            "train.lr_warmup_steps (got 9223372036854775808): use a number below 2**63",
        ),
        (lambda: _load("train.epochs=.inf"), "train.epochs (got inf): use a finite number"),
        (lambda: _load("sweep.experiment=a/b"), "sweep.experiment 'a/b' is not a name"),
        (
            lambda: _load("sae.matryoshka_fractions=[0.5, 0.25]"),
            "sae.matryoshka_fractions (got [0.5, 0.25]): use fractions that increase within (0, 1)",
        ),
    ],
)
def test_each_fields_own_rule_is_checked_with_its_type(build, want):
    """The rules sit on their fields (sae.config.rule): a loaded config and one built in Python
    are refused alike, in one line that names the field, the value and the fix."""
    cfg = None
    with pytest.raises(ConfigError) as e:
        cfg = build()
        cfg.validate()
    assert str(e.value).startswith(want) and "\n" not in str(e.value)


def test_a_config_built_in_python_is_checked_like_a_loaded_one():
    cfg = _load()
    cfg.tune.seed = 2**32
    with pytest.raises(ConfigError, match=r"tune.seed \(got 4294967296\): use a seed in"):
        cfg.validate()
    with pytest.raises(ConfigError, match=r"--top-images \(got 0\): use 1 or more"):
        AnalyzeOptions(top_images=0).validate()


def test_an_override_fills_a_section_left_empty_in_the_file(tmp_path):
    # `model:` with nothing under it is YAML's null; --set once failed on it
    path = tmp_path / "c.yaml"
    path.write_text("model:\ndata:\n  path: some/dataset\n")
    cfg = load_config(path, ["model.name_or_path=my/model"])
    assert cfg.model.name_or_path == "my/model"


def test_building_the_parser_reads_no_config(monkeypatch, capsys):
    """The config fields in a command's --help (the demo's with the demo config's values) are
    read when help is shown, not each time a command starts."""
    import sweeps.cli as cli

    def refuse(*args, **kwargs):
        raise AssertionError("build_parser read a config")

    monkeypatch.setattr(cli, "load_config", refuse)
    monkeypatch.setattr(cli, "config_help", refuse)
    parser = cli.build_parser()
    monkeypatch.undo()
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--help"])
    out = capsys.readouterr().out
    demo = load_config(cli.DEMO_CONFIG)
    assert f"  sweep.name = {demo.sweep.name!r}: " in out
    assert "  train.normalize_input = True: " in out


def test_num_latents_sets_the_width_from_one_latent_up():
    assert SaeConfig(num_latents=1, k=1).resolve_num_latents(8) == 1
    assert SaeConfig(expansion_factor=3).resolve_num_latents(8) == 24


@pytest.mark.parametrize(
    "sae, d_in, message",
    [
        (SaeConfig(k=0), None, "k must be > 0 (got 0)"),
        (SaeConfig(expansion_factor=0), None, "expansion_factor must be > 0 (got 0) unless"),
        (SaeConfig(), 0, "d_in must be > 0 (got 0)"),
        (SaeConfig(k=17, num_latents=16), 8, "k=17 is larger than num_latents=16: lower k"),
    ],
)
def test_an_sae_config_names_what_cannot_work(sae, d_in, message):
    with pytest.raises(ValueError) as e:
        sae.validate(d_in)
    assert str(e.value).startswith(message)


@pytest.mark.parametrize(
    "sae, d_in",
    [
        (SaeConfig(expansion_factor=0, num_latents=1, k=1), 8),
        (SaeConfig(expansion_factor=1, k=1), 1),
        (SaeConfig(k=16, num_latents=16), 8),
    ],
)
def test_an_sae_config_at_its_limits_is_valid(sae, d_in):
    sae.validate(d_in)


def test_a_value_json_cannot_hold_reaches_a_string_field_as_text():
    # YAML reads 2024-01-01 as a date; the config is checked as JSON
    assert _load("data.split=2024-01-01").data.split == "2024-01-01"


def test_unknown_fields_list_the_valid_ones_in_order():
    with pytest.raises(ConfigError) as e:
        _load("model.nme=x")
    assert str(e.value) == "unknown model field(s): nme; valid: dtype, name_or_path, revision"
