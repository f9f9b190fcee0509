import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sampletok.history import HistoryIndex, fetch_reference


@st.composite
def logs(draw):
    n = draw(st.integers(0, 60))
    users = draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
    ts = draw(st.lists(st.integers(0, 12), min_size=n, max_size=n))  # few values: many equal timestamps
    q = draw(st.integers(1, 20))
    q_users = draw(st.lists(st.integers(0, 6), min_size=q, max_size=q))  # 5, 6: unknown users
    q_ts = draw(st.lists(st.integers(-2, 15), min_size=q, max_size=q))
    n_hist = draw(st.integers(0, 8))
    delays = draw(st.lists(st.integers(0, 5), min_size=0, max_size=2))
    return (
        np.array(users, dtype=np.int64),
        np.array(ts, dtype=np.int64),
        np.array(q_users),
        np.array(q_ts),
        n_hist,
        delays,
    )


@settings(max_examples=300, deadline=None)
@given(logs())
def test_fast_fetch_equals_reference_and_never_leaks(case):
    user, ts, qu, qt, n, delays = case
    if len(user) == 0:
        user, ts = np.array([0]), np.array([0])
    fast = HistoryIndex(user, ts, delays).fetch(qu, qt, n)
    ref = fetch_reference(user, ts, delays, qu, qt, n)
    np.testing.assert_array_equal(fast.rows, ref.rows)
    np.testing.assert_array_equal(fast.mask, ref.mask)
    np.testing.assert_array_equal(fast.gap, ref.gap)
    np.testing.assert_array_equal(fast.response_mask, ref.response_mask)
    np.testing.assert_array_equal(fast.n_past, ref.n_past)
    # no leakage: every returned row belongs to the user and is strictly earlier
    r = fast.rows[fast.mask]
    req_u = np.broadcast_to(qu[:, None], fast.rows.shape)[fast.mask]
    req_t = np.broadcast_to(qt[:, None], fast.rows.shape)[fast.mask]
    assert np.all(ts[r] < req_t) and np.all(user[r] == req_u)
    # a label is visible only when ts + delay < request time
    for k, d in enumerate(delays):
        assert np.all(
            ts[fast.rows[fast.response_mask[:, :, k]]] + d
            < np.broadcast_to(qt[:, None], fast.rows.shape)[fast.response_mask[:, :, k]]
        )


def test_equal_timestamps_are_invisible_and_order_is_most_recent_last():
    idx = HistoryIndex(np.array([7, 7, 7, 7]), np.array([5, 1, 5, 3]))
    h = idx.fetch(np.array([7, 7]), np.array([5, 6]), 3)
    assert h.rows.tolist() == [[-1, 1, 3], [3, 0, 2]]  # request at 5 never sees rows at 5
    assert h.gap.tolist() == [[0, 4, 2], [3, 1, 1]]
    assert idx.count_before(np.array([7]), np.array([5])).tolist() == [2]


def test_loaders_over_one_dataset_share_one_stacked_copy(synth_prepared):
    """A run's train, valid and test loaders gather from one read-only copy of the columns, not one each."""
    from sampletok.data.batches import BatchLoader

    a = BatchLoader(synth_prepared, synth_prepared.rows("train"), 64, hist_len=5)
    b = BatchLoader(synth_prepared, synth_prepared.rows("test"), 64, hist_len=5, shuffle=True)
    assert a._cat is b._cat and a._seq_multi is b._seq_multi
    assert not a._cat.flags.writeable
    rows = synth_prepared.rows("test")[:16]
    np.testing.assert_array_equal(a.build(rows).cat.numpy(), b.build(rows).cat.numpy())


def test_a_memory_mapped_dataset_stacks_its_columns_on_disk(synth_prepared, monkeypatch, tmp_path):
    """A memory-mapped dataset's loader gathers from stacked files written once under the dataset folder
    (chunk by chunk, published whole), and builds the same batches as the in-memory dataset."""
    import dataclasses
    import shutil

    from sampletok.data import batches
    from sampletok.data.batches import BatchLoader
    from sampletok.data.dataset import PreparedDataset

    monkeypatch.setattr(batches, "STACK_CHUNK_ROWS", 1000)  # several chunks, the last one partial
    root = tmp_path / "ds"
    shutil.copytree(synth_prepared.root, root)
    mapped = PreparedDataset(root)
    assert mapped.n_rows % 1000 and mapped.n_rows > 2000
    loader = BatchLoader(mapped, mapped.rows("train"), 64, hist_len=6, history_samples=True)
    assert isinstance(loader._cat, np.memmap) and isinstance(loader._seq_multi, np.memmap)
    (folder,) = [p for p in (root / "stacked").iterdir() if p.is_dir()]
    assert (folder / "complete").exists() and not folder.name.startswith(".")  # no staging folder left
    rows = np.r_[mapped.rows("train")[:40], mapped.rows("test")[-40:]]
    want = BatchLoader(synth_prepared, rows, 64, hist_len=6, history_samples=True).build(rows)
    got = loader.build(rows)
    for f in dataclasses.fields(got):
        a, b = getattr(got, f.name), getattr(want, f.name)
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f.name)
    for f in ("cat", "multi", "num", "hist_cat", "hist_multi"):
        assert torch.equal(getattr(got.history_samples, f), getattr(want.history_samples, f)), f
    # a second process (a new dataset object) reads the published files instead of writing them again
    stamp = (folder / "cat.npy").stat().st_mtime_ns
    BatchLoader(PreparedDataset(root), rows, 64, hist_len=6)
    assert (folder / "cat.npy").stat().st_mtime_ns == stamp


def _stack_in_a_process(root: str) -> int:
    from sampletok.data.batches import BatchLoader
    from sampletok.data.dataset import PreparedDataset

    ds = PreparedDataset(root)
    loader = BatchLoader(ds, ds.rows("train"), 64, hist_len=4)
    return int(np.asarray(loader._cat, np.int64).sum() + np.asarray(loader._seq_multi, np.int64).sum())


def test_concurrent_loaders_write_the_stacked_columns_once(synth_prepared, tmp_path):
    """Two processes opening one memory-mapped dataset at once: one writes the stacked files, the other waits
    and maps them; both read complete columns."""
    import multiprocessing
    import shutil

    from sampletok.data.batches import BatchLoader

    root = tmp_path / "ds"
    shutil.copytree(synth_prepared.root, root)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        sums = pool.map(_stack_in_a_process, [str(root)] * 2)
    want = BatchLoader(synth_prepared, synth_prepared.rows("train"), 64, hist_len=4)
    expected = int(want._cat.astype(np.int64).sum() + want._seq_multi.astype(np.int64).sum())
    assert sums == [expected, expected]
    assert len([p for p in (root / "stacked").iterdir() if p.is_dir()]) == 1
