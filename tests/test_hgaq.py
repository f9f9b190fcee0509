import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sampletok.data.batches import BatchLoader
from sampletok.errors import ConfigError, StoreError
from sampletok.features import FeatureLayout
from sampletok.schema import Schema
from sampletok.tokenizers.hgaq import HGAQConfig, ResidualVQ, SampleTokenizer, assign_sub_tokens, code_dtype


def _schema(counts, pinned=None):
    feats = []
    for g, n in counts.items():
        feats += [{"name": f"{g}{i}", "type": "categorical", "group": g} for i in range(n)]
    for f in feats:
        if pinned and f["name"] in pinned:
            f["sub_token"] = pinned[f["name"]]
    return Schema.model_validate(
        {"name": "x", "user": "u", "timestamp": "t", "labels": [{"name": "y"}], "features": feats}
    )


def test_sub_token_arithmetic_and_pinning():
    s = _schema({"user": 7, "item": 3, "context": 0, "cross": 4})
    toks = assign_sub_tokens(s, 3)
    assert [len(t) for t in toks] == [3, 2, 2, 3, 2, 2]  # K = ceil(7/3)=3, ceil(3/3)=1, ceil(4/3)=2
    assert sorted(sum(toks, [])) == sorted(f.name for f in s.features)
    pinned = assign_sub_tokens(_schema({"user": 4}, {"user3": 0}), 2)
    assert "user3" in pinned[0] and [len(t) for t in pinned] == [2, 2]
    with pytest.raises(ConfigError, match="pinned to sub-token 5"):
        assign_sub_tokens(_schema({"user": 4}, {"user0": 5}), 2)


def _fit_rvq(levels, x, steps=30, **kw):
    torch.manual_seed(0)
    rvq = ResidualVQ(x.shape[1], HGAQConfig(levels=levels, codes=16, d0=x.shape[2], entropy_weight=0, **kw)).train()
    for _ in range(steps):
        rvq(x)
    rvq.eval()
    return rvq


def test_reconstruction_error_falls_with_levels():
    x = torch.randn(2000, 3, 8)
    errs = []
    for m in (1, 2, 3):
        rvq = _fit_rvq(m, x)
        _, codes, _ = rvq(x, update=False)
        errs.append(float((rvq.decode(codes) - x).pow(2).mean()))
    assert errs[0] > errs[1] > errs[2]
    assert errs[0] < float(x.pow(2).mean())  # better than coding nothing


@pytest.mark.parametrize("codes", [16, 300])  # packed-argmin and exact-min paths
def test_encode_returns_the_forward_codes(codes):
    torch.manual_seed(1)
    x = torch.randn(3000, 4, 8)
    rvq = ResidualVQ(4, HGAQConfig(levels=3, codes=codes, d0=8, entropy_weight=0)).train()
    for _ in range(3):
        rvq(x)
    rvq.eval()
    _, forward_codes, _ = rvq(x, update=False)
    assert torch.equal(rvq.encode(x), forward_codes)


def _train_with_dead_codes(x, **kw):
    """Half the codes moved far away and marked long unused, then 40 EMA steps; returns unused-code counts."""
    rvq = _fit_rvq(1, x, steps=1, **kw)
    with torch.no_grad():
        rvq.codebook[:, 0, 8:] = 100.0
        rvq.ema_sum[:, 0, 8:] = 100.0
        rvq.ema_count[:, 0, 8:] = 0.0
    rvq.train()
    for _ in range(40):
        rvq(x)
    _, codes, _ = rvq.eval()(x, update=False)
    return rvq.utilization(codes)["dead_codes"]


def test_dead_code_restart_revives_codes():
    x = torch.randn(1000, 2, 4)
    assert _train_with_dead_codes(x).max() <= 2
    assert _train_with_dead_codes(x, dead_threshold=0.0).min() >= 8  # without restart they stay dead


