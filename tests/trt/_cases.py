"""Named cases and input builders for the UCM op plugins (shared by the CPU, GPU and TensorRT tiers).

Inputs follow the op schema: the pool holds the PAST tokens only; the chunk's K/V come as ``k``/``v``.
The reference sees a pool with the chunk appended (``pool_full``); the pool handed to the op has
the chunk slots poisoned with a large finite value, so a kernel that reads the chunk from the pool
instead of ``k``/``v`` fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ucm_trt.kernels.aot import PagedAttentionGeometry
from ucm_trt.reference import paged_rerope_attention, paged_sparse_attention

POISON = 7.0


@dataclass(frozen=True, kw_only=True)
class Case:
    batch: int = 2
    hq: int = 4
    hkv: int = 2
    d: int = 32
    bs: int = 16
    t: int = 3
    lens: tuple[int, ...] = (40, 23)
    max_blocks: int = 5
    num_blocks: int = 16
    num_sel: int = 3
    select_all: bool = False
    rerope_window: int | None = None
    logn: int = 0
    seed: int = 0

    def geometry(self) -> PagedAttentionGeometry:
        return PagedAttentionGeometry(
            num_q_heads=self.hq, num_kv_heads=self.hkv, head_dim=self.d, block_size=self.bs, scale=self.d**-0.5,
            rerope_window=self.rerope_window, rope_theta=10000.0, logn_training_length=self.logn,
        )  # fmt: skip

    def attrs(self) -> dict:
        """Plugin field values as the schema names them."""
        a = dict(num_q_heads=self.hq, num_kv_heads=self.hkv, head_dim=self.d, block_size=self.bs, scale=self.d**-0.5)
        if self.rerope_window is not None:
            a.update(rope_theta=10000.0, rerope_window=self.rerope_window, logn_training_length=self.logn)
        return a

    @property
    def op_name(self) -> str:
        return "UcmPagedSparseAttention" if self.rerope_window is None else "UcmPagedReRoPEAttention"


CASES = {
    # small decode step, partial last block, 2 sequences of different length, permuted physical blocks
    "decode": Case(t=1),
    # short chunk whose first token shares a block with the past (partial last past block)
    "chunk3": Case(t=3),
    # prefill-sized chunk spanning several blocks (two query tiles with the decode tactic)
    "prefill": Case(t=20, lens=(40, 30)),
    # one block only: the whole sequence is the chunk, no past
    "one_block": Case(t=5, lens=(5, 9), max_blocks=1, num_sel=1),
    # every block selected equals dense attention
    "select_all": Case(t=2, lens=(70, 33), select_all=True),
    # GQA 8, head_dim 64, block 32
    "gqa8_d64": Case(hq=8, hkv=1, d=64, bs=32, t=5, lens=(70, 9)),
    # MHA (group 1), head_dim 128
    "mha_d128": Case(hq=2, hkv=2, d=128, bs=16, t=2, lens=(50, 20)),
    # ReRoPE: window smaller than the distances, with and without log-n
    "rerope": Case(t=3, rerope_window=8),
    "rerope_logn_prefill": Case(t=20, lens=(60, 30), rerope_window=8, logn=16),
    # head_dim that is not a power of two (padded tiles, masked lanes): Phi-3-like 96, 80
    "d96_gqa4": Case(hq=8, hkv=2, d=96, bs=16, t=2, lens=(50, 20)),
    "d80": Case(hq=4, hkv=1, d=80, bs=32, t=3, lens=(70, 40)),
    # block 64: one block per key tile (smaller blocks are gathered several per tile)
    "bs64": Case(t=3, bs=64, lens=(150, 70), max_blocks=3, num_blocks=8, num_sel=2),
    "rerope_d80": Case(hq=4, hkv=2, d=80, bs=16, t=4, lens=(45, 30), rerope_window=8, logn=16),
}


def make_inputs(case: Case, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """``(inputs, pool_full)``: op inputs in schema order (dict) and the pool with the chunk appended."""
    g = torch.Generator().manual_seed(case.seed)
    b, t = case.batch, case.t
    assert len(case.lens) == b
    perm = torch.randperm(case.num_blocks, generator=g)[: b * case.max_blocks].view(b, case.max_blocks).int()
    pool_full = torch.randn(case.num_blocks, 2, case.hkv, case.bs, case.d, generator=g)
    q = torch.randn(b, case.hq, t, case.d, generator=g)
    k = torch.empty(b, case.hkv, t, case.d)
    v = torch.empty(b, case.hkv, t, case.d)
    pool = pool_full.clone()
    for i, n in enumerate(case.lens):
        for j in range(t):
            p = n - t + j
            phys, off = int(perm[i, p // case.bs]), p % case.bs
            k[i, :, j] = pool_full[phys, 0, :, off]
            v[i, :, j] = pool_full[phys, 1, :, off]
            pool[phys, :, :, off] = POISON
    width = case.max_blocks if case.select_all else case.num_sel
    sel = torch.full((b, case.hkv, width), -1, dtype=torch.int32)
    for i, n in enumerate(case.lens):
        nb = -(-n // case.bs)
        for h in range(case.hkv):
            ids = list(range(nb)) if case.select_all else sorted(torch.randperm(nb, generator=g)[: case.num_sel].tolist())
            sel[i, h, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
    seq = torch.tensor(case.lens, dtype=torch.int32)
    cast = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731
    inputs = {
        "q": cast(q), "k": cast(k), "v": cast(v), "kv_pool": cast(pool),
        "block_table": perm.to(device), "seq_lens": seq.to(device), "selection": sel.to(device),
    }  # fmt: skip
    return inputs, cast(pool_full)


def reference(case: Case, inputs: dict, pool_full: torch.Tensor) -> torch.Tensor:
    """fp32 reference output of the op (``ucm_trt.reference``) on the same low-precision inputs."""
    args = (inputs["q"].cpu(), pool_full.cpu(), inputs["block_table"].cpu(), inputs["seq_lens"].cpu(),
            inputs["selection"].cpu())  # fmt: skip
    if case.rerope_window is None:
        return paged_sparse_attention(*args, scale=case.d**-0.5)
    return paged_rerope_attention(*args, window=case.rerope_window, theta=10000.0,
                                  logn_training_length=case.logn or None, scale=case.d**-0.5)  # fmt: skip
