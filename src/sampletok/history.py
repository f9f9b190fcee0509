"""The leakage-safe history index: the only way any model or tokenizer sees the past.

Rows are sorted once by (user, timestamp, row id) into a CSR layout. ``fetch`` answers, for a batch of
requests ``(user, request_ts)``, the row ids of the user's last ``n`` rows with ``ts < request_ts`` (strict:
an event at the same second is never visible), right-aligned (most recent last), with a mask, the time gaps
and a per-response availability mask (a response with delay ``d`` is visible only when
``ts + d < request_ts``; one with a per-row known-at time ``k`` only when ``k < request_ts``).

The fast path is one ``np.searchsorted`` over a composite (user, ts) key plus one gather; ``fetch_reference``
is the plain per-request loop it is property-tested against.

Example:
    >>> import numpy as np
    >>> idx = HistoryIndex(user=np.array([0, 0, 1, 0]), ts=np.array([10, 20, 5, 20]))
    >>> h = idx.fetch(np.array([0]), np.array([20]), hist_len=3)
    >>> h.rows.tolist(), h.mask.tolist()
    ([[-1, -1, 0]], [[False, False, True]])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sampletok.errors import DataError


@dataclass
class History:
    """Result of :meth:`HistoryIndex.fetch` for B requests and length n (right-aligned, most recent last)."""

    rows: np.ndarray  # [B, n] int64 row ids, -1 where padded
    mask: np.ndarray  # [B, n] bool, True where a real past row
    gap: np.ndarray  # [B, n] float32 request_ts - ts(row), 0 where padded
    response_mask: np.ndarray  # [B, n, R] bool, True where that response was known before the request
    n_past: np.ndarray  # [B] int64 number of real rows


class HistoryIndex:
    """Per-user CSR over time-sorted rows.

    Args:
        user: [N] integer user key per row (any ints; equality is all that matters).
        ts: [N] int64 timestamps.
        response_delay: per-response availability delays (same unit as ts); a response of a past row is
            visible to a request at t only when ``ts + delay < t``.
        known_at: {response index: [N] int64 time it became known} for responses whose availability is a
            column (their delay is ignored); visible only when ``known_at < t``.
    """

    def __init__(
        self,
        user: np.ndarray,
        ts: np.ndarray,
        response_delay: list[int] | np.ndarray | None = None,
        known_at: dict[int, np.ndarray] | None = None,
    ):
        user = np.asarray(user, dtype=np.int64)
        ts = np.asarray(ts, dtype=np.int64)
        if user.shape != ts.shape or user.ndim != 1:
            raise ValueError("user and ts must be 1-d arrays of the same length")
        self.n_rows = len(ts)
        # sort by (user, ts); lexsort is stable, so ties keep row order (no row-number key: 8 bytes a row less)
        self.order = np.lexsort((ts, user)).astype(np.int64, copy=False)
        sorted_user = user[self.order]
        self.sorted_ts = ts[self.order]
        self.ts = ts
        self.response_delay = np.asarray(response_delay if response_delay is not None else [], dtype=np.int64)
        self.known_at = {k: np.asarray(v, dtype=np.int64) for k, v in (known_at or {}).items()}
        # composite key (user rank, ts) → one sorted int64 array, so a batch of lookups is one searchsorted. The
        # rows are sorted by user already, so users and ranks need no sort; kept: order, sorted_ts and _key
        # (24 bytes a row) and the per-user arrays
        boundary = np.r_[True, sorted_user[1:] != sorted_user[:-1]] if self.n_rows else np.zeros(0, bool)
        starts = np.flatnonzero(boundary)
        self._users = sorted_user[starts]
        user_rank = np.cumsum(boundary) - 1
        del boundary, sorted_user
        self._ts_min = int(ts.min()) if self.n_rows else 0
        ts_span = (int(ts.max()) - self._ts_min + 2) if self.n_rows else 2
        if (len(self._users) + 1) * ts_span >= 2**62:
            raise DataError(
                "timestamps",
                f"span {ts_span - 2} × {len(self._users)} users is too large for the "
                "history index (must stay below 2^62); rescale the timestamp column (e.g. to seconds)",
            )
        self._span = ts_span
        self._key = user_rank.astype(np.int64, copy=False) * ts_span + (self.sorted_ts - self._ts_min)
        del user_rank
        self._user_start = starts

    def _positions(self, users: np.ndarray, request_ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start of the user's segment, end = first position with ts >= request_ts), in sorted order."""
        users = np.asarray(users, dtype=np.int64)
        request_ts = np.asarray(request_ts, dtype=np.int64)
        rank = np.searchsorted(self._users, users)
        rank_c = np.minimum(rank, max(len(self._users) - 1, 0))
        known = (
            (rank < len(self._users)) & (self._users[rank_c] == users)
            if len(self._users)
            else np.zeros(len(users), dtype=bool)
        )
        rel = np.clip(request_ts - self._ts_min, 0, self._span - 1)
        end = np.searchsorted(self._key, rank_c * self._span + rel, side="left")
        start = self._user_start[rank_c] if len(self._users) else np.zeros(len(users), dtype=np.int64)
        end = np.where(known, end, start)
        return start, end

    def fetch(self, users: np.ndarray, request_ts: np.ndarray, hist_len: int) -> History:
        """Last ``hist_len`` rows of each user strictly before each request time."""
        start, end = self._positions(users, request_ts)
        n_past = np.minimum(end - start, hist_len)
        b = len(end)
        req = np.asarray(request_ts, dtype=np.int64)
        # output position j (0..n-1) holds sorted position end - hist_len + j when that is >= end - n_past
        offs = np.arange(hist_len, dtype=np.int64) - hist_len
        mask = offs[None, :] >= -n_past[:, None]
        if self.n_rows == 0:
            zeros = np.zeros((b, hist_len), np.float32)
            return History(
                np.full((b, hist_len), -1, np.int64),
                mask,
                zeros,
                np.zeros((b, hist_len, len(self.response_delay)), bool),
                n_past,
            )
        pos = end[:, None] + offs[None, :]
        np.maximum(pos, 0, out=pos)
        rows = self.order[pos]
        row_ts = self.sorted_ts[pos]
        pad = ~mask
        rows[pad] = -1
        gap = (req[:, None] - row_ts).astype(np.float32)
        gap[pad] = 0
        response_mask = np.empty((b, hist_len, len(self.response_delay)), dtype=bool)
        for k, d in enumerate(self.response_delay):  # a few responses, not samples
            if k in self.known_at:
                response_mask[:, :, k] = mask & (self.known_at[k][np.maximum(rows, 0)] < req[:, None])
            else:  # valid rows already satisfy ts < request; a delay d > 0 also needs ts < request - d
                response_mask[:, :, k] = mask if d <= 0 else mask & (row_ts < (req - d)[:, None])
        return History(rows=rows, mask=mask, gap=gap, response_mask=response_mask, n_past=n_past)

    def count_before(self, users: np.ndarray, request_ts: np.ndarray) -> np.ndarray:
        """How many rows each user has strictly before each request time."""
        start, end = self._positions(users, request_ts)
        return end - start


