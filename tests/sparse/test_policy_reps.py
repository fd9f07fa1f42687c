"""ESA / GSA block scoring: upstream's dot / Quest bound over every layer at once vs the per-layer
functions, and the per-head vote (ucm-trt's default) vs its head-by-head reference; the policies'
batched retrieval picks the same blocks as their per-layer reference with and without the vote."""

from __future__ import annotations

import math

import pytest
import torch

from ucm_trt.config import Budget, SparseConfig
from ucm_trt.sparse.batched import BlockRepStore
from ucm_trt.sparse.policies import ESAPolicy, GSAPolicy
from ucm_trt.sparse.policies._reps import (
    host_layer_scores,
    host_layer_vote_scores,
    host_scores,
    host_vote_scores,
    layer_view,
)
from ucm_trt.sparse.representations import block_lens_from_seq_lens, block_mean, block_minmax
from ucm_trt.sparse.score import dot_scores, quest_scores


def _case(seed, layers=3, hq=6, hkv=2, d=16, nb=11, bs=8, integer=True):
    g = torch.Generator().manual_seed(seed)
    if integer:  # small integers: every product and sum exact in float32
        k = torch.randint(-4, 5, (layers, nb, hkv, bs, d), generator=g).float()
        q = torch.randint(-4, 5, (layers, hq, d), generator=g).float()
    else:
        k = torch.randn(layers, nb, hkv, bs, d, generator=g)
        q = torch.randn(layers, hq, d, generator=g)
    seq = (nb - 1) * bs + 3  # partial last block
    lens = block_lens_from_seq_lens(torch.tensor(seq), nb, bs)
    return q, k, lens


def _reps(k, lens, representation):
    """``[L, Hkv, D, nb]`` store views (a min / max pair for minmax)."""
    if representation == "mean":
        return torch.stack([block_mean(x, lens) for x in k]).permute(0, 2, 3, 1)
    mins, maxs = zip(*(block_minmax(x, lens) for x in k), strict=True)
    return torch.stack(mins).permute(0, 2, 3, 1), torch.stack(maxs).permute(0, 2, 3, 1)


@pytest.mark.parametrize("representation", ["mean", "minmax"])
@pytest.mark.parametrize("integer", [True, False])
def test_host_scores_equal_per_layer_reference(representation, integer):
    q, k, lens = _case(3, integer=integer)
    reps = _reps(k, lens, representation)
    got = host_scores(reps, q)
    for layer in range(k.shape[0]):
        if representation == "mean":
            want = dot_scores(q[layer][None], block_mean(k[layer], lens))[0]
        else:
            kmin, kmax = block_minmax(k[layer], lens)
            want = quest_scores(q[layer][None], kmin, kmax)[0]
        torch.testing.assert_close(got[layer], want, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(host_layer_scores(layer_view(reps, layer), q[layer]), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("representation", ["mean", "minmax"])
def test_vote_scores_equal_the_head_by_head_reference(representation):
    q, k, lens = _case(5, layers=2, hq=6, hkv=2, d=16, nb=9, integer=False)
    reps = _reps(k, lens, representation)
    got = host_vote_scores(q, reps)
    assert got.shape == (2, 2, 9)
    torch.testing.assert_close(got.sum(-1), torch.full((2, 2), 3.0))  # one unit of vote per query head
    for layer in range(2):
        torch.testing.assert_close(got[layer], host_layer_vote_scores(q[layer], layer_view(reps, layer)),
                                   rtol=1e-5, atol=1e-6)


def test_vote_lets_one_sharp_head_win_over_broad_heads():
    # One KV head serving 3 query heads, 10 blocks. Logits (after 1/sqrt(D)): head 0 is sharp, 10 on
    # block 4 and 0 elsewhere; heads 1-2 are broad, 8 on block 7, 7 on every other block but 4. The
    # summed logits (upstream's group-mean dot ranks the same) prefer block 7 (16 vs 10); each
    # head's softmax mass prefers block 4 (~1.0 vs 2 x 0.25).
    d, nb = 4, 10
    reps = torch.zeros(1, 1, d, nb)
    reps[0, 0, 0, 4] = 1.0
    reps[0, 0, 1] = 7.0
    reps[0, 0, 1, 7] = 8.0
    reps[0, 0, 1, 4] = 0.0
    q = torch.zeros(1, 3, d)
    q[0, 0, 0] = 10.0 * math.sqrt(d)
    q[0, 1, 1] = q[0, 2, 1] = math.sqrt(d)
    assert int(host_scores(reps, q)[0, 0].argmax()) == 7
    assert int(host_vote_scores(q, reps)[0, 0].argmax()) == 4



@pytest.mark.parametrize("vote", [False, True])
@pytest.mark.parametrize("selection", ["shared", "per_head"])
def test_esa_gsa_batched_selection_equals_per_layer(selection, vote, bind_policy):
    q, k, lens = _case(11, layers=3, hq=8, hkv=2, d=16, nb=23, bs=8)
    layers, nb, hkv = k.shape[0], k.shape[1], k.shape[2]
    sparse = SparseConfig(block_size=8, budget=Budget.ratio(0.25), selection=selection)
    store = BlockRepStore(num_layers=layers, num_kv_heads=hkv, head_dim=16)
    store.append(torch.stack([block_mean(x, lens) for x in k]))
    per = [store.layer(layer) for layer in range(layers)]
    esa = bind_policy(ESAPolicy(vote=vote), layers, 8, hkv, 16, sparse)
    got = esa._select_all(store.reps(), nb, q)
    gsa = bind_policy(GSAPolicy(prefetch_blocks=1, vote=vote), layers, 8, hkv, 16, sparse)
    got_gsa = gsa._select_all(store.reps(), nb, q)
    for layer in range(layers):
        want = esa._select(per, nb, list(q), layer)
        assert torch.equal(got[layer, :, : want.shape[1]], want)
        want = gsa._select(per, nb, list(q), layer)
        assert torch.equal(got_gsa[layer, :, : want.shape[1]], want)


@pytest.mark.parametrize("policy", [ESAPolicy, GSAPolicy])
def test_vote_flag_is_checked(policy):
    with pytest.raises(TypeError, match="vote must be a bool"):
        policy(vote=1)
