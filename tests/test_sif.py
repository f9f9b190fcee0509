from typing import cast

import numpy as np
import pytest
import torch

from sampletok.data.batches import BatchLoader, TokenSource
from sampletok.errors import ConfigError, StoreError
from sampletok.features import FeatureLayout
from sampletok.models import build_model
from sampletok.models.sif import MixerBlock
from sampletok.tokens.sif import export_codes

SMALL = dict(hgaq=dict(fields_per_token=4, codes=32), width=16, blocks=2, heads=2)


@pytest.fixture(scope="module")
def trained(synth_prepared):
    torch.manual_seed(0)
    model = build_model("sif", FeatureLayout.from_dataset(synth_prepared), **SMALL)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    loader = BatchLoader(synth_prepared, synth_prepared.rows("train")[:1024], 256, hist_len=10, history_samples=True)
    model.train()
    for batch in loader:
        out = model(batch)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, batch.labels)
        loss = bce + sum(out.aux_losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_training_step_losses(trained, synth_prepared):
    rows = synth_prepared.rows("valid")[:64]
    batch = BatchLoader(synth_prepared, rows, 64, hist_len=10, history_samples=True).build(rows)
    trained.train()
    out = trained(batch)
    trained.eval()
    assert {"align", "vq_commit", "vq_entropy", "aux_label"} <= set(out.aux_losses)
    assert all(torch.isfinite(v) for v in out.aux_losses.values())
    assert trained.tokenizer.n_tokens == sum(
        -(-len(synth_prepared.schema.fields_of_group(g)) // 4) for g in ("user", "item", "context", "cross")
    )


def test_padding_rows_never_influence_the_target():
    torch.manual_seed(0)
    block = MixerBlock(16, 2).eval()
    x = torch.randn(3, 6, 4, 16)
    row_mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    y = block(x, row_mask)
    x2 = x.clone()
    x2[~row_mask] = torch.randn_like(x2[~row_mask]) * 100
    torch.testing.assert_close(block(x2, row_mask)[row_mask], y[row_mask])


def test_stored_codes_give_the_same_scores_as_on_the_fly(trained, synth_prepared, tmp_path):
    rows = synth_prepared.rows("test")[:200]
    batch = BatchLoader(synth_prepared, rows, 200, hist_len=10, history_samples=True).build(rows)
    with torch.no_grad():
        live = trained(batch).logits
    store = export_codes(trained, synth_prepared, tmp_path / "codes", progress=False)
    assert store.meta["dtype"] == "uint8" and store.bytes_per_instance()["payload"] == trained.tokenizer.n_tokens * 3
    trained.check_code_store(store.meta, synth_prepared.fingerprint)
    tokens = TokenSource(store.load_into_memory(), 10, dequantize=False)
    from_store = BatchLoader(synth_prepared, rows, 200, hist_len=10, tokens=tokens).build(rows)
    assert from_store.history_samples is None  # the codes replace the raw past samples
    with torch.no_grad():
        stored = trained(from_store).logits
    torch.testing.assert_close(stored, live)


def test_codes_from_another_codebook_are_refused(trained, synth_prepared, tmp_path):
    other = build_model("sif", FeatureLayout.from_dataset(synth_prepared), **SMALL)
    rows = synth_prepared.rows("train")[:256]
    other.train()
    # initializes its own codebooks
    other(BatchLoader(synth_prepared, rows, 256, hist_len=5, history_samples=True).build(rows))
    store = export_codes(other, synth_prepared, tmp_path / "other", progress=False)
    with pytest.raises(StoreError, match="codebook version"):
        trained.check_code_store(store.meta, synth_prepared.fingerprint)


def test_eval_scores_do_not_depend_on_the_batch(trained, synth_prepared):
    rows = synth_prepared.rows("test")[:50]
    loader = BatchLoader(synth_prepared, rows, 50, hist_len=10, history_samples=True)
    with torch.no_grad():
        together = trained(loader.build(rows)).logits
        alone = torch.cat([trained(loader.build(rows[i : i + 1])).logits for i in range(5)])
    torch.testing.assert_close(alone, together[:5], atol=1e-5, rtol=1e-5)


def test_flat_mixer_ablation_runs(synth_prepared):
    model = build_model("sif", FeatureLayout.from_dataset(synth_prepared), **{**SMALL, "mixer": "flat"})
    rows = synth_prepared.rows("train")[:32]
    out = model(BatchLoader(synth_prepared, rows, 32, hist_len=8, history_samples=True).build(rows))
    assert out.logits.shape == (32, 1)


def test_history_responses_count_only_once_known(trained, synth_prepared):
    """Past responses reach the model through hist_responses; a label not yet known at the request (mask False)
    cannot change the score whatever its value, a known one does."""
    import dataclasses

    rows = synth_prepared.rows("test")[:128]
    batch = BatchLoader(synth_prepared, rows, 128, hist_len=10, history_samples=True).build(rows)
    unknown, known = ~batch.hist_response_mask & batch.hist_mask.unsqueeze(-1), batch.hist_response_mask
    assert unknown.any() and known.any()
    with torch.no_grad():
        base = trained(batch).logits
        poked = batch.hist_responses.clone()
        poked[unknown] = 7.0
        torch.testing.assert_close(trained(dataclasses.replace(batch, hist_responses=poked)).logits, base)
        flipped = batch.hist_responses.clone()
        flipped[known] = 1 - flipped[known]
        assert not torch.allclose(trained(dataclasses.replace(batch, hist_responses=flipped)).logits, base)


@pytest.mark.parametrize(
    "variant",
    [
        {"mixer": "pool"},
        {"quantize_history": False},
        {"history_fields": ["item_id"]},
        {"hgaq": {"fields_per_token": 4, "codes": 32, "codebook_sizes": "cardinality"}},
    ],
)
def test_ablation_variants_train(variant, synth_prepared):
    model = build_model("sif", FeatureLayout.from_dataset(synth_prepared), **{**SMALL, **variant})
    rows = synth_prepared.rows("train")[:64]
    out = model(BatchLoader(synth_prepared, rows, 64, hist_len=8, history_samples=True).build(rows))
    (out.logits.sum() + sum(out.aux_losses.values())).backward()
    assert out.logits.shape == (64, 1) and torch.isfinite(out.logits).all()


@pytest.mark.parametrize("mixer", ["pool", "factored"])
def test_the_pool_mixer_mixes_one_token_per_row(mixer, synth_prepared):
    """``pool`` averages each row's sub-tokens into one token before mixing (sample-level attention only): the
    blocks see T = 1; the factored mixer sees every sub-token."""
    model = build_model("sif", FeatureLayout.from_dataset(synth_prepared), **{**SMALL, "mixer": mixer}).eval()
    seen: list[tuple[int, ...]] = []
    model.blocks[0].register_forward_hook(lambda _m, args, _o: seen.append(tuple(args[0].shape)))
    rows = synth_prepared.rows("train")[:16]
    with torch.no_grad():
        model(BatchLoader(synth_prepared, rows, 16, hist_len=8, history_samples=True).build(rows))
    tokens = seen[0][2]
    assert tokens == (1 if mixer == "pool" else model.tokenizer.n_tokens)


@pytest.mark.parametrize("quantize", [True, False])
def test_a_dense_history_does_not_read_the_codebooks(quantize, synth_prepared):
    """``quantize_history: false`` feeds history rows as the dense projection P x: the scores do not move when
    the codebooks do; quantized history rows do (the request row is never quantized in the forward pass)."""
    torch.manual_seed(0)
    model = build_model("sif", FeatureLayout.from_dataset(synth_prepared), **{**SMALL, "quantize_history": quantize})
    rows = synth_prepared.rows("train")[:64]
    batch = BatchLoader(synth_prepared, rows, 64, hist_len=8, history_samples=True).build(rows)
    model.train()
    model(batch)  # the first training step initializes the codebooks from data
    model.eval()
    with torch.no_grad():
        before = model(batch).logits
        model.tokenizer.rvq.codebook.add_(torch.randn_like(model.tokenizer.rvq.codebook))
        after = model(batch).logits
    assert torch.equal(before, after) != quantize


def test_history_fields_hide_the_other_fields_of_past_samples(synth_prepared):
    """With history_fields = [item_id] a history row's projection depends on the item id only; the request's
    own row (projected without ``keep``) still sees every field."""
    import dataclasses

    torch.manual_seed(0)
    layout = FeatureLayout.from_dataset(synth_prepared)
    model = build_model("sif", layout, **{**SMALL, "history_fields": ["item_id"]}).eval()
    keep = model.history_keep
    assert int(keep.sum()) == 1 and layout.field_names[int(keep.nonzero())] == "item_id"
    rows = synth_prepared.rows("test")[:32]
    batch = BatchLoader(synth_prepared, rows, 32, hist_len=8, history_samples=True).build(rows)
    item_col = [f.name for f in layout.cat_fields].index("item_id")
    scrambled = dataclasses.replace(
        batch,
        cat=torch.where(torch.arange(batch.cat.shape[1]) == item_col, batch.cat, batch.cat.flip(0)),
        num=batch.num.flip(0),
        multi=batch.multi.flip(0),
    )
    with torch.no_grad():
        torch.testing.assert_close(model.tokenizer.project(scrambled, keep), model.tokenizer.project(batch, keep))
        assert not torch.allclose(model.tokenizer.project(scrambled), model.tokenizer.project(batch))


def test_dense_history_cannot_read_a_code_store(trained, synth_prepared, tmp_path):
    from sampletok.errors import ConfigError

    model = build_model("sif", FeatureLayout.from_dataset(synth_prepared), **{**SMALL, "quantize_history": False})
    model.load_state_dict(trained.state_dict())
    store = export_codes(trained, synth_prepared, tmp_path / "codes", progress=False)
    with pytest.raises(ConfigError, match="dense-history"):
        model.check_code_store(store.meta, synth_prepared.fingerprint)


def test_train_and_eval_forward_score_alike(trained, synth_prepared):
    """Train/eval parity: no dropout, the target row is R·P x in both modes (never quantized), history rows
    are quantized with the same codebooks, so the logits agree; training only adds losses (and EMA updates,
    which happen after the codes are chosen; a copy keeps them out of the fixture)."""
    import copy

    rows = synth_prepared.rows("valid")[:64]
    batch = BatchLoader(synth_prepared, rows, 64, hist_len=10, history_samples=True).build(rows)
    twin = copy.deepcopy(trained).train()
    with torch.no_grad():
        train_logits = twin(batch).logits
        eval_logits = trained.eval()(batch).logits
    torch.testing.assert_close(train_logits, eval_logits, atol=1e-5, rtol=1e-5)


def test_long_history_runs_and_backpropagates(synth_prepared):
    """L = 1000 (the sweep's upper end): finite scores and gradients, short histories padded, train mode
    (history quantized on the fly) included."""
    torch.manual_seed(0)
    model = build_model("sif", FeatureLayout.from_dataset(synth_prepared), **SMALL)
    rows = synth_prepared.rows("test")[:4]
    batch = BatchLoader(synth_prepared, rows, 4, hist_len=1000, history_samples=True).build(rows)
    assert batch.hist_mask.shape[1] == 1000 and not batch.hist_mask.all()
    out = model.train()(batch)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, batch.labels) + sum(out.aux_losses.values())
    loss.backward()
    assert torch.isfinite(out.logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _isolated_reference(block: MixerBlock, x: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
    """The factored block with one explicit [R, R] mask: history rows (1..) never attend to row 0."""
    b, r, t, d = x.shape
    flat = x.reshape(b * r, t, d)
    flat = flat + block.token_attn(block.n1(flat))
    cols = flat.view(b, r, t, d).transpose(1, 2).reshape(b * t, r, d)
    keys = row_mask.repeat_interleave(t, dim=0)[:, None, :].expand(b * t, r, r).clone()
    keys[:, 1:, 0] = False
    keys[:, 1:][~keys[:, 1:].any(-1)] = True  # a padded history with no key: attend anywhere (ignored)
    cols = cols + block.sample_attn(block.n2(cols), None, keys)
    y = cols.view(b, t, r, d).transpose(1, 2)
    return y + block.ffn(block.n3(y))


def test_isolated_block_equals_the_masked_reference():
    torch.manual_seed(0)
    block = MixerBlock(16, 2).eval()
    x = torch.randn(3, 6, 4, 16)
    row_mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    target, hist = block.isolated(x[:, :1], x[:, 1:], row_mask[:, 1:])
    want = _isolated_reference(block, x, row_mask)
    torch.testing.assert_close(target, want[:, :1])
    torch.testing.assert_close(hist[row_mask[:, 1:]], want[:, 1:][row_mask[:, 1:]])
    # the history does not depend on the target row
    x2 = x.clone()
    x2[:, 0] = torch.randn_like(x2[:, 0]) * 10
    torch.testing.assert_close(block.isolated(x2[:, :1], x2[:, 1:], row_mask[:, 1:])[1], hist)


def test_isolated_sif_shares_one_history_pass_across_candidates(synth_prepared):
    torch.manual_seed(0)
    model = build_model("sif", FeatureLayout.from_dataset(synth_prepared), **SMALL, isolate_target=True).eval()
    loader = BatchLoader(synth_prepared, synth_prepared.rows("test"), 64, hist_len=10, history_samples=True)
    row = synth_prepared.rows("test")[-1:]
    one = loader.build(row)
    assert one.hist_mask.sum() > 0
    # one user's request with 5 candidates: the same history, other candidate rows' features
    cands = loader.build(synth_prepared.rows("test")[:5])
    batch = loader.build(row.repeat(5))
    batch.cat, batch.multi, batch.num = cands.cat, cands.multi, cands.num
    with torch.no_grad():
        each = model(batch).logits
        batch.history_group = torch.zeros(len(batch), dtype=torch.int64)
        shared = model(batch).logits
    torch.testing.assert_close(shared, each)
    assert each.std() > 0  # the candidates do score differently


def test_history_padding_is_trimmed_without_changing_a_score(trained, synth_prepared, monkeypatch):
    # the earliest requests have short histories: at L = 40 most positions are padding in every row
    rows = synth_prepared.rows("train")[:300]
    batch = BatchLoader(synth_prepared, rows, 300, hist_len=40, history_samples=True).build(rows)
    longest = int(batch.hist_mask.sum(1).max())
    assert 0 < longest < 40
    trimmed = batch.trimmed_history()
    assert trimmed.hist_mask.shape == (300, longest) and trimmed.history_sample_index.shape == (300, longest)
    assert torch.equal(trimmed.hist_rows, batch.hist_rows[:, -longest:])
    assert int(trimmed.hist_mask.sum()) == int(batch.hist_mask.sum())
    with torch.no_grad():
        fast = trained(batch).logits
        monkeypatch.setattr(type(batch), "trimmed_history", lambda self: self)
        full = trained(batch).logits
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_type", ["factored", "flat", "isolated"])
def test_last_block_computing_the_target_row_only_is_exact(block_type):
    from sampletok.models.sif import FlatBlock

    torch.manual_seed(0)
    block = (FlatBlock if block_type == "flat" else MixerBlock)(16, 2)
    x = torch.randn(3, 6, 4, 16, requires_grad=True)
    row_mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    if block_type == "isolated":
        full = block.isolated(x[:, :1], x[:, 1:], row_mask[:, 1:])[0]
        fast = block.isolated(x[:, :1], x[:, 1:], row_mask[:, 1:], target_only=True)[0]
    else:
        full, fast = block(x, row_mask)[:, :1], block(x, row_mask, target_only=True)
    assert fast.shape == (3, 1, 4, 16)
    torch.testing.assert_close(fast, full, atol=1e-6, rtol=1e-5)
    params = [x, *block.parameters()]
    for g_fast, g_full in zip(
        torch.autograd.grad(fast.pow(2).sum(), params, allow_unused=True),
        torch.autograd.grad(full.pow(2).sum(), params, allow_unused=True),
        strict=True,
    ):
        if g_full is None:  # e.g. the isolated block's history FFN is never reached by the target
            assert g_fast is None or not g_fast.any()
        else:
            torch.testing.assert_close(g_fast, g_full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("params", [{}, {"isolate_target": True}, {"mixer": "flat", "blocks": 1}])
def test_sif_with_a_target_only_last_block_trains_like_the_reference(synth_prepared, params):
    torch.manual_seed(0)
    model = build_model("sif", FeatureLayout.from_dataset(synth_prepared), **{**SMALL, **params}).train()
    rows = synth_prepared.rows("train")[-128:]
    batch = BatchLoader(synth_prepared, rows, 128, hist_len=12, history_samples=True).build(rows)

    def step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(1)  # the same codebook restarts in both passes
        out = model(batch)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, batch.labels)
        loss = loss + sum(out.aux_losses.values())
        return out.logits, list(torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad]))

    state = {k: v.clone() for k, v in model.state_dict().items()}  # EMA buffers move in each training pass
    fast, g_fast = step()
    model.load_state_dict(state)
    model.target_only_last = False
    full, g_full = step()
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_fast, g_full, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_isolated_block_trains_with_one_history_for_many_targets():
    torch.manual_seed(0)
    block = MixerBlock(16, 2).train()
    target, hist = torch.randn(3, 1, 4, 16), torch.randn(1, 5, 4, 16)
    mask = torch.tensor([[True, True, False, True, True]])
    t1, h1 = block.isolated(target, hist, mask)  # the shared history, as a served request in training mode
    t3, h3 = block.isolated(target, hist.expand(3, -1, -1, -1), mask.expand(3, -1))  # a copy per target
    torch.testing.assert_close(t1, t3)
    assert h1.shape == (1, 5, 4, 16)
    torch.testing.assert_close(h1.expand(3, -1, -1, -1), h3)


def test_trimming_keeps_every_valid_position_even_with_gaps(synth_prepared):
    rows = synth_prepared.rows("train")[-4:]
    batch = BatchLoader(synth_prepared, rows, 4, hist_len=8).build(rows)
    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask[0, [3, 6]] = True  # not right-aligned: a gap
    mask[1, 7] = True
    batch.hist_mask = mask
    trimmed = batch.trimmed_history()
    assert trimmed.hist_mask.shape == (4, 5) and int(trimmed.hist_mask.sum()) == 3
    assert torch.equal(trimmed.hist_rows, batch.hist_rows[:, 3:])
    empty = BatchLoader(synth_prepared, rows, 4, hist_len=8).build(rows[:0])
    assert empty.trimmed_history() is empty


def _cached_model(synth_prepared, steps: int):
    torch.manual_seed(0)
    return build_model("sif", FeatureLayout.from_dataset(synth_prepared), **SMALL, code_cache_steps=steps).train()


def test_code_cache_quantizes_a_row_once_per_refresh_period(synth_prepared):
    model = _cached_model(synth_prepared, steps=3)
    rows = synth_prepared.rows("train")[-128:]
    samples = BatchLoader(synth_prepared, rows, 128, hist_len=12, history_samples=True).build(rows).history_samples
    tok = model.tokenizer

    def fresh_codes() -> torch.Tensor:  # the codes of the current projection and codebooks
        with torch.no_grad():
            return tok.rvq.encode(tok.project(samples))

    model(BatchLoader(synth_prepared, rows, 128, hist_len=12, history_samples=True).build(rows))  # initializes
    first = fresh_codes()
    torch.testing.assert_close(model._cached_history(samples), tok.rvq.decode(model._cache_codes[samples.rows].long()))
    assert torch.equal(model._cache_codes[samples.rows].long(), first)  # step 2 encoded nothing
    with torch.no_grad():  # the projection learns: the cached codes go stale
        tok.proj.add_(torch.randn_like(tok.proj))
    moved = fresh_codes()
    assert not torch.equal(moved, first)
    model._cached_history(samples)  # step 3: still within the period, the old codes stay
    assert torch.equal(model._cache_codes[samples.rows].long(), first)
    model._cached_history(samples)  # step 4: three steps after step 1, every row is quantized again
    assert torch.equal(model._cache_codes[samples.rows].long(), moved)
    # the decoded history is the current codebooks' vectors of the cached codes
    torch.testing.assert_close(model._cached_history(samples), tok.rvq.decode(moved))
    model.eval()
    model.train()  # a new epoch starts from an empty cache
    assert model._cache_codes is None and model._cache_clock == 0


def test_code_cache_reads_fresh_codes_at_an_epoch_start(synth_prepared):
    """The first step after train() reads codes equal to on-the-fly quantization's, and the scores equal the
    reference path's in value (only the gradients and EMA feeds differ)."""
    rows = synth_prepared.rows("train")[-128:]
    batch = BatchLoader(synth_prepared, rows, 128, hist_len=12, history_samples=True).build(rows)
    cached = _cached_model(synth_prepared, steps=5)
    cached.eval()  # initialize the codebooks once, then freeze them (EMA updates would move them mid-forward)
    cached.tokenizer.rvq.initialized.fill_(True)
    cached.tokenizer.rvq.cfg = cached.tokenizer.rvq.cfg.model_copy(update={"ema_decay": 1.0, "dead_threshold": 0.0})
    reference = _cached_model(synth_prepared, steps=0)
    reference.load_state_dict(cached.state_dict())
    reference.tokenizer.rvq.cfg = cached.tokenizer.rvq.cfg
    torch.manual_seed(1)
    got = cached.train()(batch)
    torch.manual_seed(1)
    want = reference.train()(batch)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    assert set(got.aux_losses) == set(want.aux_losses)  # the label head reads the request rows instead


def test_code_cache_trains_projection_and_label_head_from_the_request_rows(synth_prepared):
    """With cached history codes the tokenizer still learns from the request rows: the task loss on the real
    labels, the auxiliary label loss and the commitment loss each reach the projection (through the request rows'
    straight-through quantization for the last two: ``rvq(x.detach())`` would cut them)."""
    model = _cached_model(synth_prepared, steps=100)
    rows = synth_prepared.rows("train")[-128:]
    batch = BatchLoader(synth_prepared, rows, 128, hist_len=12, history_samples=True).build(rows)
    out = model(batch)
    tok = model.tokenizer
    task = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, batch.labels)
    assert "aux_label" in out.aux_losses and "vq_commit" in out.aux_losses
    for name, loss in (("task", task), ("aux_label", out.aux_losses["aux_label"])):
        (grad,) = torch.autograd.grad(loss, tok.proj, retain_graph=True)
        assert grad.abs().sum() > 0, name
    (grad,) = torch.autograd.grad(out.aux_losses["vq_commit"], tok.proj, retain_graph=True)
    assert grad.abs().sum() > 0, "commitment"
    head = torch.autograd.grad(out.aux_losses["aux_label"], list(tok.aux_head.parameters()), retain_graph=True)
    assert all(g.abs().sum() > 0 for g in head)


