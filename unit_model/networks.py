"""The UNIT generator and the PatchGAN discriminator, layer for layer as MATLAB's
``unitGenerator`` (defaults) and ``patchGANDiscriminator(NumDownsamplingBlocks=4, FilterSize=3)``.

Shapes use B = batch, 1 channel, H and W multiples of 4 (the generator's two stride-2 stages).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = [
    "GeneratorConfig",
    "PatchDiscriminator",
    "ResidualBlock",
    "UnitGenerator",
    "UnitTranslator",
]


@dataclass(frozen=True)
class GeneratorConfig:
    """Architecture hyperparameters; the defaults are the reference's (20,370,946 parameters).

    ``residual_output`` and ``upsample="resize_conv"`` are product options, off by default:
    with a residual output each decoder predicts a bounded correction to its input,
    ``out = clamp(x + residual_scale * tanh(raw), -1, 1)``, and its last conv starts at zero so the
    untrained network is the identity. ``image_skip`` (needs ``residual_output``) gives each
    decoder's last conv a full-resolution view of the image it corrects (conv3 + ReLU features
    concatenated to the upsampled ones), so pixel-level noise need not pass the 1/4-resolution,
    noise-injected latent to be subtracted. ``encoder_skips`` (needs ``residual_output``) hands
    the encoder's full- and half-resolution features to the decoder it feeds (U-Net style), so
    edges keep their place to the pixel.
    """

    channels: int = 1
    filters: int = 64
    encoder_residual_blocks: int = 3
    shared_residual_blocks: int = 2
    decoder_residual_blocks: int = 3
    upsample: Literal["transpose", "resize_conv"] = "transpose"
    residual_output: bool = False
    residual_scale: float = 0.25
    image_skip: bool = False
    encoder_skips: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GeneratorConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown generator settings {sorted(unknown)}")
        return cls(**data)

    def __post_init__(self) -> None:
        for name in ("image_skip", "encoder_skips"):
            if getattr(self, name) and not self.residual_output:
                raise ValueError(f"{name} needs residual_output")


class ResidualBlock(nn.Module):
    """conv3-IN-ReLU-conv3-IN plus the skip, no activation after the addition. [B,C,H,W] -> same."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.InstanceNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.InstanceNorm2d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def _res_stack(channels: int, n: int) -> nn.Sequential:
    return nn.Sequential(*(ResidualBlock(channels) for _ in range(n)))


