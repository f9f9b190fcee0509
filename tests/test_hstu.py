"""HSTU's DLRM-v3 options (concat_ux, MLP + SwishLayerNorm encoders, one context token per contextual feature,
timestamp-bucket embeddings, multitask response heads) and the shared multitask mechanism (``Batch.responses``
as targets only, DIN's heads): each piece checked against its formula, and every option trained end to end."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from sampletok.data.batches import BatchLoader
from sampletok.data.dataset import PreparedDataset
from sampletok.data.prepare import prepare
from sampletok.data.sources import FrameSource
from sampletok.features import Batch, FeatureLayout
from sampletok.models import MODELS, build_model
from sampletok.models.hstu import HSTU, STULayer, TimestampBucketEmbedding
from sampletok.nn import ResponseHeads, SwishLayerNorm
from sampletok.schema import Schema
from tests.test_responses import SCHEMA as RESP_SCHEMA
from tests.test_responses import _frame as resp_frame

OPTIONS = {
    "concat_ux": {"concat_ux": True},
    "mlp": {"encoders": "mlp"},
    "per_feature": {"context_tokens": "per_feature"},
    "time": {"time_embeddings": True},
    "no_bias": {"relative_bias": False},
    "aux": {"aux_responses": True},
    "all": {
        "concat_ux": True,
        "encoders": "mlp",
        "context_tokens": "per_feature",
        "time_embeddings": True,
        "aux_responses": True,
    },
}


@pytest.fixture(scope="module")
def resp_ds(tmp_path_factory) -> PreparedDataset:
    """Task label click; responses liked (binary), watch_s (numeric), reason (categorical, known_at, some
    never known) and depth (bucketized)."""
    schema = Schema.model_validate(RESP_SCHEMA)
    return prepare(FrameSource(resp_frame(), "resp"), schema, tmp_path_factory.mktemp("resp") / "ds", progress=False)


def _layout_with_numeric() -> FeatureLayout:
    """The example layout plus a numeric response ``watch`` (DLRM-v3's watch-time regression)."""
    lay = FeatureLayout.example()
    return dataclasses.replace(
        lay, responses=[*lay.responses, "watch"], response_types={**lay.response_types, "watch": "numeric"}
    )


# ------------------------------------------------------------------------------------------------ concat_ux
def test_concat_ux_projects_u_attn_and_gated_attn():
    torch.manual_seed(0)
    plain, cat = STULayer(8, 2), STULayer(8, 2, concat_ux=True)
    assert plain.out.in_features == 8 and cat.out.in_features == 24
    seen = {}
    cat.out.register_forward_hook(lambda m, inp, out: seen.__setitem__("y", inp[0]))
    cat.uvqk.register_forward_hook(lambda m, inp, out: seen.__setitem__("uvqk", out))
    b, n = 2, 5
    x = torch.randn(b, n, 8)
    mask = torch.ones(n, n, dtype=torch.bool).tril().expand(b, n, n)
    cat.eval()(x, torch.zeros(b, n, n), mask, torch.full((b,), n))
    u = F.silu(seen["uvqk"]).split(8, dim=-1)[0]
    y = seen["y"]
    u_part, attn, gated = y.split(8, dim=-1)
    torch.testing.assert_close(u_part, u)  # the first block is u
    torch.testing.assert_close(gated, cat.norm_attn(attn) * u)  # the third is u ⊙ LN(attn), of the second
    # zeroing u zeroes the first and third blocks: the projection then sees only attn
    with torch.no_grad():
        cat.uvqk.weight[:8].zero_()
        cat.uvqk.bias[:8].zero_()
    cat(x, torch.zeros(b, n, n), mask, torch.full((b,), n))
    u0, attn0, gated0 = seen["y"].split(8, dim=-1)
    assert u0.abs().max() == 0 and gated0.abs().max() == 0 and attn0.abs().max() > 0
    torch.testing.assert_close(attn0, attn)  # attention does not read u


def test_hstu_concat_ux_builds_wide_projections():
    model = HSTU(FeatureLayout.example(), width=16, concat_ux=True)
    assert all(layer.out.in_features == 48 and layer.concat_ux for layer in model.layers)
    assert all(layer.out.in_features == 16 for layer in HSTU(FeatureLayout.example(), width=16).layers)


# ------------------------------------------------------------------------------------ MLP + SwishLayerNorm
def test_swish_layer_norm_is_x_times_sigmoid_of_layer_norm():
    torch.manual_seed(0)
    m = SwishLayerNorm(6)
    with torch.no_grad():
        m.norm.weight.uniform_(0.5, 1.5)
        m.norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, 4, 6) * 3
    ref = x * torch.sigmoid(F.layer_norm(x, (6,), m.norm.weight, m.norm.bias, 1e-5))
    torch.testing.assert_close(m(x), ref)
    assert not torch.allclose(m(x), F.silu(x))  # not plain SiLU: the gate reads the normalized input


