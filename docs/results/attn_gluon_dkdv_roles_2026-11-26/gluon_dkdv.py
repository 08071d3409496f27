"""dK/dV backward kernel for Hopper (sm_90) in Gluon, with explicit warp roles (work in progress:
built on the CPU, not yet run on a GPU).

Same math and outputs as `triton_bwd.dkdv_kernel` for causal self-attention without packed
documents. One CTA per 128 keys of one kv head: two consumer warpgroups of 64 keys each
hold their K and V in shared memory and dK, dV in registers; a producer warp streams, per
query block of 64 rows, Q, dO and the rows' ROW (= c_i log2(e) - lse_i) and DLT into a ring.
Per query block a warpgroup takes its turn to issue S^T = K Q^T and dP^T = V dO^T, waits
for them (and its previous dV, dK products), forms P^T and dS^T, then issues dV += P^T dO
and dK += dS^T Q, which run on into the other warpgroup's turn.
"""

import os

import triton.experimental.gluon.language as gl
from triton.experimental import gluon
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)

from .gluon_fwd import LOG2E, take_turn


@gluon.jit
def _dkdv_producer(q_desc, do_desc, k_desc, v_desc, row_desc, dlt_desc, q_bufs, do_bufs, k_bufs, v_bufs,
                   row_bufs, dlt_bufs, kv_bar, ready, empty, END, b, hk, n0, pid_n, NBN, H, GROUP,
                   BLOCK_M: gl.constexpr, NUM_STAGES: gl.constexpr):
    """K and V of the CTA's two 64-key halves once, then per (query head, query block) Q, dO,
    ROW and DLT into the ring."""
    key_rows: gl.constexpr = k_desc.block_type.shape[1]
    mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes + 2 * v_desc.block_type.nbytes)
    for w in gl.static_range(2):
        tma.async_copy_global_to_shared(k_desc, [b, n0 + w * key_rows, hk, 0], kv_bar, k_bufs.index(w))
        tma.async_copy_global_to_shared(v_desc, [b, n0 + w * key_rows, hk, 0], kv_bar, v_bufs.index(w))
    nbytes: gl.constexpr = (q_desc.block_type.nbytes + do_desc.block_type.nbytes + row_desc.block_type.nbytes
                            + dlt_desc.block_type.nbytes)
    m_lo = n0 // BLOCK_M
    i = 0
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        m_hi = gl.load(END + bh * NBN + pid_n)
        for m in range(m_lo, m_hi):
            s = i % NUM_STAGES
            mbarrier.wait(empty.index(s), ((i // NUM_STAGES) & 1) ^ 1)
            fence_async_shared()  # the consumers read ROW and DLT with plain shared loads
            mbarrier.expect(ready.index(s), nbytes)
            t0 = m * BLOCK_M
            tma.async_copy_global_to_shared(q_desc, [b, t0, h, 0], ready.index(s), q_bufs.index(s))
            tma.async_copy_global_to_shared(do_desc, [b, t0, h, 0], ready.index(s), do_bufs.index(s))
            tma.async_copy_global_to_shared(row_desc, [bh, t0], ready.index(s), row_bufs.index(s))
            tma.async_copy_global_to_shared(dlt_desc, [bh, t0], ready.index(s), dlt_bufs.index(s))
            i += 1


@gluon.jit
def _dkdv_consumer(q_bufs, do_bufs, k_bufs, v_bufs, row_bufs, dlt_bufs, kv_bar, ready, empty, turn,
                   CK, END, DK, DV, DCOL, b, hk, n0, pid_n, NBN, H, T, s_dkb, s_dkt, s_dkh, qk_scale, sm_scale,
                   GROUP, HEAD_DIM: gl.constexpr, WG_N: gl.constexpr, BLOCK_M: gl.constexpr,
                   NUM_STAGES: gl.constexpr, W: gl.constexpr):
    """Warpgroup W: keys n0 + W * WG_N .. + WG_N."""
    ST_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_M, 16])
    ACC_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, HEAD_DIM, 16])
    OP_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ACC_LAYOUT, k_width=2)
    KEYS: gl.constexpr = gl.SliceLayout(1, ST_LAYOUT)
    QROWS: gl.constexpr = gl.SliceLayout(0, ST_LAYOUT)
    other = 1 - W
    dtype: gl.constexpr = q_bufs.dtype

    k0 = n0 + W * WG_N
    offs_n = k0 + gl.arange(0, WG_N, layout=KEYS)
    key_ok = offs_n < T
    m_lo = n0 // BLOCK_M
    m_full = (n0 + 2 * WG_N - 1 + BLOCK_M - 1) // BLOCK_M  # query blocks below this meet the diagonal
    mbarrier.wait(kv_bar, 0)
    k = k_bufs.index(W).reshape([WG_N, HEAD_DIM])
    v = v_bufs.index(W).reshape([WG_N, HEAD_DIM])
    zeros_st = gl.zeros([WG_N, BLOCK_M], gl.float32, ST_LAYOUT)
    # dK and dV stay in flight from one query block to the next: loop-carried as accumulators
    dk = warpgroup_mma_init(gl.zeros([WG_N, HEAD_DIM], gl.float32, ACC_LAYOUT))
    dv = warpgroup_mma_init(gl.zeros([WG_N, HEAD_DIM], gl.float32, ACC_LAYOUT))
    Pb = gl.zeros([WG_N, BLOCK_M], dtype, OP_LAYOUT)
    dSb = gl.zeros([WG_N, BLOCK_M], dtype, OP_LAYOUT)

    i = 0
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = (b * H + h).to(gl.int64)
        c_ref = gl.load(CK + bh * T + n0) * LOG2E
        ck = gl.load(CK + bh * T + offs_n, mask=key_ok, other=0.0) * LOG2E - c_ref
        m_hi = gl.load(END + bh * NBN + pid_n)
        dcol = gl.zeros([WG_N], gl.float32, KEYS)
        for m in range(m_lo, m_hi):
            s = i % NUM_STAGES
            mbarrier.wait(ready.index(s), (i // NUM_STAGES) & 1)
            q = q_bufs.index(s).reshape([BLOCK_M, HEAD_DIM])
            do = do_bufs.index(s).reshape([BLOCK_M, HEAD_DIM])
            take_turn(turn, i, W)
            St = warpgroup_mma(k, q.permute((1, 0)), zeros_st, use_acc=False, is_async=True)
            dPt = warpgroup_mma(v, do.permute((1, 0)), zeros_st, use_acc=False, is_async=True)
            mbarrier.arrive(turn.index(other), count=1)
            # in order: the previous block's dV and dK products are done too
            St, dPt, dv, dk, Pb, dSb = warpgroup_mma_wait(0, deps=(St, dPt, dv, dk, Pb, dSb))
            if i > 0:
                mbarrier.arrive(empty.index((i - 1) % NUM_STAGES), count=1)
            row = row_bufs.index(s).reshape([BLOCK_M]).load(QROWS) - c_ref
            dlt = dlt_bufs.index(s).reshape([BLOCK_M]).load(QROWS)
            p_t = gl.exp2(St * qk_scale - gl.expand_dims(ck, 1) + gl.expand_dims(row, 0))
            offs_m = m * BLOCK_M + gl.arange(0, BLOCK_M, layout=QROWS)
            if (m < m_full) | (m * BLOCK_M + BLOCK_M > T):  # the diagonal, or rows past T (TMA zero-fill)
                ok = (gl.expand_dims(offs_m, 0) >= gl.expand_dims(offs_n, 1)) & gl.expand_dims(offs_m < T, 0)
                p_t = gl.where(ok, p_t, 0.0)
            ds_t = p_t * (dPt - gl.expand_dims(dlt, 0))
            dcol += gl.sum(ds_t, 1)
            Pb = gl.convert_layout(p_t.to(dtype), OP_LAYOUT)
            dSb = gl.convert_layout(ds_t.to(dtype), OP_LAYOUT)
            dv = warpgroup_mma(Pb, do, dv, is_async=True)
            dk = warpgroup_mma(dSb, q, dk, is_async=True)
            i += 1
        gl.store(DCOL + bh * T + offs_n, dcol, mask=key_ok)
    dv, dk, Pb, dSb = warpgroup_mma_wait(0, deps=(dv, dk, Pb, dSb))
    if i > 0:
        mbarrier.arrive(empty.index((i - 1) % NUM_STAGES), count=1)

    ROWS_ACC: gl.constexpr = gl.SliceLayout(1, ACC_LAYOUT)
    keys = k0 + gl.arange(0, WG_N, layout=ROWS_ACC)
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ACC_LAYOUT))
    out = b.to(gl.int64) * s_dkb + hk * s_dkh + gl.expand_dims(keys, 1) * s_dkt + gl.expand_dims(offs_d, 0)
    ok = gl.expand_dims(keys < T, 1)
    gl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=ok)
    gl.store(DV + out, dv.to(DV.dtype.element_ty), mask=ok)


