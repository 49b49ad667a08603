"""Time to result: a series sent at scanner pace, denoised while it arrives, against pure compute.

    .venv/bin/python bench/latency.py [--slices 200] [--rate 8] [--runs 3] [--precision auto]

A pynetdicom sender in this process sends ``--slices`` 512^2 slices at ``--rate`` slices per
second (one association, released at the end; files sent as stored, so that the sender, which
shares this machine's two cores where a scanner would not, costs as little as it can) to
`pacs-node serve` (one worker, the shipped model on the CPU with its defaults), which forwards to
a pynetdicom SCP in this process. Each run alternates two node set-ups on the same slices:

* ``release``: ``complete_on = ["quiet", "release"]`` and denoising while receiving (the design);
* ``quiet``: ``complete_on = ["quiet"]``, ``denoise_while_receiving = false`` (what the node did
  before: wait for ``series_quiet_seconds`` of silence, then denoise it all).

Pure compute is Denoiser.denoise_hu over the same slices in this process (the same defaults: one
slice per forward pass, malloc tuned), measured in each run before and after the node's set-ups
(their mean). Reported per run and as the median with the range:

* ratio = pure compute / (first slice sent -> last derived instance received); target >= 0.95;
* tail = last slice acknowledged -> last derived received, against the compute still left at
  that moment (pure compute x the share of slices not yet denoised then, read from the job
  table); target: tail <= left + 2 s.

Where the cores went, per run (first slice sent -> last derived received; Linux /proc): the
node's CPU time beyond pure compute's (everything but the network: receiving, reading, the
gate's figures, writing, forwarding, the kernel's share of them, and any slowdown of the network
itself), and this process's (the sender and the recording SCP). ``free`` is the ratio the run
would have had if the node's CPU beyond the network had cost nothing (wall less that time
spread over the cores): an upper bound for any saving in the node's own work.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import get_args

import numpy as np
import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import free_port, start_node

from pacs_node.config.sections import Precision
from pacs_node.work.dicom_io import read_hu
from train.synth import simple_series
from unit_model.denoiser import Denoiser

SETUPS = {
    "release": 'complete_on = ["quiet", "release"]\ndenoise_while_receiving = true\n',
    "quiet": 'complete_on = ["quiet"]\ndenoise_while_receiving = false\n',
}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (its threads, ended ones included)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _denoised(db: Path) -> int:
    with sqlite3.connect(db) as con:
        row = con.execute(
            "SELECT count(*) FROM instances WHERE state IN ('denoised', 'delivered')"
        ).fetchone()
    return int(row[0])


def one_run(
    work: Path,
    files: list[Path],
    setup: str,
    rate: float,
    quiet: float,
    log: Path | None = None,
    precision: str = "auto",
) -> dict[str, float]:
    from pynetdicom import AE, evt

    n = len(files)
    received: list[float] = []
    done = threading.Event()

    def store(event: evt.Event) -> int:
        received.append(time.perf_counter())
        if len(received) >= n:
            done.set()
        return 0

    dest = AE("PACS")
    dest.add_supported_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])
    dest_port = free_port()
    server = dest.start_server(
        ("127.0.0.1", dest_port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)]
    )
    port = free_port()
    node_dir = work / f"node-{setup}-{time.monotonic_ns()}"
    node = start_node(
        node_dir,
        port,
        f"[queue]\nseries_quiet_seconds = {quiet}\n{SETUPS[setup]}"
        f"[destination]\nport = {dest_port}\n[quality]\nforward_on_failure = true\n"
        f'[http]\nenabled = false\n[model]\nprecision = "{precision}"\n',
        log=log,
    )
    try:
        sender = AE("STORESCU")
        sender.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
        assoc = sender.associate("127.0.0.1", port, ae_title="LDCT_DENOISE")
        if not assoc.is_established:
            raise RuntimeError("the node refused the association")
        t0 = time.perf_counter()
        node_cpu0, own_cpu0 = _cpu_seconds(node.pid), time.process_time()
        for k, path in enumerate(files):
            delay = t0 + k / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            status = assoc.send_c_store(path)  # sent as stored: a scanner's CPU is not ours
            if status.Status != 0:
                raise RuntimeError(f"C-STORE status 0x{status.Status:04X}")
        t_ack = time.perf_counter()
        denoised_at_ack = _denoised(node_dir / "var" / "jobs.sqlite")
        assoc.release()
        if not done.wait(3600):
            raise RuntimeError("not everything was delivered")
        node_cpu, own_cpu = _cpu_seconds(node.pid) - node_cpu0, time.process_time() - own_cpu0
    finally:
        node.terminate()
        node.wait()
        server.shutdown()
    return {
        "wall": received[-1] - t0,
        "tail": received[-1] - t_ack,
        "send": t_ack - t0,
        "denoised_at_ack": denoised_at_ack,
        "node_cpu": node_cpu,
        "own_cpu": own_cpu,
    }


def _against(r: dict[str, float], pure: float, pure_cpu: float, n: int) -> dict[str, float]:
    """The run's figures against pure compute: the ratio, the compute still left at the last
    acknowledgement (pure compute x the share of slices not denoised then), the node's CPU time
    beyond pure compute's and the ratio had that been free."""
    left = pure * (n - r["denoised_at_ack"]) / n
    beyond = r["node_cpu"] - pure_cpu
    free = pure / (r["wall"] - max(beyond, 0.0) / (os.cpu_count() or 1))
    return {
        "ratio": pure / r["wall"],
        "left": left,
        "over": r["tail"] - left,
        "beyond": beyond,
        "free": free,
    }


