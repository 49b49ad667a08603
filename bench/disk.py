"""What the data folder's disk sustains for 512 KB files, with and without the intake's fsyncs.

    .venv/bin/python bench/disk.py [--dir DIR] [--rounds 6] [--files 100]

Rounds alternate: the intake's durable write (temp file, fsync, rename, folder fsync) and a plain
write + rename. Prints ms per file per round, so the point where the page cache stops absorbing
the writes shows.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

SIZE = 525_000  # one 512 x 512 int16 CT instance with its header


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("."))
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--files", type=int, default=100)
    args = ap.parse_args()
    from pacs_node.storage import Storage

    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="disk-bench-"))
    try:
        storage = Storage(root)
        data = os.urandom(SIZE)
        plain = root / "plain"
        plain.mkdir()
        results: dict[str, list[float]] = {"durable": [], "plain": []}
        n = 0
        for _ in range(args.rounds):
            for kind in results:
                t0 = time.perf_counter()
                for _ in range(args.files):
                    n += 1
                    if kind == "durable":
                        storage.write_atomic(storage.received_path("1.2.3", f"1.2.3.{n}"), data)
                    else:
                        tmp = plain / f"{n}.part"
                        tmp.write_bytes(data)
                        tmp.replace(plain / f"{n}.dcm")
                results[kind].append((time.perf_counter() - t0) / args.files * 1e3)
        for kind, ms in results.items():
            rounds = " / ".join(f"{m:.2f}" for m in ms)
            print(f"{kind:8s} median {statistics.median(ms):.2f} ms per file; rounds {rounds}")
        print(f"{n} files, {n * SIZE / 1e6:.0f} MB written")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