# Worker partitions take one tuple (see gluon_fwd.py); block sizes from the buffers' shapes:
# q [NUM_STAGES, 1, BLOCK_M, 1, D], k [2, 1, WG_N, 1, D].
@gluon.jit
def _dkdv_consumer_of(a, W: gl.constexpr):
    _dkdv_consumer(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12], a[13], a[14],
                   a[15], a[16], a[17], a[18], a[19], a[20], a[21], a[22], a[23], a[24], a[25], a[26],
                   a[33], a[0].shape[4], a[2].shape[2], a[0].shape[2], a[0].shape[0], W)


@gluon.jit
def _dkdv_consumer0(a):
    _dkdv_consumer_of(a, 0)


@gluon.jit
def _dkdv_consumer1(a):
    _dkdv_consumer_of(a, 1)


@gluon.jit
def _dkdv_producer_of(a):
    _dkdv_producer(a[27], a[28], a[29], a[30], a[31], a[32], a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7],
                   a[8], a[11], a[15], a[16], a[17], a[18], a[19], a[20], a[33], a[0].shape[2], a[0].shape[0])


@gluon.jit
def gluon_dkdv_kernel(q_desc, do_desc, k_desc, v_desc, row_desc, dlt_desc, CK, END, DK, DV, DCOL,
                      s_dkb, s_dkt, s_dkh, T, H, NBN, qk_scale, sm_scale,
                      GROUP: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                      NUM_STAGES: gl.constexpr):
    """q/do_desc: 4-d TMA descriptors of Q, dO [B,T,H,D] with blocks [1, BLOCK_M, 1, D];
    k/v_desc of K, V [B,T,H/GROUP,D] with blocks [1, BLOCK_N // 2, 1, D]; row/dlt_desc
    [B*H, T] float32 (ROW, DLT of the preprocessing kernel) with blocks [1, BLOCK_M]; CK
    [B*H, T] key prefix sums (natural log); END [B*H, NBN] one past the last query block
    of each key block (blocks BLOCK_M x BLOCK_N) -> DK, DV like K (pointers, strides s_dk*),
    DCOL [B*H, T] column sums of dS. Launch with num_warps = 4 and maxnreg = 168."""
    pid_n = gl.program_id(0)
    pid_bk = gl.program_id(1)
    HKV = H // GROUP
    b = pid_bk // HKV
    hk = pid_bk % HKV
    n0 = pid_n * BLOCK_N

    dtype: gl.constexpr = q_desc.dtype
    q_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES] + q_desc.block_type.shape, q_desc.layout)
    do_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES] + do_desc.block_type.shape, do_desc.layout)
    k_bufs = gl.allocate_shared_memory(dtype, [2] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(dtype, [2] + v_desc.block_type.shape, v_desc.layout)
    row_bufs = gl.allocate_shared_memory(gl.float32, [NUM_STAGES] + row_desc.block_type.shape, row_desc.layout)
    dlt_bufs = gl.allocate_shared_memory(gl.float32, [NUM_STAGES] + dlt_desc.block_type.shape, dlt_desc.layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for s in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)  # both consumer warpgroups release a slot
    for w in gl.static_range(2):
        mbarrier.init(turn.index(w), count=1)

    args = (q_bufs, do_bufs, k_bufs, v_bufs, row_bufs, dlt_bufs, kv_bar, ready, empty, turn,
            CK, END, DK, DV, DCOL, b, hk, n0, pid_n, NBN, H, T, s_dkb, s_dkt, s_dkh, qk_scale, sm_scale,
            q_desc, do_desc, k_desc, v_desc, row_desc, dlt_desc, GROUP)
    gl.warp_specialize([(_dkdv_consumer0, (args,)), (_dkdv_consumer1, (args,)), (_dkdv_producer_of, (args,))],
                       [4, 1], [240, 24])


# (block_m, block_n, stages) per head_dim: 64 query rows per block, 128 keys per CTA; slots
# 2-4 all build (132 / 166 / 199 KB); MEGATRON_FOX_GLUON_DKDV_STAGES picks one for an A/B.
DKDV_TILES = {128: (64, 128, int(os.environ.get("MEGATRON_FOX_GLUON_DKDV_STAGES", "2")))}


def launch_dkdv(q, k, v, do, ck, row_rows, dlt_rows, end, dk, dv, dcol, qk_scale, sm_scale):
    """q, do [B, T, H, D], k, v [B, T, Hkv, D] (16-bit, TMA-able strides); ck [B, H, T] key
    prefix sums; row_rows, dlt_rows [B*H, T] (16-byte aligned rows) from the preprocessing
    kernel; end [B, H, cdiv(T, 128)] from `query_block_end` with blocks (64, 128); writes
    dk, dv [B, T, Hkv, D] (same strides) and dcol [B, H, T]."""
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    B, T, H, D = q.shape
    block_m, block_n, stages = DKDV_TILES[D]
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16

    def desc(t, block, dtype):
        return TensorDescriptor(t, list(t.shape), list(t.stride()), block,
                                gl.NVMMASharedLayout.get_default_for(block, dtype))

    nbn = -(-T // block_n)
    gluon_dkdv_kernel[(nbn, B * k.shape[2])](
        desc(q, [1, block_m, 1, D], gdt), desc(do, [1, block_m, 1, D], gdt),
        desc(k, [1, block_n // 2, 1, D], gdt), desc(v, [1, block_n // 2, 1, D], gdt),
        desc(row_rows, [1, block_m], gl.float32), desc(dlt_rows, [1, block_m], gl.float32),
        ck, end, dk, dv, dcol, dk.stride(0), dk.stride(1), dk.stride(2), T, H, nbn, qk_scale, sm_scale,
        GROUP=H // k.shape[2], BLOCK_M=block_m, BLOCK_N=block_n, NUM_STAGES=stages, num_warps=4, maxnreg=168,
    )
