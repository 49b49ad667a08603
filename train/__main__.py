"""``unit-train`` / ``python -m train``: fit, synth, evaluate."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train and evaluate the UNIT low-dose CT denoiser.",
)
logger = logging.getLogger("train")


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    )


def _load_dirs(low_dose: Path | None, full_dose: Path | None, data: Path | None):
    from train.data import read_series, split_by_dose

    if data is not None:
        low, full = split_by_dose(read_series(data))
    elif low_dose is not None and full_dose is not None:
        low, full = read_series(low_dose), read_series(full_dose)
    else:
        raise typer.BadParameter("give --data DIR, or both --low-dose DIR and --full-dose DIR")
    if not low or not full:
        raise typer.BadParameter("no low-dose or no full-dose series found")
    return low, full


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="output folder (LDCT-and-Projection-data layout)")],
    cases: Annotated[int, typer.Option(help="random body phantoms")] = 5,
    dose: Annotated[float, typer.Option(help="dose fraction of the low-dose series")] = 0.25,
    seed: Annotated[int, typer.Option()] = 0,
    size: Annotated[int, typer.Option(help="matrix size (square)")] = 512,
    slices: Annotated[int, typer.Option(help="slices per series")] = 8,
    fov_mm: Annotated[
        float, typer.Option(help="field of view, mm (pixel size = fov / size)")
    ] = 380.0,
    extras: Annotated[bool, typer.Option(help="add Shepp-Logan and CT_small cases")] = True,
    calibrate: Annotated[bool, typer.Option(help="print the noise calibration and exit")] = False,
) -> None:
    """Write paired regular-dose / low-dose synthetic CT series as DICOM."""
    _setup_logging()
    from train import synth as s

    if calibrate:
        typer.echo(
            f"added noise SD at dose {dose}, {size}^2: {s.calibrate(size, dose, seed):.2f} HU"
        )
        return
    s.synthesize(
        out,
        cases=cases,
        dose=dose,
        seed=seed,
        size=size,
        slices=slices,
        extras=extras,
        fov_mm=fov_mm,
    )
    typer.echo(f"wrote {cases + 2 * extras} cases to {out}")


@app.command()
def fit(
    run_dir: Annotated[Path, typer.Option("--run-dir", help="checkpoints, logs, previews")] = Path(
        "runs/unit"
    ),
    data: Annotated[Path | None, typer.Option(help="LDCT-layout folder (both doses)")] = None,
    low_dose: Annotated[Path | None, typer.Option(help="low-dose DICOM folder")] = None,
    full_dose: Annotated[Path | None, typer.Option(help="regular-dose DICOM folder")] = None,
    heldout: Annotated[
        Path | None, typer.Option(help="paired LDCT-layout folder to pick the best checkpoint")
    ] = None,
    epochs: int = 26,
    batch_size: int = 1,
    crop: int = 256,
    lr: float = 1e-4,
    disc_lr: Annotated[float | None, typer.Option(help="discriminator lr (default: --lr)")] = None,
    beta1: float = 0.5,
    beta2: float = 0.999,
    weight_decay: float = 1e-4,
    self_recon_weight: float = 10.0,
    hidden_kl_weight: float = 0.01,
    cycle_weight: float = 10.0,
    cycle_hidden_kl_weight: float = 0.01,
    adv_weight: float = 1.0,
    disc_weight: float = 0.5,
    cycle_ld_factor: Annotated[
        float, typer.Option(help="extra factor on the LD->HD->LD cycle term")
    ] = 1.0,
    filters: Annotated[int, typer.Option(help="filters in the first generator block")] = 64,
    upsample: Annotated[str, typer.Option(help="transpose | resize_conv")] = "transpose",
    residual_output: Annotated[
        bool, typer.Option(help="decoders predict a correction, start as identity")
    ] = False,
    residual_scale: Annotated[float, typer.Option(help="largest correction, network units")] = 0.25,
    image_skip: Annotated[
        bool, typer.Option(help="decoders see the full-resolution image (needs --residual-output)")
    ] = False,
    window_lower: float = -1024.0,
    window_upper: float = 3071.0,
    disc_view: Annotated[
        str, typer.Option(help="image | soft_tissue | highpass | noise_energy")
    ] = "image",
    disc_init_std: Annotated[float, typer.Option(help="0 = torch default init")] = 0.01,
    seed: int = 0,
    max_iterations: Annotated[int | None, typer.Option()] = None,
    max_minutes: Annotated[float | None, typer.Option()] = None,
    checkpoint_every: Annotated[int, typer.Option(help="iterations; 0 = every epoch")] = 0,
    body_fraction: Annotated[float, typer.Option(help="min fraction of body in a crop")] = 0.0,
    recon_lowpass: Annotated[
        str,
        typer.Option(
            help="reconstruction losses on 5x5 low-passed images: none | all | ld (only those "
            "with a low-dose target)"
        ),
    ] = "none",
    resume: Annotated[bool, typer.Option(help="continue from RUN_DIR/state.pt")] = False,
    device: str = "auto",
    threads: Annotated[int | None, typer.Option(help="CPU threads")] = None,
) -> None:
    """Train the generator and both discriminators (unpaired), as the reference does."""
    _setup_logging()
    import torch

    from train.data import UnpairedStream, pairs, read_series, split_by_dose
    from train.losses import LossWeights
    from train.trainer import Trainer, TrainOptions
    from unit_model.denoiser import pick_device
    from unit_model.networks import GeneratorConfig

    if threads:
        torch.set_num_threads(threads)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    dev = pick_device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    try:
        opts = TrainOptions(
            epochs=epochs,
            batch_size=batch_size,
            crop=crop,
            lr=lr,
            disc_lr=disc_lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            weights=LossWeights(
                self_recon_weight,
                hidden_kl_weight,
                cycle_weight,
                cycle_hidden_kl_weight,
                adv_weight,
                disc_weight,
                cycle_ld_factor,
            ),
            generator=GeneratorConfig(
                residual_scale=residual_scale,
                filters=filters,
                upsample=upsample,  # type: ignore[arg-type]
                residual_output=residual_output,
                image_skip=image_skip,
            ),
            window_lower=window_lower,
            window_upper=window_upper,
            disc_view=disc_view,  # type: ignore[arg-type]
            disc_init_std=disc_init_std,
            seed=seed,
            max_iterations=max_iterations,
            max_minutes=max_minutes,
            checkpoint_every=checkpoint_every,
            body_fraction=body_fraction,
            recon_lowpass=recon_lowpass,  # type: ignore[arg-type]
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    low, full = _load_dirs(low_dose, full_dose, data)
    description: dict[str, Any] = {
        "low_dose_series": len(low),
        "full_dose_series": len(full),
        "low_dose_slices": int(sum(len(s.slices) for s in low)),
        "full_dose_slices": int(sum(len(s.slices) for s in full)),
        "source": str(data or f"{low_dose} + {full_dose}"),
    }
    stream = UnpairedStream(
        [x for s in low for x in s.slices],
        [x for s in full for x in s.slices],
        crop,
        opts.window,
        seed=seed,
        rank=int(os.environ.get("RANK", 0)),
        world=world,
        body_fraction=body_fraction,
    )
    evaluate = None
    if heldout is not None:
        held_pairs = pairs(*split_by_dose(read_series(heldout)))
        description["heldout"] = str(heldout)
        evaluate = _heldout_evaluator(held_pairs)
    trainer = Trainer(opts, stream, run_dir, dev, description, evaluate)
    if resume:
        state = run_dir / "state.pt"
        if not state.exists():
            raise typer.BadParameter(f"--resume: {state} does not exist")
        trainer.resume(state)
    result = trainer.fit()
    typer.echo(f"done: {result['iterations']} iterations, {result['epochs']} epochs; {run_dir}")


def _heldout_evaluator(held_pairs, slices_per_series: int = 2, crop: int = 256):
    """PSNR/SSIM of the generator on a fixed, cheap subset of the held-out pairs: a few middle
    slices per series, centre-cropped (the body, not the air around it)."""
    import copy

    import numpy as np

    from train.evaluate import image_metrics
    from unit_model.denoiser import Denoiser

    subset = []
    for low, full in held_pairs:
        n, h, w = low.slices.shape
        mid = n // 2
        ks = slice(
            max(0, mid - slices_per_series // 2),
            max(0, mid - slices_per_series // 2) + slices_per_series,
        )
        ys = slice(max(0, (h - crop) // 2), max(0, (h - crop) // 2) + crop)
        xs = slice(max(0, (w - crop) // 2), max(0, (w - crop) // 2) + crop)
        subset.append((low.slices[ks, ys, xs], full.slices[ks, ys, xs]))

    def run(gen, window):
        # a copy: Denoiser freezes and moves the module it is given
        net = copy.deepcopy(gen.translator())
        den = Denoiser(net, window, device=str(next(gen.parameters()).device))
        ps, ss = [], []
        for ld, nd in subset:
            m = image_metrics(den.denoise_hu(ld), nd, -160.0, 240.0)
            ps.append(m["psnr"])
            ss.append(m["ssim"])
        return {"psnr": float(np.mean(ps)), "ssim": float(np.mean(ss))}

    return run


@app.command()
def evaluate(
    checkpoint: Annotated[Path | None, typer.Option(help="generator checkpoint")] = None,
    data: Annotated[Path | None, typer.Option(help="LDCT-layout folder with paired series")] = None,
    low_dose: Annotated[Path | None, typer.Option()] = None,
    full_dose: Annotated[Path | None, typer.Option()] = None,
    out: Annotated[Path, typer.Option(help="folder for evaluation.md and PNGs")] = Path(
        "runs/eval"
    ),
    baselines: Annotated[str, typer.Option(help="comma list of nlm,bm3d (or none)")] = "nlm,bm3d",
    max_slices: Annotated[int | None, typer.Option(help="middle slices per series")] = None,
    device: str = "auto",
) -> None:
    """Score the low-dose input, NLM, BM3D and the checkpoint against the regular dose."""
    _setup_logging()
    from train.data import pairs
    from train.evaluate import Method, bm3d_method, evaluate_pairs, nlm
    from unit_model.denoiser import Denoiser

    low, full = _load_dirs(low_dose, full_dose, data)
    matched = pairs(low, full)
    if not matched:
        raise typer.BadParameter("no low/full-dose series pairs (same patient and shape) found")
    methods: dict[str, Method] = {"low dose": lambda x: x}
    chosen = {b.strip() for b in baselines.split(",") if b.strip() and b.strip() != "none"}
    if "nlm" in chosen:
        methods["NLM"] = nlm
    if "bm3d" in chosen:
        methods["BM3D"] = bm3d_method
    if checkpoint is not None:
        den = Denoiser.from_checkpoint(checkpoint, device=device)
        methods[f"UNIT {den.model_version}"] = den.denoise_hu
    out.mkdir(parents=True, exist_ok=True)
    evaluate_pairs(matched, methods, out, max_slices=max_slices)
    typer.echo((out / "evaluation.md").read_text())
    typer.echo(f"montages and table in {out}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
