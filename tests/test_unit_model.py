from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from unit_model import checkpoint as ckpt
from unit_model.denoiser import Denoiser
from unit_model.networks import GeneratorConfig, PatchDiscriminator, UnitGenerator
from unit_model.transforms import HUWindow

SMALL = GeneratorConfig(filters=8)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts_match_reference() -> None:
    gen = UnitGenerator()
    assert n_params(gen) == 20_370_946
    assert n_params(PatchDiscriminator()) == 3_914_241
    assert round(n_params(gen.translator()) / 1e6, 2) == 12.55


@pytest.mark.parametrize(("size", "gflop"), [(256, 107.0), (512, 428.5)])
def test_inference_flops_match_reference(size: int, gflop: float) -> None:
    net = UnitGenerator().translator().eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 1, size, size))
    assert counter.get_total_flops() / 1e9 == pytest.approx(gflop, abs=0.15)


def test_generator_outputs_and_latents() -> None:
    gen = UnitGenerator(SMALL)
    ld, hd = torch.rand(2, 1, 32, 32) * 2 - 1, torch.rand(2, 1, 32, 32) * 2 - 1
    outs = gen(ld, hd, return_latents=True)
    assert len(outs) == 6
    for o in outs[:4]:
        assert o.shape == (2, 1, 32, 32) and o.abs().max() <= 1
    assert outs[4].shape == (2, 32, 8, 8)
    # eval mode has no latent noise: deterministic, and ld2hd equals the translator's output
    gen.eval()
    a, b = gen(ld, hd), gen(ld, hd)
    assert torch.equal(a[2], b[2])
    torch.testing.assert_close(gen.translator()(ld), a[2])


def test_stacked_domains_do_not_mix() -> None:
    """Each image's translation is independent of what else is in the batch."""
    gen = UnitGenerator(SMALL).eval()
    ld, hd = torch.randn(1, 1, 32, 32).tanh(), torch.randn(1, 1, 32, 32).tanh()
    alone = gen(ld, hd)[2]
    other = gen(ld, torch.zeros_like(hd) + 0.9)[2]
    torch.testing.assert_close(alone, other)


def test_discriminator_shape_and_init() -> None:
    d = PatchDiscriminator()
    assert d(torch.zeros(1, 1, 256, 256)).shape == (1, 1, 16, 16)
    w = d.layers[0].weight
    assert abs(w.std().item() - 0.01) < 0.003


@pytest.mark.parametrize("image_skip", [False, True])
def test_residual_output_starts_as_identity(image_skip: bool) -> None:
    cfg = GeneratorConfig(filters=8, residual_output=True, image_skip=image_skip)
    gen = UnitGenerator(cfg).eval()
    x = torch.rand(1, 1, 32, 32) * 2 - 1
    assert torch.equal(gen.translator()(x), x)


def test_image_skip_gives_the_head_a_full_resolution_view() -> None:
    # With the upsampled latent's share of the head silenced, the correction at a pixel must
    # still respond to the input, and only within the 9 x 9 reach of the skip conv3 + head conv7.
    torch.manual_seed(0)
    f = 8
    gen = UnitGenerator(GeneratorConfig(filters=f, residual_output=True, image_skip=True)).eval()
    with torch.no_grad():
        gen.dec_hd.head.weight.normal_(0, 0.05)
        gen.dec_hd.head.weight[:, :f] = 0
    x = (0.1 * torch.randn(1, 1, 32, 32)).requires_grad_()
    (gen.translator()(x) - x)[0, 0, 16, 16].backward()
    g = x.grad[0, 0].abs()
    assert g[16, 16] > 0
    outside = g.clone()
    outside[12:21, 12:21] = 0
    assert outside.max() == 0
    with pytest.raises(ValueError, match="needs residual_output"):
        GeneratorConfig(image_skip=True)


def test_other_upsampling_keeps_shapes() -> None:
    gen = UnitGenerator(GeneratorConfig(filters=8, upsample="resize_conv")).eval()
    assert gen.translator()(torch.zeros(1, 1, 32, 32)).shape == (1, 1, 32, 32)


