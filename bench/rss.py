"""Memory of a running node under repeated load: is it flat?

    .venv/bin/python bench/rss.py [--senders 4] [--slices 200] [--rounds 3] [--size 128]

`pacs-node serve` (one worker, the shipped model on the CPU) receives from `senders` concurrent
DCMTK storescu processes, `slices` instances each, and denoises and forwards them to a pynetdicom
SCP in this process; that is one round. The node's resident set (VmRSS from /proc) is sampled
every 0.2 s. Prints the peak per round and the growth between rounds 2 and 3 (target < 10 %,
and every peak below 2 GiB).
"""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DCMTK_ENV, free_port, start_node, storescu_args

from train.synth import simple_series


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--senders", type=int, default=4)
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=128)
    args = ap.parse_args()
    from pynetdicom import AE, evt

    received = [0]
    ae = AE("PACS")
    ae.add_supported_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])

    def store(event: evt.Event) -> int:
        received[0] += 1
        return 0

    dest_port = free_port()
    server = ae.start_server(
        ("127.0.0.1", dest_port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)]
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        port = free_port()
        node = start_node(
            work,
            port,
            f"[queue]\nseries_quiet_seconds = 1\n[destination]\nport = {dest_port}\n"
            "[quality]\nforward_on_failure = true\n[http]\nenabled = false\n",
        )
        peaks: list[int] = []
        try:
            baseline = rss(node.pid)
            for r in range(args.rounds):
                series = [
                    simple_series(
                        work / f"r{r}s{k}",
                        n=args.slices,
                        size=args.size,
                        seed=1000 * r + k,
                        noise_sd=10,
                    )
                    for k in range(args.senders)
                ]
                peak = [rss(node.pid)]
                stop = threading.Event()

                def sample(peak: list[int] = peak, stop: threading.Event = stop) -> None:
                    while not stop.wait(0.2):
                        peak[0] = max(peak[0], rss(node.pid))

                sampler = threading.Thread(target=sample)
                sampler.start()
                senders = [
                    subprocess.Popen(
                        storescu_args(port, s),
                        env=DCMTK_ENV,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    for s in series
                ]
                for s in senders:
                    s.wait()
                target = (r + 1) * args.senders * args.slices
                while received[0] < target:
                    time.sleep(0.5)
                stop.set()
                sampler.join()
                peaks.append(peak[0])
                with sqlite3.connect(work / "var" / "jobs.sqlite") as con:
                    states = dict(
                        con.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
                    )
                print(
                    f"round {r + 1}: peak RSS {peak[0] / 2**20:.0f} MiB, delivered {received[0]}, "
                    f"jobs {states}"
                )
        finally:
            node.terminate()
            node.wait()
            server.shutdown()
    print(f"baseline RSS after start {baseline / 2**20:.0f} MiB")
    if len(peaks) >= 3:
        growth = (peaks[2] - peaks[1]) / peaks[1]
        print(f"growth round 2 -> 3: {growth * 100:+.1f} %  (target < 10 %)")
    print(f"largest peak {max(peaks) / 2**30:.2f} GiB (target < 2 GiB)")


if __name__ == "__main__":
    main()
