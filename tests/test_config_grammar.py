"""The one command grammar (pipelines.config.parse_command): defaults < --config YAML < --flags <
key.sub=value overrides, flags as shorthands for keys, and a --help that documents every key."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest

from jobs.stage2 import Stage2JobConfig
from pipelines.cli_common import parse_stage
from pipelines.config import ConfigError, field_docs, parse_command
from pipelines.features import FeaturesConfig


@dataclass(kw_only=True)
class Section:
    num_workers: int = 1
    """Workers of the section."""
    lr: float = 0.1


@dataclass(kw_only=True)
class Demo:
    root: str = "./seed-data"
    """Catalog root."""
    corpus: str = ""
    """Corpus name."""
    dry_run: bool = False
    """Print the plan and stop."""
    steps: int = 3
    """Steps to run."""
    address: str | None = None
    section: Section = field(default_factory=Section)


def parse(*argv: str, cls: type = Demo, **kwargs):
    return parse_command(cls, list(argv), prog="demo", description="A demo command.", **kwargs)


def help_text(capsys, *argv: str, cls: type = Demo, **kwargs) -> str:
    """`--help` output with whitespace normalised (argparse wraps the help column)."""
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv, "--help", cls=cls, **kwargs)
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())


@pytest.fixture
def yaml(tmp_path):
    path = tmp_path / "demo.yaml"
    path.write_text("root: from-yaml\nsteps: 5\ndry_run: true\nsection: {lr: 0.5}\n")
    return str(path)


def test_a_flag_is_the_key_it_names():
    """`--root R` and `root=R` give the same config, as do `--steps 4` and `steps=4`."""
    assert parse("--root", "R", "--steps", "4") == parse("root=R", "steps=4")
    assert parse("--root", "R").root == "R" and parse().root == "./seed-data"


def test_yaml_then_flags_then_overrides(yaml):
    """The YAML overrides the defaults, a flag overrides the YAML, a dotted override overrides the flag."""
    assert parse("--config", yaml).steps == 5
    assert parse("--config", yaml, "--steps", "7").steps == 7
    assert parse("--config", yaml, "--steps", "7", "steps=9").steps == 9
    config = parse("--config", yaml, "section.lr=0.25")
    assert (config.root, config.section.lr, config.section.num_workers) == ("from-yaml", 0.25, 1)


def test_boolean_flags_come_in_pairs(yaml):
    """`--dry-run` sets a bool, `--no-dry-run` clears it (also over the YAML), and `dry_run=true` is the same key."""
    assert parse().dry_run is False
    assert parse("--dry-run").dry_run is True
    assert parse("--config", yaml).dry_run is True
    assert parse("--config", yaml, "--no-dry-run").dry_run is False
    assert parse("dry_run=true") == parse("--dry-run")


def test_an_override_word_may_come_before_the_flags(yaml):
    """key=value words are read wherever they stand: before flags, before --config, between flags."""
    config = parse("steps=9", "--root", "R", "section.lr=0.3", "--config", yaml)
    assert (config.steps, config.root, config.section.lr) == (9, "R", 0.3)
    assert parse("steps=9", "--steps", "7").steps == 9  # still the override's precedence


def test_alias_flag_sets_the_nested_key():
    """A stage's `--num-workers N` sets resources.num_workers (and `--batch-size` resources.batch_size)."""
    argv = ["--corpus", "c", "--num-workers", "3", "--batch-size", "8"]
    config = parse_stage(FeaturesConfig, argv, prog="seedpipe features", doc="Features.")
    assert (config.resources.num_workers, config.resources.batch_size) == (3, 8)
    dotted = parse_stage(FeaturesConfig, ["corpus=c", "resources.num_workers=3", "resources.batch_size=8"],
                         prog="seedpipe features", doc="Features.")  # fmt: skip
    assert config == dotted
    aliased = parse("--workers", "4", aliases={"--workers": "section.num_workers"})
    assert aliased.section.num_workers == 4


def test_unknown_or_mistyped_keys_fail_naming_the_key():
    """An unknown key (top level or nested) and a value of the wrong type are a ConfigError naming the key."""
    with pytest.raises(ConfigError, match="section.lrr"):
        parse("section.lrr=1")
    with pytest.raises(ConfigError, match="stepz"):
        parse("stepz=1")
    with pytest.raises(ConfigError, match="steps"):
        parse("--steps", "many")
    with pytest.raises(ConfigError, match="no such file"):
        parse("--config", "/nonexistent/demo.yaml")


def test_help_lists_every_field_with_its_default_and_the_nested_keys(capsys):
    """`--help` shows a flag per top-level field with its doc and default, and every nested key with its default in the epilog."""
    text = help_text(capsys)
    for flag, doc, default in [("--root ROOT", "Catalog root.", "./seed-data"), ("--corpus CORPUS", "Corpus name.", "''"),
                               ("--dry-run, --no-dry-run", "Print the plan and stop.", "false"),
                               ("--steps STEPS", "Steps to run.", "3"), ("--address ADDRESS", "", "null")]:  # fmt: skip
        assert flag in text, flag
        assert f"{doc} (default: {default})".strip() in text, flag
    assert "section.num_workers=1" in text and "section.lr=0.1" in text
    assert "--section" not in text  # nested sections are set with dotted keys only


def shown(value) -> str:
    """A default as --help prints it (YAML-like: null, '', false)."""
    if value is None:
        return "null"
    if value == "":
        return "''"
    return str(value).lower() if isinstance(value, bool) else str(value)


def test_help_of_a_job_config_documents_every_key(capsys):
    """Every field of Stage2JobConfig is in its --help with its default: scalars as flags with their attribute docstring, sections as dotted keys."""
    text = help_text(capsys, cls=Stage2JobConfig)
    docs = field_docs(Stage2JobConfig)
    config = Stage2JobConfig(corpus="c")
    for f in dataclasses.fields(Stage2JobConfig):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            for sub in dataclasses.fields(value):
                key = f"{f.name}.{sub.name}"
                assert f"{key}={shown(getattr(value, sub.name))}" in text, key
        else:
            default = shown(Stage2JobConfig.__dataclass_fields__[f.name].default)
            assert "--" + f.name.replace("_", "-") in text, f.name
            assert f"{docs[f.name]} (default: {default})" in text, f.name
