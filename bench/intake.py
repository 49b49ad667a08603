"""Receive throughput into the node vs into DCMTK storescp, one sender and several at once.

    .venv/bin/python bench/intake.py [--images 200] [--runs 3] [--senders 4] [--processes 2]
                                     [--idle-worker]

One association: 200 x 512^2 CT from one DCMTK storescu, into `pacs-node serve` (one receiving
process) and into `storescp`. Several: ``--senders`` storescu processes at once, each sending
``--images / --senders`` slices, into the node with ``node.receive_processes = --processes`` and
into `storescp --fork`. Wall time runs from the first sender's start to the last one's end.
Receivers run on loopback in the same run, alternating; DCMTK's with TCP_NODELAY=1 (it stalls
~45 ms per C-STORE without it). The node runs with workers = 0 (receive only; with
``--idle-worker``, one worker that every arrival wakes but that has nothing to claim) and does
everything it does in production: validation, temp file, fsync, rename, folder fsync, the
job-table transaction (SQLite WAL). Prints images/s per receiver (median of the runs, with each
run) and the ratios node / storescp.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DCMTK_ENV, free_port, start_node, storescu_args, wait_port

from train.synth import simple_series


def send(port: int, parts: list[list[Path]], aec: str) -> float:
    """Every part from its own storescu, all at once; seconds until the last one ends."""
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            storescu_args(port, part, aec),
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for part in parts
    ]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')}")
    return time.perf_counter() - t0


def run_storescp(work: Path, parts: list[list[Path]]) -> float:
    port = free_port()
    out = work / "storescp"
    out.mkdir()
    fork = ["--fork"] if len(parts) > 1 else []
    proc = subprocess.Popen(
        ["/usr/bin/storescp", *fork, "-od", str(out), str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        return send(port, parts, "ANY-SCP")
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(out)


def run_node(work: Path, parts: list[list[Path]], processes: int, idle_worker: bool) -> float:
    port = free_port()
    # an idle worker that cannot claim (quiet 60 s, no denoising while receiving) is woken by
    # every arrival: what that costs the intake
    worker = (
        "[worker]\ncount = 1\n[queue]\nseries_quiet_seconds = 60\ndenoise_while_receiving = false\n"
        if idle_worker
        else "[worker]\ncount = 0\n"
    )
    proc = start_node(
        work / "node",
        port,
        f"{worker}[http]\nenabled = false\n",
        node=f"receive_processes = {processes}\nmax_associations = 16\n",
    )
    try:
        if processes > 1:
            time.sleep(3)  # the other receiving processes start after the first listens
        return send(port, parts, "LDCT_DENOISE")
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(work / "node")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--senders", type=int, default=4, help="0: the one-association case only")
    ap.add_argument("--processes", type=int, default=2, help="node.receive_processes for them")
    ap.add_argument(
        "--idle-worker", action="store_true", help="the node with one worker that has no job"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = simple_series(work / "series", n=args.images, size=512, seed=1, noise_sd=15)
        mb = sum(f.stat().st_size for f in files) / 1e6
        cases = {"1 association": ([files], 1)}
        if args.senders:
            n = args.senders
            split = [files[k * len(files) // n : (k + 1) * len(files) // n] for k in range(n)]
            cases[f"{n} associations"] = (split, args.processes)
        print(
            f"{args.images} images, {mb:.0f} MB, {args.runs} runs (median), {os.cpu_count()} cores"
        )
        for name, (parts, processes) in cases.items():
            node_rates, dcmtk_rates = [], []
            for _ in range(args.runs):  # interleaved, so drift hits both alike
                dcmtk_rates.append(args.images / run_storescp(work, parts))
                node_rates.append(args.images / run_node(work, parts, processes, args.idle_worker))
            node, dcmtk = statistics.median(node_rates), statistics.median(dcmtk_rates)
            ratios = sorted(a / b for a, b in zip(node_rates, dcmtk_rates, strict=True))
            anchor = "storescp --fork" if len(parts) > 1 else "storescp"
            print(f"\n{name} (node: {processes} receiving process(es)):")
            print(f"  {anchor:16s} {dcmtk:7.1f} images/s   runs {[round(r) for r in dcmtk_rates]}")
            print(
                f"  {'pacs-node':16s} {node:7.1f} images/s   runs {[round(r) for r in node_rates]}"
            )
            print(
                f"  ratio node / {anchor}: {node / dcmtk:.2f} "
                f"(per run {ratios[0]:.2f}-{ratios[-1]:.2f})"
            )


if __name__ == "__main__":
    main()
