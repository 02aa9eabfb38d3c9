"""The etcd client against a real etcd: revisions, create and compare-and-swap, prefixes,
leases that lapse, watches from a revision, and the error a caller sees when etcd is gone."""

import json
import os
import threading
import time
import urllib.request

import pytest

from tests.procs import wait_until
from trainer.elastic.etcd import Etcd, EtcdRequestError, EtcdUnavailable, WatchEvent, start_etcd

WAIT_S = 5.0  # a watch event or a state change on a loopback etcd comes far sooner


@pytest.fixture
def lone_server(tmp_path):
    """An etcd of the test's own, for tests that stop it or compact its history."""
    running = start_etcd(tmp_path / "etcd")
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def etcd(etcd_server):
    return Etcd(etcd_server.endpoint, timeout=5.0)


@pytest.fixture
def prefix(request):
    return f"/test/{request.node.name}/"


@pytest.mark.timeout(30)
def test_put_returns_the_revision_a_get_reports(etcd, prefix):
    key = prefix + "spec"
    assert etcd.get(key) is None
    first = etcd.put(key, "v1")
    assert etcd.get(key) == (b"v1", first)
    second = etcd.put(key.encode(), b"\x00\xffbinary")  # bytes keys and values work alike
    assert second > first
    assert etcd.get(key) == (b"\x00\xffbinary", second)
    assert etcd.revision() >= second


@pytest.mark.timeout(30)
def test_create_writes_only_an_absent_key(etcd, prefix):
    key = prefix + "spec"
    assert etcd.create(key, "first")
    assert not etcd.create(key, "second")
    assert etcd.get(key)[0] == b"first"


@pytest.mark.timeout(30)
def test_compare_and_swap_with_a_stale_revision_loses(etcd, prefix):
    key = prefix + "status"
    assert etcd.compare_and_swap(key, "created", 0)  # 0: must not exist yet
    assert not etcd.compare_and_swap(key, "again", 0)
    _, seen = etcd.get(key)
    # Two writers read the same revision; the first swap wins, the second finds it stale.
    assert etcd.compare_and_swap(key, "running", seen)
    assert not etcd.compare_and_swap(key, "failed", seen)
    value, now = etcd.get(key)
    assert value == b"running" and now > seen


@pytest.mark.timeout(30)
def test_prefix_reads_and_deletes_stay_inside_the_prefix(etcd, prefix):
    for name in ("b", "a", "c/d"):
        etcd.put(prefix + "jobs/" + name, name)
    etcd.put(prefix + "jobsx", "a sibling that only shares characters")
    listed = etcd.get_prefix(prefix + "jobs/")
    assert [(k, v) for k, v, _ in listed] == [
        (prefix + "jobs/a", b"a"),
        (prefix + "jobs/b", b"b"),
        (prefix + "jobs/c/d", b"c/d"),
    ]
    assert all(etcd.get(key)[1] == revision for key, _, revision in listed)
    assert etcd.delete(prefix + "jobs/a")
    assert not etcd.delete(prefix + "jobs/a")
    assert etcd.delete_prefix(prefix + "jobs/") == 2
    assert etcd.get_prefix(prefix + "jobs/") == []
    assert etcd.get(prefix + "jobsx") is not None


@pytest.mark.timeout(60)
def test_a_kept_lease_holds_its_key_and_a_dropped_one_lets_it_lapse(etcd, prefix):
    key = prefix + "heartbeat"
    lease = etcd.lease(2)
    etcd.put(key, "alive", lease=lease)
    keeper = lease.keep_alive(interval=0.5)
    try:
        # Refreshed, the key outlives twice its TTL.
        past_ttl = time.monotonic() + 2 * lease.ttl
        while time.monotonic() < past_ttl:
            assert etcd.get(key) is not None, "the key lapsed although its lease was refreshed"
            time.sleep(0.2)
        assert not keeper.expired
    finally:
        keeper.stop()
    took = wait_until(lambda: etcd.get(key) is None, 15, "the key's lapse after its lease")
    assert took < lease.ttl + 3
    assert lease.refresh() == 0  # etcd reports the lease gone


@pytest.mark.timeout(30)
def test_revoking_a_lease_deletes_its_keys_at_once(etcd, prefix):
    lease = etcd.lease(60)
    etcd.put(prefix + "a", "1", lease=lease)
    etcd.put(prefix + "b", "2", lease=lease)
    lease.revoke()
    assert etcd.get_prefix(prefix) == []
    lease.revoke()  # revoking a lease that is gone is not an error
    with pytest.raises(EtcdRequestError, match="lease not found"):
        etcd.put(prefix + "c", "3", lease=lease)


