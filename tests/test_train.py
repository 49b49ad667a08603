from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from tests.conftest import BIN, require_tool
from train import losses, synth
from train.data import TrainingStream, pairs, read_series, split_by_dose
from train.trainer import Trainer, TrainOptions
from unit_model import checkpoint as ckpt
from unit_model.networks import GeneratorConfig
from unit_model.transforms import HUWindow


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synth.synthesize(out, cases=2, size=64, slices=3, seed=5)
    return out


def test_losses_match_hand_computed_values() -> None:
    a = torch.tensor([[0.0, 1.0], [-1.0, 0.5]])
    b = torch.tensor([[0.5, 1.0], [0.0, 0.0]])
    assert losses.recon_loss(a, b).item() == pytest.approx((0.5 + 0 + 1 + 0.5) / 4)
    assert losses.kl_loss(a).item() == pytest.approx((0 + 1 + 1 + 0.25) / 4)
    assert losses.adv_loss(b).item() == pytest.approx((0.25 + 0 + 1 + 1) / 4)
    real, fake = torch.tensor([1.0, 0.0]), torch.tensor([0.5, -1.0])
    assert losses.disc_loss(real, fake).item() == pytest.approx((0 + 1) / 2 + (0.25 + 1) / 2)


def test_generator_total_is_the_weighted_sum() -> None:
    g = torch.Generator().manual_seed(0)
    img = [torch.rand(1, 1, 4, 4, generator=g) for _ in range(4)]
    lat = [torch.rand(1, 2, 1, 1, generator=g) for _ in range(2)]
    ld, hd = torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)
    w = losses.LossWeights()
    t = losses.generator_losses(
        ld, hd, (*img, *lat), (*img, *lat), torch.zeros(1), torch.ones(1), w
    )
    expected_self = (img[0] - ld).abs().mean() + (img[3] - hd).abs().mean()
    expected_cycle = (img[1] - ld).abs().mean() + (img[2] - hd).abs().mean()
    kl = torch.cat(lat).pow(2).mean()
    assert t["self_recon"].item() == pytest.approx(expected_self.item())
    assert t["cycle"].item() == pytest.approx(expected_cycle.item())
    assert t["adv"].item() == pytest.approx(1.0)  # (0-1)^2 + (1-1)^2
    total = 10 * expected_self + 0.01 * kl + 10 * expected_cycle + 0.01 * kl + 1.0
    assert t["total"].item() == pytest.approx(total.item(), rel=1e-6)
    half = losses.generator_losses(
        ld,
        hd,
        (*img, *lat),
        (*img, *lat),
        torch.zeros(1),
        torch.ones(1),
        losses.LossWeights(cycle_ld=0.5),
    )
    assert half["cycle"].item() == pytest.approx(
        0.5 * (img[1] - ld).abs().mean().item() + (img[2] - hd).abs().mean().item()
    )


def _trainer(tmp_path: Path, tiny_set: Path, **kw: object) -> Trainer:
    low, full = split_by_dose(read_series(tiny_set))
    kw.setdefault("generator", GeneratorConfig(filters=4))
    opts = TrainOptions(crop=32, seed=1, **kw)  # type: ignore[arg-type]
    partner = {id(a): b for a, b in pairs(low, full)}
    stream = TrainingStream(
        [x for s in low for x in s.slices],
        [x for s in full for x in s.slices],
        32,
        opts.window,
        seed=1,
        targets=[partner[id(s)].slices[k] for s in low for k in range(len(s.slices))],
    )
    return Trainer(opts, stream, tmp_path / "run", torch.device("cpu"))


def test_optimizer_uses_coupled_weight_decay(tmp_path: Path, tiny_set: Path) -> None:
    tr = _trainer(tmp_path, tiny_set)
    assert type(tr.opt_g) is torch.optim.Adam and tr.opt_g.defaults["weight_decay"] == 1e-4
    assert tr.opt_g.defaults["betas"] == (0.5, 0.999) and tr.opt_g.defaults["lr"] == 1e-4
    # With a zero loss gradient, coupled L2 makes the gradient 1e-4 * w; Adam's first step then
    # moves every weight by ~lr toward zero. Decoupled (AdamW) would move it by lr * 1e-4 * w.
    p = next(tr.gen.parameters())
    before = p.detach().clone()
    tr.opt_g.zero_grad()
    (p.sum() * 0).backward()
    tr.opt_g.step()
    moved = (before - p.detach())[before.abs() > 0.05]
    sign = torch.sign(before[before.abs() > 0.05])
    torch.testing.assert_close(moved, 1e-4 * sign, rtol=1e-2, atol=1e-8)


