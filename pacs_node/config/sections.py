"""The plain sections of ``config.toml``: one frozen pydantic model each (the routing tables are
in :mod:`pacs_node.config.routing`)."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
)

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


Precision = Literal["auto", "fp32", "bf16", "fp16"]  # model.precision (unit_model.pick_dtype)


class ModelConfig(_Section):
    checkpoint: Path | None = None
    device: str = "auto"
    batch_size: int | None = Field(default=None, ge=1, le=1024)  # None: the Denoiser's default
    precision: Precision = "auto"
    compile: bool = False
    strength: float = Field(default=1.0, ge=0.0, le=1.0)

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError(f"{value!r} is not one of auto, cpu, cuda, cuda:N")
        return value


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
