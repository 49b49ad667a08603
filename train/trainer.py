"""UNIT training: one discriminator step, then one generator step, per iteration.

The defaults are the reference recipe (losses and weights, Adam 1e-4 / (0.5, 0.999) with coupled
weight decay 1e-4, batch 1, 26 epochs, 256 crops, unpaired). Options that change it (HU window,
residual output, what the discriminators see, the LD-side cycle weight, a paired term for slices
with a regular-dose partner, an average of the weights, the schedule) are recorded in every
checkpoint. With the paired term on and every unpaired weight at zero, an iteration is one
supervised step of the LD->HD translator alone (as used at inference: no latent noise, no
discriminators).
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from train.data import Augment, Batch, TrainingStream
from train.losses import LossWeights, disc_loss, generator_losses
from unit_model import checkpoint as ckpt
from unit_model.networks import GeneratorConfig, PatchDiscriminator, UnitGenerator
from unit_model.transforms import HUWindow

logger = logging.getLogger(__name__)

DiscView = Literal["image", "soft_tissue", "highpass", "noise_energy"]
ReconLowpass = Literal["none", "all", "ld"]
Schedule = Literal["constant", "cosine"]


@dataclass
class TrainOptions:
    epochs: int = 26
    batch_size: int = 1
    crop: int = 256
    lr: float = 1e-4
    disc_lr: float | None = None  # None: same as lr
    beta1: float = 0.5
    beta2: float = 0.999
    weight_decay: float = 1e-4
    weights: LossWeights = field(default_factory=LossWeights)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    window_lower: float = -1024.0
    window_upper: float = 3071.0
    disc_view: DiscView = "image"
    disc_init_std: float = 0.01
    seed: int = 0
    max_iterations: int | None = None
    max_minutes: float | None = None
    checkpoint_every: int = 0  # iterations; 0 = each epoch only
    body_fraction: float = 0.0
    recon_lowpass: ReconLowpass = "none"
    amp: bool = True
    ema: float = 0.0  # decay of the generator's weight average; 0 = no average
    augment: Augment = "flip"
    lr_schedule: Schedule = "constant"  # cosine: to 0 over max_iterations (or the epochs)

    def __post_init__(self) -> None:
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1), not {self.ema}")
        for name, allowed in (
            ("disc_view", DiscView),
            ("recon_lowpass", ReconLowpass),
            ("augment", Augment),
            ("lr_schedule", Schedule),
        ):
            value, choices = getattr(self, name), get_args(allowed)
            if value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, not {value!r}")

    @property
    def paired_only(self) -> bool:
        """Only the paired term is on: train the LD->HD translator alone, supervised."""
        return self.weights.paired > 0 and not self.weights.unpaired

    @property
    def window(self) -> HUWindow:
        return HUWindow(self.window_lower, self.window_upper)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainOptions:
        d = dict(d)
        if isinstance(d.get("recon_lowpass"), bool):  # written before "ld" existed
            d["recon_lowpass"] = "all" if d["recon_lowpass"] else "none"
        d["weights"] = LossWeights(**d["weights"])
        d["generator"] = GeneratorConfig.from_dict(d["generator"])
        return cls(**d)


def disc_input(x: Tensor, view: DiscView, window: HUWindow) -> Tensor:
    """What the discriminators see of a [-1, 1] image."""
    if view == "image":
        return x
    if view == "soft_tissue":  # C40 / W400, rescaled to [-1, 1]
        hu = window.to_hu(x)
        return ((hu - 40.0) / 200.0).clamp(-1, 1)
    detail = (x - _lowpass(x)) * (window.half_width / 50.0)  # 50 HU of detail -> 1
    if view == "highpass":
        return detail
    # noise_energy: log of the local (5 x 5) power of the detail, where dose shows as a level shift
    return torch.log(_lowpass(detail * detail) + 1e-3)


def _lowpass(x: Tensor) -> Tensor:
    """5 x 5 box blur, reflect-padded: what is left when pixel noise is averaged away."""
    return F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), 5, stride=1)


def _summary(losses: dict[str, float]) -> str:
    """The progress bar's loss figures."""
    text = f"G {losses['total']:.4f}"
    if "adv" in losses:
        text += f" adv {losses['adv']:.3f} D {losses['d_ld']:.3f}/{losses['d_hd']:.3f}"
    if "paired" in losses:
        text += f" paired {losses['paired']:.4f}"
    return text


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    def __init__(
        self,
        opts: TrainOptions,
        stream: TrainingStream,
        run_dir: Path,
        device: torch.device,
        data_description: dict[str, Any] | None = None,
        evaluate: Any = None,
    ) -> None:
        self.opts = opts
        self.stream = stream
        self.run_dir = run_dir
        self.device = device
        self.data_description = data_description or {}
        self.evaluate = evaluate  # callable(generator, window) -> metrics dict, optional
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        _seed_all(opts.seed + self.rank)
        self.gen = UnitGenerator(opts.generator).to(device)
        self.d_ld = PatchDiscriminator(init_std=opts.disc_init_std).to(device)
        self.d_hd = PatchDiscriminator(init_std=opts.disc_init_std).to(device)
        self.g_model: nn.Module = self.gen
        self.t_model: nn.Module = self.gen.translator()
        self.d_models: tuple[nn.Module, nn.Module] = (self.d_ld, self.d_hd)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [device.index] if device.type == "cuda" else None
            if opts.paired_only:
                self.t_model = DDP(self.t_model, device_ids=ids)
            else:
                self.g_model = DDP(self.gen, device_ids=ids)
                self.d_models = (DDP(self.d_ld, device_ids=ids), DDP(self.d_hd, device_ids=ids))
        # The weight average (``--ema``): what is evaluated, picked and saved as a generator.
        self.ema_gen: UnitGenerator | None = None
        if opts.ema:
            self.ema_gen = copy.deepcopy(self.gen).requires_grad_(False)
        betas = (opts.beta1, opts.beta2)
        self.opt_g = torch.optim.Adam(
            self.gen.parameters(), lr=opts.lr, betas=betas, weight_decay=opts.weight_decay
        )
        d_params = [*self.d_ld.parameters(), *self.d_hd.parameters()]
        self.opt_d = torch.optim.Adam(
            d_params, lr=opts.disc_lr or opts.lr, betas=betas, weight_decay=opts.weight_decay
        )
        self.amp = opts.amp and device.type == "cuda"
        self.base_lrs = (opts.lr, opts.disc_lr or opts.lr)
        self.total_iterations: int | None = None  # set by fit() for the schedule
        self.iteration = 0
        self.epoch = 0
        self.best: dict[str, Any] = {}
        self.started = time.monotonic()
        run_dir.mkdir(parents=True, exist_ok=True)

    # -- state ----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "generator": self.gen.state_dict(),
            "d_ld": self.d_ld.state_dict(),
            "d_hd": self.d_hd.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "iteration": self.iteration,
            "epoch": self.epoch,
            "options": json.dumps(self.opts.to_dict()),
            "best": json.dumps(self.best),
            "torch_rng": torch.get_rng_state(),
            "stream_rng": json.dumps(self.stream.rng.bit_generator.state),
            **({"ema": self.ema_gen.state_dict()} if self.ema_gen is not None else {}),
        }

    @property
    def shipped(self) -> UnitGenerator:
        """The generator that is evaluated and saved: the weight average when there is one."""
        return self.ema_gen if self.ema_gen is not None else self.gen

    def save(self) -> Path:
        """Trainer state (state.pt) and generator weights (generator-*.safetensors)."""
        if self.rank != 0:
            return self.run_dir / "state.pt"
        state_path = self.run_dir / "state.pt"
        tmp = state_path.with_suffix(".tmp")
        torch.save(self.state(), tmp)
        tmp.replace(state_path)
        training = {
            "iteration": self.iteration,
            "epoch": self.epoch,
            "options": self.opts.to_dict(),
            "wall_seconds": round(time.monotonic() - self.started, 1),
            "device": str(self.device),
        }
        ckpt.save(
            self.run_dir / "generator-last.safetensors",
            self.shipped,
            self.opts.window,
            inference_only=False,
            data=self.data_description,
            training=training,
        )
        return state_path

    def resume(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=True)
        saved = TrainOptions.from_dict(json.loads(state["options"]))
        if saved.generator != self.opts.generator:
            raise ValueError(
                f"{path}: trained with generator {saved.generator}, not {self.opts.generator}"
            )
        self.gen.load_state_dict(state["generator"])
        self.d_ld.load_state_dict(state["d_ld"])
        self.d_hd.load_state_dict(state["d_hd"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        if self.ema_gen is not None:
            self.ema_gen.load_state_dict(state.get("ema", state["generator"]))
        self.iteration = int(state["iteration"])
        self.epoch = int(state["epoch"])
        self.best = json.loads(state["best"])
        torch.set_rng_state(state["torch_rng"].cpu())
        self.stream.rng.bit_generator.state = json.loads(state["stream_rng"])
        logger.info("resumed from %s at iteration %d (epoch %d)", path, self.iteration, self.epoch)

    # -- one iteration --------------------------------------------------------------------
    def _set_lr(self) -> None:
        if self.opts.lr_schedule != "cosine" or not self.total_iterations:
            return
        f = 0.5 * (1 + math.cos(math.pi * min(self.iteration / self.total_iterations, 1.0)))
        for opt, base in zip((self.opt_g, self.opt_d), self.base_lrs, strict=True):
            for group in opt.param_groups:
                group["lr"] = base * f

    def _update_ema(self) -> None:
        if self.ema_gen is None:
            return
        # warm-up: early on the average follows the weights more closely
        decay = min(self.opts.ema, (1 + self.iteration) / (10 + self.iteration))
        with torch.no_grad():
            for avg, p in zip(self.ema_gen.parameters(), self.gen.parameters(), strict=True):
                avg.lerp_(p.detach(), 1 - decay)

    def step(self, batch: Batch) -> dict[str, float]:
        self._set_lr()
        out = self._paired_step(batch) if self.opts.paired_only else self._unit_step(batch)
        self.iteration += 1
        self._update_ema()
        return out

    def _paired_step(self, batch: Batch) -> dict[str, float]:
        """Supervised: L1 between the translator's output and the regular-dose partner."""
        keep = batch.paired
        ld = batch.ld[keep].to(self.device)
        target = batch.target[keep].to(self.device)
        self.opt_g.zero_grad(set_to_none=True)
        if not len(ld):
            return {"paired": 0.0, "total": 0.0}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss = (self.t_model(ld).float() - target).abs().mean()
        total = self.opts.weights.paired * loss
        total.backward()
        self.opt_g.step()
        return {"paired": float(loss.detach()), "total": float(total.detach())}

    def _unit_step(self, batch: Batch) -> dict[str, float]:
        o = self.opts
        view = o.disc_view
        win = o.window
        ld, hd = batch.ld.to(self.device), batch.hd.to(self.device)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)
        d_ld, d_hd = self.d_models
        # Generator forward (training mode: latent noise); its fakes feed the D step detached.
        with autocast:
            outs = self.g_model(ld, hd, return_latents=True)
        hd2ld, ld2hd = outs[1], outs[2]
        # Discriminator step (on the generator as it was before this iteration's update).
        for p in (*self.d_ld.parameters(), *self.d_hd.parameters()):
            p.requires_grad_(True)
        self.opt_d.zero_grad(set_to_none=True)
        with autocast:
            loss_d_ld = o.weights.disc * disc_loss(
                d_ld(disc_input(ld, view, win)), d_ld(disc_input(hd2ld.detach(), view, win))
            )
            loss_d_hd = o.weights.disc * disc_loss(
                d_hd(disc_input(hd, view, win)), d_hd(disc_input(ld2hd.detach(), view, win))
            )
        (loss_d_ld + loss_d_hd).backward()
        self.opt_d.step()
        # Generator step against the updated discriminators.
        for p in (*self.d_ld.parameters(), *self.d_hd.parameters()):
            p.requires_grad_(False)
        self.opt_g.zero_grad(set_to_none=True)
        with autocast:
            cycle = self.g_model(hd2ld, ld2hd, return_latents=True)
            terms = generator_losses(
                ld,
                hd,
                outs,
                cycle,
                d_ld(disc_input(hd2ld, view, win)),
                d_hd(disc_input(ld2hd, view, win)),
                o.weights,
                lowpass=None if o.recon_lowpass == "none" else _lowpass,
                lowpass_hd=o.recon_lowpass == "all",
                paired=(
                    (ld2hd[batch.paired], batch.target[batch.paired].to(self.device))
                    if o.weights.paired
                    else None
                ),
            )
        terms["total"].backward()
        self.opt_g.step()
        out = {k: float(v.detach()) for k, v in terms.items()}
        out["d_ld"] = float(loss_d_ld.detach())
        out["d_hd"] = float(loss_d_hd.detach())
        return out

    def preview(self, ld: Tensor, hd: Tensor, path: Path) -> None:
        """The reference's 2 x 2 figure: LD, LD->HD / HD, HD->LD, in a C40/W400 window."""
        from pacs_node.work.images import save_grid

        gen = self.shipped
        gen.eval()
        with torch.no_grad():
            outs = gen(ld[:1].to(self.device), hd[:1].to(self.device))
        self.gen.train()
        win = self.opts.window
        tiles = [
            win.to_hu(t[0, 0].float().cpu()).numpy() for t in (ld[:1], outs[2], hd[:1], outs[1])
        ]
        save_grid(path, [tiles[:2], tiles[2:]], labels=[["LD", "LD->HD"], ["HD", "HD->LD"]])

    # -- the loop -------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        o = self.opts
        log_path = self.run_dir / "log.csv"
        new_log = not log_path.exists()
        deadline = self.started + o.max_minutes * 60 if o.max_minutes else math.inf
        per_epoch = max(len(self.stream) // o.batch_size, 1)
        total = o.max_iterations or o.epochs * per_epoch
        self.total_iterations = total
        self.gen.train()
        done = False
        with (
            open(log_path, "a", newline="") as logf,
            Progress(
                TextColumn("epoch {task.fields[epoch]}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[losses]}"),
                TimeElapsedColumn(),
                disable=self.rank != 0,
            ) as progress,
        ):
            writer: csv.DictWriter[str] | None = None
            task = progress.add_task(
                "fit", total=total, completed=self.iteration, epoch=self.epoch, losses=""
            )
            while self.epoch < o.epochs and not done:
                last: tuple[Tensor, Tensor] | None = None
                for batch in self.stream.epoch(o.batch_size):
                    losses = self.step(batch)
                    last = (batch.ld, batch.hd)
                    row = {
                        "iteration": self.iteration,
                        "epoch": self.epoch,
                        "seconds": round(time.monotonic() - self.started, 2),
                        **losses,
                    }
                    if writer is None:
                        writer = csv.DictWriter(logf, fieldnames=list(row))
                        if new_log:
                            writer.writeheader()
                    writer.writerow(row)
                    if self.iteration % 10 == 0:
                        logf.flush()
                    progress.update(
                        task,
                        advance=1,
                        epoch=self.epoch,
                        losses=_summary(losses),
                    )
                    if o.checkpoint_every and self.iteration % o.checkpoint_every == 0:
                        if self.rank == 0:
                            self.preview(
                                batch.ld,
                                batch.hd,
                                self.run_dir / f"preview-{self.iteration:07d}.png",
                            )
                        self.checkpoint()
                    if (
                        o.max_iterations and self.iteration >= o.max_iterations
                    ) or time.monotonic() > deadline:
                        done = True
                        break
                if not done:
                    self.epoch += 1
                # Per epoch, as the reference does; with checkpoint_every, on those iterations
                # (above) and at the end only.
                if not o.checkpoint_every or done or self.epoch >= o.epochs:
                    if last is not None and self.rank == 0:
                        self.preview(*last, self.run_dir / f"preview-epoch{self.epoch:03d}.png")
                    self.checkpoint()
                logf.flush()
        return {"iterations": self.iteration, "epochs": self.epoch, "best": self.best}

    def checkpoint(self) -> None:
        self.save()
        if self.evaluate is None or self.rank != 0:
            return
        gen = self.shipped
        gen.eval()
        metrics = self.evaluate(gen, self.opts.window)
        self.gen.train()
        metrics["iteration"] = self.iteration
        with open(self.run_dir / "heldout.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        logger.info("iteration %d held-out: %s", self.iteration, metrics)
        if not self.best or metrics["psnr"] > self.best.get("psnr", -1):
            self.best = metrics
            ckpt.save(
                self.run_dir / "generator-best.safetensors",
                gen,
                self.opts.window,
                data=self.data_description,
                metrics=metrics,
                training={"iteration": self.iteration, "options": self.opts.to_dict()},
            )
