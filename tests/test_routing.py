"""Routing: rules alone, then with real peers (DCMTK storescu in; Orthanc over DIMSE and over
DICOMweb, and recording pynetdicom SCPs, out)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from pacs_node import config as config_mod
from pacs_node.route.rules import Facts, decide, is_own_output
from tests.conftest import BIN, make_series, wait_for
from tests.peers import Orthanc, RecordingSCP
from tests.test_worker import MECHANICS

CT = "1.2.840.10008.5.1.4.1.1.2"
SR = "1.2.840.10008.5.1.4.1.1.88.33"


def rules(toml: str) -> tuple[config_mod.RuleConfig, ...]:
    import tomllib

    cfg = config_mod.parse(tomllib.loads(toml), Path("/tmp/x.toml"))
    return cfg.rules


def header(**values: Any) -> Dataset:
    ds = Dataset()
    for key, value in {"Modality": "CT", "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"]}.items():
        setattr(ds, key, value)
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


def facts(ds: Dataset | None, sop_class: str = CT, caller: str = "CT1", peer: str = "10.2.0.7"):
    return Facts(caller, peer, sop_class, ds)


# -- the rules alone -------------------------------------------------------------------------------
def test_default_rules_denoise_ct_pass_localizers_and_refuse_the_rest() -> None:
    r = config_mod.Config().rules
    assert decide(r, facts(header()), ("default",)).action == "denoise"
    scout = header(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    assert decide(r, facts(scout), ("default",)).action == "pass"
    sr = decide(r, facts(header(Modality="SR"), SR), ("default",))
    assert sr.action == "refuse" and "no rule" in sr.note


def test_each_matcher_and_first_match_wins() -> None:
    r = rules(
        """
