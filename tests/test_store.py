import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sampletok.errors import StoreError
from sampletok.history import HistoryIndex
from sampletok.store import LocalTokenStore


def _instances(n, seed=0, dim=4):
    rng = np.random.default_rng(seed)
    return dict(
        instance_id=np.arange(n) + 1000 * seed,
        user=rng.integers(0, 5, n),
        ts=rng.integers(0, 30, n),
        payload=rng.normal(size=(n, dim)).astype(np.float32),
        responses=rng.integers(0, 2, (n, 1)).astype(float),
        known_at=None,
    )


def _make(tmp_path, dtype="float32", name="s"):
    """An empty committed store (later appends commit one version each)."""
    store = LocalTokenStore.create(
        tmp_path / name, producer="p1", payload_shape=(4,), response_names=["click"], dtype=dtype
    )
    store.commit()
    return store


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 80), st.integers(0, 1000), st.integers(1, 6), st.integers(1, 3))
def test_fetch_matches_history_index_and_never_leaks(tmp_path_factory, n, seed, length, n_appends):
    store = _make(tmp_path_factory.mktemp("s"))
    parts = [_instances(n, seed + k) for k in range(n_appends)]
    for p in parts:
        p["known_at"] = p["ts"][:, None] + 3  # label known 3 s after the event
        store.append(**p)
    allc = {k: np.concatenate([p[k] for p in parts]) for k in ("user", "ts", "payload", "responses")}
    rng = np.random.default_rng(seed)
    qu, qt = rng.integers(0, 6, 20), rng.integers(-1, 35, 20)
    got = store.fetch(qu, qt, length)
    assert store._cache is None  # read from the segments' memory maps: no column concatenated into RAM
    ref = HistoryIndex(allc["user"], allc["ts"], [3]).fetch(qu, qt, length)
    np.testing.assert_array_equal(got.mask, ref.mask)
    np.testing.assert_array_equal(got.gap, ref.gap)
    np.testing.assert_array_equal(got.response_mask, ref.response_mask)
    safe = np.where(ref.mask, ref.rows, 0)
    np.testing.assert_allclose(got.payload, np.where(ref.mask[..., None], allc["payload"][safe], 0))
    np.testing.assert_allclose(got.responses, np.where(ref.response_mask, allc["responses"][safe], 0))
    assert np.all(allc["ts"][got.seq[got.mask]] < np.broadcast_to(qt[:, None], got.seq.shape)[got.mask])


@pytest.mark.parametrize("dtype, tol, nbytes", [("float32", 0, 16), ("float16", 2e-3, 8), ("int8", 2e-2, 8)])
def test_payload_dtypes_round_trip(tmp_path, dtype, tol, nbytes):
    store = _make(tmp_path, dtype)
    inst = _instances(50)
    store.append(**inst)
    f = store.fetch(inst["user"], inst["ts"] + 100, 60)
    order = f.seq[f.mask]
    got = f.payload[f.mask]
    scale = np.abs(inst["payload"]).max()
    assert np.max(np.abs(got - inst["payload"][order])) <= tol * scale + 1e-7
    assert store.bytes_per_instance()["payload"] == nbytes


def test_compaction_keeps_content_and_reopen(tmp_path):
    store = _make(tmp_path)
    for k in range(3):
        store.append(**_instances(30, k))
    before = store.fetch(np.arange(5), np.full(5, 40), 10)
    store.compact()
    assert len(store.manifest["segments"]) == 1
    again = LocalTokenStore.open(tmp_path / "s")
    after = again.fetch(np.arange(5), np.full(5, 40), 10)
    np.testing.assert_array_equal(before.payload, after.payload)
    assert len(again) == 90


def test_producer_mismatch_is_refused(tmp_path):
    _make(tmp_path).append(**_instances(5))
    with pytest.raises(StoreError, match="written by producer p1, but the model expects p2"):
        LocalTokenStore.open(tmp_path / "s", expect_producer="p2")
    with pytest.raises(StoreError, match="not a token store"):
        LocalTokenStore.open(tmp_path / "nothing")
    with pytest.raises(StoreError, match="payload shape"):
        LocalTokenStore.open(tmp_path / "s").append(**{**_instances(5), "payload": np.zeros((5, 3))})


