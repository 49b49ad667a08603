"""Generator checkpoints: one ``.safetensors`` file with the weights and JSON metadata.

The metadata (``__metadata__["unit_model"]``) holds the architecture, the HU window, a
description of the training data, metrics and ``model_version``: the first 12 hex digits of the
sha256 of the weights (tensor names, dtypes, shapes and bytes in name order). Loading recomputes
it, so a file whose weights changed after saving is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from unit_model.networks import INFERENCE_PREFIXES, GeneratorConfig, UnitGenerator
from unit_model.transforms import HUWindow

FORMAT = "unit-ldct-generator/1"
SHIPPED = Path(__file__).parent / "weights" / "unit-ldct-synth.safetensors"

__all__ = ["SHIPPED", "CheckpointError", "GeneratorCheckpoint", "load", "model_version", "save"]


class CheckpointError(Exception):
    """The checkpoint is missing, unreadable, or does not match its own description."""


@dataclass
class GeneratorCheckpoint:
    generator: UnitGenerator
    window: HUWindow
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def model_version(self) -> str:
        return str(self.metadata["model_version"])


def model_version(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:12]


def save(
    path: str | Path,
    generator: UnitGenerator,
    window: HUWindow,
    *,
    inference_only: bool = True,
    dtype: torch.dtype = torch.float32,
    data: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
) -> str:
    """Write the checkpoint atomically; return its ``model_version``."""
    state = generator.state_dict()
    if inference_only:
        state = {k: v for k, v in state.items() if k.startswith(INFERENCE_PREFIXES)}
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
    version = model_version(tensors)
    meta = {
        "format": FORMAT,
        "model_version": version,
        "architecture": generator.cfg.to_dict(),
        "hu_window": window.to_dict(),
        "inference_only": inference_only,
        "dtype": str(dtype).removeprefix("torch."),
        "data": data or {},
        "metrics": metrics or {},
        "training": training or {},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"unit_model": json.dumps(meta)})
    tmp.replace(path)
    return version


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("unit_model")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated or corrupt?): {err}"
        ) from None
    if raw is None:
        raise CheckpointError(f"{path}: a safetensors file without unit_model metadata")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: metadata is not valid JSON: {err}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return tensors, meta


def load(path: str | Path, map_location: str | torch.device = "cpu") -> GeneratorCheckpoint:
    """Read a checkpoint; raise :class:`CheckpointError` naming the problem."""
    path = Path(path)
    tensors, meta = _read(path)
    version = model_version(tensors)
    if version != meta.get("model_version"):
        raise CheckpointError(
            f"{path}: weights do not match their model_version "
            f"({version} != {meta.get('model_version')}): the file was altered or damaged"
        )
    try:
        cfg = GeneratorConfig.from_dict(meta["architecture"])
        window = HUWindow(**meta["hu_window"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: bad architecture or hu_window metadata: {err}") from None
    gen = UnitGenerator(cfg)
    expected = gen.state_dict()
    for name, t in tensors.items():
        if name not in expected:
            raise CheckpointError(f"{path}: tensor {name!r} is not part of the architecture {cfg}")
        if tuple(t.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {tuple(t.shape)}, but the architecture "
                f"in its metadata ({cfg}) needs {tuple(expected[name].shape)}"
            )
    needed = [k for k in expected if k.startswith(INFERENCE_PREFIXES)]
    missing = [k for k in needed if k not in tensors]
    if missing:
        raise CheckpointError(f"{path}: missing {len(missing)} tensors, e.g. {missing[0]!r}")
    gen.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    gen.to(map_location)
    return GeneratorCheckpoint(gen, window, meta)