[[destination]]
name = "neuro"
[[destination]]
name = "body"
[[rule]]
name = "thin head"
series_description = "(?i)head"
slice_thickness = [0.5, 1.5]
destinations = ["neuro"]
action = "denoise"
[[rule]]
name = "from the CT room"
calling_ae_title = "CT1"
peer = "10.2.0.0/24"
kernel = "B30f"
body_part = "abdomen"
protocol_name = "^Abd"
rows = 512
columns = 512
image_type = ["AXIAL", "PRIMARY"]
destinations = ["body"]
action = "denoise"
send_original = true
[[rule]]
name = "everything else"
action = "ignore"
"""
    )
    names = ("neuro", "body")
    head = header(SeriesDescription="HEAD 1mm", SliceThickness="1.0")
    assert decide(r, facts(head), names).destinations == ("neuro",)
    assert decide(
        r, facts(header(SeriesDescription="Head 5mm", SliceThickness=5)), names
    ).action == ("ignore")
    abdomen = header(
        ConvolutionKernel="B30f",
        BodyPartExamined="ABDOMEN",
        ProtocolName="Abdomen routine",
        Rows=512,
        Columns=512,
    )
    got = decide(r, facts(abdomen), names)
    assert (got.rule, got.destinations, got.send_original) == ("from the CT room", ("body",), True)
    for wrong in (
        facts(abdomen, caller="CT2"),
        facts(abdomen, peer="10.3.0.7"),
        facts(header(**{**{"Rows": 256}, **{k: abdomen.get(k) for k in ("ConvolutionKernel",)}})),
    ):
        assert decide(r, wrong, names).rule == "everything else"


def test_the_nodes_own_output_is_never_denoised_again(tmp_path: Path) -> None:
    from pacs_node.work.dicom_io import derive, read_hu

    src = pydicom.dcmread(make_series(tmp_path, n=1)[0])
    ours = derive(
        src,
        read_hu(src),
        model_version="abc",
        software_version="0",
        series_number_offset=1000,
        series_description_suffix=" (UNIT denoised)",
    )
    assert is_own_output(ours) and not is_own_output(src)
    default = config_mod.Config().rules
    assert decide(default, facts(src), ("default",)).action == "denoise"
    again = decide(default, facts(ours), ("default",))
    assert again.action == "refuse" and "own output" in again.note
    passing = rules(
        '[[rule]]\nname = "all"\naction = "denoise"\n[[rule]]\nname = "p"\naction = "pass"\n'
    )
    assert decide(passing, facts(ours), ("default",)).action == "pass"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[[rule]]\nname = "x"\naction = "pass"\ndestinations = ["nowhere"]\n', "rule[0]"),
        ('[[destination]]\nname = "a"\n[[destination]]\nname = "a"\n', "destination.name"),
        ('[[destination]]\nname = "w"\nkind = "dicomweb"\n', "destination[0]"),
        ('[[rule]]\nname = "x"\naction = "move"\n', "rule[0].action"),
        ('[[rule]]\nname = "x"\naction = "pass"\npeer = "10.2.0.0/33"\n', "rule[0].peer"),
        ('[node]\nallowed_calling_ae_titles = ["CT1@nowhere"]\n', "node.allowed_calling_ae_titles"),
    ],
)
def test_routing_configuration_errors_name_the_key(write_config, text: str, key: str) -> None:
    out = subprocess.run(
        [str(BIN / "pacs-node"), "check-config", "--config", str(write_config(text))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1 and key in lines[0], out.stderr


def test_the_single_destination_table_still_works(write_config) -> None:
    cfg = config_mod.load(write_config('[destination]\nae_title = "OLDPACS"\nport = 104\n'))
    assert [(d.name, d.ae_title, d.port) for d in cfg.destination] == [("default", "OLDPACS", 104)]
    assert [r.name for r in cfg.rules] == ["CT localizers pass through", "CT images denoised"]


# -- with real peers -------------------------------------------------------------------------------
def _dimse(name: str, port: int, aet: str = "PACS", backoff: float = 0.5) -> str:
    return (
        f'[[destination]]\nname = "{name}"\nae_title = "{aet}"\nport = {port}\n'
        f"retry_backoff_seconds = {backoff}\nretry_backoff_max_seconds = 2\nmax_attempts = 100\n"
        "timeout_seconds = 10\n"
    )


def _routing_config(destinations: str, rules_toml: str, checkpoint: Path, extra: str = "") -> str:
    return (
        "[queue]\nseries_quiet_seconds = 0.5\nheartbeat_seconds = 0.5\nstale_after_seconds = 5\n"
        f'[model]\ncheckpoint = "{checkpoint}"\nbatch_size = 8\n'
        f"{MECHANICS}{destinations}{rules_toml}{extra}"
    )


def _study(tmp_path: Path) -> tuple[list[Path], list[Path], Path]:
    """An axial series, a localizer and a dose report of one study."""
    axial = make_series(tmp_path / "axial", n=6, noise_sd=10, seed=2)
    first = pydicom.dcmread(axial[0])
    scout = pydicom.dcmread(axial[1])
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.SeriesInstanceUID, scout.SeriesNumber = generate_uid(), 1
    scout.SOPInstanceUID = scout.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    (tmp_path / "scout").mkdir()
    scout.save_as(tmp_path / "scout" / "1.dcm", enforce_file_format=True)
    sr = pydicom.dcmread(get_testdata_file("test-SR.dcm", download=False))
    sr.StudyInstanceUID = first.StudyInstanceUID
    sr.PatientID, sr.PatientName = first.PatientID, first.PatientName
    sr.SeriesInstanceUID = generate_uid()
    sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    (tmp_path / "sr").mkdir()
    sr.save_as(tmp_path / "sr" / "1.dcm", enforce_file_format=True)
    return axial, [tmp_path / "scout" / "1.dcm"], tmp_path / "sr" / "1.dcm"


def _dataset_bytes(data: bytes) -> bytes:
    """A Part 10 file's bytes after its File Meta Information (the data set as sent)."""
    assert data[128:132] == b"DICM"
    group_length = int.from_bytes(data[140:144], "little")  # (0002,0000) UL, explicit VR
    return data[144 + group_length :]


