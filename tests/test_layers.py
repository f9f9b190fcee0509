import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sampletok.nn.embedding import pooled_lookup, pooled_lookup_reference
from sampletok.nn.layers import RankMixerBlock, TargetAttention


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 6), st.integers(1, 12), st.integers(1, 9), st.integers(0, 10_000), st.sampled_from(["sum", "mean"])
)
def test_target_attention_fast_path_equals_reference(b, n, d, seed, pooling):
    torch.manual_seed(seed)
    att = TargetAttention(d, [7, 5], pooling=pooling)
    q, k = torch.randn(b, d), torch.randn(b, n, d)
    mask = torch.rand(b, n) > 0.3
    q.requires_grad_(True)
    fast, ref = att(q, k, mask), att.forward_reference(q, k, mask)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    params = [q, *att.parameters()]
    for g_fast, g_ref in zip(
        torch.autograd.grad(fast.pow(2).sum(), params), torch.autograd.grad(ref.pow(2).sum(), params), strict=True
    ):
        torch.testing.assert_close(g_fast, g_ref, atol=1e-5, rtol=1e-4)


def test_mean_pooling_is_the_sum_over_the_valid_rows_and_does_not_grow_with_repeated_history():
    torch.manual_seed(0)
    d = 5
    summed, mean = TargetAttention(d, [6]), TargetAttention(d, [6], pooling="mean")
    mean.load_state_dict(summed.state_dict())
    q, k = torch.randn(4, d), torch.randn(4, 7, d)
    mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4, [False] * 7, [True, False] * 3 + [True]])
    count = mask.sum(1, keepdim=True).clamp(min=1).float()
    torch.testing.assert_close(mean(q, k, mask), summed(q, k, mask) / count)
    assert mean(q, k, mask)[2].abs().max() == 0  # no history: zeros, not NaN
    twice, twice_mask = torch.cat([k, k], dim=1), torch.cat([mask, mask], dim=1)  # every row read twice
    torch.testing.assert_close(summed(q, twice, twice_mask), 2 * summed(q, k, mask))
    torch.testing.assert_close(mean(q, twice, twice_mask), mean(q, k, mask))
    with pytest.raises(Exception, match="pooling must be 'sum' or 'mean'"):
        TargetAttention(d, pooling="max")  # type: ignore[arg-type]


def _token_mixing_reference(x: torch.Tensor) -> torch.Tensor:
    """RankMixer's token mixing written from the paper, by explicit loops: split every token's channels into
    T heads of d/T; output token t is the concatenation, over input tokens s = 0..T-1, of head t of token s."""
    b, t, d = x.shape
    dh = d // t
    out = torch.empty_like(x)
    for i in range(b):
        for head in range(t):
            out[i, head] = torch.cat([x[i, s, head * dh : (head + 1) * dh] for s in range(t)])
    return out


@pytest.mark.parametrize("t,d", [(4, 8), (3, 12), (2, 6)])
def test_rankmixer_token_mixing_equals_paper_reference(t, d):
    """The residual branch that enters the first LayerNorm is x + mixing(x), with mixing as in the paper (distinct
    values, so a transposed or shifted order fails), and the whole block equals the reference formula."""
    torch.manual_seed(0)
    block = RankMixerBlock(t, d).eval()
    x = torch.arange(2 * t * d, dtype=torch.float32).view(2, t, d) / (2 * t * d)
    seen: list[torch.Tensor] = []
    handle = block.norm1.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    out = block(x)
    handle.remove()
    expected_mix = _token_mixing_reference(x)
    assert not torch.equal(expected_mix, x)  # the reference is not the identity: an unmixed block must fail
    torch.testing.assert_close(seen[0] - x, expected_mix)
    # whole block: residual + LayerNorm, then a per-token FFN (token t has its own weights), residual + LayerNorm
    h1 = torch.nn.functional.layer_norm(x + expected_mix, (d,), block.norm1.weight, block.norm1.bias)
    ffn = torch.stack(
        [torch.nn.functional.gelu(h1[:, k] @ block.w1[k] + block.b1[k]) @ block.w2[k] + block.b2[k] for k in range(t)],
        dim=1,
    )
    ref = torch.nn.functional.layer_norm(h1 + ffn, (d,), block.norm2.weight, block.norm2.bias)
    torch.testing.assert_close(out, ref)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 4), st.integers(1, 5), st.integers(0, 6), st.integers(1, 5), st.integers(0, 10_000))