def test_streams_are_unpaired_and_hd_restarts() -> None:
    low = [np.full((8, 8), float(i)) for i in range(5)]
    full = [np.full((8, 8), 100.0 + i) for i in range(2)]
    s = TrainingStream(low, full, 8, HUWindow(-1024, 1024), seed=0)
    batches = list(s.epoch(1))
    assert len(batches) == 5
    hd_values = [round(float(HUWindow(-1024, 1024).to_hu(b.hd).mean())) for b in batches]
    assert sorted(set(hd_values)) == [100, 101] and len(hd_values) == 5
    assert not any(bool(b.paired.any()) for b in batches)


@pytest.mark.parametrize("mode", ["flip", "dihedral"])
def test_a_paired_slice_yields_the_same_crop_of_its_partner(mode: str) -> None:
    rng = np.random.default_rng(0)
    window = HUWindow(-1024, 1024)
    full = [rng.uniform(-200, 200, (48, 40)).astype(np.float32) for _ in range(3)]
    low = [f + 7.0 for f in full] + [np.zeros((48, 40), np.float32)]  # the last: unpaired
    targets: list[np.ndarray | None] = [*full, None]
    s = TrainingStream(low, full, 16, window, seed=3, targets=targets, mode=mode)  # type: ignore[arg-type]
    seen = 0
    for _ in range(20):
        for b in s.epoch(2):
            for ld, target, paired in zip(b.ld, b.target, b.paired, strict=True):
                if paired:
                    torch.testing.assert_close(window.to_hu(ld) - 7.0, window.to_hu(target))
                    seen += 1
                else:
                    assert float(window.to_hu(ld).abs().max()) == 0.0
    assert seen > 40
    with pytest.raises(ValueError, match="one to one"):
        TrainingStream(low, full, 16, window, targets=targets[:2])


def test_fit_then_resume_carries_the_step_count(tmp_path: Path, tiny_set: Path) -> None:
    run = tmp_path / "run"
    cmd = [
        str(BIN / "unit-train"),
        "fit",
        "--data",
        str(tiny_set),
        "--run-dir",
        str(run),
        "--crop",
        "64",
        "--filters",
        "8",
        "--max-iterations",
        "3",
        "--seed",
        "3",
    ]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert (run / "generator-last.safetensors").exists() and (run / "state.pt").exists()
    assert list(run.glob("preview-epoch*.png"))
    meta = ckpt.load(run / "generator-last.safetensors").metadata
    assert meta["training"]["iteration"] == 3 and meta["architecture"]["filters"] == 8
    second = subprocess.run(
        [*cmd[:-4], "--max-iterations", "5", "--resume"], capture_output=True, text=True, timeout=60
    )
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stderr
    with open(run / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4, 5]
    assert ckpt.load(run / "generator-last.safetensors").metadata["training"]["iteration"] == 5


def test_resume_refuses_other_architecture(tmp_path: Path, tiny_set: Path) -> None:
    tr = _trainer(tmp_path, tiny_set, max_iterations=1)
    tr.fit()
    other = _trainer(tmp_path, tiny_set)
    other.opts.generator = GeneratorConfig(filters=8)
    with pytest.raises(ValueError, match="trained with generator"):
        other.resume(tmp_path / "run" / "state.pt")


