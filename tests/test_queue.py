"""The job table, against SQLite and a real PostgreSQL (the ``database_url`` fixture)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from pacs_node.jobs import TRANSITIONS, InstanceState, JobState, JobStore, LostClaim
from pacs_node.jobs.schema import metadata


def _queue(url: str) -> JobStore:
    q = JobStore(url)
    q.migrate()
    return q


def test_migrations_match_the_models(database_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    q = _queue(database_url)
    q.migrate()  # idempotent
    with q.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    q = _queue(f"sqlite:///{tmp_path}/q.sqlite")
    with q.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 60000


def test_quiet_series_are_claimed_and_late_instances_join_the_open_job(database_url: str) -> None:
    q = _queue(database_url)
    job = q.record_instance(
        sop_uid="1.2.3.1", series_uid="1.2.3", study_uid="1.2", path="a", now=100
    )
    assert (
        q.record_instance(sop_uid="1.2.3.2", series_uid="1.2.3", study_uid="1.2", path="b", now=105)
        == job
    )
    assert q.claim("w", 10, now=114) is None  # not quiet yet
    claim = q.claim("w", 10, now=115)
    assert claim is not None and claim.job_id == job
    assert q.list_jobs()[0].state == JobState.RUNNING
    q.release(claim)  # shutting down: receiving again (claimed once complete), not counted
    assert (q.list_jobs()[0].state, q.list_jobs()[0].attempts) == (JobState.RECEIVING, 0)
    # a late instance joins the same job
    assert (
        q.record_instance(sop_uid="1.2.3.3", series_uid="1.2.3", study_uid="1.2", path="c", now=120)
        == job
    )
    row = q.list_jobs()[0]
    assert row.state == JobState.RECEIVING and row.received == 3
    with q.engine.begin() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM jobs")).scalar() == 1


@pytest.mark.parametrize("start", list(JobState))
def test_every_state_change_follows_the_map(tmp_path: Path, start: JobState) -> None:
    """From each state, the store's own statements move a job to exactly the states the map
    allows, and match no row for any other."""
    from pacs_node.jobs import queries
    from pacs_node.jobs.schema import HELD, InvalidTransition

    q = _queue(f"sqlite:///{tmp_path}/map.sqlite")
    q.record_instance(sop_uid="1.9.1.1", series_uid="1.9.1", study_uid="1.9", path="a", now=0)
    for to in JobState:
        with q.engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE jobs SET state = :s, worker = 'w', next_attempt_at = 0"),
                {"s": start.value},
            )
            try:
                if start in HELD:
                    stmt = queries.held(1, "w", to)
                else:
                    stmt = sa.update(queries.jobs).where(queries.move(to)).values(state=to.value)
            except InvalidTransition:
                assert to not in TRANSITIONS[start] or start in HELD
                continue
            moved = conn.execute(stmt).rowcount
        assert bool(moved) == (to in TRANSITIONS[start]), (start, to)
    # and the map itself: finished jobs never reopen except by retry; receiving is reached by a
    # ready job getting a new instance, or a running one parked before its series is complete
    assert TRANSITIONS[JobState.DONE] == frozenset()
    assert [s for s, t in TRANSITIONS.items() if JobState.RECEIVING in t] == [
        JobState.READY,
        JobState.RUNNING,
    ]


def test_concurrent_first_instances_open_one_job(database_url: str) -> None:
    q = _queue(database_url)
    ids: list[int] = []

    def record(k: int) -> None:
        ids.append(
            q.record_instance(
                sop_uid=f"1.2.9.{k}", series_uid="1.2.9", study_uid="1.2", path=str(k)
            )
        )

    threads = [threading.Thread(target=record, args=(k,)) for k in range(1, 13)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1
    assert q.list_jobs()[0].received == 12


def test_each_job_is_claimed_once_under_contention(database_url: str) -> None:
    q = _queue(database_url)
    for s in range(1, 21):
        q.record_instance(
            sop_uid=f"1.3.{s}.1", series_uid=f"1.3.{s}", study_uid="1.3", path=f"p{s}", now=0
        )
    claimed: list[int] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        while True:
            c = q.claim(f"w{n}", 1)
            if c is None:
                return
            with lock:
                claimed.append(c.job_id)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted({j.id for j in q.list_jobs()})
    assert all(j.state == JobState.RUNNING and j.attempts == 1 for j in q.list_jobs())


def test_reaper_requeues_stale_work_and_the_old_worker_loses_its_claim(database_url: str) -> None:
    q = _queue(database_url)
    q.record_instance(sop_uid="1.4.1.1", series_uid="1.4.1", study_uid="1.4", path="x", now=0)
    old = q.claim("old", 1)
    assert old is not None
    assert q.reap(stale_after=60) == 0
    with q.engine.begin() as conn:
        conn.execute(sa.text("UPDATE jobs SET heartbeat_at = heartbeat_at - 1000"))
    assert q.reap(stale_after=60) == 1
    new = q.claim("new", 1)
    assert new is not None and new.job_id == old.job_id and new.attempts == 2
    try:
        q.heartbeat(old)
        raise AssertionError("the old worker still holds the job")
    except LostClaim:
        pass
    q.mark_denoised(new, [(1, "2.25.1", "d")], "v1")
    q.start_forwarding(new)
    sent = q.pending_deliveries(new, "default")
    assert [f for _, f in sent] == ["d"]
    q.mark_sent(new, [i for i, _ in sent])
    q.destination_done(new, "default")
    assert q.settle(new) == (JobState.DONE, 0.0)
    row = q.list_jobs()[0]
    assert (row.state, row.delivered, row.model_version) == ("done", 1, "v1")


def test_finish_goes_back_to_ready_when_instances_arrived_meanwhile(database_url: str) -> None:
    q = _queue(database_url)
    q.record_instance(sop_uid="1.5.1.1", series_uid="1.5.1", study_uid="1.5", path="a", now=0)
    c = q.claim("w", 1)
    assert c is not None
    q.record_instance(sop_uid="1.5.1.2", series_uid="1.5.1", study_uid="1.5", path="b")
    assert len(q.pending_instances(c, InstanceState.RECEIVED)) == 2
    q.mark_denoised(c, [(1, "2.25.1", "d1")], "v")
    q.start_forwarding(c)
    q.mark_sent(c, [i for i, _ in q.pending_deliveries(c, "default")])
    q.destination_done(c, "default")
    assert q.settle(c)[0] == JobState.READY
    row = q.list_jobs()[0]
    assert (row.received, row.delivered) == (2, 1)


def test_each_destination_is_delivered_and_retried_on_its_own(database_url: str) -> None:
    q = _queue(database_url)
    for k in (1, 2):
        q.record_instance(
            sop_uid=f"1.7.1.{k}",
            series_uid="1.7.1",
            study_uid="1.7",
            path=f"in{k}",
            now=0,
            destinations=("pacs", "archive"),
            send_original=True,
        )
    c = q.claim("w", 1)
    assert c is not None and c.destinations == ("pacs", "archive") and c.send_original
    q.mark_denoised(c, [(1, "2.25.1", "out1"), (2, "2.25.2", "out2")], "v")
    q.start_forwarding(c)
    assert sorted(n for n, _ in q.due_destinations(c)) == ["archive", "pacs"]
    # derived and original, per instance, for each destination
    assert sorted(f for _, f in q.pending_deliveries(c, "pacs")) == ["in1", "in2", "out1", "out2"]
    q.mark_sent(c, [i for i, _ in q.pending_deliveries(c, "pacs")])
    q.destination_done(c, "pacs")
    assert q.destination_failed(c, "archive", "refused", delay=30, max_attempts=2) == "pending"
    state, due = q.settle(c)
    assert state == JobState.READY and due > 0
    row = q.list_jobs()[0]
    assert row.destinations["pacs"]["delivered"] == 4 and row.destinations["pacs"]["pending"] == 0
    assert row.destinations["archive"]["pending"] == 4 and "refused" in str(row.last_error)
    report = q.destination_report()
    assert report["pacs"]["delivered"] == 4 and report["archive"]["last_error"] == "refused"
    # the next try: only the archive is due, and it gives up after its max_attempts
    c = q.claim("w", 1, now=due + 1)
    assert c is not None
    q.start_forwarding(c)
    assert [n for n, _ in q.due_destinations(c, now=due + 1)] == ["archive"]
    assert q.pending_deliveries(c, "pacs") == []
    assert q.destination_failed(c, "archive", "refused again", delay=0, max_attempts=2) == "failed"
    assert q.settle(c)[0] == JobState.FAILED
    row = q.list_jobs()[0]
    assert row.destinations["archive"]["failed"] == 4 and row.delivered == 0
    # pacs-node retry --destination archive: only the archive is tried again
    assert "no destination" in str(q.retry(row.id, "nowhere"))
    assert q.retry(row.id, "archive") is None
    c = q.claim("w", 1)
    assert c is not None
    q.start_forwarding(c)
    assert [n for n, _ in q.due_destinations(c)] == ["archive"]
    q.mark_sent(c, [i for i, _ in q.pending_deliveries(c, "archive")])
    q.destination_done(c, "archive")
    assert q.settle(c)[0] == JobState.DONE
    assert q.list_jobs()[0].delivered == 2


def test_a_pass_job_sends_the_originals(database_url: str) -> None:
    q = _queue(database_url)
    q.record_instance(
        sop_uid="1.8.1.1", series_uid="1.8.1", study_uid="1.8", path="sr", now=0, action="pass"
    )
    c = q.claim("w", 1)
    assert c is not None and c.action == "pass"
    q.start_forwarding(c)
    assert [f for _, f in q.pending_deliveries(c, "default")] == ["sr"]
    q.mark_sent(c, [i for i, _ in q.pending_deliveries(c, "default")])
    q.destination_done(c, "default")
    assert q.settle(c)[0] == JobState.DONE
    assert q.list_jobs()[0].delivered == 1


def test_failed_job_retry_and_new_round(database_url: str) -> None:
    q = _queue(database_url)
    q.record_instance(sop_uid="1.6.1.1", series_uid="1.6.1", study_uid="1.6", path="a", now=0)
    c = q.claim("w", 1)
    assert c is not None
    assert q.defer(c, "destination down", delay=0, max_attempts=1) == JobState.FAILED
    q.record_instance(sop_uid="1.6.1.2", series_uid="1.6.1", study_uid="1.6", path="b")
    rows = q.list_jobs()
    assert [(r.round, r.state) for r in rows] == [(2, "receiving"), (1, "failed")]
    assert "open job" in str(q.retry(rows[1].id))
    assert "not failed" in str(q.retry(rows[0].id))
    with q.engine.begin() as conn:  # the new round finishes
        conn.execute(sa.text(f"UPDATE jobs SET state='done' WHERE id={rows[0].id}"))
    assert q.retry(rows[1].id) is None
    assert q.list_jobs(job_id=rows[1].id)[0].state == JobState.READY
    assert "does not exist" in str(q.retry(999))


def test_migration_carries_jobs_of_the_one_destination_over(tmp_path: Path) -> None:
    """A job table from before routing (revision 0001): upgraded, a delivered job counts as
    delivered at "default" and a job that was forwarding has what it had left pending there."""
    from alembic import command
    from alembic.config import Config as AlembicConfig

    url = f"sqlite:///{tmp_path}/old.sqlite"
    q = JobStore(url)
    cfg = AlembicConfig()
    cfg.set_main_option(
        "script_location", str(Path(__file__).parents[1] / "pacs_node/jobs/migrations")
    )
    with q.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
    with q.engine.begin() as conn:
        for job, state in ((1, "done"), (2, "forwarding")):
            conn.execute(
                sa.text(
                    "INSERT INTO jobs (id, series_uid, study_uid, round, state, created_at, "
                    "updated_at, last_instance_at, attempts, next_attempt_at, flagged) "
                    f"VALUES ({job}, '1.2.{job}', '1.2', 1, '{state}', 0, 0, 0, 0, 0, 0)"
                )
            )
        rows = [(1, 1, "delivered"), (2, 2, "delivered"), (3, 2, "denoised")]
        for iid, job, state in rows:
            conn.execute(
                sa.text(
                    "INSERT INTO instances (id, job_id, sop_instance_uid, series_uid, path, state, "
                    "received_at, updated_at, derived_path) VALUES "
                    f"({iid}, {job}, '1.2.{job}.{iid}', '1.2.{job}', 'in{iid}', '{state}', 0, 0, "
                    f"'out{iid}')"
                )
            )
    q.migrate()
    jobs = {j.id: j for j in q.list_jobs()}
    assert jobs[1].destinations["default"] | {"attempts": 0} == {
        "state": "delivered",
        "attempts": 0,
        "last_error": None,
        "delivered": 1,
        "pending": 0,
        "failed": 0,
    }
    assert jobs[2].destinations["default"]["delivered"] == 1
    assert jobs[2].destinations["default"]["pending"] == 1
    assert jobs[2].action == "denoise" and jobs[2].state == "forwarding"


def test_a_series_is_claimed_early_to_denoise_and_complete_on_release(database_url: str) -> None:
    from pacs_node.jobs.queries import Completion

    q = _queue(database_url)
    for k in range(20):
        q.record_instance(
            sop_uid=f"1.9.2.{k}", series_uid="1.9.2", study_uid="1.9", path=f"{k}", now=100
        )
    on_release = Completion(quiet_seconds=10, on_release=True, grace_seconds=1)
    assert q.claim("w", on_release, now=100.5) is None  # neither quiet nor released
    c = q.claim("w", on_release, now=100.5, early_chunk=16)  # but 20 wait to be denoised
    assert c is not None and not q.is_complete(c, on_release, now=100.5)
    q.mark_denoised(c, [(k + 1, f"2.25.{k}", f"d{k}") for k in range(20)], "v", '{"regions": 3}')
    q.release(c)  # parked: what has arrived is denoised
    assert q.claim("w", on_release, now=100.6, early_chunk=16) is None  # nothing waits now
    q.mark_released(["1.9.2"], now=100.7)  # the sender released its association
    assert q.claim("w", on_release, now=100.9) is None  # the grace has not passed
    c = q.claim("w", on_release, now=101.2)
    assert c is not None and q.is_complete(c, on_release, now=101.2)
    assert c.tally == '{"regions": 3}'  # the gate's figures so far come with the claim
    assert not c.judged  # denoised while it arrived, but the gate has yet to judge the series
    # quiet alone does not know about releases; an instance after the release undoes it
    assert not q.is_complete(c, Completion(10), now=101.2)
    q.record_instance(sop_uid="1.9.2.99", series_uid="1.9.2", study_uid="1.9", path="x", now=101.3)
    assert not q.is_complete(c, on_release, now=103)


def test_a_claim_says_whether_the_gate_has_judged_the_series(database_url: str) -> None:
    """What decides whether a reclaimed job is judged again: the gate's recorded figures."""
    q = _queue(database_url)
    q.record_instance(sop_uid="1.9.3.1", series_uid="1.9.3", study_uid="1.9", path="a", now=100)
    c = q.claim("w", 10, now=200)
    assert c is not None and not c.judged
    q.defer(c, "destination busy", 0, 5)  # a retryable error before the gate
    c = q.claim("w", 10)
    assert c is not None and not c.judged
    q.record_quality(c, '{"regions": 1}', flagged=False)
    q.defer(c, "destination busy", 0, 5)  # judged, then the destination failed
    c = q.claim("w", 10)
    assert c is not None and c.judged


def test_a_series_first_slice_is_claimed_at_once_then_a_batch_at_a_time(database_url: str) -> None:
    """Denoising while receiving starts with a series' first slice; once part of it has been
    denoised, a parked series is claimed again when a batch waits (or it is complete)."""
    from pacs_node.jobs.queries import Completion

    q = _queue(database_url)
    quiet = Completion(quiet_seconds=10)

    def arrive(k: int, now: float) -> None:
        q.record_instance(
            sop_uid=f"1.9.4.{k}", series_uid="1.9.4", study_uid="1.9", path=f"{k}", now=now
        )

    arrive(1, 100)
    assert q.claim("w", quiet, now=100.1) is None  # without early claims: only once quiet
    c = q.claim("w", quiet, now=100.1, early_chunk=8)
    assert c is not None and c.tally is None
    q.mark_denoised(c, [(1, "2.25.1", "d1")], "v", '{"regions": 1}')
    q.release(c)
    for k in range(2, 9):
        arrive(k, 100.2)
    assert q.claim("w", quiet, now=100.3, early_chunk=8) is None  # 7 wait: less than a batch
    arrive(9, 100.4)
    c = q.claim("w", quiet, now=100.5, early_chunk=8)
    assert c is not None and c.tally == '{"regions": 1}'
