"""The Redis backend against a real redis-server: the same fetch as the local store (property test over random
appends, ties, delays and payload dtypes), staged creates, atomic concurrent appends from 8 processes, and
one-line errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sampletok.errors import StoreError
from sampletok.store import LocalTokenStore, TokenStore, open_store
from sampletok.store.redis import RedisTokenStore


def _url(base: str) -> str:
    return f"{base}?store=t{uuid.uuid4().hex[:8]}"


def _instances(n: int, seed: int, dim: int, dtype: str):
    rng = np.random.default_rng(seed)
    ts = rng.integers(0, 30, n)
    payload = rng.integers(0, 250, (n, dim)) if dtype == "uint8" else rng.normal(size=(n, dim))
    return dict(
        instance_id=np.arange(n) + 1000 * seed,
        user=rng.integers(0, 5, n),
        ts=ts,
        payload=payload,
        responses=rng.normal(size=(n, 2)),
        known_at=ts[:, None] + rng.integers(0, 8, (n, 2)),  # each response known some seconds later
    )


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 60),
    st.integers(0, 1000),
    st.integers(1, 7),
    st.integers(1, 3),
    st.sampled_from(["float32", "float16", "int8", "uint8"]),
    st.booleans(),
)
def test_redis_fetch_equals_the_local_store(redis_url, tmp_path_factory, n, seed, length, appends, dtype, staged):
    meta = dict(producer="p", payload_shape=(3,), response_names=["a", "b"], dtype=dtype, extra_meta={"kind": "x"})
    local = LocalTokenStore.create(tmp_path_factory.mktemp("s") / "s", **meta)
    remote = RedisTokenStore.create(_url(redis_url), **meta)
    if not staged:  # appends to a committed store commit one by one
        local.commit()
        remote.commit()
    for k in range(appends):
        part = _instances(n, seed + k, 3, dtype)
        local.append(**part)
        remote.append(**part)
    local.commit()
    remote.commit()
    rng = np.random.default_rng(seed)
    users, before = rng.integers(0, 6, 30), rng.integers(-1, 40, 30)
    want = local.fetch(users, before, length)
    got = open_store(remote.url).fetch(users, before, length)
    for field in ("payload", "responses", "response_mask", "mask", "gap", "seq"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
    codes = open_store(remote.url).fetch(users, before, length, dequantize=False)
    np.testing.assert_array_equal(codes.payload, local.fetch(users, before, length, dequantize=False).payload)


def test_staged_store_is_invisible_until_commit_and_overwrite_keeps_the_old(redis_url):
    url = _url(redis_url)
    meta = dict(producer="v1", payload_shape=(2,), response_names=["y"], dtype="float32")
    first = RedisTokenStore.create(url, **meta)
    first.append(np.array([1]), np.array([7]), np.array([5]), np.ones((1, 2)))
    with pytest.raises(StoreError, match="no token store"):
        RedisTokenStore.open(url)
    first.commit()
    with pytest.raises(StoreError, match="already exists"):
        RedisTokenStore.create(url, **meta)
    second = RedisTokenStore.create(url, **{**meta, "producer": "v2"}, overwrite=True)
    second.append(np.array([2]), np.array([7]), np.array([6]), np.full((1, 2), 2.0))
    reader = RedisTokenStore.open(url)
    assert reader.meta["producer"] == "v1"  # until the new version commits
    assert reader.fetch(np.array([7]), np.array([10]), 2).payload[0, -1].tolist() == [1.0, 1.0]
    second.commit()
    now = RedisTokenStore.open(url)
    assert now.meta["producer"] == "v2"
    assert now.fetch(np.array([7]), np.array([10]), 2).payload[0, -1].tolist() == [2.0, 2.0]
    assert isinstance(now, TokenStore)
    assert not list(now.client.scan_iter(match=f"{now.name}:{first.vid}:*"))  # the old version is gone
    with pytest.raises(StoreError, match="replaced since it was opened"):  # never an empty read of a dead version
        reader.fetch(np.array([7]), np.array([10]), 2)


def test_a_lost_store_is_an_error_never_an_empty_history(redis_url):
    """After a Redis restart without persistence (here: the store's keys deleted) a fetch and an append fail
    loudly instead of reading nothing and writing into a version no one will open."""
    url = _url(redis_url)
    store = RedisTokenStore.create(url, producer="p", payload_shape=(2,), response_names=["y"], dtype="float32")
    store.append(np.array([1]), np.array([7]), np.array([5]), np.ones((1, 2)))
    store.commit()
    reader = open_store(url)
    assert reader.fetch(np.array([7]), np.array([10]), 2).mask.sum() == 1
    keys = list(reader.client.scan_iter(match=f"{reader.name}:*"))
    reader.client.delete(*keys)
    with pytest.raises(StoreError, match="gone from the server"):
        reader.fetch(np.array([7]), np.array([10]), 2)
    with pytest.raises(StoreError, match="gone from the server"):
        reader.append(np.array([2]), np.array([7]), np.array([6]), np.ones((1, 2)))


def test_eight_concurrent_writers_lose_no_append(redis_url):
    url = _url(redis_url)
    store = RedisTokenStore.create(url, producer="p", payload_shape=(1,), response_names=[], dtype="float32")
    store.commit()
    code = textwrap.dedent(
        f"""
        import numpy as np, sys
        from sampletok.store.redis import RedisTokenStore
        w = int(sys.argv[1])
        s = RedisTokenStore.open({url!r})
        for k in range(25):
            iid = np.array([w * 1000 + k, w * 1000 + k + 500])
            s.append(iid, np.array([k % 3, (k + 1) % 3]), np.array([k, k]), iid[:, None].astype(float))
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(w)]) for w in range(8)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    f = RedisTokenStore.open(url).fetch(np.array([0, 1, 2]), np.array([10**6] * 3), 1000)
    got = sorted(f.payload[f.mask][:, 0].astype(int).tolist())
    want = sorted(w * 1000 + k + off for w in range(8) for k in range(25) for off in (0, 500))
    assert got == want  # 400 instances, each exactly once