@pytest.mark.timeout(30)
def test_a_chosen_lease_id_is_granted_once_while_it_lives(etcd):
    lease = etcd.lease(30, lease_id=0x5EED)
    try:
        assert lease.id == 0x5EED
        with pytest.raises(EtcdRequestError, match="lease already exists"):
            etcd.lease(30, lease_id=0x5EED)
    finally:
        lease.revoke()
    etcd.lease(30, lease_id=0x5EED).revoke()  # free again once revoked


@pytest.mark.timeout(30)
def test_a_watch_replays_from_its_start_revision_then_follows_puts_and_deletes(etcd, prefix):
    etcd.put(prefix + "before", "ignored")  # older than the start revision
    start = etcd.put(prefix + "a", "1")
    events, cancel = etcd.watch_prefix(prefix, start_revision=start)
    try:
        second = etcd.put(prefix + "b", "2")
        etcd.put("/elsewhere/" + prefix, "not under the prefix")
        gone = etcd.put(prefix + "a", "1b") + 1
        etcd.delete(prefix + "a")
        seen = [events.next_event(WAIT_S) for _ in range(4)]
        assert seen == [
            WatchEvent("put", prefix + "a", b"1", start),
            WatchEvent("put", prefix + "b", b"2", second),
            WatchEvent("put", prefix + "a", b"1b", gone - 1),
            WatchEvent("delete", prefix + "a", b"", gone),
        ]
        assert events.next_event(0.2) is None  # nothing else happened under the prefix
    finally:
        cancel()
    assert list(events) == []  # cancelled: iteration ends at once
    cancel()  # idempotent


@pytest.mark.timeout(30)
def test_a_watch_can_be_cancelled_from_another_thread_while_a_consumer_waits(etcd, prefix):
    events, cancel = etcd.watch_prefix(prefix)
    started = time.monotonic()
    timer = threading.Timer(0.3, cancel)
    timer.start()
    try:
        assert list(events) == []  # blocks until the cancel, then ends
    finally:
        timer.cancel()
    assert time.monotonic() - started < WAIT_S


@pytest.mark.timeout(60)
def test_a_watch_from_a_compacted_revision_is_refused(lone_server):
    etcd = Etcd(lone_server.endpoint)
    old = etcd.put("/k", "1")
    now = etcd.put("/k", "2")
    compact = urllib.request.Request(
        f"http://{lone_server.endpoint}/v3/kv/compaction",
        data=json.dumps({"revision": now}).encode(),
        method="POST",
    )
    urllib.request.urlopen(compact, timeout=5).close()  # raises on an HTTP error
    events, cancel = etcd.watch_prefix("/k", start_revision=old)
    try:
        with pytest.raises(EtcdRequestError, match=r"refused watching /k: .*compacted"):
            next(events)
    finally:
        cancel()


@pytest.mark.timeout(60)
def test_a_stopped_etcd_gives_one_clear_error_naming_endpoint_and_action(lone_server):
    etcd = Etcd(lone_server.endpoint, timeout=2.0)
    etcd.put("/megamoe/jobs/x/spec", "v")
    events, cancel = etcd.watch_prefix("/megamoe/jobs/")
    lone_server.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(lone_server.pid, 0)  # stopped and reaped
    where = f"etcd at {lone_server.endpoint} unreachable while"
    try:
        with pytest.raises(EtcdUnavailable, match=f"{where} watching /megamoe/jobs/"):
            next(events)  # an open watch learns it too
    finally:
        cancel()
    with pytest.raises(EtcdUnavailable, match=f"{where} reading /megamoe/jobs/x/spec: .+"):
        etcd.get("/megamoe/jobs/x/spec")
    with pytest.raises(EtcdUnavailable, match=f"{where} writing /megamoe/jobs/x/cancel"):
        etcd.put("/megamoe/jobs/x/cancel", "1")
    with pytest.raises(EtcdUnavailable, match=f"{where} updating /megamoe/jobs/x/status"):
        etcd.compare_and_swap("/megamoe/jobs/x/status", "s", 3)
    with pytest.raises(EtcdUnavailable, match=f"{where} watching /megamoe/"):
        etcd.watch_prefix("/megamoe/")
    with pytest.raises(EtcdUnavailable, match=f"{where} granting a lease"):
        etcd.lease(5)


@pytest.mark.timeout(30)
def test_endpoints_with_and_without_a_scheme_reach_the_same_etcd(etcd_server, prefix):
    Etcd(etcd_server.endpoint).put(prefix + "k", "v")
    assert Etcd(f"http://{etcd_server.endpoint}/").get(prefix + "k")[0] == b"v"
    for bad in ("", "unix:///tmp/etcd.sock", "127.0.0.1:notaport", "http://h:1/v3"):
        with pytest.raises(ValueError, match="must look like host:port"):
            Etcd(bad)


@pytest.mark.timeout(10)
def test_start_etcd_leaves_its_log_in_the_data_dir(etcd_server):
    assert etcd_server.log_path.exists() and etcd_server.log_path.stat().st_size > 0
