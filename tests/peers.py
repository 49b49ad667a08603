"""Real destinations for the worker tests: Orthanc, and a pynetdicom SCP that records."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import urllib.request
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt

from tests.conftest import dcmtk_env, free_port, port_open, wait_for

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class Orthanc:
    """Orthanc on loopback ports; with ``dicomweb`` its DICOMweb plugin (Debian's
    orthanc-dicomweb) serves STOW-RS at ``http://127.0.0.1:<http>/dicom-web``."""

    def __init__(self, tmp: Path, aet: str = "PACS", dicomweb: bool = False) -> None:
        self.exe = shutil.which("Orthanc", path="/usr/sbin:/usr/bin")
        if self.exe is None:
            raise AssertionError("Orthanc is not installed: run ./install.sh --test")
        if dicomweb and not DICOMWEB_PLUGIN.exists():
            raise AssertionError("orthanc-dicomweb is not installed: run ./install.sh --test")
        self.dir = tmp / "orthanc"
        self.dir.mkdir(parents=True)
        self.port, self.http = free_port(), free_port()
        self.aet = aet
        cfg = {
            "Name": "test",
            "StorageDirectory": str(self.dir / "db"),
            "IndexDirectory": str(self.dir / "db"),
            "DicomAet": aet,
            "DicomPort": self.port,
            "HttpPort": self.http,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "Plugins": [str(DICOMWEB_PLUGIN)] if dicomweb else [],
            "DicomWeb": {"Enable": dicomweb, "Root": "/dicom-web/"},
            "DicomAlwaysAllowStore": True,
            "HttpServerEnabled": True,
            "ConcurrentJobs": 1,
        }
        (self.dir / "orthanc.json").write_text(json.dumps(cfg))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Orthanc:
        with open(self.dir / "log", "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.exe), str(self.dir / "orthanc.json")],
                env=dcmtk_env(),
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        wait_for(lambda: port_open(self.port) and port_open(self.http), 60, "Orthanc")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=30) as r:
            return json.loads(r.read())

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=30) as r:
            return bytes(r.read())

    def series(self) -> list[dict[str, Any]]:
        return [self.get(f"/series/{s}") for s in self.get("/series")]

    def instance_count(self) -> int:
        return len(self.get("/instances"))

    def by_sop_uid(self) -> dict[str, str]:
        """SOP Instance UID -> Orthanc's instance id, for every stored instance."""
        return {
            self.get(f"/instances/{i}/simplified-tags")["SOPInstanceUID"]: i
            for i in self.get("/instances")
        }


class RecordingSCP:
    """Stores what it receives in memory. ``fail_first`` answers that many C-STOREs with
    ``fail_status`` before accepting."""

    def __init__(
        self,
        aet: str = "PACS",
        port: int | None = None,
        fail_first: int = 0,
        fail_status: int = 0xA700,
    ) -> None:
        self.aet, self.port = aet, port or free_port()
        self.received: dict[str, Dataset] = {}
        self.calls = 0
        self.fail_first, self.fail_status = fail_first, fail_status
        self.lock = threading.Lock()
        self.server: Any = None

    def _store(self, event: evt.Event) -> int:
        with self.lock:
            self.calls += 1
            if self.calls <= self.fail_first:
                return self.fail_status
            ds = event.dataset
            ds.file_meta = event.file_meta
            self.received[str(ds.SOPInstanceUID)] = ds
        return 0

    def start(self) -> RecordingSCP:
        ae = AE(ae_title=self.aet)
        ae.maximum_pdu_size = 0
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(
                cx.abstract_syntax, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
            )
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
