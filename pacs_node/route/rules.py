"""The routing rules: a header and its sender in, an action and destinations out.

Rules are tried in order; the first whose every matcher holds decides. ``denoise`` writes a derived
series for the listed destinations (and the original too with ``send_original``), ``pass``
forwards the original unchanged, ``ignore`` stores nothing and answers Success. When no rule
matches, the instance is refused (0x0122). The node's own output is never denoised again: a
series it made follows only the ``pass`` and ``ignore`` rules, so a PACS that routes everything
back cannot start a loop.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from pacs_node.config import RuleConfig

SOFTWARE = "ldct-pacs-node"  # the Manufacturer of its contributing-equipment entry


@dataclass(frozen=True)
class Facts:
    """What a rule can look at: the sender, and the instance's header up to its pixel data."""

    calling_ae_title: str
    peer: str  # the sender's IP address
    sop_class: str
    header: Any  # a pydicom Dataset (None before the header is read)


@dataclass(frozen=True)
class Decision:
    action: str  # denoise | pass | ignore | refuse
    rule: str  # the rule's name ("" when none matched)
    destinations: tuple[str, ...]
    send_original: bool = False
    note: str = ""  # why (for the log line), when it is not simply the rule

    @property
    def stores(self) -> bool:
        return self.action in ("denoise", "pass")


def _text(value: object) -> str:
    return "" if value is None else str(value).strip()


def _values(value: object) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split("\\")]
    try:
        return [str(v).strip() for v in value]  # type: ignore[attr-defined]
    except TypeError:
        return [str(value).strip()]


def is_own_output(ds: Any) -> bool:
    """A derived instance this software made (its derivation and contributing equipment say
    so), e.g. sent back by a PACS that routes everything here."""
    if ds is None:
        return False
    equipment = ds.get("ContributingEquipmentSequence") or []
    ours = any(_text(item.get("Manufacturer")) == SOFTWARE for item in equipment)
    derived = SOFTWARE in _text(ds.get("DerivationDescription")) or "DERIVED" in _values(
        ds.get("ImageType")
    )
    return ours and derived


def _sender_matches(rule: RuleConfig, facts: Facts) -> bool:
    if rule.calling_ae_title is not None and rule.calling_ae_title != facts.calling_ae_title:
        return False
    if rule.peer is not None:
        try:
            address = ipaddress.ip_address(facts.peer)
        except ValueError:
            return False
        if address not in ipaddress.ip_network(rule.peer, strict=False):
            return False
    return rule.sop_class is None or rule.sop_class == facts.sop_class


def _header_matches(rule: RuleConfig, ds: Any) -> bool:
    def equal(want: str | None, have: object) -> bool:
        return want is None or want.upper() == _text(have).upper()

    if not (
        equal(rule.modality, ds.get("Modality"))
        and equal(rule.body_part, ds.get("BodyPartExamined"))
        and equal(rule.kernel, " ".join(_values(ds.get("ConvolutionKernel"))))
    ):
        return False
    for want, key in (
        (rule.series_description, "SeriesDescription"),
        (rule.protocol_name, "ProtocolName"),
    ):
        if want is not None and not re.search(want, _text(ds.get(key))):
            return False
    if rule.image_type:
        have = {v.upper() for v in _values(ds.get("ImageType"))}
        if not {v.upper() for v in rule.image_type} <= have:
            return False
    if rule.slice_thickness is not None:
        try:
            thickness = float(ds.get("SliceThickness"))
        except (TypeError, ValueError):
            return False
        if not rule.slice_thickness[0] <= thickness <= rule.slice_thickness[1]:
            return False
    for size, key in ((rule.rows, "Rows"), (rule.columns, "Columns")):
        if size is not None and ds.get(key) != size:
            return False
    return True


def needs_header(rule: RuleConfig) -> bool:
    """Whether the rule looks beyond the sender and the SOP class."""
    return any(
        v not in (None, ())
        for v in (
            rule.modality,
            rule.series_description,
            rule.protocol_name,
            rule.body_part,
            rule.image_type,
            rule.slice_thickness,
            rule.kernel,
            rule.rows,
            rule.columns,
        )
    )


def could_match(rules: tuple[RuleConfig, ...], facts: Facts) -> bool:
    """Whether any rule can still match once the header is known (the request alone: SOP class
    and sender). False: the instance can be refused before its data arrive."""
    return any(_sender_matches(r, facts) for r in rules)


def decide(
    rules: tuple[RuleConfig, ...], facts: Facts, all_destinations: tuple[str, ...]
) -> Decision:
    own = is_own_output(facts.header)
    for rule in rules:
        if own and rule.action == "denoise":
            continue  # never denoise what the node itself made
        if _sender_matches(rule, facts) and _header_matches(rule, facts.header):
            return Decision(
                rule.action,
                rule.name,
                rule.destinations or all_destinations,
                rule.send_original and rule.action == "denoise",
                "the node's own output" if own else "",
            )
    why = "no rule routes it"
    if own:
        why += " (the node's own output is never denoised again)"
    return Decision("refuse", "", (), note=why)
