"""The node's configuration: one frozen pydantic model per ``config.toml`` section.

``load(path)`` parses the file once with :mod:`tomllib`; every relative path in it resolves
against the folder that holds the file. With no file at all, :func:`defaults` gives the embedded
defaults, with paths relative to the current directory.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = ["Config", "ConfigError", "default_path", "defaults", "load"]

ENV_VAR = "PACS_NODE_CONFIG"

# DICOM PS3.5 AE: 1-16 characters of the default repertoire, no backslash or control
# characters, not all spaces. Leading/trailing spaces are insignificant.
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


def _check_ae(value: str) -> str:
    if not 1 <= len(value) <= 16:
        raise ValueError(f"AE title {value!r} must be 1 to 16 characters (has {len(value)})")
    if not _AE_RE.match(value) or not value.strip():
        raise ValueError(
            f"AE title {value!r} may hold only printable ASCII without backslash, not all spaces"
        )
    return value.strip()


Port = Annotated[int, Field(ge=1, le=65535)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSConfig(_Section):
    certificate: Path
    private_key: Path
    ca_certificates: Path | None = None
    require_client_certificate: bool = False


class NodeConfig(_Section):
    ae_title: str = "LDCT_DENOISE"
    bind: str = "0.0.0.0"
    port: Port = 11112
    allowed_calling_ae_titles: tuple[str, ...] = ("STORESCU",)
    max_associations: int = Field(default=8, ge=1, le=1000)
    max_pdu_size: int = Field(default=0, ge=0)
    network_timeout_seconds: float = Field(default=60.0, gt=0)
    tls: TLSConfig | None = None

    _ae = field_validator("ae_title")(_check_ae)

    @field_validator("allowed_calling_ae_titles")
    @classmethod
    def _check_allowed(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if value == ("*",):
            return value
        if not value:
            raise ValueError('list is empty: name the calling AE titles, or ["*"] for any')
        return tuple(_check_ae(v) for v in value)

    @property
    def accepts_any_caller(self) -> bool:
        return self.allowed_calling_ae_titles == ("*",)


class StorageConfig(_Section):
    data_dir: Path = Path("var")
    min_free_bytes: int = Field(default=1 << 30, ge=0)
    keep_days: float = Field(default=0, ge=0)


class QueueConfig(_Section):
    database_url: str = "sqlite:///var/jobs.sqlite"
    series_quiet_seconds: float = Field(default=10, ge=0)
    heartbeat_seconds: float = Field(default=5, gt=0)
    stale_after_seconds: float = Field(default=60, gt=0)


class ModelConfig(_Section):
    checkpoint: Path | None = None
    device: str = "auto"
    batch_size: int = Field(default=8, ge=1, le=1024)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False
    strength: float = Field(default=1.0, ge=0.0, le=1.0)

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError(f"{value!r} is not one of auto, cpu, cuda, cuda:N")
        return value


class DestinationConfig(_Section):
    ae_title: str = "PACS"
    host: str = "127.0.0.1"
    port: Port = 4242
    calling_ae_title: str = "LDCT_DENOISE"
    max_attempts: int = Field(default=8, ge=1)
    retry_backoff_seconds: float = Field(default=2, ge=0)
    retry_backoff_max_seconds: float = Field(default=300, ge=0)
    timeout_seconds: float = Field(default=30, gt=0)

    _ae = field_validator("ae_title", "calling_ae_title")(_check_ae)


class OutputConfig(_Section):
    series_number_offset: int = Field(default=1000, ge=0)
    series_description_suffix: str = " (UNIT denoised)"


class WorkerConfig(_Section):
    count: int = Field(default=1, ge=0, le=64)


class QualityConfig(_Section):
    max_hu_bias: float = Field(default=10.0, gt=0)
    max_edge_ratio: float = Field(default=4.0, gt=0)
    forward_on_failure: bool = False


class HttpConfig(_Section):
    enabled: bool = True
    bind: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class Config(_Section):
    node: NodeConfig = NodeConfig()
    storage: StorageConfig = StorageConfig()
    queue: QueueConfig = QueueConfig()
    model: ModelConfig = ModelConfig()
    destination: DestinationConfig = DestinationConfig()
    output: OutputConfig = OutputConfig()
    worker: WorkerConfig = WorkerConfig()
    quality: QualityConfig = QualityConfig()
    http: HttpConfig = HttpConfig()
    logging: LoggingConfig = LoggingConfig()
    source: Path | None = Field(default=None, exclude=True)
    """The file this was read from (None for the embedded defaults)."""


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


def _describe(err: ValidationError, source: Path) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            msg = "unknown key (misspelled? see the configuration reference in README.md)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if "input" in e and e["type"] not in ("value_error",):
                msg += f" (got {e['input']!r})"
        lines.append(f"{source}: {key}: {msg}")
    return "\n".join(lines)


def parse(data: dict[str, object], source: Path) -> Config:
    try:
        config = Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None
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
