"""The node's configuration: one frozen pydantic model per ``config.toml`` section.

``load(path)`` parses the file once with :mod:`tomllib`; every relative path in it resolves
against the folder that holds the file. With no file at all, :func:`defaults` gives the embedded
defaults, with paths relative to the current directory.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

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
    max_pdu_size: int = Field(default=1 << 20, ge=0)  # advertised; 0 = unlimited
    # processes receiving on the port (SO_REUSEPORT); the associations of all count against
    # max_associations
    receive_processes: int = Field(default=1, ge=1, le=64)
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
        out = []
        for v in value:
            title, _, where = v.partition("@")
            if where:
                try:
                    ipaddress.ip_network(where, strict=False)
                except ValueError:
                    raise ValueError(
                        f"{v!r}: {where!r} is not an address or network (e.g. 10.2.0.0/24)"
                    ) from None
            out.append(_check_ae(title) + (f"@{where}" if where else ""))
        return tuple(out)

    @property
    def accepts_any_caller(self) -> bool:
        return self.allowed_calling_ae_titles == ("*",)

    @property
    def callers(self) -> dict[str, tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]]:
        """Allowed calling AE title -> the networks it may call from (empty: anywhere)."""
        out: dict[str, list[Any]] = {}
        for entry in self.allowed_calling_ae_titles:
            title, _, where = entry.partition("@")
            nets = out.setdefault(title, [])
            if where:
                nets.append(ipaddress.ip_network(where, strict=False))
            else:
                nets.append(None)  # this title from anywhere
        return {t: () if None in n else tuple(n) for t, n in out.items()}


class StorageConfig(_Section):
    data_dir: Path = Path("var")
    min_free_bytes: int = Field(default=1 << 30, ge=0)
    keep_days: float = Field(default=0, ge=0)


class QueueConfig(_Section):
    database_url: str = "sqlite:///var/jobs.sqlite"
    series_quiet_seconds: float = Field(default=10, ge=0)
    # A series is complete (judged and forwarded) when quiet, or also ("release") once the
    # association that sent it was released normally and release_grace_seconds passed.
    complete_on: tuple[Literal["quiet", "release"], ...] = ("quiet",)
    release_grace_seconds: float = Field(default=1, ge=0)
    # Denoise a series chunk by chunk while it still arrives (forwarded once complete).
    denoise_while_receiving: bool = True
    heartbeat_seconds: float = Field(default=5, gt=0)
    stale_after_seconds: float = Field(default=60, gt=0)

    @field_validator("complete_on")
    @classmethod
    def _check_complete_on(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if "quiet" not in value:
            raise ValueError(
                'must include "quiet": a series whose sender never releases still ends'
            )
        return value


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


class DestinationTLS(_Section):
    ca_certificates: Path | None = None  # verify the destination's certificate with these
    certificate: Path | None = None  # our client certificate, when the destination asks
    private_key: Path | None = None


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")


class DestinationConfig(_Section):
    name: str = "default"
    kind: Literal["dimse", "dicomweb"] = "dimse"
    ae_title: str = "PACS"
    host: str = "127.0.0.1"
    port: Port = 4242
    calling_ae_title: str = "LDCT_DENOISE"
    tls: DestinationTLS | None = None
    url: str | None = None  # dicomweb: the STOW-RS base URL
    auth_env: str | None = None  # dicomweb: variable holding "Bearer ..." or "user:password"
    max_attempts: int = Field(default=8, ge=1)
    retry_backoff_seconds: float = Field(default=2, ge=0)
    retry_backoff_max_seconds: float = Field(default=300, ge=0)
    timeout_seconds: float = Field(default=30, gt=0)
    batch_size: int = Field(default=16, ge=1, le=1000)  # dicomweb: instances per STOW-RS request

    _ae = field_validator("ae_title", "calling_ae_title")(_check_ae)

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(f"{value!r}: 1-32 letters, digits, '_', '.' or '-'")
        return value

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _check_kind(self) -> DestinationConfig:
        if self.kind == "dicomweb" and not self.url:
            raise ValueError(f'destination {self.name!r}: kind = "dicomweb" needs url')
        return self


Action = Literal["denoise", "pass", "ignore"]


class RuleConfig(_Section):
    """One routing rule: every matcher given must hold; the first rule that matches decides."""

    name: str
    calling_ae_title: str | None = None
    peer: str | None = None  # address or network of the sender, e.g. "10.2.0.0/24"
    modality: str | None = None
    sop_class: str | None = None
    series_description: str | None = None  # regular expression, searched
    protocol_name: str | None = None  # regular expression, searched
    body_part: str | None = None
    image_type: tuple[str, ...] = ()  # values that must all be present
    slice_thickness: tuple[float, float] | None = None  # [min, max] mm
    kernel: str | None = None
    rows: int | None = None
    columns: int | None = None
    action: Action
    destinations: tuple[str, ...] = ()  # empty: every destination
    send_original: bool = False  # denoise: also forward the original series unchanged

    @field_validator("series_description", "protocol_name")
    @classmethod
    def _check_regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"{value!r} is not a regular expression: {err}") from None
        return value

    @field_validator("peer")
    @classmethod
    def _check_peer(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError:
                raise ValueError(f"{value!r} is not an address or network") from None
        return value

    @field_validator("slice_thickness")
    @classmethod
    def _check_range(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and value[0] > value[1]:
            raise ValueError(f"[{value[0]}, {value[1]}]: min is above max")
        return value


CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def default_rules() -> tuple[RuleConfig, ...]:
    """With no [[rule]]: CT images are denoised, CT localizers passed on unchanged, both to every
    destination; anything else is refused."""
    return (
        RuleConfig(
            name="CT localizers pass through",
            sop_class=CT_IMAGE_STORAGE,
            image_type=("LOCALIZER",),
            action="pass",
        ),
        RuleConfig(name="CT images denoised", sop_class=CT_IMAGE_STORAGE, action="denoise"),
    )


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
    # The status page shows patient images: off loopback it needs a bearer token, read from this
    # environment variable (/metrics and /healthz stay open).
    token_env: str | None = None

    @property
    def on_loopback(self) -> bool:
        if self.bind == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.bind).is_loopback
        except ValueError:
            return False


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


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
