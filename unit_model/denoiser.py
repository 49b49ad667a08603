"""Inference: HU slices in, HU slices out, on the best device available."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import platform
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unit_model import checkpoint as ckpt
from unit_model.transforms import HUWindow

logger = logging.getLogger(__name__)

__all__ = ["Denoiser", "pick_device", "pick_dtype", "tune_cpu_allocator"]

# slices per forward pass when the caller does not say: on the CPU one slice keeps the
# activations small (2 cores, 512^2: 5.5 slices/s against 3.0 in batches of 8), a GPU wants a batch
CPU_BATCH, GPU_BATCH = 1, 8

# glibc's mallopt parameters (malloc.h) and what the CPU network runs best with
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4
_MALLOPT = (
    (_M_MMAP_THRESHOLD, 32 << 20),
    (_M_MMAP_MAX, 0),
    (_M_TRIM_THRESHOLD, 256 << 20),
    (_M_TOP_PAD, 64 << 20),
)
_MALLOC_ENV = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_MMAP_MAX_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "GLIBC_TUNABLES",
)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return dev


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@functools.cache
def tune_cpu_allocator() -> bool:
    """Keep the CPU network's freed activations in the heap for the next forward pass.

    With glibc's defaults each large activation comes from fresh pages that the kernel zeroes
    on first touch and takes back when the tensor is freed: 48 slices of 512^2 through the
    shipped model cost 8.5 M page faults, and a third of the time went to the kernel. Here
    every block comes from the heap (mmap is off: glibc's largest mmap threshold, 32 MiB, still
    left a few padded 32-channel maps of 32.8 MiB to fresh pages on each pass), and up to
    256 MiB of freed heap is kept. Process-wide; applied once, only with glibc, and not where the
    environment already sets malloc's parameters. Returns whether it applied them.
    """
    if platform.libc_ver()[0] != "glibc" or any(k in os.environ for k in _MALLOC_ENV):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    applied = all(mallopt(param, value) == 1 for param, value in _MALLOPT)
    logger.debug("glibc malloc tuned for CPU inference: %s", applied)
    return applied


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Run the block's torch operations on the calling thread alone.

    A thread that runs a multi-threaded torch operation keeps a team of OpenMP threads for the
    rest of its life. Loading a model on the node's main thread left one there, and with two
    teams in the process (main's idle one and the worker thread's) libgomp stops spinning
    between parallel regions: the worker's network ran 4.6 slices/s instead of 5.5.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class _Streams:
    """Threads that each run torch on one core: the CPU network's slices side by side.

    One network on an OpenMP team of k threads waits at every layer for the slowest of them, so
    a core taken for a moment by anything else (the intake, a sender, the writer thread) stalls
    the whole team: with 8 % of one of 2 cores busy elsewhere the team lost 7 % of its speed,
    with 20 % it lost 15 %. k single-threaded networks, each on its own slices, lose only what
    was taken.
    """

    def __init__(self, k: int) -> None:
        self.pool = ThreadPoolExecutor(k, thread_name_prefix="denoise")
        default = torch.get_num_threads()
        ready = threading.Barrier(k)

        def one_torch_thread() -> None:
            torch.get_num_threads()  # torch takes the process default at a thread's first call
            torch.set_num_threads(1)  # then this thread's own (and, for now, the default)
            ready.wait()

        for started in [self.pool.submit(one_torch_thread) for _ in range(k)]:
            started.result()
        torch.set_num_threads(default)  # the default back for every other thread


class Denoiser:
    """Low-dose -> regular-dose translation of CT slices in Hounsfield units.

    ``denoise_hu`` takes float32 [N, H, W] HU of any H, W; slices are reflect-padded to a multiple
    of 4, run in batches of ``batch_size`` (default: 1 on the CPU, 8 on a GPU) and cropped back.
    On the CPU the batches run side by side, each on one core (one stream per torch thread of
    the first caller); ``submit_hu`` queues slices without waiting for them. ``strength`` (0-1)
    blends the result with its input, ``input + strength * (model - input)``, as commercial CT
    denoisers offer.
    """

    def __init__(
        self,
        network: nn.Module,
        window: HUWindow,
        *,
        device: str = "auto",
        precision: str = "auto",
        batch_size: int | None = None,
        compile: bool = False,
        model_version: str = "untracked",
        metadata: dict[str, object] | None = None,
        strength: float = 1.0,
    ) -> None:
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be between 0 and 1, not {strength}")
        self.strength = strength
        self.device = pick_device(device)
        self.dtype = pick_dtype(precision, self.device)
        self.window = window
        cpu = self.device.type == "cpu"
        self.batch_size = batch_size or (CPU_BATCH if cpu else GPU_BATCH)
        if cpu:
            tune_cpu_allocator()
        self.model_version = model_version
        self.metadata = metadata or {}
        # channels_last suits a GPU's convolutions; on the CPU its instance norms run 5x slower
        # than on plain NCHW (15.6 against 2.9 ms for 16 x 512^2), the whole network 1.3x
        self.memory_format = torch.contiguous_format if cpu else torch.channels_last
        net = network.eval().to(self.device).to(memory_format=self.memory_format)  # type: ignore[call-overload]
        for p in net.parameters():
            p.requires_grad_(False)
        self.network: nn.Module = torch.compile(net) if compile else net  # type: ignore[assignment]
        self._streams: _Streams | None = None
        self._streams_lock = threading.Lock()

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path | None = None,
        device: str = "auto",
        precision: str = "auto",
        batch_size: int | None = None,
        compile: bool = False,
        strength: float = 1.0,
    ) -> Denoiser:
        """Load a generator checkpoint (the shipped one when ``path`` is None).

        Raises :class:`unit_model.checkpoint.CheckpointError` when there is no usable checkpoint:
        the node never passes images through unprocessed.
        """
        with _one_torch_thread():  # the thread that loads need not be the one that denoises
            loaded = ckpt.load(path or ckpt.SHIPPED)
            return cls(
                loaded.generator.translator(),
                loaded.window,
                device=device,
                precision=precision,
                batch_size=batch_size,
                compile=compile,
                model_version=loaded.model_version,
                metadata=loaded.metadata,
                strength=strength,
            )

    @property
    def version_label(self) -> str:
        """``model_version``, with the strength when it is not 1: what derived data record."""
        if self.strength == 1.0:
            return self.model_version
        return f"{self.model_version} strength {self.strength:g}"

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _cpu_streams(self) -> _Streams | None:
        """The CPU's single-threaded streams, one per torch thread of the first caller, made at
        its first call; None on a GPU or with one torch thread."""
        if self.device.type != "cpu":
            return None
        with self._streams_lock:
            if self._streams is None and torch.get_num_threads() > 1:
                self._streams = _Streams(torch.get_num_threads())
        return self._streams

    def denoise_hu(self, slices: np.ndarray) -> np.ndarray:
        """float32 [N, H, W] HU -> float32 [N, H, W] HU."""
        return self.submit_hu(slices).result()

    def submit_hu(self, slices: np.ndarray) -> Future[np.ndarray]:
        """``denoise_hu`` started on the CPU's streams; the future holds its output. Slices
        submitted later queue behind these, so a caller that submits its next chunk before it
        waits for this one keeps every stream busy. Elsewhere (a GPU, one torch thread) the
        slices are denoised before this returns."""
        arr = np.asarray(slices, dtype=np.float32)
        if arr.ndim != 3:
            raise ValueError(f"expected [N, H, W] slices, got shape {arr.shape}")
        n, h, w = arr.shape
        pad_h, pad_w = (-h) % 4, (-w) % 4
        out = np.empty_like(arr)

        @torch.inference_mode()
        def run(start: int) -> None:
            hu = torch.from_numpy(arr[start : start + self.batch_size]).to(self.device)
            hu = hu.unsqueeze(1)
            x = self.window.to_network(hu)
            xp = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect") if pad_h or pad_w else x
            with self._autocast():
                y = self.network(xp.contiguous(memory_format=self.memory_format))
            y = y.float()[..., :h, :w]
            result = self.window.apply_correction(hu, x, y)
            if self.strength != 1.0:
                result = hu + self.strength * (result - hu)
            out[start : start + len(hu)] = result.squeeze(1).cpu().numpy()

        starts = range(0, n, self.batch_size)
        result: Future[np.ndarray] = Future()
        streams = self._cpu_streams()
        if streams is None or not starts:
            for start in starts:
                run(start)
            result.set_result(out)
            return result
        left = len(starts)
        lock = threading.Lock()

        def finished(part: Future[None]) -> None:
            nonlocal left
            with lock:
                left -= 1
                if result.done():
                    return
                if (error := part.exception()) is not None:
                    result.set_exception(error)
                elif left == 0:
                    result.set_result(out)

        for start in starts:
            streams.pool.submit(run, start).add_done_callback(finished)
        return result
