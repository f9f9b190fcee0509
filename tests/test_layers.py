import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sampletok.nn.layers import RankMixerBlock, TargetAttention


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 12), st.integers(1, 9), st.integers(0, 10_000))
def test_target_attention_fast_path_equals_reference(b, n, d, seed):
    torch.manual_seed(seed)
    att = TargetAttention(d, [7, 5])
    q, k = torch.randn(b, d), torch.randn(b, n, d)
    mask = torch.rand(b, n) > 0.3
    torch.testing.assert_close(att(q, k, mask), att.forward_reference(q, k, mask), atol=1e-5, rtol=1e-5)


def test_rankmixer_token_mixing_is_a_permutation():
    block = RankMixerBlock(4, 8)
    x = torch.arange(2 * 4 * 8, dtype=torch.float32).view(2, 4, 8)
    mixed = x.view(2, 4, 4, 2).transpose(1, 2).reshape(2, 4, 8)
    assert sorted(mixed.flatten().tolist()) == sorted(x.flatten().tolist())
    assert block(x).shape == x.shape
