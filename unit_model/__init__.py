"""unit_model: the UNIT generator and discriminators, the HU transform, checkpoints, inference.

Imports torch and numpy only, never pydicom, pynetdicom or SQLAlchemy::

    from unit_model import Denoiser

    den = Denoiser.from_checkpoint()          # the shipped weights, best device available
    out = den.denoise_hu(slices)              # float32 [N, H, W] HU in and out
"""

from unit_model.checkpoint import CheckpointError, GeneratorCheckpoint, load, save
from unit_model.denoiser import Denoiser, pick_device, pick_dtype
from unit_model.networks import GeneratorConfig, PatchDiscriminator, UnitGenerator
from unit_model.transforms import HUWindow

__all__ = [
    "CheckpointError",
    "Denoiser",
    "GeneratorCheckpoint",
    "GeneratorConfig",
    "HUWindow",
    "PatchDiscriminator",
    "UnitGenerator",
    "load",
    "pick_device",
    "pick_dtype",
    "save",
]