class Encoder(nn.Module):
    """[B,1,H,W] -> [B,4F,H/4,W/4]: conv7 (reflect), LeakyReLU, 2 x (conv3 s2, IN, ReLU), res.

    :meth:`features` also returns the full- and half-resolution activations ([B,F,H,W],
    [B,2F,H/2,W/2]) for decoders with ``encoder_skips``.
    """

    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__()
        f = cfg.filters
        self.layers = nn.Sequential(
            nn.Conv2d(cfg.channels, f, 7, padding=3, padding_mode="reflect"),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(f, 2 * f, 3, stride=2, padding=1),
            nn.InstanceNorm2d(2 * f),
            nn.ReLU(inplace=True),
            nn.Conv2d(2 * f, 4 * f, 3, stride=2, padding=1),
            nn.InstanceNorm2d(4 * f),
            nn.ReLU(inplace=True),
            _res_stack(4 * f, cfg.encoder_residual_blocks),
        )

    def features(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(latent, half-resolution, full-resolution) activations."""
        full = self.layers[:2](x)
        half = self.layers[2:5](full)
        return self.layers[5:](half), half, full

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def _upsample(cin: int, cout: int, mode: str) -> list[nn.Module]:
    if mode == "transpose":
        return [nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1)]
    return [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1)]


class Decoder(nn.Module):
    """[B,4F,H/4,W/4] -> [B,1,H,W]: res, 2 x (up, IN, ReLU), conv7 (reflect), tanh."""

    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__()
        f = cfg.filters
        self.cfg = cfg
        joined = 2 if cfg.encoder_skips else 1  # encoder features joined at each resolution
        first_up = _upsample(4 * f, 2 * f, cfg.upsample)
        self.layers = nn.Sequential(
            _res_stack(4 * f, cfg.decoder_residual_blocks),
            *first_up,
            nn.InstanceNorm2d(2 * f),
            nn.ReLU(inplace=True),
            *_upsample(2 * f * joined, f, cfg.upsample),
            nn.InstanceNorm2d(f),
            nn.ReLU(inplace=True),
        )
        self._half = 3 + len(first_up)  # layers before this index run at half resolution
        self.skip: nn.Module | None = None
        head_in = f * joined
        if cfg.image_skip:
            self.skip = nn.Sequential(
                nn.Conv2d(cfg.channels, f, 3, padding=1, padding_mode="reflect"),
                nn.ReLU(inplace=True),
            )
            head_in += f
        self.head = nn.Conv2d(head_in, cfg.channels, 7, padding=3, padding_mode="reflect")

    def forward(
        self,
        h: Tensor,
        source: Tensor | None = None,
        skips: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """``source``: the image being translated ([B,1,H,W]; residual output, image skip);
        ``skips``: its encoder's (half, full)-resolution features (``encoder_skips``)."""
        if self.cfg.encoder_skips:
            assert skips is not None, "an encoder-skip decoder needs its encoder's features"
            features = self.layers[: self._half](h)
            features = self.layers[self._half :](torch.cat([features, skips[0]], dim=1))
            features = torch.cat([features, skips[1]], dim=1)
        else:
            features = self.layers(h)
        if self.skip is not None:
            assert source is not None, "an image-skip decoder needs the image it corrects"
            features = torch.cat([features, self.skip(source)], dim=1)
        raw = self.head(features)
        if not self.cfg.residual_output:
            return torch.tanh(raw)
        assert source is not None, "a residual decoder needs the image it corrects"
        return torch.clamp(source + self.cfg.residual_scale * torch.tanh(raw), -1.0, 1.0)


def init_he(module: nn.Module) -> None:
    """He (Kaiming) normal initialization of conv weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class UnitGenerator(nn.Module):
    """The UNIT generator: per-domain encoders and decoders around a shared latent.

    Domain ``ld`` (low dose) is the source, ``hd`` (regular dose) the target. The latent is the
    output of the two shared encoder blocks (MATLAB's ``encoderSharedBlock``); in training mode
    N(0, 1) noise is added to it before the shared decoder blocks.
    """

    def __init__(self, cfg: GeneratorConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or GeneratorConfig()
        f4 = 4 * cfg.filters
        self.enc_ld = Encoder(cfg)
        self.enc_hd = Encoder(cfg)
        self.shared_enc = _res_stack(f4, cfg.shared_residual_blocks)
        self.shared_dec = _res_stack(f4, cfg.shared_residual_blocks)
        self.dec_ld = Decoder(cfg)
        self.dec_hd = Decoder(cfg)
        init_he(self)
        if cfg.residual_output:
            for dec in (self.dec_ld, self.dec_hd):
                nn.init.zeros_(dec.head.weight)
                nn.init.zeros_(dec.head.bias)  # type: ignore[arg-type]

    def encode(self, x_ld: Tensor, x_hd: Tensor) -> tuple[Tensor, Tensor]:
        """Latents of both domains, [B,4F,H/4,W/4] each."""
        return self.shared_enc(self.enc_ld(x_ld)), self.shared_enc(self.enc_hd(x_hd))

    def forward(
        self, x_ld: Tensor, x_hd: Tensor, return_latents: bool = False
    ) -> tuple[Tensor, ...]:
        """[B,1,H,W] x 2 -> ``(ld2ld, hd2ld, ld2hd, hd2hd)``, then ``(h_ld, h_hd)`` if asked.

        The two domains travel stacked along the batch dimension through the shared blocks and
        each decoder; instance norm works per image, so no statistics mix between them.
        """
        b = x_ld.shape[0]
        e_ld, e_hd = self.enc_ld.features(x_ld), self.enc_hd.features(x_hd)
        h_ld, h_hd = self.shared_enc(e_ld[0]), self.shared_enc(e_hd[0])
        h = torch.cat([h_ld, h_hd])
        z = h + torch.randn_like(h) if self.training else h
        d = self.shared_dec(z)
        src = torch.cat([x_ld, x_hd])
        skips = (torch.cat([e_ld[1], e_hd[1]]), torch.cat([e_ld[2], e_hd[2]]))
        to_ld = self.dec_ld(d, src, skips)
        to_hd = self.dec_hd(d, src, skips)
        out = (to_ld[:b], to_ld[b:], to_hd[:b], to_hd[b:])
        return (*out, h_ld, h_hd) if return_latents else out

    def translator(self) -> UnitTranslator:
        """The inference path, low dose -> regular dose (MATLAB ``unitPredict``)."""
        return UnitTranslator(self)


INFERENCE_PREFIXES = ("enc_ld.", "shared_enc.", "shared_dec.", "dec_hd.")


class UnitTranslator(nn.Module):
    """Source encoder -> shared blocks -> target decoder, no latent noise. [B,1,H,W] -> same."""

    def __init__(self, gen: UnitGenerator) -> None:
        super().__init__()
        self.encoder = gen.enc_ld
        self.shared_enc = gen.shared_enc
        self.shared_dec = gen.shared_dec
        self.decoder = gen.dec_hd

    def forward(self, x: Tensor) -> Tensor:
        if not self.decoder.cfg.encoder_skips:  # keep no activations the decoder never reads
            return self.decoder(self.shared_dec(self.shared_enc(self.encoder(x))), x)
        h, half, full = self.encoder.features(x)
        return self.decoder(self.shared_dec(self.shared_enc(h)), x, (half, full))


class PatchDiscriminator(nn.Module):
    """PatchGAN: 4 x (conv3 s2, LeakyReLU 0.2), conv3 s1 512, LeakyReLU, conv3 s1 -> 1.

    Zero padding 1, no normalization, weights N(0, ``init_std``). [B,1,H,W] -> [B,1,H/16,W/16].
    """

    def __init__(self, channels: int = 1, filters: int = 64, init_std: float = 0.01) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = channels
        for i in range(4):
            cout = filters * 2**i
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
            cin = cout
        layers += [nn.Conv2d(cin, cin, 3, padding=1), nn.LeakyReLU(0.2, True)]
        layers += [nn.Conv2d(cin, 1, 3, padding=1)]
        self.layers = nn.Sequential(*layers)
        if init_std > 0:
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.normal_(m.weight, 0.0, init_std)
                    nn.init.zeros_(m.bias)  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)