def test_connection_errors_and_bad_appends_are_one_line():
    with pytest.raises(StoreError) as e:
        RedisTokenStore.open("redis://127.0.0.1:1/0?store=x")
    assert "redis://127.0.0.1:1/0?store=x: cannot reach the Redis server" in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_append_shape_is_one_line(redis_url):
    store = RedisTokenStore.create(_url(redis_url), producer="p", payload_shape=(4,), response_names=["y"])
    with pytest.raises(StoreError, match=r"payload shape \(2, 3\) is not \(2, 4\)"):
        store.append(np.array([1, 2]), np.array([1, 1]), np.array([1, 2]), np.zeros((2, 3)))


@pytest.mark.parametrize("dtype", ["float32", "int8", "uint8"])
def test_the_protocol_reads_meta_and_producer_the_same_on_both_backends(redis_url, tmp_path, dtype):
    meta = dict(producer="p", payload_shape=(3,), response_names=["a", "b"], dtype=dtype)
    local = LocalTokenStore.create(tmp_path / "s", **meta)
    remote = RedisTokenStore.create(_url(redis_url), **meta)
    assert not LocalTokenStore.exists(tmp_path / "s") and not RedisTokenStore.exists(remote.url)
    for k in range(3):  # three appends: the local store has three segments
        part = _instances(20, k, 3, dtype)
        local.append(**part)
        remote.append(**part)
    for store in (local, remote):
        store.update_meta(export_speed=12.5)
        store.commit()
    local, remote = LocalTokenStore.open(tmp_path / "s"), open_store(remote.url)
    assert LocalTokenStore.exists(local.root) and RedisTokenStore.exists(remote.url)
    assert local.meta["export_speed"] == remote.meta["export_speed"] == 12.5
    seq = np.array([59, 0, 21, 40, 7])
    for name in ("instance_id", "user", "ts", "payload", "responses", "known_at"):
        np.testing.assert_array_equal(remote.read(name), local.read(name), err_msg=name)
        np.testing.assert_array_equal(remote.read(name, seq), local.read(name)[seq], err_msg=name)
    for store in (local, remote):
        store.check_producer("p")
        with pytest.raises(StoreError, match="written by producer p, but the model expects q"):
            store.check_producer("q")
        with pytest.raises(StoreError, match="update_meta is for staged stores"):
            store.update_meta(x=1)


def test_a_store_of_the_older_format_names_the_fix(redis_url, tmp_path):
    import json

    local = LocalTokenStore.create(
        tmp_path / "s", producer="p", payload_shape=(2,), response_names=["y"], dtype="float32"
    )
    local.commit()
    current = (tmp_path / "s" / "CURRENT").read_text().strip()
    manifest_path = tmp_path / "s" / current
    manifest = json.loads(manifest_path.read_text())
    manifest["meta"]["format"] = 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="store format 1 is not 2 .*export the tokens again"):
        LocalTokenStore.open(tmp_path / "s")