def test_a_whole_study_to_orthanc_over_dimse_and_dicomweb(
    tmp_path: Path, node_factory, tiny_checkpoint: Path
) -> None:
    """Axial series, localizer and dose SR in one association: the denoised axial series reaches
    both Orthancs (DIMSE and STOW-RS), the localizer and the SR reach the pass-through one byte
    for byte, nothing else is denoised, and the sender sees Success for every instance."""
    dimse = Orthanc(tmp_path / "a", aet="ARCHIVE").start()
    web = Orthanc(tmp_path / "b", aet="WEB", dicomweb=True).start()
    try:
        cfg = _routing_config(
            _dimse("archive", dimse.port, "ARCHIVE")
            + f'[[destination]]\nname = "web"\nkind = "dicomweb"\n'
            f'url = "http://127.0.0.1:{web.http}/dicom-web"\nretry_backoff_seconds = 0.5\n'
            "batch_size = 4\n",
            '[[rule]]\nname = "scouts"\nimage_type = ["LOCALIZER"]\naction = "pass"\n'
            'destinations = ["archive"]\n'
            f'[[rule]]\nname = "dose reports"\nmodality = "SR"\naction = "pass"\n'
            'destinations = ["archive"]\n'
            f'[[rule]]\nname = "axial"\nsop_class = "{CT}"\naction = "denoise"\n',
            tiny_checkpoint,
        )
        node = node_factory(cfg, workers=1).start()
        axial, scouts, sr = _study(tmp_path)
        res = node.storescu(*map(str, [*axial, *scouts, sr]))
        assert res.returncode == 0 and "Status" not in res.stderr, res.stderr
        wait_for(lambda: all(j["state"] == "done" for j in node.status()), 120, "all jobs done")
        jobs = {j["rule"]: j for j in node.status()}
        assert set(jobs) == {"scouts", "dose reports", "axial"}
        assert jobs["axial"]["action"] == "denoise" and jobs["scouts"]["action"] == "pass"
        assert jobs["axial"]["destinations"]["web"]["delivered"] == 6
        # the archive: 6 derived + the localizer + the SR; the web one: the 6 derived only
        assert dimse.instance_count() == 8 and web.instance_count() == 6
        for orthanc in (dimse, web):
            kinds = {
                orthanc.get(f"/instances/{i}/simplified-tags")["SeriesInstanceUID"]
                for i in orthanc.get("/instances")
            }
            assert pydicom.dcmread(axial[0]).SeriesInstanceUID not in kinds  # never the original
        stored_ids = dimse.by_sop_uid()
        for sent in (*scouts, sr):
            uid = str(pydicom.dcmread(sent).SOPInstanceUID)
            stored = dimse.get_bytes(f"/instances/{stored_ids[uid]}/file")
            assert _dataset_bytes(stored) == _dataset_bytes(sent.read_bytes())
    finally:
        dimse.stop()
        web.stop()


def test_rules_by_series_description_send_head_and_abdomen_apart(
    tmp_path: Path, node_factory, tiny_checkpoint: Path
) -> None:
    neuro, body = RecordingSCP(aet="NEURO").start(), RecordingSCP(aet="BODY").start()
    try:
        cfg = _routing_config(
            _dimse("neuro", neuro.port, "NEURO") + _dimse("body", body.port, "BODY"),
            '[[rule]]\nname = "head"\nseries_description = "(?i)head"\naction = "denoise"\n'
            'destinations = ["neuro"]\n'
            '[[rule]]\nname = "abdomen"\nseries_description = "(?i)abd"\naction = "denoise"\n'
            'destinations = ["body"]\n',
            tiny_checkpoint,
        )
        node = node_factory(cfg, workers=1).start()
        head = make_series(tmp_path / "h", n=4, seed=1, noise_sd=10)
        abdomen = make_series(tmp_path / "a", n=5, seed=2, noise_sd=10)
        for files, text in ((head, "HEAD routine"), (abdomen, "Abdomen portal venous")):
            for f in files:
                ds = pydicom.dcmread(f)
                ds.SeriesDescription = text
                ds.save_as(f)
        assert node.storescu(*map(str, head + abdomen)).returncode == 0
        wait_for(lambda: len(neuro.received) == 4 and len(body.received) == 5, 90, "deliveries")
        assert {d.SeriesDescription for d in neuro.received.values()} == {
            "HEAD routine (UNIT denoised)"
        }
        assert {d.SeriesDescription for d in body.received.values()} == {
            "Abdomen portal venous (UNIT denoised)"
        }
    finally:
        neuro.stop()
        body.stop()


