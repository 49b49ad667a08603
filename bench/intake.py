"""Receive throughput: 200 x 512^2 CT in one association, into the node vs into DCMTK storescp.

    .venv/bin/python bench/intake.py [--images 200] [--runs 3]

Both receivers run on loopback in the same run, DCMTK's with TCP_NODELAY=1 (it stalls ~45 ms per
C-STORE without it); the sender is DCMTK storescu, also with TCP_NODELAY=1. The node runs with
workers = 0 (receive only) and does everything it does in production: validation, temp file,
fsync, rename, folder fsync, the job-table transaction (SQLite WAL).
Prints images/s per receiver (median of the runs) and the ratio node / storescp.
"""

from __future__ import annotations

import argparse
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


def send(port: int, files: list[Path], aec: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(storescu_args(port, files, aec), check=True, env=DCMTK_ENV, capture_output=True)
    return time.perf_counter() - t0


def run_storescp(work: Path, files: list[Path]) -> float:
    port = free_port()
    out = work / "storescp"
    out.mkdir()
    proc = subprocess.Popen(
        ["/usr/bin/storescp", "-od", str(out), str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        return send(port, files, "ANY-SCP")
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(out)


def run_node(work: Path, files: list[Path]) -> float:
    port = free_port()
    proc = start_node(work / "node", port, "[worker]\ncount = 0\n[http]\nenabled = false\n")
    try:
        return send(port, files, "LDCT_DENOISE")
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(work / "node")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = simple_series(work / "series", n=args.images, size=512, seed=1, noise_sd=15)
        mb = sum(f.stat().st_size for f in files) / 1e6
        node_rates, dcmtk_rates = [], []
        for _ in range(args.runs):  # interleaved, so drift hits both alike
            dcmtk_rates.append(args.images / run_storescp(work, files))
            node_rates.append(args.images / run_node(work, files))
        node, dcmtk = statistics.median(node_rates), statistics.median(dcmtk_rates)
        print(f"{args.images} images, {mb:.0f} MB, {args.runs} runs (median)")
        print(f"DCMTK storescp: {dcmtk:7.1f} images/s   runs {[round(r) for r in dcmtk_rates]}")
        print(f"pacs-node:      {node:7.1f} images/s   runs {[round(r) for r in node_rates]}")
        print(f"ratio node / storescp: {node / dcmtk:.2f}")


if __name__ == "__main__":
    main()
