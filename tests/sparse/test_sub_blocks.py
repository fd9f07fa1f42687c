"""ESA / GSA sub-block representation (``sub_block_tokens``): the sub-block means against a token-by-token
reference, a block scoring its best sub-block (or the mass of its sub-blocks with the vote), the
batched retrieval equal to the per-layer reference, and a needle of a few tokens found where the block
mean dilutes it."""

from __future__ import annotations

import pytest
import torch

from ucm_trt.config import Budget, SparseConfig
from ucm_trt.sparse.batched import BlockRepStore
from ucm_trt.sparse.policies import ESAPolicy, GSAPolicy
from ucm_trt.sparse.policies.esa import sub_block_scores
from ucm_trt.sparse.representations import block_lens_from_seq_lens, block_mean, block_submeans


def test_block_submeans_equal_a_token_loop():
    g = torch.Generator().manual_seed(0)
    nb, hkv, bs, d, sb = 5, 2, 8, 4, 4
    k = torch.randint(-4, 5, (nb, hkv, bs, d), generator=g).float()
    lens = block_lens_from_seq_lens(torch.tensor(4 * bs + 3), nb, bs)  # last block: 3 tokens
    got = block_submeans(k, lens, sb)
    assert got.shape == (nb * sb, hkv, d)
    w = bs // sb
    for b in range(nb):
        for j in range(sb):
            toks = [t for t in range(j * w, (j + 1) * w) if t < int(lens[b])]
            want = k[b, :, toks].mean(1) if toks else torch.zeros(hkv, d)
            torch.testing.assert_close(got[b * sb + j], want)
    torch.testing.assert_close(block_submeans(k, lens, 1), block_mean(k, lens))
    with pytest.raises(ValueError, match="must divide block_size"):
        block_submeans(k, lens, 3)


def test_sub_block_scores_max_and_mass():
    g = torch.Generator().manual_seed(1)
    L, hq, hkv, d, nb, sb = 2, 4, 2, 8, 6, 4
    q = torch.randn(L, hq, d, generator=g)
    reps = torch.randn(L, hkv, d, nb * sb, generator=g)
    dot = sub_block_scores(q, reps, sb, vote=False)
    qg = q.reshape(L, hkv, hq // hkv, d).mean(2)
    for b in range(nb):
        per_sub = torch.einsum("lhd,lhdn->lhn", qg, reps[..., b * sb : (b + 1) * sb])
        torch.testing.assert_close(dot[..., b], per_sub.amax(-1))
    vote = sub_block_scores(q, reps, sb, vote=True)
    torch.testing.assert_close(vote.sum(-1), torch.full((L, hkv), float(hq // hkv)))  # every head: one unit



@pytest.mark.parametrize("vote", [False, True])
@pytest.mark.parametrize("selection", ["shared", "per_head"])
def test_sub_block_batched_selection_equals_per_layer(selection, vote, bind_policy):
    g = torch.Generator().manual_seed(11)
    layers, hq, hkv, d, nb, bs, sb = 3, 8, 2, 16, 23, 8, 4
    k = torch.randint(-4, 5, (layers, nb, hkv, bs, d), generator=g).float()
    q = torch.randint(-4, 5, (layers, hq, d), generator=g).float()
    lens = block_lens_from_seq_lens(torch.tensor((nb - 1) * bs + 3), nb, bs)
    sparse = SparseConfig(block_size=bs, budget=Budget.ratio(0.25), selection=selection)
    store = BlockRepStore(num_layers=layers, num_kv_heads=hkv, head_dim=d)
    store.append(torch.stack([block_submeans(x, lens, sb) for x in k]))
    per = [store.layer(layer) for layer in range(layers)]
    for policy in (ESAPolicy(vote=vote, sub_block_tokens=bs // sb),
                   GSAPolicy(prefetch_blocks=1, vote=vote, sub_block_tokens=bs // sb)):
        p = bind_policy(policy, layers, hq, hkv, d, sparse)
        assert p.sub_blocks == sb
        got = p._select_all(store.reps(), nb, q)
        for layer in range(layers):
            want = p._select(per, nb, list(q), layer)
            assert torch.equal(got[layer, :, : want.shape[1]], want)


def test_sub_blocks_find_a_short_needle_the_block_mean_dilutes():
    # 20 blocks of 32 tokens; block 7 holds a 4-token needle aligned with the query, block 12 a mild
    # bias over all its tokens. The block mean ranks block 12 first, the best 8-token sub-block block 7.
    nb, bs, d = 20, 32, 16
    g = torch.Generator().manual_seed(3)
    k = 0.1 * torch.randn(1, nb, 1, bs, d, generator=g)
    q = torch.zeros(1, 1, d)
    q[0, 0, 0] = 1.0
    k[0, 7, 0, 8:12, 0] += 4.0  # needle: 4 tokens, mean over the block +0.5
    k[0, 12, 0, :, 0] += 0.8  # broad: every token, block mean +0.8
    lens = torch.full((nb,), bs, dtype=torch.int32)
    mean = block_mean(k[0], lens).permute(1, 2, 0)[None]
    assert int(sub_block_scores(q, mean, 1, vote=False)[0, 0].argmax()) == 12
    sub = block_submeans(k[0], lens, 4).permute(1, 2, 0)[None]
    assert int(sub_block_scores(q, sub, 4, vote=False)[0, 0].argmax()) == 7


@pytest.mark.parametrize("policy", [ESAPolicy, GSAPolicy])
def test_sub_block_tokens_are_checked(policy, bind_policy):
    with pytest.raises(ValueError, match="sub_block_tokens must be None or an int >= 1"):
        policy(sub_block_tokens=0)
    with pytest.raises(ValueError, match="must divide SparseConfig.block_size"):
        bind_policy(policy(sub_block_tokens=3), 1, 2, 1, 8, SparseConfig(block_size=16))
    assert bind_policy(policy(), 1, 2, 1, 8, SparseConfig(block_size=16)).sub_blocks == 1
