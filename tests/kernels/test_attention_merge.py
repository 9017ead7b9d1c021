"""merge_attention_ against its twin: odd query counts and value widths, strided (transposed) partials as SDPA
returns them, a chain of merges, bad shapes refused."""
import pytest
import torch
from helpers import DEVICE, GPU, assert_close

from klconvert.kernels.attention_merge import merge_attention_
from klconvert.kernels.naive_attention_merge import naive_merge_attention


def partial(B, H, T, Dv, dtype, transposed):
    """A block's (o, lse) as an attention kernel returns them: possibly laid out [B, T, H, ...] underneath."""
    if transposed:
        return (torch.randn(B, T, H, Dv, device=DEVICE).to(dtype).transpose(1, 2),
                torch.randn(B, T, H, device=DEVICE).transpose(1, 2) * 4)
    return torch.randn(B, H, T, Dv, device=DEVICE).to(dtype), torch.randn(B, H, T, device=DEVICE) * 4


@pytest.mark.parametrize("B, H, T, Dv", [(1, 1, 1, 16), (2, 3, 37, 24), (1, 4, 65, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
def test_merge_attention_equals_its_twin(B, H, T, Dv, dtype, transposed):
    o, lse = partial(B, H, T, Dv, torch.float32, False)
    o_b, lse_b = partial(B, H, T, Dv, dtype, transposed)
    ref_o, ref_lse = naive_merge_attention(o, lse, o_b, lse_b)
    merge_attention_(o, lse, o_b, lse_b)
    assert_close(o, ref_o, 1e-6, "output")
    assert_close(lse, ref_lse, 1e-6, "lse")


def test_a_chain_of_merges_is_attention_over_the_union_of_the_blocks():
    q, k, v = torch.randn(1, 2, 9, 16, device=DEVICE), torch.randn(1, 2, 50, 16, device=DEVICE), \
        torch.randn(1, 2, 50, 12, device=DEVICE)
    scores = q @ k.transpose(-1, -2)
    whole = scores.softmax(-1) @ v
    o = lse = None
    for a, b in [(0, 7), (7, 30), (30, 50)]:
        s = scores[..., a:b]
        o_b, lse_b = s.softmax(-1) @ v[:, :, a:b], s.logsumexp(-1)
        if o is None:
            o, lse = o_b.clone(), lse_b.clone()
        else:
            merge_attention_(o, lse, o_b, lse_b)
    assert_close(o, whole, 1e-5, "merged")
    assert_close(lse, scores.logsumexp(-1), 1e-6, "lse")


@GPU
def test_merge_attention_at_prefill_shapes():
    o, lse = partial(1, 32, 8192, 128, torch.float32, False)
    o_b, lse_b = partial(1, 32, 8192, 128, torch.bfloat16, True)
    ref_o, ref_lse = naive_merge_attention(o, lse, o_b, lse_b)
    merge_attention_(o, lse, o_b, lse_b)
    assert_close(o, ref_o, 1e-6, "output")
    assert_close(lse, ref_lse, 1e-6, "lse")


def test_merge_attention_refuses_what_it_cannot_merge():
    o, lse = partial(1, 2, 5, 8, torch.float32, False)
    with pytest.raises(ValueError, match="fp32"):
        merge_attention_(o.bfloat16(), lse, o, lse)
    with pytest.raises(ValueError, match="do not agree"):
        merge_attention_(o, lse, o[:, :, :4], lse[:, :, :4])
    with pytest.raises(ValueError, match="contiguous"):
        merge_attention_(o, lse, o.transpose(-1, -2).contiguous().transpose(-1, -2), lse)