@pytest.mark.parametrize("shape", [(256, 256), (512, 512), (500, 373)])
def test_any_slice_size_comes_back_in_its_own_shape(shape: tuple[int, int]) -> None:
    den = Denoiser(UnitGenerator(SMALL).translator(), HUWindow(), device="cpu")
    out = den.denoise_hu(np.zeros((1, *shape), np.float32))
    assert out.shape == (1, *shape) and out.dtype == np.float32


def test_hu_round_trip_is_exact_with_identity_network() -> None:
    window = HUWindow()
    den = Denoiser(nn.Identity(), window, device="cpu", batch_size=3)
    rng = np.random.default_rng(0)
    hu = rng.integers(-1024, 3072, size=(7, 37, 41)).astype(np.float32)
    hu[0, 0, :4] = [-1024, 3071, 0, -1]
    hu[1, 0, :3] = rng.uniform(-1024, 3071, 3)  # non-integers too
    assert np.array_equal(den.denoise_hu(hu), hu)
    # outside the window: passed through, never clipped
    hu[2, 0, :2] = [-3000, 8000]
    assert np.array_equal(den.denoise_hu(hu), hu)


def test_window_inverse_and_clip() -> None:
    w = HUWindow(-1024, 1024)
    x = torch.tensor([-2000.0, -1024, 0, 512, 1024, 5000])
    assert w.to_network(x).tolist() == [-1, -1, 0, 0.5, 1, 1]
    assert w.to_hu(w.to_network(x))[1:5].tolist() == [-1024, 0, 512, 1024]
    with pytest.raises(ValueError):
        HUWindow(10, 10)


def test_checkpoint_round_trip_is_bit_identical(tmp_path: Path) -> None:
    gen = UnitGenerator(SMALL)
    path = tmp_path / "g.safetensors"
    version = ckpt.save(path, gen, HUWindow(-1024, 1024), data={"cases": 3})
    assert len(version) == 12
    loaded = ckpt.load(path)
    assert loaded.model_version == version and loaded.metadata["data"] == {"cases": 3}
    assert loaded.window == HUWindow(-1024, 1024)
    hu = np.random.default_rng(1).normal(0, 300, (2, 36, 36)).astype(np.float32)
    a = Denoiser(gen.translator(), HUWindow(-1024, 1024), device="cpu").denoise_hu(hu)
    b = Denoiser.from_checkpoint(path, device="cpu").denoise_hu(hu)
    assert np.array_equal(a, b)
    # saving the same weights again gives the same version
    assert ckpt.save(tmp_path / "h.safetensors", gen, HUWindow(-1024, 1024)) == version


def test_fp16_checkpoint_is_smaller_and_close(tmp_path: Path) -> None:
    gen = UnitGenerator(SMALL)
    ckpt.save(tmp_path / "a.safetensors", gen, HUWindow())
    ckpt.save(tmp_path / "b.safetensors", gen, HUWindow(), dtype=torch.float16)
    assert (tmp_path / "b.safetensors").stat().st_size < (tmp_path / "a.safetensors").stat().st_size
    assert ckpt.load(tmp_path / "b.safetensors").metadata["dtype"] == "float16"


def test_truncated_checkpoint_fails_clearly(tmp_path: Path) -> None:
    path = tmp_path / "g.safetensors"
    ckpt.save(path, UnitGenerator(SMALL), HUWindow())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt"):
        Denoiser.from_checkpoint(path)


def test_altered_weights_fail_model_version_check(tmp_path: Path) -> None:
    path = tmp_path / "g.safetensors"
    ckpt.save(path, UnitGenerator(SMALL), HUWindow())
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="do not match their model_version"):
        ckpt.load(path)


def test_architecture_mismatch_names_the_tensor(tmp_path: Path) -> None:
    import json

    from safetensors.torch import load_file, save_file

    path = tmp_path / "g.safetensors"
    ckpt.save(path, UnitGenerator(SMALL), HUWindow())
    meta = ckpt._read(path)[1]
    meta["architecture"]["filters"] = 16  # claims another width than its tensors have
    save_file(load_file(str(path)), str(path), metadata={"unit_model": json.dumps(meta)})
    with pytest.raises(ckpt.CheckpointError, match=r"tensor '[\w.]+' has shape \(\d+, 8,"):
        ckpt.load(path)
    meta["architecture"]["depth"] = 5
    save_file(load_file(str(path)), str(path), metadata={"unit_model": json.dumps(meta)})
    with pytest.raises(ckpt.CheckpointError, match="unknown generator settings"):
        ckpt.load(path)


