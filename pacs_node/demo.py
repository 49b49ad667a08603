"""``pacs-node demo``: the whole path on one machine, in a few minutes, with a report.

1. ``unit-train synth`` makes a synthetic case: a regular-dose and a quarter-dose CT series (run as
   a command: pacs_node never imports train).
2. A destination starts on loopback: Orthanc when installed, else a pynetdicom SCP that stores
   what it receives.
3. A node starts (in this process) with its own data folder, a free port and the shipped model.
4. The low-dose series is sent with DCMTK storescu when installed, else with pynetdicom.
5. When the destination holds the derived series, a report is written: a PNG montage of the middle
   slice (low dose | denoised | regular dose | difference, C40/W400) with a zoomed soft-tissue
   crop of each below it, and the figures: noise in uniform soft tissue before and after (and its
   reduction in per cent), the HU bias, and the regular dose's noise for comparison.
"""

from __future__ import annotations

import html
import json
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from pacs_node.config import (
    Config,
    DestinationConfig,
    HttpConfig,
    NodeConfig,
    QualityConfig,
    QueueConfig,
    StorageConfig,
)
from pacs_node.work.dicom_io import read_hu
from pacs_node.work.quality import find_uniform_regions, measure

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout:.0f} s")


class _Destination:
    """Orthanc when installed, else a pynetdicom SCP writing files into ``folder``."""

    def __init__(self, work: Path, prefer_orthanc: bool = True) -> None:
        self.port = free_port()
        self.folder = work / "destination"
        self.folder.mkdir()
        self.orthanc = (
            shutil.which("Orthanc", path="/usr/sbin:/usr/bin") if prefer_orthanc else None
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.server: Any = None
        self.kind = "Orthanc" if self.orthanc else "pynetdicom storage SCP"

    def start(self) -> None:
        if self.orthanc:
            http = free_port()
            cfg = {
                "Name": "demo",
                "StorageDirectory": str(self.folder / "db"),
                "IndexDirectory": str(self.folder / "db"),
                "DicomAet": "PACS",
                "DicomPort": self.port,
                "HttpPort": http,
                "RemoteAccessAllowed": False,
                "AuthenticationEnabled": False,
                "DicomAlwaysAllowStore": True,
                "Plugins": [],
            }
            (self.folder / "orthanc.json").write_text(json.dumps(cfg))
            env = {"TCP_NODELAY": "1", "PATH": "/usr/sbin:/usr/bin:/bin"}
            self.http = http
            self.proc = subprocess.Popen(
                [self.orthanc, str(self.folder / "orthanc.json")],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            wait_port(self.port)
            wait_port(http)
            return
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        def store(event: evt.Event) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            ds.save_as(
                self.folder / f"{len(list(self.folder.glob('*.dcm'))):05d}.dcm",
                enforce_file_format=True,
            )
            return 0

        ae = AE("PACS")
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(
                str(cx.abstract_syntax), ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
            )
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)]
        )

    def received(self) -> list[pydicom.Dataset]:
        if self.orthanc:
            import urllib.request

            out: list[pydicom.Dataset] = []
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/instances", timeout=10) as r:
                ids = json.loads(r.read())
            for iid in ids:
                url = f"http://127.0.0.1:{self.http}/instances/{iid}/file"
                with urllib.request.urlopen(url, timeout=30) as r:
                    from io import BytesIO

                    out.append(pydicom.dcmread(BytesIO(r.read())))
            return out
        return [pydicom.Dataset(pydicom.dcmread(p)) for p in sorted(self.folder.glob("*.dcm"))]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(20)
        if self.server is not None:
            self.server.shutdown()


def _send(files: list[Path], port: int) -> str:
    storescu = shutil.which("storescu", path="/usr/bin:/usr/local/bin")
    if storescu:
        subprocess.run(
            [
                storescu,
                "-aet",
                "STORESCU",
                "-aec",
                "LDCT_DENOISE",
                "127.0.0.1",
                str(port),
                *map(str, files),
            ],
            check=True,
            capture_output=True,
            env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
        )
        return "DCMTK storescu"
    from pynetdicom import AE

    ae = AE("STORESCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", port, ae_title="LDCT_DENOISE")
    if not assoc.is_established:
        raise RuntimeError("the node refused the demo's association")
    try:
        for f in files:
            status = assoc.send_c_store(f)
            if not status or int(status.Status) != 0:
                raise RuntimeError(f"the node refused {f.name}")
    finally:
        assoc.release()
    return "pynetdicom"


