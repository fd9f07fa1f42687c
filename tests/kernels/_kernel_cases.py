"""Random paged-KV cases for the kernel tests (fresh inputs from a seeded generator per test).

Physical block 0 is reserved as the null block and never mapped; the other physical blocks
are handed out in a random permutation. Slots past ``seq_len`` in mapped blocks and every
unmapped block are filled with NaN, so a kernel that reads a token it must not see fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedCase:
    q: torch.Tensor
    kv_pool: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    block_size: int

    @property
    def num_blocks(self) -> list[int]:
        bs = self.block_size
        return [(int(n) + bs - 1) // bs for n in self.seq_lens.tolist()]


def make_paged_case(
    *, lens, hkv, group, d, bs, tq, dtype, device, gen, extra_blocks=2, poison=True
) -> PagedCase:
    b = len(lens)
    nbs = [(n + bs - 1) // bs for n in lens]
    max_blocks = max(nbs) + extra_blocks
    num_phys = 1 + sum(nbs) + 3
    pool = torch.randn((num_phys, 2, hkv, bs, d), generator=gen, dtype=torch.float32)
    perm = (torch.randperm(num_phys - 1, generator=gen) + 1).tolist()
    table = torch.zeros((b, max_blocks), dtype=torch.int32)
    used = torch.zeros(num_phys, dtype=torch.bool)
    it = iter(perm)
    for i, nb in enumerate(nbs):
        for j in range(nb):
            p = next(it)
            table[i, j] = p
            used[p] = True
    if poison:
        pool[~used] = float("nan")
        for i, n in enumerate(lens):
            last = int(table[i, nbs[i] - 1])
            pool[last, :, :, n - (nbs[i] - 1) * bs:] = float("nan")
    q = torch.randn((b, hkv * group, tq, d), generator=gen, dtype=torch.float32)
    return PagedCase(
        q=q.to(dtype).to(device),
        kv_pool=pool.to(dtype).to(device),
        block_table=table.to(device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        block_size=bs,
    )


def random_selection(nbs, hkv, width, gen, device, *, empty_row=False) -> torch.Tensor:
    """Sorted random subsets of each sequence's blocks (any subset: windows are not forced here)."""
    sel = torch.full((len(nbs), hkv, width), -1, dtype=torch.int32)
    for b, nb in enumerate(nbs):
        for h in range(hkv):
            if empty_row and b == 0 and h == 0:
                continue
            k = int(torch.randint(1, min(width, nb) + 1, (1,), generator=gen))
            ids = torch.randperm(nb, generator=gen)[:k].sort().values
            sel[b, h, :k] = ids.to(torch.int32)
    return sel.to(device)


def all_selection(nbs, hkv, device) -> torch.Tensor:
    width = max(nbs)
    sel = torch.full((len(nbs), hkv, width), -1, dtype=torch.int32)
    for b, nb in enumerate(nbs):
        sel[b, :, :nb] = torch.arange(nb, dtype=torch.int32)
    return sel.to(device)


def nan_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, float("nan"))