def test_tokenizer_encode_decode_round_trip_and_version(synth_prepared):
    layout = FeatureLayout.from_dataset(synth_prepared)
    tok = SampleTokenizer(layout, HGAQConfig(fields_per_token=4, codes=32))
    rows = synth_prepared.rows("train")[:512]
    batch = BatchLoader(synth_prepared, rows, 512).build(rows)
    q, codes, losses = tok(batch)  # training step: data init + EMA
    assert q.shape == (512, tok.n_tokens, 16) and codes.shape == (512, tok.n_tokens, 3)
    assert set(losses) == {"commit", "entropy", "aux_label"}
    sum(losses.values()).backward()
    assert tok.proj.grad is not None and tok.proj.grad.abs().sum() > 0
    stored = tok.encode(batch)
    assert stored.dtype == np.uint8
    tok.eval()
    with torch.no_grad():
        q_eval, _, _ = tok(batch)
    torch.testing.assert_close(tok.decode(stored, version=tok.rvq.version()), q_eval)
    with pytest.raises(StoreError, match="codebook version"):
        tok.decode(stored, version="0" * 16)
    assert code_dtype(256) == np.uint8 and code_dtype(257) == np.uint16


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 300),
    t=st.integers(1, 5),
    v=st.sampled_from([2, 3, 17, 40, 256, 300]),
    d=st.integers(1, 6),
    block=st.integers(1, 64),
    kernel=st.sampled_from(["auto", "packed", "matmul"]),
    seed=st.integers(0, 10_000),
)
def test_blocked_nearest_code_equals_the_literal_formula(n, t, v, d, block, kernel, seed):
    if kernel == "packed" and v > 256:
        kernel = "auto"  # packing needs V <= 256 (tested to be refused below)
    g = torch.Generator().manual_seed(seed)
    vq = ResidualVQ(t, HGAQConfig(levels=2, codes=v, d0=d, kernel=kernel))
    vq.codebook.copy_(torch.randn(t, 2, v, d, generator=g))
    r = torch.randn(n, t, d, generator=g)
    r[::3] = vq.codebook[torch.arange(t), 1, torch.randint(0, v, (len(r[::3]), t), generator=g)]  # distance 0
    fast, ref = vq._nearest(r, 1, block=block), vq._nearest_reference(r, 1)
    assert fast.shape == (n, t)

    # equal, except where two codes are equally near (then either is right; V ≤ 256 packs the index into the
    # distance's low bits, so "equally near" there means within 2^-15 relative)
    def dist(c):
        return (r - vq.codebook[torch.arange(t), 1, c]).pow(2).sum(-1)

    torch.testing.assert_close(dist(fast), dist(ref), atol=1e-4, rtol=1e-4)


def test_packed_kernel_refuses_codebooks_it_cannot_pack():
    vq = ResidualVQ(2, HGAQConfig(levels=1, codes=300, d0=4, kernel="packed"))
    with pytest.raises(ConfigError, match="hgaq.kernel packed needs codes <= 256"):
        vq.encode(torch.randn(5, 2, 4))


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (device checks run there)"),
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", ["auto", "matmul", "packed"])
def test_every_kernel_encodes_like_the_cpu_reference(kernel, device):
    g = torch.Generator().manual_seed(0)
    cpu = ResidualVQ(6, HGAQConfig(levels=3, codes=256, d0=16, kernel="reference"))
    cpu.codebook.copy_(torch.randn(6, 3, 256, 16, generator=g))
    x = torch.randn(2_000 if device == "cpu" else 50_000, 6, 16, generator=g)
    vq = ResidualVQ(6, HGAQConfig(levels=3, codes=256, d0=16, kernel=kernel)).to(device)
    vq.codebook.copy_(cpu.codebook)
    ref, got = cpu.encode(x), vq.encode(x.to(device)).cpu()
    # all M codes equal but for near-ties (the packed kernel breaks ties within 3e-5 relative by index; a
    # different first-level code changes the residual of the levels after it)
    assert (got == ref).all(-1).float().mean() > 0.999