def test_killed_writer_leaves_previous_state_readable(tmp_path):
    store = _make(tmp_path)
    store.append(**_instances(20))
    before = store.fetch(np.arange(5), np.full(5, 40), 8)
    script = textwrap.dedent(f"""
        import numpy as np
        import os
        from sampletok.store import LocalTokenStore
        s = LocalTokenStore.open({str(tmp_path / "s")!r}, on_before_commit=lambda: os._exit(137))
        s.append(instance_id=np.arange(10) + 10**6, user=np.zeros(10, int), ts=np.arange(10),
                 payload=np.ones((10, 4)), responses=np.ones((10, 1)))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == 137, proc.stderr.decode()  # really killed between segment write and commit
    reopened = LocalTokenStore.open(tmp_path / "s")
    after = reopened.fetch(np.arange(5), np.full(5, 40), 8)
    np.testing.assert_array_equal(before.payload, after.payload)
    assert len(reopened) == 20
    reopened.gc(min_age_s=0)  # the orphan segment of the dead writer is removed
    assert sorted(p.name for p in (tmp_path / "s" / "segments").iterdir()) == reopened.manifest["segments"]


def test_killed_writer_with_sigkill_mid_append(tmp_path):
    """A writer SIGKILLed at an arbitrary moment during many appends leaves a consistent store."""
    store = _make(tmp_path)
    store.append(**_instances(10))
    script = textwrap.dedent(f"""
        import numpy as np
        from sampletok.store import LocalTokenStore
        s = LocalTokenStore.open({str(tmp_path / "s")!r})
        print("ready", flush=True)
        for k in range(100000):
            s.append(instance_id=np.arange(50) + 10**6 + 50 * k, user=np.zeros(50, int), ts=np.arange(50),
                     payload=np.ones((50, 4)), responses=np.ones((50, 1)))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"ready"
    import time

    time.sleep(0.5)
    proc.kill()
    proc.wait()
    reopened = LocalTokenStore.open(tmp_path / "s")
    n = len(reopened)
    assert n >= 10 and (n - 10) % 50 == 0  # whole appends only
    reopened.fetch(np.zeros(3, int), np.full(3, 100), 5)


def test_a_store_is_readable_only_once_complete(tmp_path):
    """An export that dies before its commit leaves no store (or the previous one), never a partial one."""
    staged = LocalTokenStore.create(
        tmp_path / "s", producer="p1", payload_shape=(4,), response_names=["click"], dtype="float32"
    )
    staged.append(**_instances(20))
    with pytest.raises(StoreError, match="not a token store"):
        LocalTokenStore.open(tmp_path / "s")
    staged.commit()
    assert len(LocalTokenStore.open(tmp_path / "s")) == 20


def test_overwrite_keeps_the_old_store_until_the_new_one_is_committed(tmp_path):
    old = _make(tmp_path)
    old.append(**_instances(20))
    reader = LocalTokenStore.open(tmp_path / "s")
    before = reader.fetch(np.arange(5), np.full(5, 40), 8)
    new = LocalTokenStore.create(
        tmp_path / "s", producer="p2", payload_shape=(4,), response_names=["click"], dtype="float32", overwrite=True
    )
    new.append(**_instances(7, seed=5))
    # not committed yet: a new reader still gets the old store, whole
    assert LocalTokenStore.open(tmp_path / "s").meta["producer"] == "p1"
    assert len(LocalTokenStore.open(tmp_path / "s")) == 20
    new.commit()
    now = LocalTokenStore.open(tmp_path / "s")
    assert now.meta["producer"] == "p2" and len(now) == 7
    # the reader that opened the old version keeps reading it, though its segments are gone from disk
    np.testing.assert_array_equal(reader.fetch(np.arange(5), np.full(5, 40), 8).payload, before.payload)


def test_reader_keeps_its_version_through_commits_and_compaction(tmp_path):
    store = _make(tmp_path)
    for k in range(3):
        store.append(**_instances(30, k))
    before = LocalTokenStore.open(tmp_path / "s").fetch(np.arange(5), np.full(5, 40), 10)
    reader = LocalTokenStore.open(tmp_path / "s")  # opened, not read yet
    writer = LocalTokenStore.open(tmp_path / "s")
    writer.append(**_instances(30, 9))
    writer.compact()
    assert len(os.listdir(tmp_path / "s" / "segments")) == 1
    after = reader.fetch(np.arange(5), np.full(5, 40), 10)
    np.testing.assert_array_equal(before.payload, after.payload)
    assert len(reader) == 90 and len(LocalTokenStore.open(tmp_path / "s")) == 120


def test_concurrent_writer_processes_lose_no_append(tmp_path):
    """Two processes appending to the same store at once: every append lands, each in its own version."""
    _make(tmp_path)
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        from sampletok.store import LocalTokenStore
        w = int(sys.argv[1])
        s = LocalTokenStore.open({str(tmp_path / "s")!r})
        for k in range(15):
            s.append(instance_id=np.arange(3) + 10**6 * w + 10 * k, user=np.full(3, w), ts=np.arange(3) + 10 * k,
                     payload=np.full((3, 4), float(w)), responses=np.ones((3, 1)))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(w)]) for w in (1, 2)]
    assert [p.wait() for p in procs] == [0, 0]
    final = LocalTokenStore.open(tmp_path / "s")
    assert final.version == 31  # 1 (create) + 30 appends, none overwritten by the other writer
    ids = np.sort(np.asarray(final.columns()["instance_id"]))
    want = np.sort(np.concatenate([np.arange(3) + 10**6 * w + 10 * k for w in (1, 2) for k in range(15)]))
    np.testing.assert_array_equal(ids, want)