def _zoomed_crop(hu: np.ndarray, center: tuple[int, int], side: int, zoom: int) -> np.ndarray:
    """A ``side`` x ``side`` crop around ``center``, kept inside the slice, enlarged ``zoom``
    times (nearest neighbour, so pixels and noise grain stay visible)."""
    h, w = hu.shape
    y = min(max(center[0] - side // 2, 0), h - side)
    x = min(max(center[1] - side // 2, 0), w - side)
    return np.kron(hu[y : y + side, x : x + side], np.ones((zoom, zoom), np.float32))


def run_demo(
    out: Path,
    slices: int = 8,
    size: int = 512,
    timeout: float = 600,
    checkpoint: Path | None = None,
    prefer_orthanc: bool = True,
) -> Path:
    """Run the demo; return the report's path."""
    from pacs_node.node import Node
    from pacs_node.work.images import save_grid

    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="pacs-demo-"))
    t0 = time.monotonic()
    try:
        synth = [
            sys.executable,
            "-m",
            "train",
            "synth",
            str(work / "synth"),
            "--cases",
            "1",
            "--slices",
            str(slices),
            "--size",
            str(size),
            "--no-extras",
            "--seed",
            "1",  # an abdomen (316 x 266 mm): 15-25 HU of quarter-dose noise in soft tissue
        ]
        print(f"1/5 making a synthetic quarter-dose CT series ({slices} slices, {size}x{size})")
        subprocess.run(synth, check=True, capture_output=True)
        low = sorted((work / "synth").rglob("1.000000-Low Dose Images-*/*.dcm"))
        full = sorted((work / "synth").rglob("1.000000-Full dose images-*/*.dcm"))
        dest = _Destination(work, prefer_orthanc)
        print(f"2/5 starting the destination: {dest.kind} on port {dest.port}")
        dest.start()
        node_port = free_port()
        config = Config(
            node=NodeConfig(bind="127.0.0.1", port=node_port),
            storage=StorageConfig(data_dir=work / "node", min_free_bytes=0, keep_days=1),
            queue=QueueConfig(
                database_url=f"sqlite:///{work}/node/jobs.sqlite", series_quiet_seconds=1
            ),
            destination=(DestinationConfig(port=dest.port),),
            http=HttpConfig(port=0),
            # show the result even when the gate would hold it; the report says so
            quality=QualityConfig(forward_on_failure=True),
            model=Config().model.model_copy(update={"checkpoint": checkpoint}),
        )
        node = Node(config)
        try:
            node.start()
            print(
                f"3/5 node listening on port {node_port}, status page http://127.0.0.1:"
                f"{node.http.port if node.http else '-'}/"
            )
            how = _send(low, node_port)
            print(
                f"4/5 sent {len(low)} instances with {how}; denoising on "
                f"{node.workers[0].denoiser.device if node.workers else '?'}"
            )
            deadline = time.monotonic() + timeout
            while True:
                jobs = node.jobs.list_jobs()
                if jobs and jobs[0].state in ("done", "failed"):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no delivery within {timeout:.0f} s")
                time.sleep(0.5)
            job = jobs[0]
        finally:
            node.stop()
        derived = [d for d in dest.received() if "DERIVED" in list(d.get("ImageType", []))]
        dest.stop()
        print(f"5/5 job {job.id} {job.state}; destination holds {len(derived)} derived instances")
        by_source = {str(d.SourceImageSequence[0].ReferencedSOPInstanceUID): d for d in derived}
        ld_ds = [pydicom.dcmread(p) for p in low]
        nd_hu = np.stack([read_hu(pydicom.dcmread(p)) for p in full])
        ld_hu = np.stack([read_hu(d) for d in ld_ds])
        have = [k for k, d in enumerate(ld_ds) if str(d.SOPInstanceUID) in by_source]
        figures: dict[str, Any] = {
            "job": job.id,
            "state": job.state,
            "last_error": job.last_error,
            "quality_gate": "failed (forwarded, flagged)" if job.flagged else "passed",
            "model_version": job.model_version,
            "derived_instances": len(derived),
        }
        rows = ""
        if have:
            den_hu = np.stack([read_hu(by_source[str(ld_ds[k].SOPInstanceUID)]) for k in have])
            regions = find_uniform_regions(nd_hu[have])  # flat in the truth, not in the noise
            q = measure(ld_hu[have], den_hu, regions)
            ref = measure(ld_hu[have], nd_hu[have], regions)
            figures.update(
                noise_low_dose=q.noise_in,
                noise_denoised=q.noise_out,
                noise_reduction=f"{1 - q.noise_out / q.noise_in:.0%}",
                noise_regular_dose=ref.noise_out,
                hu_bias=q.hu_bias,
                regions=q.regions,
            )
            mid = len(have) // 2
            k = have[mid]
            tiles = [ld_hu[k], den_hu[mid], nd_hu[k], den_hu[mid] - ld_hu[k] + 40.0]
            on_mid = [(r, c) for s, r, c, _ in regions if s == mid] or [(size // 2, size // 2)]
            side = max(size // 4, 16)
            save_grid(
                out / "series-1.png",
                [tiles, [_zoomed_crop(t, on_mid[0], side, size // side) for t in tiles]],
                labels=[
                    ["low dose", "denoised", "regular dose", "difference"],
                    [f"soft tissue, x{size // side}", "", "", ""],
                ],
            )
            rows = "".join(
                f"<tr><th>{html.escape(key)}</th><td>{val:.2f}</td></tr>"
                if isinstance(val, float)
                else f"<tr><th>{html.escape(key)}</th><td>{html.escape(str(val))}</td></tr>"
                for key, val in figures.items()
            )
        figures["seconds"] = round(time.monotonic() - t0, 1)
        (out / "figures.json").write_text(json.dumps(figures, indent=2))
        report = out / "report.html"
        report.write_text(
            "<!doctype html><html><head><meta charset='utf-8'><title>pacs-node demo</title></head>"
            "<body style='font-family:sans-serif'><h1>pacs-node demo</h1>"
            f"<p>A synthetic quarter-dose CT series of {slices} slices went from {how} through the "
            f"node to {dest.kind} in {figures['seconds']} s. Noise and bias in HU, measured in "
            "uniform soft tissue.</p>"
            f"<table border=1 cellpadding=4>{rows}</table>"
            "<h2>Middle slice: low dose | denoised | regular dose | difference (C40/W400); "
            "below, a soft-tissue crop of each, enlarged</h2>"
            "<img src='series-1.png' alt='montage'></body></html>"
        )
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)
