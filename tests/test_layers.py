import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sampletok.nn.embedding import pooled_lookup, pooled_lookup_reference
from sampletok.nn.layers import RankMixerBlock, TargetAttention


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 12), st.integers(1, 9), st.integers(0, 10_000))
def test_target_attention_fast_path_equals_reference(b, n, d, seed):
    torch.manual_seed(seed)
    att = TargetAttention(d, [7, 5])
    q, k = torch.randn(b, d), torch.randn(b, n, d)
    mask = torch.rand(b, n) > 0.3
    q.requires_grad_(True)
    fast, ref = att(q, k, mask), att.forward_reference(q, k, mask)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    params = [q, *att.parameters()]
    for g_fast, g_ref in zip(torch.autograd.grad(fast.pow(2).sum(), params),
                             torch.autograd.grad(ref.pow(2).sum(), params)):
        torch.testing.assert_close(g_fast, g_ref, atol=1e-5, rtol=1e-4)


def test_rankmixer_token_mixing_is_a_permutation():
    block = RankMixerBlock(4, 8)
    x = torch.arange(2 * 4 * 8, dtype=torch.float32).view(2, 4, 8)
    mixed = x.view(2, 4, 4, 2).transpose(1, 2).reshape(2, 4, 8)
    assert sorted(mixed.flatten().tolist()) == sorted(x.flatten().tolist())
    assert block(x).shape == x.shape


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
