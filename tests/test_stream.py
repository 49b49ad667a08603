"""The streamed C-STORE path (pacs_node.receive.stream) against pynetdicom's own, in one process."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode, encode

from pacs_node.config import NodeConfig
from pacs_node.jobs import JobStore
from pacs_node.receive import stream
from pacs_node.receive.intake import Intake
from pacs_node.receive.rules import TRANSFER_SYNTAXES
from pacs_node.receive.scp import StorageSCP
from pacs_node.storage import Storage
from tests.conftest import free_port, make_series, require_tool, run_tool, wait_for

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


class CountingIntake(Intake):
    """Counts the data sets that reach it through pynetdicom's EVT_C_STORE."""

    evt_c_store = 0

    def handle_store(self, event: evt.Event) -> int:
        self.evt_c_store += 1
        return super().handle_store(event)


class InProcessNode:
    def __init__(self, root: Path, streamed: bool = True, max_pdu: int = 0) -> None:
        self.storage = Storage(root / "data")
        self.queue = JobStore(f"sqlite:///{root / 'jobs.sqlite'}")
        self.queue.migrate()
        self.intake = CountingIntake(self.storage, self.queue)
        config = NodeConfig(bind="127.0.0.1", port=free_port(), max_pdu_size=max_pdu)
        self.scp = StorageSCP(
            config, self.intake.handlers(), TRANSFER_SYNTAXES, self.intake if streamed else None
        )
        self.scp.start()

    def files(self) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in self.storage.received_dir.glob("*/*.dcm")}

    def temporary_files(self) -> list[Path]:
        return list(self.storage.tmp_dir.iterdir())

    def stop(self) -> None:
        self.scp.stop()
        self.queue.dispose()


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[InProcessNode]]:
    made: list[InProcessNode] = []
    yield made
    for n in made:
        n.stop()


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xA900, 0xC000, 0x0122])
@pytest.mark.parametrize("sop_instance", ["1.2.3.4", "1.2.826.0.1.3680043.10.1045.123456789"])
def test_c_store_rsp_is_byte_identical_to_pynetdicoms(status: int, sop_instance: str) -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 7
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    assert stream.store_rsp(CT, sop_instance, 7, status) == encode(message.command_set, True, True)


@pytest.mark.parametrize("max_pdu", [0, 16, 4096])
def test_response_pdus_fit_the_peers_maximum_and_reassemble(max_pdu: int) -> None:
    command = stream.store_rsp(CT, "1.2.3.4", 1, 0)
    pdus = list(stream.command_pdus(3, command, max_pdu))
    assembled = b""
    for i, pdu in enumerate(pdus):
        pdu_type, _, length, item, context_id, mch = struct.unpack(">BBIIBB", pdu[:12])
        assert pdu_type == 4 and length == len(pdu) - 6 and item == length - 4 and context_id == 3
        assert max_pdu == 0 or length <= max_pdu
        assert mch == (3 if i == len(pdus) - 1 else 1)  # command; last bit on the last only
        assembled += pdu[12:]
    assert assembled == command
    assert decode(BytesIO(assembled), True, True).Status == 0


def test_streamed_and_pynetdicom_paths_store_identical_files(
    tmp_path: Path, nodes: list[InProcessNode]
) -> None:
    files = make_series(tmp_path / "s", n=5, size=128, seed=3)
    streamed = InProcessNode(tmp_path / "streamed")
    nodes.append(streamed)
    assembled = InProcessNode(tmp_path / "assembled", streamed=False)
    nodes.append(assembled)
    assert streamed.scp.streaming and not assembled.scp.streaming
    for node in (streamed, assembled):
        res = run_tool(
            require_tool("storescu"),
            *("-aet", "STORESCU", "-aec", "LDCT_DENOISE", "127.0.0.1", str(node.scp.port)),
            *map(str, files),
        )
        assert res.returncode == 0, res.stderr
    assert streamed.intake.evt_c_store == 0 and assembled.intake.evt_c_store == 5
    got = streamed.files()
    assert len(got) == 5 and got == assembled.files()
    for f in files:  # the data set as sent, behind pynetdicom's file meta
        stored = pydicom.dcmread(BytesIO(got[f"{pydicom.dcmread(f).SOPInstanceUID}.dcm"]))
        assert stored == pydicom.dcmread(f)


def test_one_association_mixes_echo_and_stores_in_small_pdus(
    tmp_path: Path, nodes: list[InProcessNode]
) -> None:
    node = InProcessNode(tmp_path / "n", max_pdu=4096)  # a 128² slice: 9 PDUs a data set
    nodes.append(node)
    ct = [pydicom.dcmread(f) for f in make_series(tmp_path / "s", n=3, size=128, seed=4)]
    mr = pydicom.dcmread(make_series(tmp_path / "m", n=1, size=64, seed=5)[0])
    mr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.add_requested_context(CT, EXPLICIT_LE)
    ae.add_requested_context(mr.SOPClassUID, EXPLICIT_LE)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="LDCT_DENOISE", max_pdu=4096)
    assert assoc.is_established
    try:
        statuses = [assoc.send_c_echo().Status]
        statuses += [assoc.send_c_store(ds).Status for ds in ct]
        statuses += [assoc.send_c_echo().Status, assoc.send_c_store(mr).Status]
        statuses += [assoc.send_c_echo().Status]
    finally:
        assoc.release()
    assert statuses == [0, 0, 0, 0, 0, 0x0122, 0]
    got = node.files()
    assert sorted(got) == sorted(f"{ds.SOPInstanceUID}.dcm" for ds in ct)
    for ds in ct:
        assert pydicom.dcmread(BytesIO(got[f"{ds.SOPInstanceUID}.dcm"])) == ds
    assert node.intake.evt_c_store == 0 and node.temporary_files() == []


