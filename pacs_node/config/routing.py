"""The routing tables of ``config.toml``: ``[[destination]]`` and ``[[rule]]``, and the rules
that serve when there is none."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from pacs_node.config.sections import Port, _check_ae, _Section


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
