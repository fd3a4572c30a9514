"""Typed stage configurations: defaults <- YAML file <- command-line flags, and their shared parts.

Every stage has one pydantic model derived from :class:`StageConfig`. The same object drives the
``tprl`` CLI, the ``pipelines/*.py`` entrypoints for ``ray job submit`` and the tests:

    cfg = DigitsConfig.load("digits.yaml", overrides={"seed": 3})

Shared parts are defined once here: the run fields (:class:`RayConfig`, :class:`RunConfig`), an actor
pool (:class:`PoolConfig`) and the model to load (:class:`BackboneConfig`). On the command line every
field becomes a flag, nested ones dotted (``--backbone.dtype float16``, see :func:`add_config_args`),
and ``--set a.b=value`` sets any field. This module imports no heavy library: the CLI builds its
parser from these classes alone.
"""

from __future__ import annotations

import argparse
import importlib
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

ASSETS = Path(__file__).resolve().parent / "assets"
EMBEDDED_MODEL = ASSETS / "tiny-llava-digits"
EMBEDDED_QWEN = ASSETS / "tiny-qwen-digits"
EMBEDDED_LFD = ASSETS / "tiny-llava-digits-lfd"
# The shipped models by name: the tiny LLaVA (the default) and the tiny Qwen2.5-VL (two board sizes).
EMBEDDED_MODELS = {"embedded": EMBEDDED_MODEL, "embedded-qwen": EMBEDDED_QWEN}
PAPER_CONFIGS = {name: ASSETS / "configs" / name for name in ("llava-1.5-7b", "llava-1.5-13b", "qwen2.5-vl-3b")}

Dtype = Literal["float32", "bfloat16", "float16"]

# Kept fractions of the visual tokens: the paper's 192, 144 and 128 of 576, and the field's 64 of 576.
PAPER_BUDGETS = [192 / 576, 144 / 576, 128 / 576, 64 / 576]


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message names the culprit."""


def known_name(kind: str, value: str, known) -> str:
    """``value`` if it is one of ``known``, else a ValueError listing them (for field validators)."""
    if value not in known:
        raise ValueError(f"unknown {kind} {value!r} (available: {', '.join(known)})")
    return value


def check_budgets(budgets: list[float], counts: bool = True) -> list[float]:
    """Each budget a kept fraction in (0, 1] or, with ``counts``, a whole number of kept tokens above 1
    (for field validators: a ValueError naming the first bad one)."""
    for b in budgets:
        if 0 < b <= 1 or (counts and b > 1 and float(b).is_integer()):
            continue
        kinds = "a kept fraction in (0, 1] nor a whole token count" if counts else "a kept fraction in (0, 1]"
        raise ValueError(f"budget {b} is {'neither ' if counts else 'not '}{kinds}")
    return budgets


def first_error(exc: ValidationError) -> str:
    """``Model.field.sub: message`` of a validation error's first problem (``Model: message`` for the
    model as a whole)."""
    first = exc.errors()[0]
    where = ".".join([exc.title, *map(str, first["loc"])])
    return f"{where}: {first['msg'].removeprefix('Value error, ')}"


class Section(BaseModel):
    """A nested part of a stage configuration: strict keys, checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StageConfig(Section):
    """Base of every stage configuration: YAML round trip, dotted overrides. ``wired`` names fields
    of its nested sections that the stage sets itself (they get no flag)."""

    wired: ClassVar[frozenset[str]] = frozenset()
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def load(
        cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None, preset: str | None = None
    ) -> Self:
        """Build from defaults, then the named preset (dotted keys), then the YAML file at ``path``,
        then ``overrides`` (dotted keys)."""
        data: dict[str, Any] = {}
        if preset is not None:
            if preset not in cls.presets:
                raise ConfigError(f"unknown preset {preset!r} (available: {', '.join(cls.presets) or 'none'})")
            for key, value in cls.presets[preset].items():
                set_dotted(data, key, value)
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"{path}: config file not found")
            try:
                loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except UnicodeDecodeError as exc:
                byte = exc.object[exc.start]
                raise ConfigError(f"{path}: not UTF-8 (byte {byte:#04x} at offset {exc.start})") from None
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
            if not isinstance(loaded, dict):
                raise ConfigError(f"{path}: expected a mapping at the top level")
            deep_merge(data, loaded)
        for key, value in (overrides or {}).items():
            set_dotted(data, key, value)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            where = f"{path}: " if path else ""
            raise ConfigError(f"{where}{first_error(exc)}") from exc

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


