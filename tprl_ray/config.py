"""Typed stage configurations: defaults <- YAML file <- command-line flags.

Every stage has one pydantic model derived from :class:`StageConfig`. The same object drives the
``tprl`` CLI, the ``pipelines/*.py`` entrypoints for ``ray job submit`` and the tests:

    cfg = DigitsConfig.load("digits.yaml", overrides={"seed": 3})

On the command line each top-level field becomes a ``--field-name`` flag (see :func:`add_config_args`)
and any field, nested ones included, can be set with ``--set a.b=value``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Self

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message names the culprit."""


def known_name(kind: str, value: str, known) -> str:
    """``value`` if it is one of ``known``, else a ValueError listing them (for field validators)."""
    if value not in known:
        raise ValueError(f"unknown {kind} {value!r} (available: {', '.join(known)})")
    return value


class StageConfig(BaseModel):
    """Base of every stage configuration: strict keys, YAML round trip, dotted overrides."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Self:
        """Build from defaults, then the YAML file at ``path``, then ``overrides`` (dotted keys)."""
        data: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"{path}: config file not found")
            try:
                loaded = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
            if not isinstance(loaded, dict):
                raise ConfigError(f"{path}: expected a mapping at the top level")
            data = loaded
        for key, value in (overrides or {}).items():
            _set_dotted(data, key, value)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            where = f"{path}: " if path else ""
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise ConfigError(f"{where}{cls.__name__}.{loc}: {first['msg']}") from exc

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(json.loads(self.model_dump_json()), sort_keys=False))

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, for logging as MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}{k}.", v)
            else:
                out[prefix[:-1]] = value

        walk("", json.loads(self.model_dump_json()))
        return out


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a mapping")
    node[parts[-1]] = value


def add_config_args(parser: argparse.ArgumentParser, cls: type[StageConfig]) -> None:
    """Add ``--config``, ``--set`` and one ``--flag`` per top-level scalar field of ``cls``."""
    parser.add_argument("--config", type=Path, help="YAML file with this stage's settings")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override any field, dotted for nested ones (repeatable); VALUE is parsed as YAML",
    )
    for name, field in cls.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            continue
        default = field.get_default(call_default_factory=True)
        parser.add_argument(
            f"--{name.replace('_', '-')}", dest=f"cfg__{name}", default=None, metavar="V",
            help=f"{field.description or name} (default: {default})",
        )


def config_from_args(args: argparse.Namespace, cls: type[StageConfig]) -> StageConfig:
    """The stage config described by parsed ``args`` (see :func:`add_config_args`)."""
    overrides: dict[str, Any] = {}
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        overrides[key] = yaml.safe_load(raw)
    for key, raw in vars(args).items():
        if key.startswith("cfg__") and raw is not None:
            overrides[key[5:]] = yaml.safe_load(raw)
    return cls.load(args.config, overrides)
