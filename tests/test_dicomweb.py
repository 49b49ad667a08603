"""STOW-RS against a DICOMweb server that stores some instances and refuses others: the
response's failed-SOP list is honoured per instance. (Orthanc's DICOMweb plugin, the happy path,
is in test_routing.)"""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest

from pacs_node.config import DestinationConfig
from pacs_node.deliver.dicomweb import StowSender
from pacs_node.errors import PermanentError, RetryableError
from tests.conftest import make_series


class StowServer:
    """Refuses the SOP instances in ``refuse`` (HTTP 409 with a FailedSOPSequence, as PS3.18
    says), stores the rest; records every request's instances and Authorization header."""

    def __init__(self) -> None:
        self.refuse: set[str] = set()
        self.stored: list[str] = []
        self.requests: list[list[str]] = []
        self.auth: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                boundary = self.headers["Content-Type"].split("boundary=")[1].strip('"')
                uids = []
                for part in body.split(b"--" + boundary.encode())[1:-1]:
                    payload = part.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n", 1)[0]
                    uids.append(str(pydicom.dcmread(io.BytesIO(payload)).SOPInstanceUID))
                outer.requests.append(uids)
                outer.auth.append(self.headers.get("Authorization"))

                def item(uid: str, failed: bool) -> dict[str, object]:
                    out = {"00081155": {"vr": "UI", "Value": [uid]}}
                    if failed:
                        out["00081197"] = {"vr": "US", "Value": [0xA700]}
                    return out

                refused = [u for u in uids if u in outer.refuse]
                stored = [u for u in uids if u not in outer.refuse]
                outer.stored += stored
                response: dict[str, object] = {
                    "00081199": {"vr": "SQ", "Value": [item(u, False) for u in stored]}
                }
                if refused:
                    response["00081198"] = {"vr": "SQ", "Value": [item(u, True) for u in refused]}
                data = json.dumps(response).encode()
                self.send_response(409 if refused else 200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def stop(self) -> None:
        self.server.shutdown()


def test_refused_instances_stay_pending_and_the_rest_count_as_delivered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = StowServer()
    try:
        files = make_series(tmp_path, n=5)
        uids = [str(pydicom.dcmread(f).SOPInstanceUID) for f in files]
        server.refuse = {uids[1], uids[3]}
        monkeypatch.setenv("STOW_TEST_TOKEN", "Bearer abc")
        dest = DestinationConfig(
            name="web", kind="dicomweb", url=server.url, batch_size=2, auth_env="STOW_TEST_TOKEN"
        )
        sender = StowSender(dest)
        delivered: list[int] = []
        with pytest.raises(RetryableError, match="1 of 2 instances refused"):
            sender.send(list(enumerate(files)), lambda i, _s: delivered.append(i))
        # batches of two: the first request had one refusal, so the send stopped after it
        assert server.requests == [uids[:2]] and delivered == [0]
        server.refuse = set()
        left = [(i, f) for i, f in enumerate(files) if i not in delivered]
        assert sender.send(left, lambda i, _s: delivered.append(i)) == 4
        assert sorted(delivered) == [0, 1, 2, 3, 4] and sorted(server.stored) == sorted(uids)
        assert set(server.auth) == {"Bearer abc"}
    finally:
        server.stop()


def test_credentials_come_from_the_named_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "http://127.0.0.1:9/dicom-web"
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    with pytest.raises(PermanentError, match="NO_SUCH_TOKEN"):
        StowSender(DestinationConfig(name="w", kind="dicomweb", url=url, auth_env="NO_SUCH_TOKEN"))
    monkeypatch.setenv("BASIC_TOKEN", "user:secret")
    sender = StowSender(
        DestinationConfig(name="w", kind="dicomweb", url=url, auth_env="BASIC_TOKEN")
    )
    assert sender.client._session.auth == ("user", "secret")