class RayConfig(StageConfig):
    """A stage that runs on Ray."""

    ray_address: str | None = Field(None, description="None: join or start Ray; 'local': a private local Ray")


class RunConfig(RayConfig):
    """A stage that runs on Ray, is seeded and logs to MLflow."""

    seed: int = 0
    mlflow_uri: str | None = Field(None, description="tracking URI (default: sqlite under the output directory)")


class PoolConfig(Section):
    """A pool of model replicas (Ray Data actors or Serve replicas)."""

    size: int = Field(1, ge=1, description="replicas")
    cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves per replica")
    gpus: float | None = Field(None, ge=0, description="GPUs per replica (None: 1 if the cluster has GPUs, else 0)")
    batch_size: int = Field(32, ge=1, description="samples per call")


class VllmConfig(Section):
    """The vLLM engine of the ``vllm`` backend (LLaVA: the kept visual tokens go in as image embeddings)."""

    runtime_env: dict[str, Any] = Field(
        {"pip": ["vllm==0.33.0"]},
        description="Ray runtime environment of the actors that host the engine (vLLM pins its own torch): "
        "a pip list, or py_executable of a virtualenv that has vLLM and tprl-ray",
    )
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="fraction of the GPU the engine may take")
    max_model_len: int | None = Field(None, ge=16, description="context length (None: the model's)")
    max_num_seqs: int = Field(64, ge=1, description="sequences the engine batches at once")
    enforce_eager: bool = Field(False, description="no CUDA graphs (faster start, slower decoding)")


class BackboneConfig(Section):
    """Which vision-language model to load, with which backend, and how."""

    backend: Literal["hf", "vllm"] = Field(
        "hf", description="hf: transformers model classes; vllm: a vLLM engine for the LLM (LLaVA)"
    )
    vllm: VllmConfig = Field(VllmConfig(), description="the vllm backend's engine")
    path: str = Field(
        "embedded",
        description="'embedded' (the shipped tiny LLaVA), 'embedded-qwen' (the shipped tiny Qwen2.5-VL), a local "
        "directory or a hub id",
    )
    adapter: Path | None = Field(
        None, description="a LoRA adapter directory (`tprl train llm`) merged into the model at load"
    )
    dtype: Dtype = "float32"
    device: str = Field("auto", description="torch device: 'auto' (CUDA when present), 'cpu', 'cuda:0', ...")
    prompt_format: Literal["auto", "vicuna_v1", "chat_template"] = Field(
        "auto", description="LLaVA prompts: 'auto' is the model card's format for tprl-trained models, else vicuna_v1"
    )
    pad_to_square: bool = Field(True, description="LLaVA: pad images to a square with the mean colour first")
    max_question_tokens: int | None = Field(
        None,
        ge=1,
        description="questions with more tokens are rejected (None: what fits the model's context beside "
        "its visual tokens, the answer and 64 tokens of prompt template)",
    )

    def resolved_path(self) -> Path | str:
        """The shipped checkpoint's directory for ``embedded`` / ``embedded-qwen``, else ``path``."""
        shipped = EMBEDDED_MODELS.get(self.path)
        if shipped is not None and not (shipped / "config.json").is_file():
            raise FileNotFoundError(
                f"{self.path}: the shipped checkpoint {shipped} is missing (a broken install? reinstall, or "
                "retrain it as the README's section on the tiny models shows), or give a checkpoint directory"
            )
        return shipped or self.path