def test_missing_checkpoint_refuses_to_denoise(tmp_path: Path) -> None:
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint"):
        Denoiser.from_checkpoint(tmp_path / "absent.safetensors")


@pytest.mark.gpu
def test_cuda_bf16_close_to_fp32() -> None:
    gen = UnitGenerator(SMALL)
    hu = np.random.default_rng(2).normal(0, 100, (4, 64, 64)).astype(np.float32)
    a = Denoiser(gen.translator(), HUWindow(), device="cpu").denoise_hu(hu)
    b = Denoiser(gen.translator(), HUWindow(), device="cuda", precision="bf16").denoise_hu(hu)
    assert np.abs(a - b).mean() < 20


def test_cpu_bf16_stays_within_a_fifth_of_a_hu_of_fp32_with_the_shipped_model() -> None:
    """What README says of ``model.precision = "bf16"`` on the CPU: the shipped model's output
    in bf16 differs from fp32 by hundredths of a HU (RMS), a fifth at most, and values outside
    the network's window still pass through unchanged."""
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:256, :256]
    body = (yy - 128) ** 2 / 110**2 + (xx - 128) ** 2 / 90**2 < 1
    hu = np.where(body, 40.0, -1000.0)[None].repeat(2, 0).astype(np.float32)
    hu[:, 100:120, 100:130] = 700.0  # bone
    hu[:, 60:64, 60:64] = 3000.0  # metal, outside the window
    hu += rng.normal(0, 20, hu.shape).astype(np.float32)
    fp32 = Denoiser.from_checkpoint(device="cpu", precision="fp32").denoise_hu(hu)
    bf16 = Denoiser.from_checkpoint(device="cpu", precision="bf16").denoise_hu(hu)
    diff = bf16 - fp32
    assert float(np.sqrt(np.mean(diff**2))) < 0.1
    assert float(np.abs(diff).max()) < 0.5
    metal = hu > 1024
    assert np.array_equal(bf16[metal], hu[metal])


class _Shift(nn.Module):
    """A 'network' that lowers everything by 0.01 network units (10.24 HU in ±1024)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - 0.01


def test_strength_blends_the_correction_with_the_input() -> None:
    hu = np.full((1, 8, 8), 40.0, np.float32)
    window = HUWindow(-1024, 1024)
    full = Denoiser(_Shift(), window, device="cpu").denoise_hu(hu)
    half = Denoiser(_Shift(), window, device="cpu", strength=0.5).denoise_hu(hu)
    none = Denoiser(_Shift(), window, device="cpu", strength=0.0).denoise_hu(hu)
    np.testing.assert_allclose(full, 40.0 - 10.24, atol=1e-3)
    np.testing.assert_allclose(half, 40.0 - 5.12, atol=1e-3)
    assert np.array_equal(none, hu)
    den = Denoiser(_Shift(), window, device="cpu", strength=0.7, model_version="abc")
    assert den.version_label == "abc strength 0.7"
    assert Denoiser(_Shift(), window, device="cpu", model_version="abc").version_label == "abc"
    with pytest.raises(ValueError, match="strength"):
        Denoiser(_Shift(), window, device="cpu", strength=1.5)


def test_the_package_face_exports_the_denoiser() -> None:
    import unit_model

    assert unit_model.Denoiser is Denoiser
    assert {"Denoiser", "HUWindow", "GeneratorConfig", "UnitGenerator"} <= set(unit_model.__all__)


def test_batch_size_defaults_to_one_slice_on_the_cpu() -> None:
    assert Denoiser(nn.Identity(), HUWindow(), device="cpu").batch_size == 1
    assert Denoiser(nn.Identity(), HUWindow(), device="cpu", batch_size=8).batch_size == 8


_FAULTS = """
import resource, numpy as np
from unit_model.denoiser import Denoiser
den = Denoiser.from_checkpoint(None, device="cpu")
hu = np.zeros((4, 512, 512), np.float32)
for _ in range(4):
    den.denoise_hu(hu)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
    den.denoise_hu(hu)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _python(code: str, env: dict[str, str] | None = None) -> str:
    """``code`` run by a fresh interpreter in the repository (process-wide state starts clean);
    its standard output."""
    import os
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **(env or {})}, capture_output=True,
        text=True, check=True, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    return out.stdout


