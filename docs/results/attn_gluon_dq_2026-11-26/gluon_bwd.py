"""dQ backward kernel for Hopper (sm_90) in Gluon, with the forward's warp roles.

Same math and outputs as `triton_bwd.dq_kernel` for causal self-attention without packed
documents: P = exp2(x - (c_j - r) + (c_i - lse_i - r)), dP = dO V^T, dS = P (dP - D),
dQ = sm_scale dS K, DROW = row sums of dS. Roles as in `gluon_fwd.py`: a producer warp
streams K (with c) and V; two consumer warpgroups of 64 rows take turns at the tensor
cores. Per key block a warpgroup issues S_j = Q K_j^T, dP_j = dO V_j^T and
dQ += dS_{j-1} K_{j-1}, waits for S_j and dP_j only, and forms dS_j while the dQ product
runs (docs/kernel_notes.md step 22). V's slot frees when dP is done, K's when dQ is.
"""

import triton.experimental.gluon.language as gl
from triton.experimental import gluon
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

from .gluon_fwd import LOG2E, load_halves, stream_keys, take_turn


@gluon.jit
def _ds_block(S, dP, c_bufs, s, j, row, dlt, offs_m, c_ref, n_full, qk_scale,
              S_LAYOUT: gl.constexpr, BLOCK_N: gl.constexpr):
    """dS of key block j [rows, BLOCK_N] float32 (row = c_i log2(e) - lse_i - r, base 2)."""
    ck = c_bufs.index(s).reshape([BLOCK_N]).load(gl.SliceLayout(0, S_LAYOUT)) * LOG2E - c_ref
    p = gl.exp2(S * qk_scale - gl.expand_dims(ck, 0) + gl.expand_dims(row, 1))
    if j >= n_full:  # blocks on the diagonal: causal mask
        offs_n = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_LAYOUT))
        p = gl.where(gl.expand_dims(offs_n, 0) <= gl.expand_dims(offs_m, 1), p, 0.0)
    return p * (dP - gl.expand_dims(dlt, 1))


