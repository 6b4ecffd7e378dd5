"""One config mechanism and one command grammar for every stage and job.

    seedpipe <command> [--config FILE.yaml] [--root R] [--corpus C] [--<field> V ...] [key.sub=value ...]

Every entry point (ingest, features, qembeds, tokenize, train-tokenizer, train-lora, ...) loads one
typed config dataclass with `parse_command`:

    dataclass defaults  <  --config YAML  <  --flags  <  dotted key.sub=value overrides

- One library for the merge: OmegaConf structured configs. Unknown keys and values of the wrong
  type fail naming the full key (OmegaConf); values out of range fail naming the field (the
  dataclasses' `__post_init__`). Both surface as `ConfigError` (a `ValueError`), exit status 2.
- Flags are only shorthands for keys: every top-level scalar field `some_name` is `--some-name`
  (booleans `--some-name / --no-some-name`), so `--root R` and `root=R` are the same thing, and
  `--help` lists each field with its default and its doc (the attribute docstring under the
  field). Nested sections (`optim.lr`, `resources.num_workers`) are set with dotted overrides; the
  help's epilog lists them with their defaults. A command may add aliases for nested keys
  (`--num-workers` -> `resources.num_workers`).
- argparse (stdlib) builds the parser instead of a dataclass-CLI library (tyro, simple-parsing):
  those bring their own merge semantics, and the merge order must stay OmegaConf's, the same for
  YAML files, flags and overrides.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key."""


@dataclass(kw_only=True)
class CommonSettings:
    """The keys every command accepts (root, corpus, dry_run, address): the base of stage and job configs."""

    root: str = "./seed-data"
    """Catalog root: a local path or a filesystem URI (shared storage on a cluster)."""
    corpus: str = ""
    """Corpus name (`<root>/corpora/<corpus>/`). Required."""
    dry_run: bool = False
    """Print the plan (inputs, what would run) and stop; write nothing."""
    address: str | None = None
    """Ray cluster address (default: RAY_ADDRESS, else a local Ray)."""

    def __post_init__(self) -> None:
        if not self.corpus:
            raise ValueError("corpus is required (--corpus NAME or corpus=NAME)")


def load_config(
    cls: type[T], config_path: str | Path | None = None, overrides: Sequence[str] = ()
) -> T:
    """Defaults of `cls` < YAML at `config_path` < dotted `key.sub=value` overrides."""
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key.sub=value, got {bad}")
    try:
        merged = OmegaConf.structured(cls)
        if config_path is not None:
            if not Path(config_path).is_file():
                raise ConfigError(f"--config {config_path}: no such file")
            merged = OmegaConf.merge(merged, OmegaConf.load(config_path))
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except ConfigError:
        raise
    except ValueError as err:  # a dataclass's __post_init__: its message names the field
        raise ConfigError(str(err)) from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(
            f"config key {key!r}: {str(err).splitlines()[0]}" if key else str(err)
        ) from None


