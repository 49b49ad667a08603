"""End to end: a 100-slice 512^2 series through the node, against the pure denoise time.

    .venv/bin/python bench/end_to_end.py [--slices 100] [--quiet 2]

The node runs as `pacs-node serve` (one worker, the shipped model, defaults otherwise) with a
pynetdicom SCP in this process as the destination (with the node's event-driven waits, so its
1 ms polling does not slow the forwarding); DCMTK storescu sends the series. Wall time runs
from the first byte sent to the last derived instance received. The pure denoise time is
Denoiser.denoise_hu over the same slices in this process, with the same batch size, before the
node starts. Ratio = pure denoise / (wall - series_quiet_seconds): receiving, writing, the
database and forwarding should hide behind compute (target >= 0.90).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DCMTK_ENV, free_port, start_node, storescu_args

from pacs_node.work.dicom_io import read_hu
from train.synth import simple_series
from unit_model.denoiser import Denoiser


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--quiet", type=float, default=2.0, help="queue.series_quiet_seconds")
    ap.add_argument("--batch", type=int, help="slices per forward pass (default: the node's)")
    args = ap.parse_args()
    from pynetdicom import AE, evt

    from pacs_node import pynetdicom_compat

    # the destination answers without pynetdicom's 1 ms polling, as a PACS would
    pynetdicom_compat.install()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = simple_series(work / "series", n=args.slices, size=512, seed=3, noise_sd=15)
        hu = np.stack([read_hu(pydicom.dcmread(f)) for f in files])
        den = Denoiser.from_checkpoint(None, device="cpu", batch_size=args.batch)
        den.denoise_hu(hu[:2])  # warm-up
        t0 = time.perf_counter()
        den.denoise_hu(hu)
        pure = time.perf_counter() - t0
        del den

        received: list[float] = []
        done = threading.Event()

        def store(event: evt.Event) -> int:
            received.append(time.perf_counter())
            if len(received) >= args.slices:
                done.set()
            return 0

        ae = AE("PACS")
        ae.add_supported_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])
        dest_port = free_port()
        server = ae.start_server(
            ("127.0.0.1", dest_port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)]
        )
        port = free_port()
        node = start_node(
            work / "node",
            port,
            f"[queue]\nseries_quiet_seconds = {args.quiet}\n[model]\n"
            + (f"batch_size = {args.batch}\n" if args.batch else "")
            + f"[destination]\nport = {dest_port}\n[quality]\nforward_on_failure = true\n"
            "[http]\nenabled = false\n",
        )
        try:
            t_send = time.perf_counter()
            subprocess.run(
                storescu_args(port, files), check=True, env=DCMTK_ENV, capture_output=True
            )
            t_sent = time.perf_counter()
            if not done.wait(3600):
                raise RuntimeError("not everything was delivered")
            wall = received[-1] - t_send
            first, forwarding = received[0] - t_send, received[-1] - received[0]
        finally:
            node.terminate()
            node.wait()
            server.shutdown()
    busy = wall - args.quiet
    print(f"{args.slices} slices 512^2, batch {args.batch or 'default'}, {os.cpu_count()} cores")
    print(
        f"pure denoise {pure:.1f} s ({args.slices / pure:.2f} slices/s); "
        f"receive {t_sent - t_send:.1f} s"
    )
    print(
        f"end to end {wall:.1f} s, minus quiet time {args.quiet:.1f} s = {busy:.1f} s "
        f"(first derived instance at {first:.1f} s, forwarding {forwarding:.1f} s)"
    )
    print(f"ratio pure denoise / (end to end - quiet) = {pure / busy:.2f}")


if __name__ == "__main__":
    main()