def _page_faults(env: dict[str, str]) -> int:
    return int(_python(_FAULTS, env).split()[-1])


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="glibc on Linux")
def test_cpu_inference_reuses_its_memory_unless_the_environment_tunes_malloc() -> None:
    # the shipped model on 8 slices of 512^2 after 16 others: with glibc's defaults each large
    # activation is fresh pages from the kernel (~60k faults a slice); tuned, the heap keeps
    # them (this VM: 0.2-3.8k faults in all once the streams' heaps have settled, 0-17k after
    # 8 slices only, against 470-490k)
    tuned = _page_faults({})
    untouched = _page_faults({"GLIBC_TUNABLES": ""})  # the user's say: left as it is
    assert tuned * 10 < untouched, (tuned, untouched)


_TEAMS = """
import os, threading
import numpy as np
from unit_model.denoiser import Denoiser
before = len(os.listdir("/proc/self/task"))
den = Denoiser.from_checkpoint(None, device="cpu")
loaded = len(os.listdir("/proc/self/task"))
worker = threading.Thread(target=den.denoise_hu, args=(np.zeros((1, 256, 256), np.float32),))
worker.start()
worker.join()
print(before, loaded)
"""


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="Linux /proc")
def test_loading_the_model_leaves_no_openmp_team_on_the_loading_thread() -> None:
    # the node loads on its main thread and denoises on a worker thread; a second, idle team of
    # OpenMP threads made libgomp stop spinning between parallel regions (the network ~15 % slower)
    out = _python(_TEAMS)
    before, loaded = map(int, out.split())
    assert loaded == before, out


_STREAMS = """
import threading, torch, numpy as np
from unit_model.denoiser import Denoiser
den = Denoiser.from_checkpoint(None, device="cpu")
hu = np.random.default_rng(0).normal(40, 25, (6, 64, 64)).astype(np.float32)
seen = {}
def network_threads(module, args):
    seen[threading.current_thread().name] = torch.get_num_threads()
den.network.register_forward_pre_hook(network_threads)
out = {}
worker = threading.Thread(target=lambda: out.update(streams=den.denoise_hu(hu)))
worker.start()
worker.join()
late = []
fresh = threading.Thread(target=lambda: late.append(torch.get_num_threads()))
fresh.start()
fresh.join()
torch.set_num_threads(1)
one = Denoiser.from_checkpoint(None, device="cpu").denoise_hu(hu)
print(sorted(set(seen.values())), len(seen), late[0], float(np.abs(out["streams"] - one).max()))
"""


def test_the_cpu_network_runs_as_one_single_threaded_stream_per_torch_thread() -> None:
    # one network on an OpenMP team waits at every layer for its slowest thread, so a core taken
    # for a moment by the intake or a sender stalls the team; independent streams do not
    threads, streams, fresh, diff = _python(_STREAMS, {"OMP_NUM_THREADS": "2"}).split()
    assert (threads, streams) == ("[1]", "2")  # two streams, each with one torch thread
    assert fresh == "2"  # and the process default is left as it was for every other thread
    assert float(diff) == 0.0  # the same output as one thread alone, to the bit


def test_an_error_in_a_cpu_stream_reaches_the_caller_and_the_streams_go_on() -> None:
    class Fails(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if bool((x > -0.1).any()):
                raise RuntimeError("bad slice")
            return x

    den = Denoiser(Fails(), HUWindow(), device="cpu")
    hu = np.zeros((4, 32, 32), np.float32)
    bad = hu.copy()
    bad[2] = 1000.0  # above -0.1 in the network's window, where 0 HU is -0.5
    with pytest.raises(RuntimeError, match="bad slice"):
        den.denoise_hu(bad)
    assert np.array_equal(den.denoise_hu(hu), hu)