def test_mlp_encoders_swap_the_modules():
    lay = FeatureLayout.example()
    linear, mlp = HSTU(lay, width=16), HSTU(lay, width=16, encoders="mlp", encoder_hidden=24)
    assert isinstance(linear.content, torch.nn.Linear) and linear.action_mlp is None
    kinds = [type(m) for m in mlp.content]
    assert kinds == [torch.nn.Linear, SwishLayerNorm, torch.nn.Linear, torch.nn.LayerNorm]
    assert mlp.content[0].out_features == 24 and mlp.content[2].out_features == 16
    assert [type(m) for m in mlp.action_mlp] == [SwishLayerNorm, torch.nn.Linear, torch.nn.LayerNorm]
    assert mlp.action.dim == 24
    assert any(isinstance(m, SwishLayerNorm) for m in mlp.head) and not any(
        isinstance(m, torch.nn.ReLU) for m in mlp.head
    )
    assert any(isinstance(m, torch.nn.ReLU) for m in linear.head)


# ------------------------------------------------------------------------------- one token per context field
def test_one_context_token_per_contextual_feature():
    lay = FeatureLayout.example()  # user_id (user), item_id (item, seq), hour (context), genres, price (item)
    contextual = [
        f for f in lay.field_names if lay.groups[f] != "item" and f not in set(lay.seq_cat) | set(lay.seq_multi)
    ]
    assert contextual == ["user_id", "hour"]
    torch.manual_seed(0)
    model = HSTU(lay, context_tokens="per_feature").eval()
    assert model.n_context == len(contextual)
    batch = Batch.example(lay, batch_size=3)
    with torch.no_grad():
        a = model.context_tokens(model.embed(batch))
        assert a.shape == (3, len(contextual), 32)
        hour = [f.name for f in lay.cat_fields].index("hour")
        changed = dataclasses.replace(batch, cat=batch.cat.clone())
        changed.cat[:, hour] = changed.cat[:, hour] % (lay.vocab_sizes["hour"] - 1) + 1
        b = model.context_tokens(model.embed(changed))
        torch.testing.assert_close(b[:, 0], a[:, 0])  # user_id's token is unchanged
        assert (b[:, 1] - a[:, 1]).abs().amax(-1).min() > 0  # hour's token changed in every row
        # an item field (price) is no context token
        priced = dataclasses.replace(batch, num=batch.num + 1.0)
        torch.testing.assert_close(model.context_tokens(model.embed(priced)), a)
        assert not torch.allclose(model(changed).logits, model(batch).logits)
    one = HSTU(lay).eval()
    with torch.no_grad():
        assert one.context_tokens(one.embed(batch)).shape == (3, 1, 32)


# ------------------------------------------------------------------------------------- timestamp buckets
def test_timestamp_buckets_follow_the_log_minutes_formula():
    emb = TimestampBucketEmbedding(4, buckets=32)
    gaps = torch.tensor([0.0, 1.0, 100.0, 60 * 2.7, 60 * 2.8, 60 * 7.0, 60 * 7.5, 1e20])
    assert emb.bucket(gaps).tolist() == [0, 0, 0, 0, 1, 1, 2, 32]
    valid = torch.ones(1, len(gaps), dtype=torch.bool)
    e = emb(gaps.unsqueeze(0), valid)[0]
    torch.testing.assert_close(e[0], e[3])  # same bucket, same embedding
    torch.testing.assert_close(e[4], e[5])
    assert not torch.allclose(e[3], e[4]) and not torch.allclose(e[5], e[6])  # different buckets differ
    padded = emb(gaps.unsqueeze(0), torch.zeros_like(valid))
    assert padded.abs().max() == 0


def test_time_embeddings_change_the_score_by_bucket_and_ignore_padding():
    lay = FeatureLayout.example()
    torch.manual_seed(0)
    model = HSTU(lay, time_embeddings=True, dropout=0.0).eval()
    with torch.no_grad():
        model.bias.time_w.zero_()  # the relative bias reads gaps too: isolate the embeddings
    batch = Batch.example(lay, batch_size=6, hist_len=6)
    assert (~batch.hist_mask).any() and batch.hist_mask.any()
    gaps = torch.where(batch.hist_mask, 60 * 2.0, 0.0)  # bucket 0 (ln 2 < 1)
    with torch.no_grad():
        base = model(dataclasses.replace(batch, hist_gap=gaps)).logits
        same = model(dataclasses.replace(batch, hist_gap=torch.where(batch.hist_mask, 60 * 2.5, 0.0))).logits
        torch.testing.assert_close(same, base)  # same bucket
        other = model(dataclasses.replace(batch, hist_gap=torch.where(batch.hist_mask, 60 * 50.0, 0.0))).logits
        has = batch.hist_mask.any(1)
        assert (other - base)[has].abs().min() > 0  # another bucket
        pad = model(dataclasses.replace(batch, hist_gap=torch.where(batch.hist_mask, gaps, 1e9))).logits
        torch.testing.assert_close(pad, base)  # a padded position's gap has no effect
        # a padded position's item either (padding is masked out of attention)
        cat = torch.where(batch.hist_mask.unsqueeze(-1), batch.hist_cat, 3)
        torch.testing.assert_close(model(dataclasses.replace(batch, hist_gap=gaps, hist_cat=cat)).logits, base)
    assert HSTU(lay).time is None


