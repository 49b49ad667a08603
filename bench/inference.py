"""CPU (or GPU) inference speed at 512 x 512: the shipped model as the node runs it, and the
reference's full-width generator.

    .venv/bin/python bench/inference.py [--checkpoint PATH] [--slices 8] [--shipped-batch N]
                                        [--precision auto] [--one-team] [--busy MS]
                                        [--batch 4] [--device cpu] [--compile] [--reference]

First the shipped checkpoint (or ``--checkpoint``) through ``Denoiser.denoise_hu`` with the node's
defaults (``--precision`` is ``model.precision``: auto = fp32 on the CPU; on the CPU one slice
per forward pass and glibc's malloc tuned, see ``unit_model.denoiser.tune_cpu_allocator``;
``GLIBC_TUNABLES= `` in the environment leaves malloc as it is; on the CPU one single-threaded
stream of slices per torch thread, or with ``--one-team`` the network on one OpenMP team of all
the threads, as before): slices/s, the median of ``--reps`` passes of ``--slices`` slices, with
the spread. ``--busy MS`` runs a second process beside it that keeps one core busy for MS ms of
every 125 ms, as a sender and the intake do while a series arrives at 8 slices/s.
With ``--reference``, also the full-width generator (428.5 GFLOP per slice, counted by torch's
FlopCounterMode): achieved FLOP/s as a fraction of torch's own matmul FLOP/s measured in the same
process with the same threads, for fp32 contiguous, fp32 channels_last and bf16 autocast (when
the CPU has native bf16), optionally torch.compile.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import get_args

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pacs_node.config.sections import Precision
from unit_model.denoiser import Denoiser, tune_cpu_allocator
from unit_model.networks import UnitGenerator


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 15) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def time_network(net: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype, reps: int) -> float:
    ctx = torch.autocast(x.device.type, dtype=dtype) if dtype != torch.float32 else torch.no_grad()
    times = []
    with torch.inference_mode(), ctx:
        net(x)  # warm-up (and compilation)
        for _ in range(reps):
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            net(x)
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


BUSY = """
import sys, time
burn, t0, k = float(sys.argv[1]) / 1000, time.perf_counter(), 0
while True:
    k += 1
    end = time.perf_counter() + burn
    while time.perf_counter() < end:
        pass
    time.sleep(max(0.0, t0 + k / 8 - time.perf_counter()))
"""


@contextlib.contextmanager
def busy(ms: float) -> Iterator[None]:
    """A second process that keeps one core busy for ``ms`` of every 125 ms."""
    if not ms:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", BUSY, str(ms)])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def shipped(args: argparse.Namespace) -> None:
    """Slices/s of ``Denoiser.denoise_hu`` on 512^2 slices of noise around soft tissue."""
    den = Denoiser.from_checkpoint(
        args.checkpoint,
        device=args.device,
        precision=args.precision,
        batch_size=args.shipped_batch,
    )
    if args.one_team:
        den._cpu_streams = lambda: None  # type: ignore[method-assign]
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        den.network(torch.zeros(1, 1, 512, 512, device=den.device))
    rng = np.random.default_rng(0)
    slices = (40 + 20 * rng.standard_normal((args.slices, 512, 512))).astype(np.float32)
    den.denoise_hu(slices[:2])  # warm-up
    rates = []
    with busy(args.busy):
        for _ in range(args.reps):
            t0 = time.perf_counter()
            den.denoise_hu(slices)
            rates.append(args.slices / (time.perf_counter() - t0))
    layout = "one OpenMP team" if args.one_team or den.device.type != "cpu" else "streams"
    print(
        f"shipped model {den.model_version} on {den.device} ({torch.get_num_threads()} threads "
        f"as {layout}{f', a core {args.busy:g} ms in 125 busy' if args.busy else ''}, "
        f"{str(den.dtype).removeprefix('torch.')}, batch {den.batch_size}, malloc "
        f"{'tuned' if den.device.type == 'cpu' and tune_cpu_allocator() else 'as it is'}, "
        f"{fc.get_total_flops() / 1e9:.1f} GFLOP per slice): "
        f"median {statistics.median(rates):.2f} slices/s "
        f"(passes {' / '.join(f'{r:.2f}' for r in rates)})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: the shipped one")
    ap.add_argument("--slices", type=int, default=8, help="slices per timed pass")
    ap.add_argument("--shipped-batch", type=int, help="default: the Denoiser's (CPU 1, GPU 8)")
    ap.add_argument("--precision", default="auto", choices=get_args(Precision))  # model.precision
    ap.add_argument("--one-team", action="store_true", help="the CPU network as one OpenMP team")
    ap.add_argument("--busy", type=float, default=0, help="ms of every 125 ms a core is busy")
    ap.add_argument("--batch", type=int, default=4, help="batch of the reference generator")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--reference", action="store_true", help="also the full-width generator")
    args = ap.parse_args()
    shipped(args)
    if not args.reference:
        return
    dev = torch.device(args.device)
    net = UnitGenerator().translator().eval().to(dev)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(torch.zeros(1, 1, 512, 512, device=dev))
    flop = fc.get_total_flops()
    print(
        f"device {dev}, threads {torch.get_num_threads()}, {flop / 1e9:.1f} GFLOP per 512^2 slice"
    )
    variants = [("fp32", torch.float32, False)]
    variants.append(("fp32 channels_last", torch.float32, True))
    cpu_flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if dev.type == "cuda" or "avx512_bf16" in cpu_flags or "amx_bf16" in cpu_flags:
        variants.append(("bf16 channels_last", torch.bfloat16, True))
    peak = {dtype: matmul_flops(dev, dtype) for dtype in {v[1] for v in variants}}
    for name, dtype, cl in variants:
        model = (
            net.to(memory_format=torch.channels_last)
            if cl
            else net.to(memory_format=torch.contiguous_format)
        )
        if args.compile:
            model = torch.compile(model)
        x = torch.zeros(args.batch, 1, 512, 512, device=dev)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        per_batch = time_network(model, x, dtype, max(1, args.reps * args.slices // args.batch))
        rate = args.batch / per_batch
        mm = max(peak[dtype], matmul_flops(dev, dtype))  # the better of before and after
        achieved = rate * flop
        print(
            f"{name:20s} {rate:8.2f} slices/s  {achieved / 1e9:8.1f} GFLOP/s  "
            f"matmul {mm / 1e9:8.1f} GFLOP/s  ratio {achieved / mm:.2f}"
        )


if __name__ == "__main__":
    main()