def _p_data(context_id: int, mch: int, data: bytes) -> bytes:
    return struct.pack(">BBIIBB", 4, 0, len(data) + 6, len(data) + 2, context_id, mch) + data


def test_association_aborted_inside_a_data_set_leaves_no_file(
    tmp_path: Path, nodes: list[InProcessNode]
) -> None:
    node = InProcessNode(tmp_path / "n")
    nodes.append(node)
    ds = pydicom.dcmread(make_series(tmp_path / "s", n=1, size=128, seed=6)[0])
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CT, EXPLICIT_LE)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="LDCT_DENOISE")
    assert assoc.is_established
    context_id = assoc.accepted_contexts[0].context_id
    command = Dataset()
    command.CommandGroupLength = 0
    command.AffectedSOPClassUID = CT
    command.CommandField = 0x0001
    command.MessageID = 1
    command.Priority = 0
    command.CommandDataSetType = 0x0000
    command.AffectedSOPInstanceUID = ds.SOPInstanceUID
    command.CommandGroupLength = len(encode(command, True, True)) - 12
    data_set = encode(ds, False, True)  # Explicit VR Little Endian, no file meta
    first_half = data_set[: len(data_set) // 2]  # the header (judged: acceptable) and some pixels
    socket = assoc.dul.socket
    socket.send(_p_data(context_id, 0x03, encode(command, True, True)))
    socket.send(_p_data(context_id, 0x00, first_half))  # data set, not the last fragment
    wait_for(lambda: len(node.temporary_files()) == 1, 10, "the partial data set's file")
    assoc.abort()
    wait_for(lambda: node.temporary_files() == [], 10, "the partial file to go")
    assert node.files() == {} and node.queue.known_paths() == set()


@pytest.mark.parametrize("ts", [EXPLICIT_LE, "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"])
def test_header_is_read_from_the_first_bytes_only_once_they_reach_the_pixel_data(
    tmp_path: Path, ts: str
) -> None:
    import warnings

    from pydicom.uid import UID

    from pacs_node.receive.header import read_header

    ds = pydicom.dcmread(make_series(tmp_path / "s", n=1, size=32, seed=7)[0])
    icon = Dataset()  # a nested Pixel Data ahead of the top-level one
    icon.Rows, icon.Columns, icon.BitsAllocated = 2, 2, 8
    icon.PixelData = b"\xe0\x7f\x10\x00"
    ds.IconImageSequence = [icon]
    uid = UID(ts)
    data = encode(ds, uid.is_implicit_VR, uid.is_little_endian)
    full = read_header(data, ts)
    assert full is not None and full[1] and full[0].SOPInstanceUID == ds.SOPInstanceUID
    pixel_tag_at = len(data) - len(ds.PixelData) - (8 if uid.is_implicit_VR else 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a short prefix must not warn (or truncate) in pydicom
        for cut in range(0, len(data), 7):
            early = read_header(data[:cut], ts, complete=False)
            if cut < pixel_tag_at + (8 if uid.is_implicit_VR else 12):  # its element header
                assert early is None, cut
            else:
                assert early is not None and early[1], cut
                assert early[0] == full[0]


@pytest.mark.parametrize("fragment", [1, 7, 4096, 1 << 20])
def test_an_instance_is_judged_while_it_arrives_whatever_the_fragment_size(
    tmp_path: Path, fragment: int
) -> None:
    from pacs_node.receive.filemeta import part10_header

    storage = Storage(tmp_path / "data")
    jobs = JobStore(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    jobs.migrate()
    try:
        ds = pydicom.dcmread(make_series(tmp_path / "s", n=1, size=64, seed=8)[0])
        data = encode(ds, False, True)
        incoming = Intake(storage, jobs).incoming(
            _Caller(), CT, EXPLICIT_LE, str(ds.SOPInstanceUID)
        )
        header_end = len(data) - len(ds.PixelData)
        for at in range(0, len(data), fragment):
            incoming.write(memoryview(data)[at : at + fragment])
            if at + fragment >= header_end:  # judged as soon as the pixel data's header is in
                assert incoming.accepted is not None and incoming.head is None, at
        assert incoming.finish() == 0
        (stored,) = storage.received_dir.glob("*/*.dcm")
        assert stored.read_bytes() == part10_header(CT, ds.SOPInstanceUID, EXPLICIT_LE) + data
        assert storage.tmp_dir.exists() and list(storage.tmp_dir.iterdir()) == []
    finally:
        jobs.dispose()


class _Caller:
    """Stands in for the association in Intake.incoming (its requestor's title and address)."""

    class requestor:
        ae_title = "STORESCU"
        address = "127.0.0.1"