def to_yaml(config: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def save_config(config: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (loads back with `load_config(type(config), path)`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(config))
    return path


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass (the string literal right under each field), with
    those of its base classes: the one place a field is documented, shown by `--help`."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _nested_defaults(value: Any, prefix: str) -> list[tuple[str, Any]]:
    out = []
    for f in dataclasses.fields(value):
        sub = getattr(value, f.name)
        if dataclasses.is_dataclass(sub):
            out += _nested_defaults(sub, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", sub))
    return out


def _is_scalar(tp: Any) -> bool:
    """str/int/float/bool, or Optional of one: the fields that get a flag of their own."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return len(args) == 1 and _is_scalar(args[0])
    return tp in (str, int, float, bool)


def _to_text(value: Any) -> str:
    if value is None:
        return "null"
    if value == "":
        return "''"
    return str(value).lower() if isinstance(value, bool) else str(value)


def build_parser(cls: type, *, prog: str, description: str, aliases: Mapping[str, str] | None = None,
                 positional: str | None = None) -> argparse.ArgumentParser:  # fmt: skip
    """The argparse parser for `cls`: `--config`, one flag per top-level scalar field, the
    `aliases` (flag name -> dotted key), an optional positional list field, and the overrides."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    instance_defaults = {f.name: _default(f) for f in dataclasses.fields(cls)}
    nested = [
        (key, value)
        for name, value in instance_defaults.items()
        if dataclasses.is_dataclass(value)
        for key, value in _nested_defaults(value, f"{name}.")
    ]
    epilog = "dotted overrides (key.sub=value) for the nested settings, with their defaults:\n" + "\n".join(
        f"  {k}={_to_text(v)}" for k, v in nested
    ) if nested else None  # fmt: skip
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="YAML config (keys as below); a shipped one by name, e.g. tiny_stage1")  # fmt: skip
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if f.name == positional or not _is_scalar(tp):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = instance_defaults[f.name]
        text = f"{docs.get(f.name, '')} (default: {_to_text(default)!s})".strip()
        if tp is bool:
            parser.add_argument(flag, dest=f"set:{f.name}", action=argparse.BooleanOptionalAction,
                                default=None, help=text)  # fmt: skip
        else:
            parser.add_argument(flag, dest=f"set:{f.name}", metavar=f.name.upper(), default=None,
                                help=text)  # fmt: skip
    for flag, key in (aliases or {}).items():
        default = dict(nested).get(key)
        parser.add_argument(flag, dest=f"set:{key}", metavar="V", default=None,
                            help=f"= {key}=V (default: {_to_text(default)})")  # fmt: skip
    if positional:
        parser.add_argument(positional, nargs="+", help=docs.get(positional, ""))
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser


def find_config(name: str, config_dirs: Sequence[str | Path] = ()) -> Path:
    """`--config` as given when it is a file, else a shipped config by name (`tiny_stage1` or
    `tiny_stage1.yaml` in one of `config_dirs`), so the shipped YAMLs work from any folder."""
    path = Path(name)
    if path.is_file():
        return path
    for directory in config_dirs:
        for candidate in (Path(directory, name), Path(directory, f"{name}.yaml")):
            if candidate.is_file():
                return candidate
    shipped = sorted(p.stem for d in config_dirs for p in Path(d).glob("*.yaml"))
    raise ConfigError(
        f"--config {name}: no such file" + (f" (shipped: {', '.join(shipped)})" if shipped else "")
    )


def parse_command(cls: type[T], argv: Sequence[str] | None, *, prog: str, description: str,
                  aliases: Mapping[str, str] | None = None, positional: str | None = None,
                  config_dirs: Sequence[str | Path] = ()) -> T:  # fmt: skip
    """Parse `argv` into a validated `cls`: defaults < --config < flags < key=value overrides.
    `config_dirs`: where `--config NAME` finds shipped YAMLs by name."""
    parser = build_parser(cls, prog=prog, description=description, aliases=aliases,
                          positional=positional)  # fmt: skip
    argv = list(argv or [])
    # key=value words may sit anywhere (before or after flags): take them out before argparse,
    # which would otherwise read them as a flag's value or as the positional.
    overrides = [a for a in argv if "=" in a and not a.startswith("-") and _is_key(a)]
    rest = [a for a in argv if a not in overrides]
    args = parser.parse_args(rest)
    flags = [
        f"{dest[4:]}={_to_text(value)}"
        for dest, value in vars(args).items()
        if dest.startswith("set:") and value is not None
    ]
    if positional:
        values = getattr(args, positional)
        flags.append(f"{positional}=[{','.join(_quote(v) for v in values)}]")
    path = find_config(args.config, config_dirs) if args.config else None
    config = load_config(cls, path, flags + overrides + list(args.overrides))
    check_tracking_store(config)
    return config


def check_tracking_store(config: Any) -> None:
    """Before any work: a command on an object-store root needs a tracking server (the embedded
    SQLite store lives beside a local root). Commands that track nothing themselves (`submit`:
    the job tracks, on the cluster, with the cluster's environment) set `tracks_runs = False`."""
    import os

    from pipelines.storage import is_remote

    root = getattr(config, "root", None)
    if not getattr(config, "tracks_runs", True) or not root or not is_remote(str(root)):
        return
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        from pipelines.tracking.store import remote_root_needs_server

        raise ConfigError(remote_root_needs_server(str(root)))


def _is_key(word: str) -> bool:
    key = word.split("=", 1)[0]
    return bool(key) and all(part.isidentifier() for part in key.split("."))


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def cli_main(fn: Any) -> Any:
    """Wrap an entry point `main(argv) -> int`: a user error (ValueError: a bad config key, a
    missing dataset, a model reference that does not resolve) is one clear line and exit status 2,
    not a traceback; `SEEDPIPE_DEBUG=1` shows the traceback."""

    @functools.wraps(fn)
    def wrapper(argv: Sequence[str] | None = None) -> int:
        import os
        import sys

        try:
            return fn(sys.argv[1:] if argv is None else argv)  # `python -m module ARGS`
        except ValueError as err:
            if os.environ.get("SEEDPIPE_DEBUG"):
                raise
            print(f"error: {err}", file=sys.stderr)
            return 2

    return wrapper