def test_without_the_relative_bias_time_gaps_reach_the_score_only_through_time_embeddings():
    lay = FeatureLayout.example()
    batch = Batch.example(lay, batch_size=6, hist_len=6)
    has = batch.hist_mask.any(1)
    later = dataclasses.replace(batch, hist_gap=torch.where(batch.hist_mask, batch.hist_gap * 37.0 + 5e4, 0.0))
    scores = {}
    for bias, time in ((True, False), (False, False), (False, True)):
        torch.manual_seed(0)
        model = HSTU(lay, relative_bias=bias, time_embeddings=time, dropout=0.0).eval()
        if bias:  # a fresh bias is all zeros: give it values, as training would
            with torch.no_grad():
                model.bias.time_w.normal_()
        with torch.no_grad():
            scores[bias, time] = (model(batch).logits, model(later).logits)
    base, moved = scores[True, False]
    assert (moved - base)[has].abs().min() > 0  # the bias reads the gaps
    base, moved = scores[False, False]
    torch.testing.assert_close(moved, base)  # nothing else does
    base, moved = scores[False, True]
    assert (moved - base)[has].abs().min() > 0  # the time embeddings still do
    assert HSTU(lay, relative_bias=False).bias is None


# ------------------------------------------------------------------------------------------ multitask heads
def test_response_heads_predict_every_response_by_its_type():
    lay = _layout_with_numeric()
    heads = ResponseHeads(lay, in_dim=8)
    assert heads.names == ["rating", "watch"] and heads.kinds == ["categorical", "numeric"]
    assert heads.predict[-1].out_features == 7 + 1
    assert ResponseHeads(lay, 8, ["click"]).kinds == ["binary"]
    batch = Batch.example(lay, batch_size=5)
    h = torch.randn(5, 8)
    losses = heads.losses(h, batch)
    out = heads(h)
    ri, wi = lay.responses.index("rating"), lay.responses.index("watch")
    ce = F.cross_entropy(out[:, :7], batch.responses[:, ri].long())
    mse = F.mse_loss(out[:, 7], batch.responses[:, wi])
    torch.testing.assert_close(losses["aux_rating"], 0.2 * ce)
    torch.testing.assert_close(losses["aux_watch"], 0.2 * mse)
    # rows without the outcome are left out
    masked = dataclasses.replace(batch, response_mask=batch.response_mask.clone())
    masked.response_mask[:2, wi] = False
    torch.testing.assert_close(
        heads.losses(h, masked)["aux_watch"], 0.2 * F.mse_loss(out[2:, 7], batch.responses[2:, wi])
    )
    assert heads.losses(h, dataclasses.replace(batch, responses=None)) == {}