def test_code_cache_needs_quantized_history(synth_prepared):
    with pytest.raises(ConfigError, match="code_cache_steps"):
        build_model(
            "sif", FeatureLayout.from_dataset(synth_prepared), **SMALL, code_cache_steps=5, quantize_history=False
        )
    with pytest.raises(ConfigError, match="code_cache_steps"):
        build_model("sif", FeatureLayout.from_dataset(synth_prepared), **SMALL, code_cache_steps=-1)


def test_code_export_in_segments_equals_one_segment(trained, synth_prepared, tmp_path):
    one = export_codes(trained, synth_prepared, tmp_path / "one", progress=False)
    many = export_codes(trained, synth_prepared, tmp_path / "many", progress=False, rows_per_segment=700)
    assert len(one.manifest["segments"]) == 1
    assert len(many.manifest["segments"]) == -(-synth_prepared.n_rows // 700)
    a, b = one.columns(), many.columns()
    for name in ("instance_id", "user", "ts", "payload", "responses", "known_at"):
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _scramble_history_items(batch, layout):
    """``batch`` whose history rows carry other item ids (every other field of theirs unchanged)."""
    import dataclasses

    item_col = [f.name for f in layout.cat_fields].index("item_id")
    samples = batch.history_samples
    cat = samples.cat.clone()
    cat[:, item_col] = cat[:, item_col].flip(0)
    assert not torch.equal(cat, samples.cat)
    return dataclasses.replace(batch, history_samples=dataclasses.replace(samples, cat=cat))


@pytest.mark.parametrize("isolate_target", [False, True])
def test_exact_fields_carry_the_history_item_id_past_the_quantizer(synth_prepared, isolate_target):
    """With the item id left out of a history row's quantized content (history_fields), a history row's item
    id still reaches the score through its exact slot, and only through it; the exact tables learn from it."""
    torch.manual_seed(0)
    layout = FeatureLayout.from_dataset(synth_prepared)
    others = [n for n in layout.field_names if n != "item_id"]
    params = {**SMALL, "history_fields": others, "history_responses": False, "isolate_target": isolate_target}
    rows = synth_prepared.rows("test")[:64]
    batch = BatchLoader(synth_prepared, rows, 64, hist_len=8, history_samples=True).build(rows)
    scrambled = _scramble_history_items(batch, layout)
    plain = build_model("sif", layout, **params).eval()
    exact = build_model("sif", layout, **params, exact_fields=["item_id"]).eval()
    with torch.no_grad():  # the control: without the slot the history item ids are invisible
        torch.testing.assert_close(plain(scrambled).logits, plain(batch).logits)
        assert not torch.allclose(exact(scrambled).logits, exact(batch).logits)
    exact.train()
    exact(batch).logits.sum().backward()
    grad = exact.exact[0].weight.grad
    hist_items = batch.history_samples.cat[:, [f.name for f in layout.cat_fields].index("item_id")].unique()
    target_items = batch.cat[:, [f.name for f in layout.cat_fields].index("item_id")].unique()
    only_history = hist_items[~torch.isin(hist_items, target_items)]
    assert len(only_history) and grad[only_history].abs().sum(1).gt(0).all()


def test_exact_fields_must_be_categorical_and_need_past_samples(synth_prepared):
    layout = FeatureLayout.from_dataset(synth_prepared)
    numeric = layout.num_fields[0].name
    with pytest.raises(ConfigError, match=f"exact_fields \\['{numeric}'\\] are not categorical"):
        build_model("sif", layout, **SMALL, exact_fields=[numeric])
    with pytest.raises(ConfigError, match="need whole past samples"):
        build_model("sif", layout, **SMALL, exact_fields=["item_id"], store="some/store")


@pytest.mark.parametrize("isolate_target", [False, True])
def test_head_fields_feed_the_request_field_embeddings_beside_the_target_row(synth_prepared, isolate_target):
    """``head_fields``: the head reads [the mixed target row's mean, the request's field embeddings]; the first
    part is what the paper's head reads from the same weights, the second the tokenizer's embeddings."""
    torch.manual_seed(0)
    layout = FeatureLayout.from_dataset(synth_prepared)
    rows = synth_prepared.rows("test")[:32]
    batch = BatchLoader(synth_prepared, rows, 32, hist_len=8, history_samples=True).build(rows)
    params = {**SMALL, "isolate_target": isolate_target}
    paper = build_model("sif", layout, **params).eval()
    wide = build_model("sif", layout, **params, head_fields=True).eval()
    wide.load_state_dict({k: v for k, v in paper.state_dict().items() if not k.startswith("head.")}, strict=False)
    seen: dict[str, torch.Tensor] = {}
    for name, model in (("paper", paper), ("wide", wide)):
        model.head.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, args[0]))
        with torch.no_grad():
            model(batch)
    width = seen["paper"].shape[1]
    assert seen["wide"].shape[1] == width + layout.n_fields * wide.cfg.field_dim
    torch.testing.assert_close(seen["wide"][:, :width], seen["paper"])
    with torch.no_grad():
        torch.testing.assert_close(seen["wide"][:, width:], wide.tokenizer.embed(batch).flatten(1))
    wide.train()
    wide(batch).logits.sum().backward()
    first = cast(torch.nn.Linear, wide.head[0])
    assert first.weight.grad is not None and first.weight.grad[:, width:].abs().sum() > 0
