"""Triton decode-step metadata kernel vs its torch twins (ring_destinations, decode_flush): equal results.

CPU: TRITON_INTERPRET=1. GPU (`pytest -m gpu`): the compiled kernel, same cases.
"""

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels import triton.jit

from vllm_quantspec.hierarchical_kv_backend import decode_flush, ring_destinations  # noqa: E402
from vllm_quantspec.kernels.decode_metadata import decode_metadata  # noqa: E402
from vllm_quantspec.recent_buffer import HierarchicalKVConfig  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _check(G: int, gamma: int, fp_min: int, draft: bool, seed: int) -> None:
    """Random decode / verify (or draft: one token each) batches with CUDA-graph padding (requests
    without tokens and the spare slot; tokens past query_start_loc[-1]), and the persistent buffers
    prefilled with junk, so that an entry the kernel does not write fails."""
    cfg = HierarchicalKVConfig(group_size=G, v_group=64, fp_min=fp_min, gamma=gamma, num_slots=6)
    rng = random.Random(seed)
    for _ in range(6):
        n, pad_reqs, pad_tokens = rng.randint(0, 5), rng.randint(0, 2), rng.randint(0, 5)
        q_lens = [1 if draft else rng.randint(1, gamma + 1) for _ in range(n)] + [0] * pad_reqs
        seq_lens = [rng.randint(q, 20 * G) if q else 0 for q in q_lens]
        qsl = torch.tensor([0] + list(torch.tensor(q_lens, dtype=torch.int64).cumsum(0)), dtype=torch.int32)
        seq = torch.tensor(seq_lens, dtype=torch.int32)
        slot = torch.tensor(rng.sample(range(cfg.num_slots), n) + [cfg.num_slots] * pad_reqs, dtype=torch.int32)
        block_table = torch.randperm(1000)[: (n + pad_reqs) * 30].view(n + pad_reqs, 30).int()
        t = int(qsl[-1]) + pad_tokens
        want_dst = ring_destinations(qsl, seq, slot, torch.arange(t), cfg)
        want_rows, want_blocks = decode_flush(qsl, seq, block_table, slot, cfg)
        dev = [x.to(DEVICE) for x in (qsl, seq, block_table, slot)]
        m = (n + pad_reqs) * cfg.decode_flush_groups
        ring_dst = torch.full((t + 3,), -7, dtype=torch.int64, device=DEVICE)
        rows = torch.full((m + 2, G), -7, dtype=torch.int64, device=DEVICE)
        blocks = torch.full((m + 2,), -7, dtype=torch.int32, device=DEVICE)
        if draft:
            decode_metadata(*dev, cfg, t, ring_dst)
        else:
            decode_metadata(*dev, cfg, t, ring_dst, rows, blocks)
            assert torch.equal(rows[:m].cpu(), want_rows) and torch.equal(blocks[:m].cpu(), want_blocks)
            assert (rows[m:] == -7).all() and (blocks[m:] == -7).all()
        assert torch.equal(ring_dst[:t].cpu(), want_dst) and (ring_dst[t:] == -7).all()


@pytest.mark.parametrize("G,gamma,fp_min,draft", [(16, 0, 16, False), (16, 4, 16, False), (16, 8, 0, False),
                                                  (32, 3, 0, False), (16, 4, 16, True)])
def test_decode_metadata_kernel_matches_torch(G, gamma, fp_min, draft):
    _check(G, gamma, fp_min, draft, seed=G + gamma + fp_min + draft)


@pytest.mark.gpu
@pytest.mark.parametrize("gamma,draft", [(0, False), (4, False), (8, False), (4, True)])
def test_decode_metadata_kernel_matches_torch_gpu(gamma, draft):
    _check(128, gamma, 128, draft, seed=gamma + draft)