def deep_merge(data: dict[str, Any], new: dict[str, Any]) -> None:
    """``new`` into ``data``, nested mappings merged key by key."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            deep_merge(data[key], value)
        else:
            data[key] = value


def known_settings(model: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """``data`` without the keys that ``model`` (and its nested sections) no longer has: settings an
    older version saved and this one dropped."""
    out = {}
    for key, value in data.items():
        if (field := model.model_fields.get(key)) is None:
            continue
        section = field.annotation
        nested = isinstance(section, type) and issubclass(section, BaseModel) and isinstance(value, dict)
        out[key] = known_settings(section, value) if nested else value
    return out


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``data[a][b][c] = value`` for ``key`` 'a.b.c', creating the mappings on the way."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a mapping")
    node[parts[-1]] = value


# ----------------------------------------------------------------------------- the command line


@dataclass(frozen=True)
class Command:
    """One ``tprl`` command: its words, its config class, the function that runs it (``module:function``,
    imported only when the command runs) and a line of help."""

    words: tuple[str, ...]
    config: type[StageConfig]
    run: str
    help: str
    positional: tuple[str, ...] = ()  # top-level fields given as positional arguments, in order

    def function(self) -> Callable[[StageConfig], Any]:
        module, name = self.run.split(":")
        return getattr(importlib.import_module(module), name)


def _kind(annotation) -> type | None:
    """``list``, ``dict`` or a pydantic model class behind ``annotation`` (``X | None`` unwrapped)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = inner[0] if len(inner) == 1 else annotation
    origin = typing.get_origin(annotation) or annotation
    if origin in (list, dict) or (isinstance(origin, type) and issubclass(origin, BaseModel)):
        return origin
    return None


def parse_flag(raw: str, kind: type | None) -> Any:
    """A flag's value as YAML; a list field also takes ``a,b,c`` and a dict field ``k=v,k2=v2``."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    if kind is list and not isinstance(value, list):
        return [yaml.safe_load(item) for item in raw.split(",")]
    if kind is dict and isinstance(value, str):
        pairs = [item.split("=", 1) for item in raw.split(",")]
        if any(len(pair) != 2 for pair in pairs):
            raise ConfigError(f"{raw!r}: expected KEY=VALUE[,KEY=VALUE...]")
        return {key: yaml.safe_load(val) for key, val in pairs}
    return value


def add_config_args(
    parser: argparse.ArgumentParser,
    cls: type[BaseModel],
    prefix: str = "",
    hidden: frozenset[str] = frozenset(),
    positional: tuple[str, ...] = (),
) -> None:
    """Add ``--config``, ``--set`` and one flag per field of ``cls``: ``--field-name`` at the top level,
    ``--section.field-name`` for fields of nested sections, but those in ``hidden`` and those that a
    config above wires itself (its ``wired``); the top-level fields in ``positional`` are arguments."""
    for name in positional:
        field = cls.model_fields[name]
        parser.add_argument(f"cfg__{name}", nargs="?", metavar=name.upper(), help=field.description)
    hidden = hidden | frozenset(positional)
    if not prefix:
        parser.add_argument("--config", type=Path, help="YAML file with this stage's settings")
        parser.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override any field, dotted for nested ones (repeatable); VALUE is parsed as YAML",
        )
        if cls.presets:
            parser.add_argument(
                "--preset",
                choices=sorted(cls.presets),
                help="start from a named set of settings (paper: the paper's recipe); --config and flags apply on top",
            )
    below = hidden | getattr(cls, "wired", frozenset())
    for name, field in cls.model_fields.items():
        if name in hidden:
            continue
        kind = _kind(field.annotation)
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            add_config_args(parser, kind, f"{prefix}{name}.", below)
            continue
        default = field.get_default(call_default_factory=True)
        switch = {"nargs": "?", "const": True} if field.annotation is bool else {}  # `--quick` alone: true
        parser.add_argument(
            f"--{prefix}{name.replace('_', '-')}",
            dest=f"cfg__{prefix}{name}",
            default=None,
            metavar="V",
            type=lambda raw, kind=kind: parse_flag(raw, kind),
            help=f"{field.description or name} (default: {default})",
            **switch,
        )


def config_from_args(args: argparse.Namespace, cls: type[StageConfig]) -> StageConfig:
    """The stage config described by parsed ``args`` (see :func:`add_config_args`)."""
    overrides: dict[str, Any] = {}
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        overrides[key] = yaml.safe_load(raw)
    for key, value in vars(args).items():
        if key.startswith("cfg__") and value is not None:
            overrides[key[5:]] = value
    return cls.load(args.config, overrides, getattr(args, "preset", None))