def fetch_reference(
    user: np.ndarray,
    ts: np.ndarray,
    response_delay: list[int],
    users: np.ndarray,
    request_ts: np.ndarray,
    hist_len: int,
    known_at: dict[int, np.ndarray] | None = None,
) -> History:
    """Plain, obviously-correct loop over requests (the reference the fast path is tested against)."""
    user, ts, known_at = np.asarray(user), np.asarray(ts), known_at or {}
    b, n_labels = len(users), len(response_delay)
    rows = np.full((b, hist_len), -1, dtype=np.int64)
    mask = np.zeros((b, hist_len), dtype=bool)
    gap = np.zeros((b, hist_len), dtype=np.float32)
    response_mask = np.zeros((b, hist_len, n_labels), dtype=bool)
    n_past = np.zeros(b, dtype=np.int64)
    for i, (u, t) in enumerate(zip(users, request_ts, strict=True)):
        past = [r for r in range(len(ts)) if user[r] == u and ts[r] < t]
        past.sort(key=lambda r: (ts[r], r))
        past = past[-hist_len:] if hist_len else []
        n_past[i] = len(past)
        for j, r in enumerate(past):
            k = hist_len - len(past) + j
            rows[i, k], mask[i, k], gap[i, k] = r, True, t - ts[r]
            for lab, d in enumerate(response_delay):
                known = known_at[lab][r] if lab in known_at else ts[r] + d
                response_mask[i, k, lab] = known < t
    return History(rows=rows, mask=mask, gap=gap, response_mask=response_mask, n_past=n_past)
