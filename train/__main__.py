"""``unit-train`` / ``python -m train``: fit, synth, evaluate."""

from __future__ import annotations

import json
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


def _as_list(value: Path | list[Path] | None) -> list[Path]:
    return [] if value is None else [value] if isinstance(value, Path) else list(value)


def _load_dirs(
    low_dose: Path | list[Path] | None,
    full_dose: Path | list[Path] | None,
    data: Path | list[Path] | None,
):
    """Low- and regular-dose series from LDCT-layout folders (``data``, both doses, split by
    series folder names) and from folders of one dose each; every folder read recursively."""
    from train.data import read_series, split_by_dose

    if not _as_list(data) and not (_as_list(low_dose) and _as_list(full_dose)):
        raise typer.BadParameter(
            "give --data DIR, or --low-dose DIR and --full-dose DIR (each may be repeated)"
        )
    low, full = [], []
    try:
        for folder in _as_list(data):
            a, b = split_by_dose(read_series(folder))
            low += a
            full += b
        for folder in _as_list(low_dose):
            low += read_series(folder)
        for folder in _as_list(full_dose):
            full += read_series(folder)
    except FileNotFoundError as err:
        raise typer.BadParameter(str(err)) from None
    if not low or not full:
        raise typer.BadParameter("no low-dose or no full-dose series found")
    return low, full


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="output folder (LDCT-and-Projection-data layout)")],
    from_dir: Annotated[
        Path | None,
        typer.Option(
            "--from",
            help="a folder of regular-dose CT series (a PACS export) to simulate low doses of, "
            "instead of phantoms",
        ),
    ] = None,
    cases: Annotated[int, typer.Option(help="random body phantoms")] = 5,
    dose: Annotated[
        str,
        typer.Option(
            help="dose fraction of the low dose: 0.25, a range 0.15:0.4 or a list 0.15,0.25 "
            "(drawn per series)"
        ),
    ] = "0.25",
    filter_: Annotated[
        str,
        typer.Option(
            "--filter",
            help="reconstruction filter of the added noise, or a comma list drawn per series: "
            "ramp, shepp-logan, cosine, hamming, hann (sharp to soft)",
        ),
    ] = "ramp",
    seed: Annotated[int, typer.Option()] = 0,
    size: Annotated[int, typer.Option(help="matrix size (square)")] = 512,
    slices: Annotated[int, typer.Option(help="slices per series")] = 8,
    fov_mm: Annotated[
        float, typer.Option(help="field of view, mm (pixel size = fov / size)")
    ] = 380.0,
    extras: Annotated[bool, typer.Option(help="add Shepp-Logan and CT_small cases")] = True,
    workers: Annotated[int, typer.Option(help="processes for --from")] = 1,
    repeat: Annotated[
        int, typer.Option(help="--from: independent low doses per series, each its own case")
    ] = 1,
    calibrate: Annotated[bool, typer.Option(help="print the noise calibration and exit")] = False,
) -> None:
    """Write paired regular-dose / low-dose CT series as DICOM: synthetic phantoms, or (with
    --from) a site's own routine-dose series with simulated low doses."""
    _setup_logging()
    from train import synth as s

    try:
        doses = s.DoseChoice.parse(dose)
        filters = s.parse_filters(filter_)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    if calibrate:
        typer.echo(
            f"added noise SD at dose {doses.low}, {size}^2: "
            f"{s.calibrate(size, doses.low, seed):.2f} HU"
        )
        return
    if from_dir is not None:
        if not from_dir.is_dir():
            raise typer.BadParameter(f"{from_dir} is not a folder", param_hint="--from")
        summary = s.synthesize_from(
            from_dir, out, dose=doses, filters=filters, seed=seed, workers=workers, repeat=repeat
        )
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(summary.reasons().items()))
        typer.echo(
            f"wrote {summary.series} series ({summary.slices} slices) with simulated low doses "
            f"to {out}; skipped {len(summary.skipped)} files" + (f" ({skipped})" if skipped else "")
        )
        if not summary.series:
            raise typer.Exit(1)
        return
    s.synthesize(
        out,
        cases=cases,
        dose=doses,
        filters=filters,
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
    data: Annotated[
        list[Path] | None,
        typer.Option(help="LDCT-layout folder, both doses (repeatable; pairs are found in it)"),
    ] = None,
    low_dose: Annotated[
        list[Path] | None, typer.Option(help="low-dose DICOM folder (repeatable; unpaired)")
    ] = None,
    full_dose: Annotated[
        list[Path] | None, typer.Option(help="regular-dose DICOM folder (repeatable; unpaired)")
    ] = None,
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
    paired_weight: Annotated[
        float,
        typer.Option(
            help="weight of L1(LD->HD, regular dose) on slices with a regular-dose partner; "
            "0 = the reference (unpaired only); with every unpaired weight 0, the translator "
            "is trained alone, supervised"
        ),
    ] = 0.0,
    encoder_skips: Annotated[
        bool,
        typer.Option(help="decoders see their encoder's full/half-resolution features (U-Net)"),
    ] = False,
    ema: Annotated[
        float,
        typer.Option(help="decay of a moving average of the generator's weights (0 = off)"),
    ] = 0.0,
    augment: Annotated[
        str, typer.Option(help="flip (the reference's) | dihedral (flips and quarter turns)")
    ] = "flip",
    lr_schedule: Annotated[
        str, typer.Option(help="constant | cosine (to 0 over --max-iterations or the epochs)")
    ] = "constant",
    resume: Annotated[bool, typer.Option(help="continue from RUN_DIR/state.pt")] = False,
    device: str = "auto",
    threads: Annotated[int | None, typer.Option(help="CPU threads")] = None,
) -> None:
    """Train the generator and both discriminators, unpaired as the reference does, with an
    optional paired term for slices that have a regular-dose partner."""
    _setup_logging()
    import torch

    from train.data import TrainingStream, pairs, read_series, split_by_dose
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
                paired_weight,
            ),
            generator=GeneratorConfig(
                residual_scale=residual_scale,
                filters=filters,
                upsample=upsample,  # type: ignore[arg-type]
                residual_output=residual_output,
                image_skip=image_skip,
                encoder_skips=encoder_skips,
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
            ema=ema,
            augment=augment,  # type: ignore[arg-type]
            lr_schedule=lr_schedule,  # type: ignore[arg-type]
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    low, full = _load_dirs(low_dose, full_dose, data)
    partner = {id(a): b for a, b in pairs(low, full)}
    if paired_weight > 0 and not partner:
        raise typer.BadParameter(
            "--paired-weight needs paired series: a low dose and a regular dose of the same "
            "slices in one study folder (e.g. from `unit-train synth`)"
        )
    low_slices = [x for s in low for x in s.slices]
    targets = [
        (partner[id(s)].slices[k] if id(s) in partner else None)
        for s in low
        for k in range(len(s.slices))
    ]
    description: dict[str, Any] = {
        "low_dose_series": len(low),
        "full_dose_series": len(full),
        "paired_series": len(partner),
        "low_dose_slices": len(low_slices),
        "paired_slices": sum(t is not None for t in targets),
        "full_dose_slices": int(sum(len(s.slices) for s in full)),
        "source": [str(p) for p in [*(data or []), *(low_dose or []), *(full_dose or [])]],
    }
    stream = TrainingStream(
        low_slices,
        [x for s in full for x in s.slices],
        crop,
        opts.window,
        seed=seed,
        rank=int(os.environ.get("RANK", 0)),
        world=world,
        body_fraction=body_fraction,
        targets=targets,
        mode=opts.augment,
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
    data: Annotated[Path | None, typer.Option(help="LDCT-layout folder with paired series")] = None,
    low_dose: Annotated[Path | None, typer.Option()] = None,
    full_dose: Annotated[Path | None, typer.Option()] = None,
    checkpoint: Annotated[
        list[Path] | None, typer.Option(help="generator checkpoint (repeat for several)")
    ] = None,
    baselines: Annotated[
        str, typer.Option(help="comma list of gaussian,nlm,bm3d (or none)")
    ] = "gaussian,nlm,bm3d",
    tune_on: Annotated[
        Path | None,
        typer.Option(help="paired held-out folder the baselines' strengths are picked on"),
    ] = None,
    settings: Annotated[
        Path | None,
        typer.Option(help="baselines.json of an earlier run: reuse its strengths unchanged"),
    ] = None,
    out: Annotated[Path, typer.Option(help="folder for evaluation.md and PNGs")] = Path(
        "runs/eval"
    ),
    max_slices: Annotated[int | None, typer.Option(help="middle slices per series")] = None,
    record: Annotated[
        Path | None,
        typer.Option(
            help="a JSON record (e.g. the one beside shipped weights) to add this set's strengths "
            "and figures to, under --as"
        ),
    ] = None,
    as_: Annotated[str, typer.Option("--as", help="the set's name in --record")] = "test",
    device: str = "auto",
) -> None:
    """Score the low-dose input, tuned classical baselines and checkpoints against the regular
    dose."""
    _setup_logging()
    from train.data import pairs
    from train.evaluate import BASELINES, Method, evaluate_pairs, parse_baselines, tune
    from unit_model.denoiser import Denoiser

    try:
        chosen = parse_baselines(baselines)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--baselines") from None
    matched = pairs(*_load_dirs(low_dose, full_dose, data))
    if not matched:
        raise typer.BadParameter("no low/full-dose series pairs (same patient and shape) found")
    strengths: dict[str, float] = {}
    tuned_on = "untuned: default strength"
    if tune_on is not None:
        held = pairs(*_load_dirs(None, None, tune_on))
        if not held:
            raise typer.BadParameter(f"{tune_on}: no paired series to tune on")
        for b in chosen:
            strengths[b.name], _ = tune(b, held, max_slices)
        tuned_on = f"picked by PSNR on {tune_on}"
    elif settings is not None:
        try:
            saved = json.loads(settings.read_text())["strengths"]
        except (OSError, ValueError, KeyError) as err:
            raise typer.BadParameter(f"{settings}: {err}", param_hint="--settings") from None
        strengths = {k: float(v) for k, v in saved.items()}
        tuned_on = f"from {settings}"
    methods: dict[str, Method] = {"low dose": lambda x: x}
    described = {"low dose": ""}
    for b in chosen:
        s = strengths.setdefault(b.name, 1.0 if b.name != "Gaussian" else 0.5)
        methods[b.name] = b.method(s)
        described[b.name] = b.describe(s)
    for path in checkpoint or []:
        den = Denoiser.from_checkpoint(path, device=device)
        name = f"UNIT {den.model_version}"
        methods[name] = den.denoise_hu
        described[name] = path.name
    out.mkdir(parents=True, exist_ok=True)
    (out / "baselines.json").write_text(
        json.dumps(
            {
                "strengths": strengths,
                "settings": {b.name: described[b.name] for b in chosen},
                "tuned": tuned_on,
                "grids": {b.name: list(b.grid) for b in BASELINES.values()},
            },
            indent=2,
        )
    )
    results = evaluate_pairs(matched, methods, out, max_slices=max_slices, settings=described)
    if record is not None:
        kept = json.loads(record.read_text()) if record.exists() else {"sets": {}}
        kept.setdefault("sets", {})[as_] = {
            "data": str(data or f"{low_dose} + {full_dose}"),
            "tuned": tuned_on,
            "strengths": strengths,
            "settings": described,
            "overall": results["overall"],
        }
        record.write_text(json.dumps(kept, indent=2) + "\n")
    typer.echo((out / "evaluation.md").read_text())
    typer.echo(f"baselines {tuned_on}; montages and table in {out}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