def test_a_destination_down_holds_back_no_other(
    tmp_path: Path, node_factory, tiny_checkpoint: Path
) -> None:
    """One destination stopped for 30 s: the other gets everything at once, the stopped one
    everything once it is back, neither anything twice."""
    up, down = RecordingSCP(aet="UP").start(), RecordingSCP(aet="DOWN")
    try:
        cfg = _routing_config(
            _dimse("up", up.port, "UP") + _dimse("down", down.port, "DOWN", backoff=1),
            "",
            tiny_checkpoint,
        )
        node = node_factory(cfg, workers=1).start()
        t0 = time.monotonic()
        first = make_series(tmp_path / "1", n=6, seed=1, noise_sd=10)
        assert node.storescu(*map(str, first)).returncode == 0
        wait_for(lambda: len(up.received) == 6, 60, "the live destination")
        second = make_series(tmp_path / "2", n=4, seed=2, noise_sd=10)
        assert node.storescu(*map(str, second)).returncode == 0
        wait_for(lambda: len(up.received) == 10, 60, "the live destination, second series")
        assert time.monotonic() - t0 < 30, "the live destination waited for the dead one"
        job = node.status()[0]  # the second series: at the live one, waiting for the other
        assert job["destinations"]["up"] | {"attempts": 0, "last_error": None} == {
            "state": "delivered",
            "attempts": 0,
            "last_error": None,
            "delivered": 4,
            "pending": 0,
            "failed": 0,
        }
        assert job["destinations"]["down"]["pending"] == 4
        time.sleep(max(0.0, 30 - (time.monotonic() - t0)))
        down.start()
        wait_for(lambda: len(down.received) == 10, 90, "the destination back up")
        wait_for(lambda: all(j["state"] == "done" for j in node.status()), 60, "jobs done")
        assert up.calls == 10 and down.calls == 10  # nothing twice
    finally:
        up.stop()
        down.stop()


def test_a_bound_title_is_refused_from_another_address(tmp_path: Path, node_factory) -> None:
    from pynetdicom import AE

    node = node_factory('[[rule]]\nname = "all"\naction = "ignore"\n').start()
    node.config.write_text(
        node.config.read_text().replace(
            'allowed_calling_ae_titles = ["STORESCU", "SENDER1", "SENDER2"]',
            'allowed_calling_ae_titles = ["STORESCU", "CT1@127.0.0.2/32"]',
        )
    )
    node.stop()
    node.start()
    files = make_series(tmp_path / "s", n=2)
    wrong = node.storescu(*map(str, files), aet="CT1")  # from 127.0.0.1
    assert wrong.returncode != 0 and "Rejected" in wrong.stderr + wrong.stdout
    ae = AE("CT1")
    ae.add_requested_context(CT, "1.2.840.10008.1.2.1")
    assoc = ae.associate(
        "127.0.0.1", node.port, ae_title="LDCT_DENOISE", bind_address=("127.0.0.2", 0)
    )
    assert assoc.is_established
    assert assoc.send_c_store(files[0]).Status == 0  # ignored by the rule, answered Success
    assoc.release()
    log = node.log()
    assert "may call only from 127.0.0.2/32, not from 127.0.0.1" in log
    assert "ignored by rule 'all'" in log