@pytest.mark.parametrize("kernel", ["reference", "packed", "matmul"])
def test_cardinality_sized_codebooks_use_only_their_codes_and_fit_few_values_exactly(kernel):
    """Sub-token 0 takes 3 distinct values and gets 3 codes; its codes never leave 0..2 under training (EMA,
    dead-code restart, entropy), and (with the exact kernel: k-means from this seed's initialization) one level
    reconstructs it exactly; the others keep their sizes."""
    torch.manual_seed(0)
    n, sizes = 2000, [3, 16, 5]
    x = torch.randn(n, 3, 4)
    x[:, 0] = torch.randn(3, 4)[torch.randint(0, 3, (n,))]
    # a fast EMA so that a code lost to a duplicate initialization is restarted within the test's steps
    cfg = HGAQConfig(levels=2, codes=16, d0=4, kernel=kernel, entropy_weight=0.01, ema_decay=0.8)
    rvq = ResidualVQ(3, cfg, sizes).train()
    for _ in range(150):
        q, codes, losses = rvq(x.clone().requires_grad_(True))
        sum(losses.values()).backward()
        assert (codes < torch.tensor(sizes)[None, :, None]).all()
    rvq.eval()
    _, codes, _ = rvq(x, update=False)
    assert torch.equal(rvq.encode(x), codes)
    assert (codes.amax(dim=(0, 2)) < torch.tensor(sizes)).all() and codes[:, 1].amax() > 5  # sizes bind
    if kernel == "reference":
        level_one = rvq.codebook[0, 0, codes[:, 0, 0]]  # sub-token 0 through its first level alone
        assert float((level_one - x[:, 0]).pow(2).mean()) < 1e-6
    dead = rvq.utilization(codes)["dead_codes"]
    used = [[len(torch.unique(codes[:, t, m])) for m in range(2)] for t in range(3)]
    assert dead.tolist() == [[size - u for u in row] for size, row in zip(sizes, used, strict=True)]
    with pytest.raises(ConfigError, match="codebook sizes"):
        ResidualVQ(3, HGAQConfig(codes=16), [3, 17, 5])


def test_tokenizer_sizes_codebooks_from_the_fields_cardinality(synth_prepared):
    layout = FeatureLayout.from_dataset(synth_prepared)
    fixed = SampleTokenizer(layout, HGAQConfig(fields_per_token=2, codes=64))
    tok = SampleTokenizer(layout, HGAQConfig(fields_per_token=2, codes=64, codebook_sizes="cardinality"))
    assert fixed.rvq.sizes == [64] * fixed.n_tokens
    multi = {f.name for f in layout.multi_fields}
    for names, size in zip(tok.sub_tokens, tok.rvq.sizes, strict=True):
        if all(n in layout.vocab_sizes and n not in multi for n in names):
            assert size == min(64, int(np.prod([layout.vocab_sizes[n] for n in names])))
        else:
            assert size == 64
    assert min(tok.rvq.sizes) < 64  # the synthetic schema has small joint vocabularies
    rows = synth_prepared.rows("train")[:512]
    batch = BatchLoader(synth_prepared, rows, 512).build(rows)
    for _ in range(3):
        tok(batch)
    assert (tok.encode(batch) < np.asarray(tok.rvq.sizes)[None, :, None]).all()


def test_codebook_utilization_counts_unused_codes_within_each_size():
    from sampletok.report.codebooks import codebook_utilization

    codes = np.zeros((10, 2, 1), dtype=np.int64)
    codes[:, 0, 0] = np.arange(10) % 3  # sub-token 0 uses all of its 3 codes; sub-token 1 one of its 8
    u = codebook_utilization(codes, 8, sizes=[3, 8])
    assert u["dead_codes"].tolist() == [[0], [7]]
    assert codebook_utilization(codes, 8)["dead_codes"].tolist() == [[5], [7]]