@gluon.jit
def _dq_consumer(q_bufs, do_bufs, k_bufs, v_bufs, c_bufs, qd_bar, k_ready, v_ready, k_empty, v_empty, turn,
                 CQ, ROW, DLT, DQ, DROW, b, h, bh, m0, n_lo, n_hi, n_full, T, s_dqb, s_dqt, s_dqh, qk_scale, sm_scale,
                 HEAD_DIM: gl.constexpr, WG_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
                 W: gl.constexpr):
    """Warpgroup W: rows m0 + W * WG_M .. + WG_M of the query block."""
    S_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    DQ_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HEAD_DIM, 16])
    DS_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=DQ_LAYOUT, k_width=2)
    ROWS: gl.constexpr = gl.SliceLayout(1, S_LAYOUT)
    other = 1 - W

    r0 = m0 + W * WG_M
    offs_m = r0 + gl.arange(0, WG_M, layout=ROWS)
    row_ok = offs_m < T
    base = bh.to(gl.int64) * T
    c_ref = gl.load(CQ + base + m0) * LOG2E
    row = gl.load(ROW + base + offs_m, mask=row_ok, other=float("-inf")) - c_ref
    dlt = gl.load(DLT + base + offs_m, mask=row_ok, other=0.0)
    mbarrier.wait(qd_bar, 0)
    q = q_bufs.index(W).reshape([WG_M, HEAD_DIM])
    do = do_bufs.index(W).reshape([WG_M, HEAD_DIM])
    dtype: gl.constexpr = q_bufs.dtype
    zeros_s = gl.zeros([WG_M, BLOCK_N], gl.float32, S_LAYOUT)

    mbarrier.wait(k_ready.index(0), 0)
    mbarrier.wait(v_ready.index(0), 0)
    take_turn(turn, 0, W)
    S = warpgroup_mma(q, k_bufs.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), zeros_s,
                      use_acc=False, is_async=True)
    dP = warpgroup_mma(do, v_bufs.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), zeros_s,
                       use_acc=False, is_async=True)
    mbarrier.arrive(turn.index(other), count=1)
    S, dP = warpgroup_mma_wait(0, deps=(S, dP))
    mbarrier.arrive(v_empty.index(0), count=1)
    dS = _ds_block(S, dP, c_bufs, 0, n_lo, row, dlt, offs_m, c_ref, n_full, qk_scale, S_LAYOUT, BLOCK_N)
    drow = gl.sum(dS, 1)
    dSb = gl.convert_layout(dS.to(dtype), DS_LAYOUT)
    dq = gl.zeros([WG_M, HEAD_DIM], gl.float32, DQ_LAYOUT)

    for j in range(n_lo + 1, n_hi):
        i = j - n_lo
        s = i % NUM_STAGES
        sp = (i - 1) % NUM_STAGES
        phase = (i // NUM_STAGES) & 1
        mbarrier.wait(k_ready.index(s), phase)
        mbarrier.wait(v_ready.index(s), phase)
        take_turn(turn, i, W)
        S = warpgroup_mma(q, k_bufs.index(s).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), zeros_s,
                          use_acc=False, is_async=True)
        dP = warpgroup_mma(do, v_bufs.index(s).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), zeros_s,
                           use_acc=False, is_async=True)
        dq = warpgroup_mma(dSb, k_bufs.index(sp).reshape([BLOCK_N, HEAD_DIM]), dq, is_async=True)
        mbarrier.arrive(turn.index(other), count=1)
        S, dP = warpgroup_mma_wait(1, deps=(S, dP))  # MMAs complete in order: dQ += may run on
        mbarrier.arrive(v_empty.index(s), count=1)
        dS = _ds_block(S, dP, c_bufs, s, j, row, dlt, offs_m, c_ref, n_full, qk_scale, S_LAYOUT, BLOCK_N)
        drow += gl.sum(dS, 1)
        dS_next = gl.convert_layout(dS.to(dtype), DS_LAYOUT)
        dq, dSb = warpgroup_mma_wait(0, deps=(dq, dSb))
        mbarrier.arrive(k_empty.index(sp), count=1)
        dSb = dS_next

    i_last = n_hi - 1 - n_lo
    s_last = i_last % NUM_STAGES
    take_turn(turn, i_last + 1, W)
    dq = warpgroup_mma(dSb, k_bufs.index(s_last).reshape([BLOCK_N, HEAD_DIM]), dq, is_async=True)
    mbarrier.arrive(turn.index(other), count=1)
    dq, dSb = warpgroup_mma_wait(0, deps=(dq, dSb))
    mbarrier.arrive(k_empty.index(s_last), count=1)

    DQ_ROWS: gl.constexpr = gl.SliceLayout(1, DQ_LAYOUT)
    rows = r0 + gl.arange(0, WG_M, layout=DQ_ROWS)
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, DQ_LAYOUT))
    ptrs = DQ + b.to(gl.int64) * s_dqb + h * s_dqh + gl.expand_dims(rows, 1) * s_dqt + gl.expand_dims(offs_d, 0)
    gl.store(ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=gl.expand_dims(rows < T, 1))
    gl.store(DROW + base + offs_m, drow, mask=row_ok)


# Worker partitions take one tuple (see gluon_fwd.py); block sizes from the buffers' shapes.
@gluon.jit
def _dq_consumer_of(a, W: gl.constexpr):
    _dq_consumer(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12], a[13], a[14],
                 a[15], a[16], a[17], a[18], a[19], a[20], a[21], a[22], a[23], a[24], a[25], a[26], a[27], a[28],
                 a[0].shape[4], a[0].shape[2], a[2].shape[2], a[2].shape[0], W)


@gluon.jit
def _dq_consumer0(a):
    _dq_consumer_of(a, 0)


@gluon.jit
def _dq_consumer1(a):
    _dq_consumer_of(a, 1)


@gluon.jit
def _dq_producer(a):
    q_desc, do_desc, k_desc, v_desc, c_desc, hk = a[29], a[30], a[31], a[32], a[33], a[34]
    b, h, bh, m0, n_lo, n_hi = a[16], a[17], a[18], a[19], a[20], a[21]
    mbarrier.expect(a[5], 2 * q_desc.block_type.nbytes + 2 * do_desc.block_type.nbytes)
    load_halves(q_desc, a[0], a[5], b, m0, h)
    load_halves(do_desc, a[1], a[5], b, m0, h)
    stream_keys(k_desc, v_desc, c_desc, a[2], a[3], a[4], a[6], a[7], a[8], a[9], b, hk, bh, n_lo, n_hi,
                a[2].shape[2], a[2].shape[0])