def test_pooled_lookup_equals_reference_with_gradients(b, n, length, vocab, seed):
    """Multi-hot mean pooling: the fused embedding_bag path and the literal masked mean agree, also for
    bags that are all padding (→ zeros) and for empty bags."""
    torch.manual_seed(seed)
    table = torch.nn.Embedding(vocab + 1, 3, padding_idx=0)
    codes = torch.randint(0, vocab + 1, (b, n, length))
    fast, ref = pooled_lookup(table, codes), pooled_lookup_reference(table, codes)
    assert fast.shape == ref.shape == (b, n, 3)
    torch.testing.assert_close(fast, ref)
    g_ref = torch.autograd.grad(ref.pow(2).sum(), table.weight)[0]
    if fast.requires_grad:
        torch.testing.assert_close(torch.autograd.grad(fast.pow(2).sum(), table.weight)[0], g_ref)
    else:  # empty bags: a constant zero, and the literal formula has no gradient either
        assert length == 0 or b == 0
        assert not g_ref.any()


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 5),  # batch
    st.integers(1, 3),  # heads
    st.integers(1, 9),  # queries
    st.integers(1, 48),  # keys: both sides of the short kernel's limit
    st.sampled_from([2, 8]),  # head dim
    st.sampled_from(["none", "keys", "full"]),
    st.booleans(),  # a context of batch 1 shared by every row
    st.integers(0, 10_000),
)
def test_attention_kernels_agree_with_the_reference(b, h, lq, lk, dh, mask_kind, shared, seed):
    from sampletok.nn.attention import attend, use_attention_kernel

    torch.manual_seed(seed)
    kb = 1 if shared else b
    q = torch.randn(b, h, lq, dh, requires_grad=True)
    k, v = torch.randn(kb, h, lk, dh, requires_grad=True), torch.randn(kb, h, lk, dh, requires_grad=True)
    mask = None
    if mask_kind != "none":
        shape = (b, 1, 1, lk) if mask_kind == "keys" else (b, h, lq, lk)
        mask = torch.rand(shape) > 0.4
        mask[..., torch.randint(lk, ())] = True  # every query has a key (SDPA's all-masked rows are NaN)
    with use_attention_kernel("reference"):
        ref = attend(q, k, v, mask)
    g_ref = torch.autograd.grad(ref.pow(2).sum(), (q, k, v))
    for kernel in ("short", "sdpa", "auto"):
        with use_attention_kernel(kernel):
            out = attend(q, k, v, mask)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4, msg=f"{kernel} values")
        for g, gr in zip(torch.autograd.grad(out.pow(2).sum(), (q, k, v)), g_ref, strict=True):
            torch.testing.assert_close(g, gr, atol=1e-4, rtol=1e-4, msg=f"{kernel} gradients")


def test_unknown_attention_kernel_is_a_config_error():
    from sampletok.errors import ConfigError
    from sampletok.nn.attention import use_attention_kernel

    with pytest.raises(ConfigError, match="unknown attention kernel 'flash'"), use_attention_kernel("flash"):  # type: ignore[arg-type]
        pass


def _assert_same_values_and_gradients(out: torch.Tensor, ref: torch.Tensor, inputs: tuple) -> None:
    """A grouped path against its spread reference: equal values, and equal gradients of every input."""
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    grads = torch.autograd.grad(out.pow(2).sum(), inputs)
    for a, b in zip(grads, torch.autograd.grad(ref.pow(2).sum(), inputs), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(1, 6), min_size=1, max_size=5),  # rows per history group (a served request's candidates)
    st.integers(1, 12),  # keys
    st.integers(1, 2),  # heads
    st.booleans(),  # a group without any valid key
    st.integers(0, 10_000),
)
def test_grouped_cross_attention_equals_the_context_spread_to_every_row(sizes, n, heads, empty, seed):
    """Several requests in one served forward: each history projected once, equal (values and gradients) to
    the plain path that copies each history to each of its rows."""
    from sampletok.nn.layers import TransformerBlock, key_padding_mask

    torch.manual_seed(seed)
    d, g = 4 * heads, len(sizes)
    block = TransformerBlock(d, heads)
    group = torch.repeat_interleave(torch.arange(g), torch.tensor(sizes))
    x = torch.randn(len(group), d, requires_grad=True)
    context = torch.randn(g, n, d, requires_grad=True)
    valid = torch.rand(g, n) > 0.3
    valid[:, -1] = True
    if empty:
        valid[0] = False
    ref = block(x.unsqueeze(1), key_padding_mask(valid[group], 1), context=context[group])[:, 0]
    out = block.forward_grouped(x, context, valid, group)
    _assert_same_values_and_gradients(out, ref, (x, context, *block.parameters()))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(1, 6), min_size=1, max_size=5),  # rows per history group
    st.integers(1, 12),  # keys
    st.sampled_from([3, 8]),  # dim
    st.integers(0, 10_000),
)
def test_grouped_target_attention_equals_the_keys_spread_to_every_row(sizes, n, d, seed):
    """DIN's activation unit over several served requests' histories, each read once: the same values and
    gradients as the per-row path over the history copied to each of its rows."""
    from sampletok.nn.layers import TargetAttention

    torch.manual_seed(seed)
    att = TargetAttention(d, [6, 4])
    g = len(sizes)
    group = torch.repeat_interleave(torch.arange(g), torch.tensor(sizes))
    query = torch.randn(len(group), d, requires_grad=True)
    keys = torch.randn(g, n, d, requires_grad=True)
    mask = torch.rand(g, n) > 0.3
    ref = att(query, keys[group], mask[group])
    out = att.forward_grouped(query, keys, mask, group)
    _assert_same_values_and_gradients(out, ref, (query, keys, *att.parameters()))
