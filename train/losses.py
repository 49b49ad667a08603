"""The reference's losses (MATLAB example's helper functions), on tensors of any shape."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor


def recon_loss(real: Tensor, recon: Tensor) -> Tensor:
    """L1: mean(|real - recon|)."""
    return (real - recon).abs().mean()


def kl_loss(hidden: Tensor) -> Tensor:
    """The 'hidden KL' term: mean(h^2)."""
    return hidden.pow(2).mean()


def adv_loss(fake_pred: Tensor) -> Tensor:
    """LSGAN generator loss: mean((D(fake) - 1)^2)."""
    return (fake_pred - 1).pow(2).mean()


def disc_loss(real_pred: Tensor, fake_pred: Tensor) -> Tensor:
    """LSGAN discriminator loss: mean((1 - D(real))^2) + mean(D(fake)^2)."""
    return (1 - real_pred).pow(2).mean() + fake_pred.pow(2).mean()


@dataclass(frozen=True)
class LossWeights:
    """The reference's weights. ``cycle_ld`` scales the LD->HD->LD cycle term on top of
    ``cycle`` (1.0 = the reference). ``paired`` weighs L1(LD->HD translation, regular dose) on
    slices that have a regular-dose partner (0 = the reference, unpaired only)."""

    self_recon: float = 10.0
    hidden_kl: float = 0.01
    cycle: float = 10.0
    cycle_hidden_kl: float = 0.01
    adv: float = 1.0
    disc: float = 0.5
    cycle_ld: float = 1.0
    paired: float = 0.0

    @property
    def unpaired(self) -> bool:
        """Whether any of the reference's unpaired terms is on."""
        return any((self.self_recon, self.hidden_kl, self.cycle, self.cycle_hidden_kl, self.adv))

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def generator_losses(
    ld: Tensor,
    hd: Tensor,
    outs: tuple[Tensor, ...],
    cycle_outs: tuple[Tensor, ...],
    d_ld_fake: Tensor,
    d_hd_fake: Tensor,
    w: LossWeights,
    lowpass: Callable[[Tensor], Tensor] | None = None,
    lowpass_hd: bool = True,
    paired: tuple[Tensor, Tensor] | None = None,
) -> dict[str, Tensor]:
    """All generator terms and their weighted sum (``total``).

    ``outs`` = gen(ld, hd, latents) = (ld2ld, hd2ld, ld2hd, hd2hd, h_ld, h_hd);
    ``cycle_outs`` = gen(hd2ld, ld2hd, latents): its 2nd and 3rd images are ld2hd2ld, hd2ld2hd.
    With ``lowpass``, reconstruction terms compare low-passed images, so keeping the noise is no
    longer rewarded (an option; the reference compares the images themselves): all of them, or,
    with ``lowpass_hd=False``, only those whose target is a low-dose image, so the HD->LD->HD
    cycle still asks for the regular-dose image back, pixel for pixel, from the noise the
    HD->LD path added. ``paired`` = (LD->HD translations, their regular-dose partners) of the
    batch's paired slices adds ``w.paired`` x their L1 distance.
    """
    ld2ld, _, _, hd2hd, h_ld, h_hd = outs
    _, ld2hd2ld, hd2ld2hd, _, ch_a, ch_b = cycle_outs
    if lowpass is not None:
        ld, ld2ld, ld2hd2ld = lowpass(ld), lowpass(ld2ld), lowpass(ld2hd2ld)
        if lowpass_hd:
            hd, hd2hd, hd2ld2hd = lowpass(hd), lowpass(hd2hd), lowpass(hd2ld2hd)
    terms = {
        "self_recon": recon_loss(ld, ld2ld) + recon_loss(hd, hd2hd),
        "hidden_kl": kl_loss(torch.cat([h_ld, h_hd])),
        "cycle": w.cycle_ld * recon_loss(ld, ld2hd2ld) + recon_loss(hd, hd2ld2hd),
        "cycle_hidden_kl": kl_loss(torch.cat([ch_a, ch_b])),
        "adv": adv_loss(d_ld_fake) + adv_loss(d_hd_fake),
    }
    terms["total"] = (
        w.self_recon * terms["self_recon"]
        + w.hidden_kl * terms["hidden_kl"]
        + w.cycle * terms["cycle"]
        + w.cycle_hidden_kl * terms["cycle_hidden_kl"]
        + w.adv * terms["adv"]
    )
    if paired is not None and w.paired:
        terms["paired"] = recon_loss(*paired) if paired[0].numel() else ld.new_zeros(())
        terms["total"] = terms["total"] + w.paired * terms["paired"]
    return terms
