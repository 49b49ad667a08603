"""Intake with the real DCMTK tools: transfer syntaxes, allow-list, TLS, refusals, crashes."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from pacs_node import pynetdicom_compat as compat
from pacs_node.receive.filemeta import part10_header
from pacs_node.receive.rules import TRANSFER_SYNTAXES
from tests.conftest import (
    PATIENT_ID,
    PATIENT_NAME,
    NodeProcess,
    make_series,
    require_tool,
    run_tool,
    wait_for,
)

JPEG_SV1, JPEG_P14 = "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.57"
JPEG_LS, J2K, RLE = "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5"
IMPLICIT, DEFLATED, BIG_ENDIAN = (
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.2",
)


def stored_files(node: NodeProcess) -> list[Path]:
    return sorted((node.tmp / "var" / "received").glob("*/*.dcm"))


def db_sop_uids(node: NodeProcess) -> set[str]:
    with sqlite3.connect(node.tmp / "var" / "jobs.sqlite") as con:
        return {r[0] for r in con.execute("SELECT sop_instance_uid FROM instances")}


def transcode(src: list[Path], dest: Path, tool: list[str]) -> list[Path]:
    dest.mkdir(parents=True)
    out = []
    for p in src:
        target = dest / p.name
        subprocess.run([*tool, str(p), str(target)], check=True, capture_output=True)
        out.append(target)
    return out


@pytest.mark.parametrize("sop_uid", ["1.2.3.4", "1.2.826.0.1.3680043.10.1045.12345678901"])
def test_hand_encoded_file_meta_equals_pydicoms(sop_uid: str) -> None:
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

    ct, ts = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.4.70"
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\0\1"
    meta.MediaStorageSOPClassUID = ct
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = PYNETDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = PYNETDICOM_IMPLEMENTATION_VERSION
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta)
    assert part10_header(ct, sop_uid, ts) == b"\0" * 128 + b"DICM" + fp.getvalue()


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, list[Path]], Path]:
    """Series in each accepted transfer syntax (DCMTK and GDCM made them), and a storescu
    configuration that offers one CT context per syntax, so each travels as it is."""
    tmp_path = tmp_path_factory.mktemp("syntaxes")
    dcmconv = require_tool("dcmconv")
    plain = make_series(tmp_path / "plain", n=50, size=64, seed=1)
    variants = {
        "1.2.840.10008.1.2.1": plain,
        JPEG_SV1: transcode(
            make_series(tmp_path / "s2", 50, 64, 2),
            tmp_path / "jsv1",
            [require_tool("dcmcjpeg"), "+e1"],
        ),
        JPEG_P14: transcode(
            make_series(tmp_path / "s3", 50, 64, 3),
            tmp_path / "jp14",
            [require_tool("dcmcjpeg"), "+el"],
        ),
        JPEG_LS: transcode(
            make_series(tmp_path / "s4", 50, 64, 4), tmp_path / "jls", [require_tool("dcmcjpls")]
        ),
        J2K: transcode(
            make_series(tmp_path / "s5", 50, 64, 5),
            tmp_path / "j2k",
            [require_tool("gdcmconv"), "--j2k"],
        ),
        RLE: transcode(
            make_series(tmp_path / "s6", 50, 64, 6), tmp_path / "rle", [require_tool("dcmcrle")]
        ),
        IMPLICIT: transcode(
            make_series(tmp_path / "s7", 10, 64, 7), tmp_path / "ivr", [dcmconv, "+ti"]
        ),
        DEFLATED: transcode(
            make_series(tmp_path / "s8", 10, 64, 8), tmp_path / "dfl", [dcmconv, "+td"]
        ),
        BIG_ENDIAN: transcode(
            make_series(tmp_path / "s9", 10, 64, 9), tmp_path / "be", [dcmconv, "+tb"]
        ),
    }
    scu_cfg = tmp_path / "storescu.cfg"
    groups = "".join(f"[TS{i}]\nTransferSyntax1 = {ts}\n" for i, ts in enumerate(TRANSFER_SYNTAXES))
    contexts = "".join(
        f"PresentationContext{i + 1} = CTImageStorage\\TS{i}\n"
        for i in range(len(TRANSFER_SYNTAXES))
    )
    scu_cfg.write_text(
        f"[[TransferSyntaxes]]\n{groups}[[PresentationContexts]]\n[CT]\n{contexts}"
        "[[Profiles]]\n[CT]\nPresentationContexts = CT\n"
    )
    return variants, scu_cfg


def _send_each(node: NodeProcess, variants: dict[str, list[Path]], scu_cfg: Path) -> None:
    for ts, files in variants.items():
        assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == ts
        # One CT context per accepted syntax: each file travels in its own transfer syntax.
        res = node.storescu(*map(str, files), opts=("-xf", str(scu_cfg), "CT"))
        assert res.returncode == 0, (ts, res.stderr)


def test_each_transfer_syntax_is_stored_as_sent(
    node_factory, variants: tuple[dict[str, list[Path]], Path]
) -> None:
    node = node_factory().start()
    _send_each(node, *variants)
    variants_, _ = variants
    stored = {pydicom.dcmread(p).SOPInstanceUID: p for p in stored_files(node)}
    assert len(stored) == 330
    for ts, files in variants_.items():
        for f in files[::7]:
            sent = pydicom.dcmread(f)
            got = pydicom.dcmread(stored[sent.SOPInstanceUID])
            assert got.file_meta.TransferSyntaxUID == ts
            assert got == sent  # every element, compressed pixel data included
    jobs = node.status()
    assert len(jobs) == 9
    assert sorted(j["received"] for j in jobs) == [10] * 3 + [50] * 6
    assert len({j["series_uid"] for j in jobs}) == 9


def test_every_accepted_transfer_syntax_is_denoised_and_delivered(
    node_factory, variants: tuple[dict[str, list[Path]], Path], tiny_checkpoint: Path
) -> None:
    """Big endian included: the derived instances are written little endian whatever the
    source's syntax, and all of them reach the destination; the node's own output, sent back,
    is refused rather than denoised again."""
    from tests.peers import RecordingSCP
    from tests.test_worker import MECHANICS, node_config

    dest = RecordingSCP().start()
    try:
        node = node_factory(node_config(dest.port, tiny_checkpoint, MECHANICS), workers=1)
        node.start()
        _send_each(node, *variants)
        wait_for(
            lambda: len(dest.received) == 330 and all(j["state"] == "done" for j in node.status()),
            240,
            "every series denoised and delivered",
        )
        sent = {
            str(pydicom.dcmread(f).SOPInstanceUID): ts
            for ts, files in variants[0].items()
            for f in files
        }
        for ds in dest.received.values():
            assert ds.file_meta.TransferSyntaxUID in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
            assert str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID) in sent
        assert {j["failed"] for j in node.status()} == {0}
        back = node.tmp / "back"
        back.mkdir()
        ours = next(iter(dest.received.values()))
        ours.save_as(back / "derived.dcm", enforce_file_format=True)
        again = node.storescu(str(back / "derived.dcm"))
        assert "0x0122" in again.stderr + again.stdout or again.returncode != 0
        assert "own output is never denoised again" in node.log()
    finally:
        dest.stop()


def test_unknown_caller_and_wrong_called_ae_are_rejected(tmp_path: Path, node_factory) -> None:
    node = node_factory().start()
    files = make_series(tmp_path / "s", n=2)
    assert node.storescu(*map(str, files), aet="INTRUDER").returncode != 0
    assert node.storescu(*map(str, files), aec="NOT_US").returncode != 0
    assert stored_files(node) == []
    log = node.log()
    assert "calling AE 'INTRUDER'" in log and "not in node.allowed_calling_ae_titles" in log
    assert "called AE 'NOT_US'" in log


def _make_certs(d: Path) -> None:
    openssl = require_tool("openssl")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=d)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
    )
    for name in ("node", "client"):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
        )


def test_tls_stores_and_refuses_plain(tmp_path: Path, node_factory) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    _make_certs(certs)
    node = node_factory(
        f'[node.tls]\ncertificate = "{certs}/node.crt"\nprivate_key = "{certs}/node.key"\n'
        f'ca_certificates = "{certs}/ca.crt"\nrequire_client_certificate = true\n'
    )
    # [node.tls] must follow [node]'s keys: rewrite the config with the table at the end
    text = node.config.read_text()
    node.config.write_text(
        text.replace("[storage]\nmin_free_bytes = 0\n", "").replace(
            "[node.tls]", "[storage]\nmin_free_bytes = 0\n[node.tls]"
        )
    )
    node.start()
    files = make_series(tmp_path / "s", n=3)
    tls = (
        "+tls",
        str(certs / "client.key"),
        str(certs / "client.crt"),
        "+cf",
        str(certs / "ca.crt"),
    )
    ok = node.storescu(*map(str, files), opts=tls)
    assert ok.returncode == 0, ok.stderr + ok.stdout
    assert len(stored_files(node)) == 3
    plain = node.storescu(*map(str, make_series(tmp_path / "p", n=1, seed=2)), timeout=60)
    assert plain.returncode != 0
    assert len(stored_files(node)) == 3


def _seg_file(path: Path) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "SEG"
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = b"\0" * 8
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_non_ct_and_broken_instances_are_refused_and_leave_nothing(
    tmp_path: Path, node_factory
) -> None:
    from pydicom.data import get_testdata_file

    node = node_factory().start()
    mr = tmp_path / "mr.dcm"
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm", download=False))
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    ds.save_as(mr)
    seg = _seg_file(tmp_path / "seg.dcm")
    nopix_path, baduid_path = make_series(tmp_path / "ct", n=2)
    nopix = pydicom.dcmread(nopix_path)
    del nopix.PixelData
    nopix.save_as(nopix_path)
    bad = pydicom.dcmread(baduid_path)
    bad.SeriesInstanceUID = "1.2.840.10008.abc.01"
    bad.save_as(baduid_path)
    expected = {
        mr: "0x0122",
        seg: "0x0122",
        nopix_path: "PixelData is missing",
        baduid_path: "SeriesInstanceUID is not a valid UID",
    }
    for path, reason in expected.items():
        res = node.storescu(str(path), opts=("-R",))  # -R: propose the file's own SOP class
        assert res.returncode != 0, path
        assert reason in node.log(), (path, node.log())
    assert stored_files(node) == []
    assert list((node.tmp / "var" / "tmp").iterdir()) == []
    assert db_sop_uids(node) == set()
    log = node.log()
    assert PATIENT_NAME.split("^")[0] not in log and PATIENT_ID not in log
    assert log.count("refused with") == 4


def _successes(storescu_stdout: str) -> int:
    return len(re.findall(r"Received Store Response \(Success\)", storescu_stdout))


def test_sigkill_during_transfer_loses_nothing_acknowledged(tmp_path: Path, node_factory) -> None:
    node = node_factory().start()
    files = make_series(tmp_path / "s", n=200, size=128)
    sender = subprocess.Popen(
        [
            require_tool("storescu"),
            "-v",
            "-aet",
            "STORESCU",
            "-aec",
            "LDCT_DENOISE",
            "127.0.0.1",
            str(node.port),
            *map(str, files),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
    )
    wait_for(
        lambda: len(db_sop_uids(node)) >= 60 if (node.tmp / "var/jobs.sqlite").exists() else False,
        60,
        "60 instances",
    )
    node.kill()
    out, _ = sender.communicate(timeout=60)
    acked = _successes(out)
    assert 0 < acked < 200, out[-2000:]
    acked_uids = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files[:acked]}
    on_disk = {p.stem for p in stored_files(node)}
    assert acked_uids <= db_sop_uids(node)
    assert acked_uids <= on_disk
    # restarted, the rest of the series joins the same job
    node.start()
    rest = node.storescu(*map(str, files[acked:]))
    assert rest.returncode == 0, rest.stderr
    jobs = node.status()
    assert len(jobs) == 1 and jobs[0]["received"] == 200
    assert list((node.tmp / "var" / "tmp").iterdir()) == []


def test_four_concurrent_senders(tmp_path: Path, node_factory) -> None:
    node = node_factory().start()
    series = [make_series(tmp_path / f"s{i}", n=100, size=64, seed=10 + i) for i in range(4)]
    results: list[subprocess.CompletedProcess[str]] = []

    def send(files: list[Path]) -> None:
        results.append(node.storescu(*map(str, files)))

    threads = [threading.Thread(target=send, args=(s,)) for s in series]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    assert len(db_sop_uids(node)) == 400 and len(stored_files(node)) == 400
    assert sorted(j["received"] for j in node.status()) == [100] * 4
    log = node.log().lower()
    assert "locked" not in log and "error" not in log


def test_same_instance_again_replaces_and_done_series_starts_new_round(
    tmp_path: Path, node_factory
) -> None:
    node = node_factory().start()
    files = make_series(tmp_path / "s", n=3)
    assert node.storescu(*map(str, files)).returncode == 0
    assert node.storescu(str(files[0])).returncode == 0
    jobs = node.status()
    assert len(jobs) == 1 and jobs[0]["received"] == 3
    with sqlite3.connect(node.tmp / "var" / "jobs.sqlite") as con:
        con.execute("UPDATE jobs SET state='done'")
    assert node.storescu(str(files[1])).returncode == 0
    jobs = node.status()
    assert [(j["round"], j["state"], j["received"]) for j in jobs] == [
        (2, "receiving", 1),
        (1, "done", 2),
    ]


def test_disk_watermark_answers_out_of_resources(tmp_path: Path, node_factory) -> None:
    node = node_factory()
    node.config.write_text(
        node.config.read_text().replace("min_free_bytes = 0", "min_free_bytes = 1000000000000000")
    )
    node.start()
    res = node.storescu(str(make_series(tmp_path / "s", n=1)[0]))
    assert res.returncode != 0
    assert "0xA700" in node.log() and "min_free_bytes" in node.log()
    assert stored_files(node) == []


def test_echo_still_works_with_storage(node_factory) -> None:
    node = node_factory().start()
    res = run_tool(
        require_tool("echoscu"),
        "-aet",
        "STORESCU",
        "-aec",
        "LDCT_DENOISE",
        "127.0.0.1",
        str(node.port),
    )
    assert res.returncode == 0
    time.sleep(0)


def test_the_pynetdicom_patches_install_only_where_every_name_they_touch_is_there(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import pynetdicom
    from pynetdicom import association, dul

    assert compat.problems() == [] and compat.install() and compat.installed()
    assert isinstance(dul.time, compat._TimeShim) and isinstance(association.time, compat._TimeShim)
    compat.uninstall()
    try:
        import time as time_module

        assert (
            not compat.installed() and dul.time is time_module and association.time is time_module
        )
        assert dul.DULServiceProvider._read_pdu_data.__name__ == "_read_pdu_data"
        assert "pacs_node" not in dul.DULServiceProvider._read_pdu_data.__module__
        # another release: nothing patched, one warning line naming why
        monkeypatch.setattr(pynetdicom, "__version__", "3.1.0")
        with caplog.at_level("WARNING"):
            assert compat.install() is False
        assert not compat.installed() and dul.time is time_module
        assert [r.message for r in caplog.records if "patches not installed" in r.message] == [
            caplog.records[-1].message
        ]
        assert "3.1.0" in caplog.records[-1].message
        monkeypatch.undo()
        # a private name gone: the same
        monkeypatch.setattr(compat, "PRIVATE", {**compat.PRIVATE, "Association": ("_gone",)})
        assert compat.problems() == ["missing Association._gone"]
        assert compat.install() is False and not compat.installed()
        monkeypatch.undo()
        # switched off on purpose
        monkeypatch.setenv(compat.ENV_SWITCH, "off")
        assert compat.install() is False
        monkeypatch.undo()
    finally:
        assert compat.install()


def test_a_sender_on_an_association_does_not_wait_out_the_reactors_nap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """send_c_echo/send_c_store pause the reactor first; with event-driven waits the pause must
    wake it, not wait for its bounded wait to time out (it did: 48 ms per forwarded instance)."""
    from pynetdicom import AE, evt

    from pacs_node import pynetdicom_compat as compat
    from tests.conftest import free_port

    if not compat.install():
        pytest.skip("the pynetdicom patches are off")
    monkeypatch.setattr(compat, "BOUND", 5.0)  # a missed wake-up now costs 5 s per request
    scp = AE("DEST")
    scp.add_supported_context("1.2.840.10008.1.1")
    port = free_port()
    server = scp.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_ECHO, lambda e: 0)]
    )
    try:
        scu = AE("SENDER")
        scu.add_requested_context("1.2.840.10008.1.1")
        assoc = scu.associate("127.0.0.1", port, ae_title="DEST")
        assert assoc.is_established
        t0 = time.monotonic()
        statuses = [assoc.send_c_echo().Status for _ in range(5)]
        elapsed = time.monotonic() - t0
        assoc.release()
    finally:
        server.shutdown()
    assert statuses == [0] * 5
    assert elapsed < 5.0, f"5 C-ECHOs took {elapsed:.1f} s: the reactor was not woken"


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(
    os.environ.get(compat.ENV_SWITCH, "").lower() in ("0", "off", "false", "no"),
    reason="the bound is kept by pynetdicom_compat's reader; pynetdicom's own reads PDUs whole",
)
def test_a_pdu_above_the_advertised_maximum_aborts_without_buffering(node_factory) -> None:
    """The node advertises a bounded maximum PDU (1 MiB by default); a peer that announces a
    1.5 GiB P-DATA-TF PDU is aborted at its header, and the node's memory does not move."""
    import contextlib
    import socket
    import struct

    from pynetdicom import AE

    node = node_factory().start()
    assert node.proc is not None
    before = _rss_kib(node.proc.pid)
    ae = AE("STORESCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="LDCT_DENOISE")
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == 1 << 20
    sock: socket.socket = assoc.dul.socket.socket
    huge = 3 << 29  # 1.5 GiB announced
    # (the node's A-ABORT may come first, and our side then closes the socket under us)
    with contextlib.suppress(OSError):
        sock.sendall(struct.pack(">BBL", 0x04, 0, huge) + b"\0" * (4 << 20))  # then 4 MiB of it
    wait_for(lambda: "above the 1048576 it was offered" in node.log(), 30, "the abort")
    wait_for(lambda: not assoc.is_established, 30, "the association to end")
    assert _rss_kib(node.proc.pid) - before < 8 * 1024, "the node buffered the PDU"
    assert f"a PDU of {huge} bytes" in node.log()
    res = run_tool(
        require_tool("echoscu"),
        "-aet",
        "STORESCU",
        "-aec",
        "LDCT_DENOISE",
        "127.0.0.1",
        str(node.port),
    )
    assert res.returncode == 0  # and the node is still there