def test_synth_passes_dciodvfy_and_reads_back(tiny_set: Path) -> None:
    dciodvfy = require_tool("dciodvfy")
    files = sorted(tiny_set.rglob("*.dcm"))
    assert len(files) == 4 * 2 * 3  # 2 bodies + Shepp-Logan + CT_small, 2 doses, 3 slices
    for f in files[:: max(1, len(files) // 6)]:
        out = subprocess.run([dciodvfy, str(f)], capture_output=True, text=True)
        assert "Error" not in out.stdout + out.stderr, out.stdout + out.stderr
    low, full = split_by_dose(read_series(tiny_set))
    assert len(low) == len(full) == 4 and len(pairs(low, full)) == 4
    ds = pydicom.dcmread(files[0])
    assert ds.Modality == "CT" and ds.Rows == 64 and ds.RescaleIntercept == -1024


def test_quarter_dose_noise_is_in_documented_band() -> None:
    sd = synth.calibrate(size=512, dose=0.25, seed=7)
    assert 15.0 <= sd <= 20.0, sd
    assert synth.calibrate(size=512, dose=0.5, seed=7) < sd


def _table(path: Path) -> dict[str, list[str]]:
    """evaluation.md's rows: method -> [setting, PSNR, SSIM, RMSE, bias, noise SD, fraction]."""
    return {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in path.read_text().splitlines()
        if line.startswith("| ") and "method" not in line
    }


def test_evaluate_writes_table_and_montages_and_nlm_beats_input(tmp_path: Path) -> None:
    data = tmp_path / "eval"
    synth.synthesize(data, cases=2, size=128, slices=2, seed=9, extras=False)
    out = tmp_path / "out"
    res = subprocess.run(
        [
            str(BIN / "unit-train"),
            "evaluate",
            "--data",
            str(data),
            "--out",
            str(out),
            "--baselines",
            "nlm",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    rows = _table(out / "evaluation.md")
    assert set(rows) == {"low dose", "NLM"}
    assert len(list(out.glob("*.png"))) == 2
    assert float(rows["NLM"][1]) > float(rows["low dose"][1])
    assert rows["NLM"][0].startswith("h = 1·σ") and "untuned" in res.stdout


@pytest.mark.slow
def test_tuned_baselines_are_picked_on_held_out_data_and_bm3d_removes_noise(
    tmp_path: Path,
) -> None:
    """Strengths are picked on a held-out pair and applied unchanged to another; tuned BM3D
    lowers the uniform-region noise SD by at least 40 %."""
    held, test = tmp_path / "held", tmp_path / "test"
    synth.synthesize(held, cases=1, size=256, slices=2, seed=21, extras=False)
    synth.synthesize(test, cases=1, size=256, slices=2, seed=22, extras=False)
    out = tmp_path / "out"
    cmd = [str(BIN / "unit-train"), "evaluate", "--data", str(test), "--baselines", "gaussian,bm3d"]
    res = subprocess.run(
        [*cmd, "--out", str(out), "--tune-on", str(held)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    chosen = json.loads((out / "baselines.json").read_text())
    assert chosen["strengths"]["BM3D"] in chosen["grids"]["BM3D"]
    assert str(held) in chosen["tuned"]
    result = json.loads((out / "evaluation.json").read_text())["overall"]
    low, bm3d = result["low dose"], result["BM3D"]
    assert bm3d["noise_fraction"] <= 0.6, bm3d
    assert bm3d["noise_sd"] <= 0.6 * low["noise_sd"]
    assert bm3d["psnr"] > low["psnr"] + 3 and abs(bm3d["bias"]) < 1.0
    rows = _table(out / "evaluation.md")
    assert rows["BM3D"][0] == f"sigma_psd = {chosen['strengths']['BM3D']:g}·σ"
    # the same strengths again, from the saved settings, without tuning
    again = subprocess.run(
        [
            *cmd,
            "--out",
            str(tmp_path / "again"),
            "--settings",
            str(out / "baselines.json"),
            "--record",
            str(tmp_path / "record.json"),
            "--as",
            "again",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr
    again_rows = _table(tmp_path / "again" / "evaluation.md")
    assert again_rows["BM3D"] == rows["BM3D"] and again_rows["Gaussian"] == rows["Gaussian"]
    kept = json.loads((tmp_path / "record.json").read_text())["sets"]["again"]
    assert kept["strengths"] == chosen["strengths"] and "BM3D" in kept["overall"]


def test_dose_and_filter_choices() -> None:
    assert synth.DoseChoice.parse("0.25").draw(np.random.default_rng(0)) == 0.25
    rng = np.random.default_rng(0)
    drawn = {synth.DoseChoice.parse("0.1,0.5").draw(rng) for _ in range(20)}
    assert drawn == {0.1, 0.5}
    span = [synth.DoseChoice.parse("0.4:0.2").draw(rng) for _ in range(50)]
    assert all(0.2 <= d <= 0.4 for d in span) and len(set(span)) == 50
    for bad in ("0", "1.5", "a:b", "0.2:1"):
        with pytest.raises(ValueError, match="dose"):
            synth.DoseChoice.parse(bad)
    assert synth.parse_filters("ramp, Hann") == ("ramp", "hann")
    with pytest.raises(ValueError, match="choose from"):
        synth.parse_filters("sharp")
    # a softer filter gives less noise at the same dose; a lower dose more
    body = synth.BodyCase(rx=160, ry=120, fat_mm=20, chest=False, liver_hu=60, seed=1)
    nd = body.slice_hu(128, 3.0, 0.0)
    sd = {}
    for name, model in {
        "ramp": synth.NoiseModel(0.25),
        "hann": synth.NoiseModel(0.25, filter="hann"),
        "ramp 0.1": synth.NoiseModel(0.1),
    }.items():
        sd[name] = float(
            np.std((model.low_dose(nd, 3.0, np.random.default_rng(5)) - nd)[54:74, 54:74])
        )
    assert sd["hann"] < 0.8 * sd["ramp"] < 0.8 * sd["ramp 0.1"]


def test_synth_from_a_pacs_export(tmp_path: Path) -> None:
    """A site's own series become the regular dose with a simulated low dose beside it; what is
    not a single-frame CT image is skipped with a reason, one line each."""
    from pydicom.data import get_testdata_file

    src = tmp_path / "export"
    series = synth.simple_series(src / "a", n=4, size=128, seed=3)
    ct_small = Path(str(get_testdata_file("CT_small.dcm", download=False)))
    (src / "b").mkdir()
    (src / "b" / "ct.dcm").write_bytes(ct_small.read_bytes())
    (src / "c").mkdir()
    mr = get_testdata_file("MR_small.dcm", download=False)
    (src / "c" / "mr.dcm").write_bytes(Path(str(mr)).read_bytes())
    scout = pydicom.dcmread(series[0])
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.SeriesInstanceUID = scout.SOPInstanceUID = "1.2.3.4.5"
    scout.save_as(src / "c" / "scout.dcm")
    multi = pydicom.dcmread(series[1])
    multi.NumberOfFrames = 2
    multi.SeriesInstanceUID = "1.2.3.4.6"
    multi.save_as(src / "c" / "multi.dcm")
    (src / "c" / "notes.txt").write_text("not DICOM")
    out = tmp_path / "out"
    res = subprocess.run(
        [
            str(BIN / "unit-train"),
            "synth",
            str(out),
            "--from",
            str(src),
            "--dose",
            "0.1",
            "--filter",
            "ramp,hann",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "wrote 2 series (5 slices)" in res.stdout and "skipped 4 files" in res.stdout
    skipped = [line for line in res.stderr.splitlines() if "skipped" in line]
    assert len(skipped) == 4
    for name, why in (
        ("mr.dcm", "modality MR"),
        ("scout.dcm", "localizer"),
        ("multi.dcm", "multi-frame"),
        ("notes.txt", "not a DICOM file"),
    ):
        assert any(name in line and why in line for line in skipped), (name, skipped)
    low, full = split_by_dose(read_series(out))
    matched = pairs(low, full)
    assert len(matched) == 2
    for ld, nd in matched:
        added = ld.slices - nd.slices
        sd = float(added[:, 44:84, 44:84].std())
        assert abs(float(added.mean())) < 2.0
        # noise grows as pixels shrink: 2.97 mm phantom pixels, CT_small's 0.66 mm (a 128^2
        # crop of a 339 mm reconstruction, embedded in water to that diameter)
        if ld.slices.shape[0] == 1:
            assert 8.0 < sd < 40.0, sd
        else:
            assert 1.0 < sd < 8.0, sd
    # the regular dose is the file as sent; the low dose is a valid CT object
    copies = sorted(out.rglob("*Full dose*/*.dcm"))
    assert {c.read_bytes() for c in copies} == {
        *(p.read_bytes() for p in series),
        ct_small.read_bytes(),
    }
    dciodvfy = require_tool("dciodvfy")
    for f in sorted(out.rglob("*Low Dose*/*.dcm"))[:2]:
        check = subprocess.run([dciodvfy, str(f)], capture_output=True, text=True)
        assert "Error" not in check.stdout + check.stderr, check.stdout + check.stderr
        ds = pydicom.dcmread(f)
        assert "simulated" in ds.ImageComments.lower() and ds.ImageType[0] == "DERIVED"
    # --repeat: each simulation of the one CT_small slice is a case of its own, paired with its
    # own copy of the regular dose (which keeps the source's UIDs)
    one = tmp_path / "one"
    one.mkdir()
    (one / "ct.dcm").write_bytes(ct_small.read_bytes())
    synth.synthesize_from(one, tmp_path / "rep", dose=synth.DoseChoice(0.25, 0.25), repeat=3)
    matched = pairs(*split_by_dose(read_series(tmp_path / "rep")))
    assert len(matched) == 3
    lows = [ld.slices for ld, _ in matched]
    assert not np.array_equal(lows[0], lows[1])  # independent noise


def test_heldout_evaluation_leaves_the_generator_trainable(tiny_set: Path) -> None:
    from train.__main__ import _heldout_evaluator
    from unit_model.networks import UnitGenerator

    gen = UnitGenerator(GeneratorConfig(filters=4)).train()
    held = pairs(*split_by_dose(read_series(tiny_set)))
    metrics = _heldout_evaluator(held, crop=32)(gen, HUWindow())
    assert set(metrics) == {"psnr", "ssim"}
    assert all(p.requires_grad for p in gen.parameters())
    assert gen.training


def test_paired_term_adds_its_weighted_l1() -> None:
    z = torch.zeros(1, 1, 4, 4)
    outs = (z, z, z, z, torch.zeros(1, 2, 1, 1), torch.zeros(1, 2, 1, 1))
    args = (z, z, outs, outs, torch.ones(1), torch.ones(1))
    base = losses.generator_losses(*args, losses.LossWeights())
    pair = (torch.full((2, 1, 4, 4), 0.25), torch.zeros(2, 1, 4, 4))
    off = losses.generator_losses(*args, losses.LossWeights(), paired=pair)
    on = losses.generator_losses(*args, losses.LossWeights(paired=4.0), paired=pair)
    assert "paired" not in off and off["total"].item() == base["total"].item()
    assert on["paired"].item() == pytest.approx(0.25)
    assert on["total"].item() == pytest.approx(base["total"].item() + 1.0)
    assert losses.LossWeights().unpaired
    only = losses.LossWeights(0, 0, 0, 0, 0, 0.5, 1.0, 1.0)
    assert not only.unpaired


def test_paired_only_trains_the_translator_and_averages_its_weights(
    tmp_path: Path, tiny_set: Path
) -> None:
    weights = losses.LossWeights(0, 0, 0, 0, 0, 0.5, 1.0, paired=1.0)
    tr = _trainer(
        tmp_path,
        tiny_set,
        weights=weights,
        ema=0.9,
        generator=GeneratorConfig(filters=4, residual_output=True, image_skip=True),
        max_iterations=6,
        batch_size=2,
    )
    assert tr.opts.paired_only
    d_before = [p.detach().clone() for p in tr.d_ld.parameters()]
    enc_hd = [p.detach().clone() for p in tr.gen.enc_hd.parameters()]
    head = tr.gen.dec_hd.head.weight.detach().clone()
    tr.fit()
    assert tr.iteration == 6
    # the translator moved; the discriminators and the HD encoder were never stepped
    assert not torch.equal(head, tr.gen.dec_hd.head.weight)
    assert all(torch.equal(a, b) for a, b in zip(d_before, tr.d_ld.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(enc_hd, tr.gen.enc_hd.parameters(), strict=True))
    with open(tmp_path / "run" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and "paired" in rows[0] and "adv" not in rows[0]
    # the saved generator is the weight average, not the last weights
    assert tr.ema_gen is not None
    saved = ckpt.load(tmp_path / "run" / "generator-last.safetensors").generator
    ema_head = tr.ema_gen.dec_hd.head.weight
    torch.testing.assert_close(saved.dec_hd.head.weight, ema_head)
    assert not torch.equal(ema_head, tr.gen.dec_hd.head.weight)
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    torch.testing.assert_close(state["ema"]["dec_hd.head.weight"], ema_head)


def test_mixed_data_adds_the_paired_term_to_the_unpaired_recipe(
    tmp_path: Path, tiny_set: Path
) -> None:
    """Paired synthetic cases plus an unpaired low-dose series: both kinds reach the step, and
    the paired term is computed on the paired crops only."""
    low, full = split_by_dose(read_series(tiny_set))
    partner = {id(a): b for a, b in pairs(low[:-1], full)}
    targets = [
        partner[id(s)].slices[k] if id(s) in partner else None
        for s in low
        for k in range(len(s.slices))
    ]
    opts = TrainOptions(
        crop=32,
        batch_size=4,
        generator=GeneratorConfig(filters=4, residual_output=True),
        weights=losses.LossWeights(paired=2.0),
        max_iterations=3,
    )
    stream = TrainingStream(
        [x for s in low for x in s.slices],
        [x for s in full for x in s.slices],
        32,
        opts.window,
        targets=targets,
    )
    assert 0 < stream.paired_slices < len(targets)
    tr = Trainer(opts, stream, tmp_path / "run", torch.device("cpu"))
    assert not opts.paired_only
    kinds = set()
    for batch in stream.epoch(4):
        kinds |= {bool(x) for x in batch.paired}
        out = tr.step(batch)
        assert {"adv", "cycle", "paired", "d_ld"} <= set(out)
    assert kinds == {True, False}


def test_fit_cli_refuses_paired_weight_without_pairs(tmp_path: Path, tiny_set: Path) -> None:
    low_only = tmp_path / "low"
    for f in tiny_set.rglob("*Low Dose*/*.dcm"):
        dest = low_only / f.parent.name / f.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(f.read_bytes())
    full_only = tmp_path / "full"
    for f in tiny_set.rglob("*Full dose*/*.dcm"):
        dest = full_only / f.parent.name / f.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(f.read_bytes())
    res = subprocess.run(
        [
            str(BIN / "unit-train"),
            "fit",
            "--low-dose",
            str(low_only),
            "--full-dose",
            str(full_only),
            "--paired-weight",
            "1",
            "--run-dir",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode != 0 and "needs paired series" in res.stderr


def test_lowpass_option_compares_low_passed_images() -> None:
    from train.trainer import _lowpass

    g = torch.Generator().manual_seed(1)
    ld = torch.zeros(1, 1, 16, 16)
    noisy = ld + 0.1 * torch.randn(1, 1, 16, 16, generator=g)  # zero-mean pixel noise
    lat = torch.zeros(1, 2, 4, 4)
    outs = (noisy, ld, ld, ld, lat, lat)
    plain = losses.generator_losses(
        ld, ld, outs, outs, torch.ones(1), torch.ones(1), losses.LossWeights()
    )
    low = losses.generator_losses(
        ld, ld, outs, outs, torch.ones(1), torch.ones(1), losses.LossWeights(), lowpass=_lowpass
    )
    assert low["self_recon"].item() < 0.5 * plain["self_recon"].item()
    # "ld": only terms with a low-dose target are low-passed; HD->HD is compared pixel for pixel.
    hd_noisy = (ld, ld, ld, noisy, lat, lat)
    args = (ld, ld, hd_noisy, hd_noisy, torch.ones(1), torch.ones(1), losses.LossWeights())
    plain_hd = losses.generator_losses(*args)
    ld_only = losses.generator_losses(*args, lowpass=_lowpass, lowpass_hd=False)
    all_low = losses.generator_losses(*args, lowpass=_lowpass)
    torch.testing.assert_close(ld_only["self_recon"], plain_hd["self_recon"])
    assert all_low["self_recon"].item() < 0.5 * plain_hd["self_recon"].item()
    flat = torch.full((1, 1, 8, 8), 0.3)
    torch.testing.assert_close(_lowpass(flat), flat)