def _pure(hu: np.ndarray, precision: str) -> tuple[float, float]:
    """Seconds and CPU seconds of Denoiser.denoise_hu over ``hu``."""
    den = Denoiser.from_checkpoint(None, device="cpu", precision=precision)
    den.denoise_hu(hu[:2])  # warm-up
    t, cpu = time.perf_counter(), time.process_time()
    den.denoise_hu(hu)
    return time.perf_counter() - t, time.process_time() - cpu


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--rate", type=float, default=8.0, help="slices per second sent")
    ap.add_argument("--quiet", type=float, default=10.0, help="queue.series_quiet_seconds")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--setups", default="release,quiet", help="comma list of release,quiet")
    ap.add_argument("--node-log", type=Path, help="append the node's log here")
    ap.add_argument(
        "--precision", default="auto", choices=get_args(Precision), help="model.precision, both"
    )
    args = ap.parse_args()
    setups = args.setups.split(",")
    from pynetdicom import _config

    from pacs_node import pynetdicom_compat

    pynetdicom_compat.install()  # the destination answers without pynetdicom's 1 ms polling
    _config.STORE_SEND_CHUNKED_DATASET = True  # the sender sends files without decoding them
    rows: dict[str, list[dict[str, float]]] = {s: [] for s in setups}
    pures: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = simple_series(work / "series", n=args.slices, size=512, seed=3, noise_sd=15)
        hu = np.stack([read_hu(pydicom.dcmread(f)) for f in files])
        for run in range(args.runs):
            # pure compute before and after the node's runs: a shared machine drifts by several
            # per cent within minutes, and one side alone would hand that drift to the ratio
            before, before_cpu = _pure(hu, args.precision)
            results = []
            for setup in setups if run % 2 == 0 else setups[::-1]:
                r = one_run(
                    work, files, setup, args.rate, args.quiet, args.node_log, args.precision
                )
                results.append((setup, r))
            after, after_cpu = _pure(hu, args.precision)
            pure, pure_cpu = (before + after) / 2, (before_cpu + after_cpu) / 2
            pures.append(pure)
            for setup, r in results:
                r.update(_against(r, pure, pure_cpu, args.slices))
                rows[setup].append(r)
                print(
                    f"run {run + 1} {setup:8s} pure {pure:6.1f} s ({before:.1f} before, "
                    f"{after:.1f} after)  sent {r['send']:5.1f} s  wall {r['wall']:6.1f} s  "
                    f"ratio {r['ratio']:.3f}  tail {r['tail']:5.1f} s "
                    f"(compute left {r['left']:5.1f} s, over {r['over']:+5.1f} s)\n"
                    f"      CPU: pure compute {pure_cpu:.1f} s, node {r['node_cpu']:.1f} s "
                    f"(beyond pure {r['beyond']:+.1f} s), sender + recorder {r['own_cpu']:.1f} s; "
                    f"ratio were the node's beyond free {r['free']:.3f}",
                    flush=True,
                )
    print(
        f"\n{args.slices} slices 512^2 at {args.rate:g}/s, quiet {args.quiet:g} s, "
        f"{os.cpu_count()} cores; pure compute {_summary(pures)} s"
    )
    for setup, rs in rows.items():
        print(
            f"{setup:8s} ratio {_summary([r['ratio'] for r in rs])}; "
            f"tail - compute left {_summary([r['over'] for r in rs])} s; "
            f"wall {_summary([r['wall'] for r in rs])} s; node CPU beyond pure compute "
            f"{_summary([r['beyond'] for r in rs])} s, sender + recorder "
            f"{_summary([r['own_cpu'] for r in rs])} s; ratio were that free "
            f"{_summary([r['free'] for r in rs])}"
        )


if __name__ == "__main__":
    main()
