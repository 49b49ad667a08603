"""The node's configuration: one frozen pydantic model per ``config.toml`` section (the plain
sections in :mod:`.sections`, the routing tables in :mod:`.routing`), read and checked here.

``load(path)`` parses the file once with :mod:`tomllib`; every relative path in it resolves
against the folder that holds the file. With no file at all, :func:`defaults` gives the embedded
defaults, with paths relative to the current directory.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pacs_node.config.routing import (
    CT_IMAGE_STORAGE,
    DestinationConfig,
    DestinationTLS,
    RuleConfig,
    default_rules,
)
from pacs_node.config.sections import (
    HttpConfig,
    LoggingConfig,
    ModelConfig,
    NodeConfig,
    OutputConfig,
    QualityConfig,
    QueueConfig,
    StorageConfig,
    TLSConfig,
    WorkerConfig,
    _Section,
)

__all__ = [
    "CT_IMAGE_STORAGE",
    "ENV_VAR",
    "Config",
    "ConfigError",
    "DestinationConfig",
    "DestinationTLS",
    "HttpConfig",
    "LoggingConfig",
    "ModelConfig",
    "NodeConfig",
    "OutputConfig",
    "QualityConfig",
    "QueueConfig",
    "RuleConfig",
    "StorageConfig",
    "TLSConfig",
    "WorkerConfig",
    "default_path",
    "default_rules",
    "defaults",
    "load",
    "parse",
]

ENV_VAR = "PACS_NODE_CONFIG"


class Config(_Section):
    node: NodeConfig = NodeConfig()
    storage: StorageConfig = StorageConfig()
    queue: QueueConfig = QueueConfig()
    model: ModelConfig = ModelConfig()
    destination: tuple[DestinationConfig, ...] = (DestinationConfig(),)
    rule: tuple[RuleConfig, ...] = ()
    output: OutputConfig = OutputConfig()
    worker: WorkerConfig = WorkerConfig()
    quality: QualityConfig = QualityConfig()
    http: HttpConfig = HttpConfig()
    logging: LoggingConfig = LoggingConfig()
    source: Path | None = Field(default=None, exclude=True)
    """The file this was read from (None for the embedded defaults)."""

    @field_validator("destination", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        # [destination] (one table, as before routing existed) or [[destination]] (several)
        return [value] if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _check_routing(self) -> Config:
        names = [d.name for d in self.destination]
        if not names:
            raise ValueError("destination: at least one destination is needed")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"destination.name: {dupes[0]!r} is used twice")
        for k, rule in enumerate(self.rule):
            for name in rule.destinations:
                if name not in names:
                    raise ValueError(
                        f"rule[{k}] ({rule.name!r}).destinations: unknown destination {name!r} "
                        f"(configured: {', '.join(names)})"
                    )
        return self

    @property
    def rules(self) -> tuple[RuleConfig, ...]:
        """The [[rule]] tables, or the defaults when there are none."""
        return self.rule or default_rules()

    def destination_named(self, name: str) -> DestinationConfig:
        for d in self.destination:
            if d.name == name:
                return d
        raise KeyError(name)


class ConfigError(Exception):
    """The configuration file is missing, unreadable, or invalid; ``str()`` says where and why."""


def default_path() -> Path:
    """``$PACS_NODE_CONFIG`` if set, else ``./config.toml``."""
    return Path(os.environ.get(ENV_VAR) or "config.toml")


def _resolve(config: Config, base: Path) -> Config:
    """Make every relative path in ``config`` relative to ``base``."""

    def fix(p: Path) -> Path:
        return p if p.is_absolute() else (base / p)

    storage = config.storage.model_copy(update={"data_dir": fix(config.storage.data_dir)})
    model = config.model
    if model.checkpoint is not None:
        model = model.model_copy(update={"checkpoint": fix(model.checkpoint)})
    queue = config.queue
    url = queue.database_url
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and url != prefix + ":memory:":
        queue = queue.model_copy(
            update={"database_url": prefix + str(fix(Path(url[len(prefix) :])))}
        )
    node = config.node
    if node.tls is not None:
        tls = node.tls
        tls = tls.model_copy(
            update={
                "certificate": fix(tls.certificate),
                "private_key": fix(tls.private_key),
                "ca_certificates": fix(tls.ca_certificates) if tls.ca_certificates else None,
            }
        )
        node = node.model_copy(update={"tls": tls})
    return config.model_copy(
        update={"storage": storage, "model": model, "queue": queue, "node": node}
    )


def _key(loc: tuple[int | str, ...], data: dict[str, object]) -> str:
    """A pydantic location as the TOML key an admin wrote: ``rule[1].action``, and
    ``destination.port`` for a single [destination] table."""
    out = ""
    for k, part in enumerate(loc):
        if isinstance(part, int):
            single = k == 1 and isinstance(data.get(str(loc[0])), dict)
            out += "" if single else f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def _describe(err: ValidationError, source: Path, data: dict[str, object]) -> str:
    lines = []
    for e in err.errors():
        key = _key(e["loc"], data) or "(top level)"
        if e["type"] == "extra_forbidden":
            msg = "unknown key (misspelled? see the configuration reference in README.md)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if "input" in e and e["type"] not in ("value_error",):
                msg += f" (got {e['input']!r})"
        lines.append(f"{source}: {key}: {msg}" if e["loc"] else f"{source}: {msg}")
    return "\n".join(lines)


def parse(data: dict[str, object], source: Path) -> Config:
    try:
        config = Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, source, data)) from None
    return _resolve(config, source.parent.resolve()).model_copy(update={"source": source})


def load(path: Path | str) -> Config:
    """Read and validate ``path``; raise :class:`ConfigError` with one line per problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (set --config or ${ENV_VAR})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    return parse(data, path)


def defaults() -> Config:
    """The embedded defaults, paths relative to the current directory."""
    return _resolve(Config(), Path.cwd())