def test_an_appender_never_writes_into_a_store_that_replaced_its_own(tmp_path):
    old = _make(tmp_path)
    old.append(**_instances(5))
    new = LocalTokenStore.create(
        tmp_path / "s", producer="p2", payload_shape=(4,), response_names=["click"], dtype="float32", overwrite=True
    )
    new.append(**_instances(3, seed=2))
    new.commit()
    with pytest.raises(StoreError, match="replaced since it was opened"):
        old.append(**_instances(5, seed=3))
    assert len(LocalTokenStore.open(tmp_path / "s")) == 3


def test_two_creates_without_overwrite_do_not_replace_each_other(tmp_path):
    a = LocalTokenStore.create(tmp_path / "s", producer="a", payload_shape=(4,), response_names=["click"])
    b = LocalTokenStore.create(tmp_path / "s", producer="b", payload_shape=(4,), response_names=["click"])
    a.commit()
    with pytest.raises(StoreError, match="another writer created a token store here first"):
        b.commit()
    assert LocalTokenStore.open(tmp_path / "s").meta["producer"] == "a"


def test_a_missing_segment_is_an_error_not_a_smaller_store(tmp_path):
    import shutil

    store = _make(tmp_path)
    store.append(**_instances(10))
    store.append(**_instances(10, seed=1))
    shutil.rmtree(tmp_path / "s" / "segments" / store.manifest["segments"][0])
    with pytest.raises(StoreError, match="missing or incomplete"):
        LocalTokenStore.open(tmp_path / "s")


def test_gc_spares_the_young_segments_of_a_create_staging_beside_it(tmp_path):
    committed = _make(tmp_path)
    committed.append(**_instances(5))
    staging = LocalTokenStore.create(
        tmp_path / "s", producer="p1", payload_shape=(4,), response_names=["click"], dtype="float32", overwrite=True
    )
    staging.append(**_instances(7, seed=4))
    LocalTokenStore.open(tmp_path / "s").gc()  # default min age: a just-written segment is not an orphan yet
    staging.commit()
    assert len(LocalTokenStore.open(tmp_path / "s")) == 7