@gluon.jit
def gluon_dq_kernel(q_desc, do_desc, k_desc, v_desc, c_desc, CQ, ROW, DLT, START, DQ, DROW,
                    s_dqb, s_dqt, s_dqh, T, H, NBM, qk_scale, sm_scale,
                    GROUP: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr):
    """q/do_desc: 4-d TMA descriptors of Q, dO [B,T,H,D] with blocks [1, BLOCK_M // 2, 1, D];
    k/v_desc of K, V [B,T,H/GROUP,D] with blocks [1, BLOCK_N, 1, D]; c_desc [B*H, T] prefix
    sums (natural log), blocks [1, BLOCK_N]; CQ the same as a pointer; ROW, DLT [B*H, T] from
    the preprocessing kernel; START [B*H, NBM] first key block -> DQ like Q (pointer), DROW
    [B*H, T] row sums of dS. Launch with num_warps = 4 and maxnreg = 168."""
    pid_m = gl.num_programs(0) - 1 - gl.program_id(0)  # longest rows first: shorter tail
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    n_lo = gl.load(START + bh * NBM + pid_m)
    n_hi = (gl.minimum(m0 + BLOCK_M, T) - 1 + BLOCK_N) // BLOCK_N
    n_full = (m0 + 1) // BLOCK_N  # key blocks below this need no causal mask

    dtype: gl.constexpr = q_desc.dtype
    q_bufs = gl.allocate_shared_memory(dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    do_bufs = gl.allocate_shared_memory(dtype, [2] + do_desc.block_type.shape, do_desc.layout)
    k_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES] + v_desc.block_type.shape, v_desc.layout)
    c_bufs = gl.allocate_shared_memory(gl.float32, [NUM_STAGES] + c_desc.block_type.shape, c_desc.layout)
    qd_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(qd_bar, count=1)
    for s in gl.static_range(NUM_STAGES):
        mbarrier.init(k_ready.index(s), count=1)
        mbarrier.init(v_ready.index(s), count=1)
        mbarrier.init(k_empty.index(s), count=2)  # both consumer warpgroups release a slot
        mbarrier.init(v_empty.index(s), count=2)
    for w in gl.static_range(2):
        mbarrier.init(turn.index(w), count=1)

    args = (q_bufs, do_bufs, k_bufs, v_bufs, c_bufs, qd_bar, k_ready, v_ready, k_empty, v_empty, turn,
            CQ, ROW, DLT, DQ, DROW, b, h, bh, m0, n_lo, n_hi, n_full, T, s_dqb, s_dqt, s_dqh, qk_scale, sm_scale,
            q_desc, do_desc, k_desc, v_desc, c_desc, hk)
    gl.warp_specialize([(_dq_consumer0, (args,)), (_dq_consumer1, (args,)), (_dq_producer, (args,))],
                       [4, 1], [240, 24])


# (block_m, block_n, stages) per head_dim; block sizes as the Triton dQ kernel's tile.
DQ_TILES = {128: (128, 64, 3)}


def launch_dq(q, k, v, do, cq, ck_rows, row, dlt, start, qk_scale, sm_scale):
    """q, do [B, T, H, D], k, v [B, T, Hkv, D] (16-bit, TMA-able strides); cq [B, H, T] and
    ck_rows [B*H, T] prefix sums; row, dlt [B, H, T] from the preprocessing kernel; start
    [B*H, T / block_m] first key block -> dq [B, T, H, D], drow [B, H, T] float32."""
    import torch

    from .gluon_fwd import descriptors

    B, T, H, D = q.shape
    block_m, block_n, stages = DQ_TILES[D]
    dq = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device)
    drow = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    q_d, do_d, k_d, v_d, c_d = descriptors([(q, block_m // 2), (do, block_m // 2), (k, block_n), (v, block_n)],
                                           ck_rows, block_n)
    nbm = -(-T // block_m)
    gluon_dq_kernel[(nbm, B * H)](
        q_d, do_d, k_d, v_d, c_d, cq, row, dlt, start, dq, drow, dq.stride(0), dq.stride(1), dq.stride(2),
        T, H, nbm, qk_scale, sm_scale,
        GROUP=H // k.shape[2], BLOCK_M=block_m, BLOCK_N=block_n, NUM_STAGES=stages, num_warps=4, maxnreg=168,
    )
    return dq, drow