@pytest.mark.parametrize("name", ["hstu", "din"])
def test_multitask_heads_give_aux_losses_that_training_decreases(name):
    lay = _layout_with_numeric()
    torch.manual_seed(0)
    model = build_model(name, lay, aux_responses=True, dropout=0.0)
    batch = Batch.example(lay, batch_size=16, hist_len=6)
    batch.responses[:, lay.responses.index("watch")] = torch.randn(16, generator=torch.Generator().manual_seed(2))
    out = model.train()(batch)
    assert sorted(out.aux_losses) == ["aux_rating", "aux_watch"] and out.logits.shape == (16, 1)
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.aux_losses.values())
    first = {k: v.item() for k, v in out.aux_losses.items()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        out = model(batch)
        loss = F.binary_cross_entropy_with_logits(out.logits, batch.labels) + sum(out.aux_losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = {k: v.item() for k, v in model(batch).aux_losses.items()}
    assert all(last[k] < 0.7 * first[k] for k in first), (first, last)
    assert model.eval()(batch).aux_losses == {}  # only while training
    off = build_model(name, lay, dropout=0.0).train()
    assert off.aux is None and off(batch).aux_losses == {}


def test_multitask_heads_do_not_change_the_main_logit():
    """The heads only add losses: with the same weights elsewhere, the main logit is the same with and without."""
    lay = FeatureLayout.example()
    torch.manual_seed(0)
    on = HSTU(lay, aux_responses=True).eval()
    off = HSTU(lay).eval()
    off.load_state_dict({k: v for k, v in on.state_dict().items() if not k.startswith("aux.")})
    batch = Batch.example(lay, batch_size=4)
    with torch.no_grad():
        torch.testing.assert_close(on(batch).logits, off(batch).logits)


# ------------------------------------------------------------------------- targets only, never an input
def test_the_loader_fills_the_rows_own_responses_and_never_for_history_samples(resp_ds):
    import numpy as np

    from sampletok.columns import NEVER, known_col

    lay = FeatureLayout.from_dataset(resp_ds)
    assert lay.response_types == {
        "click": "binary",
        "liked": "binary",
        "watch_s": "numeric",
        "reason": "categorical",
        "depth": "numeric",
    }
    rows = resp_ds.rows("train")[:64]
    batch = BatchLoader(resp_ds, rows, 64, hist_len=5, history_samples=True).build(rows)
    assert batch.responses is not None and batch.responses.shape == (64, len(lay.responses))
    for i, r in enumerate(lay.responses):
        np.testing.assert_array_equal(batch.responses[:, i].numpy(), np.asarray(resp_ds.response_column(r))[rows])
    never = np.asarray(resp_ds.col(known_col("reason")))[rows] == NEVER
    assert never.any() and (~never).any()
    np.testing.assert_array_equal(batch.response_mask[:, lay.responses.index("reason")].numpy(), ~never)
    assert batch.response_mask[:, lay.responses.index("liked")].all()
    assert batch.history_samples is not None and batch.history_samples.responses is None


def _every_model(layout: FeatureLayout):
    for name in sorted(set(MODELS) - {"iat"}):  # IAT reads a token store
        yield name, build_model(name, layout)
    yield "din+aux", build_model("din", layout, aux_responses=True, history_responses=True)
    yield "hstu+all", build_model("hstu", layout, **OPTIONS["all"])


def test_no_model_score_reads_the_rows_own_responses(resp_ds):
    """Leakage: the row's own outcomes (Batch.responses) are targets only. Every model scores the same with
    them shuffled across rows (mask flipped) or absent, in training mode too (a fresh copy of the model and the
    same seed for each forward); only the aux losses read them."""
    import copy

    lay = FeatureLayout.from_dataset(resp_ds)
    rows = resp_ds.rows("test")[:32]
    for name, model in _every_model(lay):
        loader = BatchLoader(resp_ds, rows, 32, hist_len=5, history_samples=model.reads_history_samples)
        batch = loader.build(rows)
        assert batch.responses is not None and batch.response_mask is not None
        perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(1))
        shuffled = dataclasses.replace(batch, responses=batch.responses[perm], response_mask=~batch.response_mask)
        assert not torch.equal(shuffled.responses, batch.responses)
        absent = dataclasses.replace(batch, responses=None, response_mask=None)
        for train in (False, True):
            outs = []
            for b in (batch, shuffled, absent):
                torch.manual_seed(0)
                with torch.no_grad():
                    outs.append(copy.deepcopy(model).train(train)(b))
            torch.testing.assert_close(outs[1].logits, outs[0].logits, msg=name)
            torch.testing.assert_close(outs[2].logits, outs[0].logits, msg=name)
            heads = {f"aux_{r}" for r in lay.responses}  # the response heads' losses (not e.g. SIF's own)
            expected = {f"aux_{r}" for r in lay.responses[1:]} if train and "aux" in model._modules else set()
            assert set(outs[0].aux_losses) & heads == expected, name
            assert not set(outs[2].aux_losses) & heads


# ---------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_every_option_trains_end_to_end(option):
    lay = FeatureLayout.example()
    torch.manual_seed(0)
    model = build_model("hstu", lay, **OPTIONS[option], dropout=0.0).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = Batch.example(lay, batch_size=8, hist_len=6)
    losses = []
    for _ in range(10):
        out = model(batch)
        assert out.logits.shape == (8, 1)
        loss = F.binary_cross_entropy_with_logits(out.logits, batch.labels) + sum(out.aux_losses.values())
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert bool(out.aux_losses) is ("aux_responses" in OPTIONS[option])


def test_the_full_configuration_trains_on_a_prepared_dataset(resp_ds):
    """The full DLRM-v3 configuration on loader batches: finite loss and gradients, every response an aux loss."""
    lay = FeatureLayout.from_dataset(resp_ds)
    torch.manual_seed(0)
    model = build_model("hstu", lay, **OPTIONS["all"]).train()
    rows = resp_ds.rows("train")[:64]
    batch = BatchLoader(resp_ds, rows, 64, hist_len=6).build(rows)
    out = model(batch)
    assert sorted(out.aux_losses) == ["aux_depth", "aux_liked", "aux_reason", "aux_watch_s"]
    loss = F.binary_cross_entropy_with_logits(out.logits, batch.labels) + sum(out.aux_losses.values())
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
