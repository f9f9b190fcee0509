"""Synthetic raw-sample logs: the embedded default (no download) and the scale benchmark.

Generative process (all vectorized NumPy; users are generated in independent blocks, so a 50M-row log streams
chunk by chunk with bounded memory and the same seed always gives the same rows):

1. **Items** (shared): latent ``v_i ~ N(0, I/k)``, a category (nearest of C centres), a brand, a base price
   and a Zipf popularity. With D domains the items are split evenly between domains.
2. **Users**: latent ``u_0 ~ N(0, I/k)`` drifting linearly to ``u_0 + drift`` over the horizon; category
   preferences ``softmax(3 · u_0 · centres)``; demographic fields derived from ``u_0`` with noise; an event count
   ``~ LogNormal``; and a hidden **context sensitivity**: for each of R regimes a vector ``phi[u, r, channel]``;
   the active regime changes at user-specific times. Only the user's *recent full samples* (channel + label)
   reveal the active regime: item IDs alone cannot, and a user-ID embedding learns only its average.
3. **Events**: time uniform on the horizon; domain; category from the user's preferences, item by popularity
   within it; context fields: hour, weekday, channel, device, a promotion flag that depends on (item, week),
   a price bucket (base price, promotion discount, noise), and the item's popularity at that moment
   (popularity × a seasonal factor).
4. **Labels**: ``p_click = sigmoid(b + 2.0 · u(t)·v_i + 0.6 · promo − 0.3 · price_z + 0.2 · evening
   + phi[u, regime(t), channel])``, ``click ~ Bernoulli(p_click)``; ``conversion`` only after a click, with
   ``p = sigmoid(−1 + 1.5 · u(t)·v_i)``, visible after a delay (default 3 days).
5. **Extra fields** up to ``n_fields`` in all: user/item attributes (noisy quantized projections of the
   latents), context noise fields, and cross fields (hashed user-attribute × item-category pairs).

``bayes_optimal_auc`` scores the true ``p_click`` on the test window: the best AUC any model can reach.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from sampletok.data.sources.files import RawChunk
from sampletok.schema import Schema

DAY = 86_400
BASE_FIELDS = [
    "user_id",
    "age",
    "gender",
    "city",
    "item_id",
    "category",
    "brand",
    "hour",
    "weekday",
    "channel",
    "device",
    "promo",
    "price_bucket",
    "item_pop",
    "domain",
]


class SyntheticConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    n_users: int = Field(2_000, ge=1)
    n_items: int = Field(2_000, ge=10)
    events_per_user: float = Field(80.0, gt=0, description="mean events per user (log-normal)")
    n_fields: int = Field(24, ge=len(BASE_FIELDS), le=600)
    days: int = Field(60, ge=1)
    latent_dim: int = Field(8, ge=1)
    categories: int = Field(16, ge=2)
    channels: int = Field(4, ge=2)
    regimes: int = Field(3, ge=1)
    regime_strength: float = Field(1.5, ge=0)
    domains: int = Field(1, ge=1)
    conversion_delay: int = Field(3 * DAY, ge=0)
    users_per_chunk: int = Field(2_000, ge=1)
    seed: int = 0

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()[:12]

    @property
    def extra_fields(self) -> dict[str, list[str]]:
        """Names of the extra fields by group, distributed user 30% / item 30% / context 20% / cross 20%."""
        n = self.n_fields - len(BASE_FIELDS)
        shares = {"user": 0.3, "item": 0.3, "context": 0.2, "cross": 0.2}
        counts = {g: int(n * s) for g, s in shares.items()}
        counts["user"] += n - sum(counts.values())
        return {g: [f"{g}_x{i}" for i in range(c)] for g, c in counts.items()}


def schema_for(cfg: SyntheticConfig) -> Schema:
    feats = [
        {"name": "user_id", "type": "categorical", "group": "user"},
        {"name": "age", "type": "categorical", "group": "user"},
        {"name": "gender", "type": "categorical", "group": "user"},
        {"name": "city", "type": "categorical", "group": "user"},
        {"name": "item_id", "type": "categorical", "group": "item"},
        {"name": "category", "type": "categorical", "group": "item"},
        {"name": "brand", "type": "categorical", "group": "item"},
        {"name": "hour", "type": "categorical", "group": "context"},
        {"name": "weekday", "type": "categorical", "group": "context"},
        {"name": "channel", "type": "categorical", "group": "context"},
        {"name": "device", "type": "categorical", "group": "context"},
        {"name": "promo", "type": "categorical", "group": "context"},
        {"name": "price_bucket", "type": "categorical", "group": "context"},
        {"name": "item_pop", "type": "numeric", "group": "context", "normalize": "log_standard"},
        {"name": "domain", "type": "categorical", "group": "context"},
    ]
    for group, names in cfg.extra_fields.items():
        feats += [{"name": n, "type": "categorical", "group": group} for n in names]
    return Schema.model_validate(
        {
            "name": f"synthetic-{cfg.fingerprint()}",
            "user": "user_key",
            "timestamp": "ts",
            "item": "item_id",
            "labels": [{"name": "click"}],
            "responses": [{"name": "conversion", "type": "binary", "delay": cfg.conversion_delay}],
            "features": feats,
            "sequence": {"fields": ["item_id", "category"], "max_len": 50},
        }
    )


class _World:
    """The shared part of the world (items, category centres, global effects)."""

    def __init__(self, cfg: SyntheticConfig):
        rng = np.random.default_rng([cfg.seed, 0])
        k, c = cfg.latent_dim, cfg.categories
        self.centres = rng.normal(size=(c, k)) / np.sqrt(k)
        self.v = rng.normal(size=(cfg.n_items, k)) / np.sqrt(k)
        self.item_cat = np.argmax(self.v @ self.centres.T, axis=1)
        self.item_domain = np.arange(cfg.n_items) % cfg.domains
        self.brand = rng.integers(0, max(cfg.n_items // 20, 2), cfg.n_items)
        self.base_price = rng.lognormal(3.0, 0.6, cfg.n_items)
        pop = 1.0 / np.arange(1, cfg.n_items + 1) ** 0.9
        self.pop = rng.permutation(pop)
        self.season_phase = rng.uniform(0, 2 * np.pi, cfg.n_items)
        # per (domain, category): items by popularity, as flat CDF rows for vectorized inverse sampling
        self.slot_items: list[np.ndarray] = []
        for d in range(cfg.domains):
            for cat in range(c):
                items = np.flatnonzero((self.item_domain == d) & (self.item_cat == cat))
                if len(items) == 0:  # an empty slot falls back to any item of the domain
                    items = np.flatnonzero(self.item_domain == d)
                self.slot_items.append(items)
        self.slot_cdf = [np.cumsum(self.pop[it]) / self.pop[it].sum() for it in self.slot_items]
        n_extra = sum(len(v) for v in cfg.extra_fields.values())
        self.extra_proj = rng.normal(size=(n_extra + 1, k))


def _unique_event_times(uid: np.ndarray, ts: np.ndarray, item: np.ndarray) -> np.ndarray:
    """Times with every repeat of an earlier (user, second, item) moved 1 s later, until none repeats.

    Derived instance ids hash (user, time, item), so a repeat would be a duplicate sample. Repeats are rare
    (dense logs: ~1,500 events per user over 60 days); logs without any are returned unchanged, bit for bit.
    Loops over collision rounds (usually one), not over samples.
    """
    ts = ts.copy()
    while True:
        order = np.lexsort((item, ts, uid))
        su, st, si = uid[order], ts[order], item[order]
        repeat = np.zeros(len(ts), dtype=bool)
        repeat[order[1:]] = (su[1:] == su[:-1]) & (st[1:] == st[:-1]) & (si[1:] == si[:-1])
        if not repeat.any():
            return ts
        ts[repeat] += 1


def _events_for_block(cfg: SyntheticConfig, world: _World, block: int) -> pl.DataFrame:
    """All events of users [block * users_per_chunk, ...) with their labels and true click probability."""
    u0_id = block * cfg.users_per_chunk
    n_u = min(cfg.users_per_chunk, cfg.n_users - u0_id)
    rng = np.random.default_rng([cfg.seed, 1, block])
    k, c, horizon = cfg.latent_dim, cfg.categories, cfg.days * DAY
    u0 = rng.normal(size=(n_u, k)) / np.sqrt(k)
    drift = rng.normal(size=(n_u, k)) * 0.5 / np.sqrt(k)
    cat_pref = np.exp(3.0 * u0 @ world.centres.T)
    cat_pref /= cat_pref.sum(1, keepdims=True)
    phi = rng.normal(size=(n_u, cfg.regimes, cfg.channels)) * cfg.regime_strength
    regime_period = rng.uniform(0.15, 0.5, n_u) * horizon
    regime_offset = rng.uniform(0, 1, n_u)
    chan_pref = rng.dirichlet(np.ones(cfg.channels), n_u)
    counts = np.maximum(1, rng.lognormal(np.log(cfg.events_per_user) - 0.32, 0.8, n_u).astype(np.int64))
    uid = np.repeat(np.arange(n_u), counts)
    n = len(uid)
    ts = rng.integers(0, horizon, n).astype(np.int64) + 1_700_000_000
    domain = rng.integers(0, cfg.domains, n)
    # category ~ user preference, item ~ popularity within (domain, category): inverse CDF, vectorized
    cat_cdf = np.cumsum(cat_pref, 1)
    cat = np.minimum((cat_cdf[uid] < rng.random(n)[:, None]).sum(1), c - 1)
    slot = domain * c + cat
    item = np.empty(n, dtype=np.int64)
    r = rng.random(n)
    for s in np.unique(slot):  # loop over (domain, category) slots, not samples
        m = slot == s
        item[m] = world.slot_items[s][
            np.minimum(np.searchsorted(world.slot_cdf[s], r[m]), len(world.slot_items[s]) - 1)
        ]
    ts = _unique_event_times(uid, ts, item)
    t_frac = (ts - 1_700_000_000) / horizon
    u_t = u0[uid] + drift[uid] * t_frac[:, None]
    affinity = np.einsum("nk,nk->n", u_t, world.v[item])
    hour = ((ts // 3600) % 24).astype(np.int64)
    weekday = ((ts // DAY) % 7).astype(np.int64)
    chan_cdf = np.cumsum(chan_pref, 1)
    channel = np.minimum((chan_cdf[uid] < rng.random(n)[:, None]).sum(1), cfg.channels - 1)
    device = rng.integers(0, 3, n)
    week = (ts - 1_700_000_000) // (7 * DAY)
    promo = ((item * 2654435761 + week * 40503) % 97 < 20).astype(np.int64)
    price = world.base_price[item] * np.where(promo == 1, 0.8, 1.0) * rng.lognormal(0, 0.1, n)
    price_z = (np.log(price) - 3.0) / 0.6
    price_bucket = np.clip(np.floor((price_z + 2.5) * 2), 0, 9).astype(np.int64)
    season = 1 + 0.5 * np.sin(2 * np.pi * t_frac * 4 + world.season_phase[item])
    item_pop = world.pop[item] * season * 1000
    regime = (np.floor(t_frac * horizon / regime_period[uid] + regime_offset[uid]) % cfg.regimes).astype(np.int64)
    evening = ((hour >= 18) & (hour <= 23)).astype(np.float64)
    logit = -0.3 + 2.0 * affinity + 0.6 * promo - 0.3 * price_z + 0.2 * evening + phi[uid, regime, channel]
    p_click = 1 / (1 + np.exp(-logit))
    click = (rng.random(n) < p_click).astype(np.int8)
    p_conv = 1 / (1 + np.exp(-(-1.0 + 1.5 * affinity)))
    conversion = (click * (rng.random(n) < p_conv)).astype(np.int8)
    age = np.clip(np.floor((u0[:, 0] * np.sqrt(k) + rng.normal(0, 0.5, n_u)) * 1.5 + 4), 0, 8).astype(np.int64)
    gender = (u0[:, 1] + rng.normal(0, 0.3, n_u) > 0).astype(np.int64)
    city = rng.integers(0, 50, n_u)
    cols = {
        "user_key": (uid + u0_id).astype(np.int64),
        "ts": ts,
        "click": click,
        "conversion": conversion,
        "user_id": (uid + u0_id).astype(np.int64),
        "age": age[uid],
        "gender": gender[uid],
        "city": city[uid],
        "item_id": item,
        "category": world.item_cat[item],
        "brand": world.brand[item],
        "hour": hour,
        "weekday": weekday,
        "channel": channel,
        "device": device,
        "promo": promo,
        "price_bucket": price_bucket,
        "item_pop": item_pop,
        "domain": domain,
    }
    j = 0
    for group, names in cfg.extra_fields.items():
        for name in names:
            w = world.extra_proj[j]
            j += 1
            if group == "user":
                vals = np.floor((u0 @ w) * np.sqrt(k) + rng.normal(0, 1, n_u)).astype(np.int64)[uid]
            elif group == "item":
                vals = np.floor((world.v @ w) * np.sqrt(k) * 2).astype(np.int64)[item]
            elif group == "context":
                vals = rng.integers(0, 8, n)
            else:
                vals = (age[uid] * 31 + world.item_cat[item] * (j + 7)) % 50
            cols[name] = np.clip(vals, -20, 20)
    df = pl.DataFrame(cols)
    # truth columns (dropped unless asked for): the click probability and the regime term alone
    return df.with_columns(pl.Series("_p_click", p_click), pl.Series("_regime_logit", phi[uid, regime, channel]))


class SyntheticSource:
    """A :class:`~sampletok.data.sources.files.RawSource` that generates rows block by block."""

    def __init__(self, cfg: SyntheticConfig, domain: int | None = None):
        self.cfg, self.domain = cfg, domain
        self.name = f"synthetic(seed={cfg.seed}, users={cfg.n_users}, fields={cfg.n_fields}" + (
            f", domain={domain})" if domain is not None else ")"
        )
        self._world: _World | None = None
        self.schema = schema_for(cfg)

    @property
    def world(self) -> _World:
        if self._world is None:
            self._world = _World(self.cfg)
        return self._world

    @property
    def columns(self) -> list[str]:
        return self.schema.raw_columns

    def n_blocks(self) -> int:
        return (self.cfg.n_users + self.cfg.users_per_chunk - 1) // self.cfg.users_per_chunk

    def frames(self, with_truth: bool = False) -> Iterator[pl.DataFrame]:
        for b in range(self.n_blocks()):
            df = _events_for_block(self.cfg, self.world, b)
            if self.domain is not None:
                df = df.filter(pl.col("domain") == self.domain)
            yield df if with_truth else df.drop("_p_click", "_regime_logit")

    def iter_chunks(self, columns: Sequence[str] | None = None) -> Iterator[RawChunk]:
        row = 1
        for df in self.frames():
            if columns is not None:
                df = df.select(columns)
            yield RawChunk(self.name, row, df)
            row += df.height

    def fingerprint(self) -> str:
        return f"synthetic:{self.cfg.fingerprint()}:{self.domain}"

    def to_frame(self, with_truth: bool = False) -> pl.DataFrame:
        return pl.concat(list(self.frames(with_truth)))


def generate_source(cfg: SyntheticConfig, domain: int | None = None) -> tuple[SyntheticSource, Schema]:
    src = SyntheticSource(cfg, domain)
    return src, src.schema


def bayes_optimal_auc(cfg: SyntheticConfig, split=None, domain: int | None = None) -> dict[str, float]:
    """AUC, GAUC and LogLoss of the true click probability on the test window of the given split.

    Also ``auc_without_regime``: the AUC of the true probability with the regime term removed, i.e. of an oracle
    that knows every static effect (affinity, promotion, price, hour) but not the user's current context
    sensitivity, which only the user's recent full samples reveal; and ``auc_regime_only`` for that term alone.
    """
    from sampletok.data.dataset import SplitSpec, assign_splits
    from sampletok.train.metrics import auc, gauc, logloss

    df = SyntheticSource(cfg, domain).to_frame(with_truth=True)
    code = assign_splits(df.get_column("ts").to_numpy(), split or SplitSpec())
    test = df.filter(pl.Series(code == 2))
    y, p = test.get_column("click").to_numpy(), test.get_column("_p_click").to_numpy()
    regime = test.get_column("_regime_logit").to_numpy()
    logit = np.log(p) - np.log1p(-p)
    return {
        "auc": auc(y, p),
        "gauc": gauc(y, p, test.get_column("user_key").to_numpy()),
        "logloss": logloss(y, p),
        "auc_without_regime": auc(y, logit - regime),
        "auc_regime_only": auc(y, regime),
        "n_test": int(len(y)),
    }
