"""Forward kernel for Hopper (sm_90) in Gluon, with explicit warp roles.

Same math and outputs as `triton_fwd.fwd_kernel` for causal self-attention without packed
documents: s2_ij = log2(e) (sm_scale q_i.k_j - (c_j - r)) with r the program's first row's
c, key blocks [START, diagonal], lse in base 2 with c_i - r added back.

What Triton 3.6 does not do on Hopper and this kernel does (docs/kernel_notes.md step 21):
- one producer warp issues the TMA loads of K (with the keys' prefix sums) and V into rings
  of NUM_STAGES shared buffers; K's slot frees once S = Q K^T is done, V's once P V is;
- the query block's rows are split between two consumer warpgroups, each in its own
  partition, that take turns issuing their MMAs (mbarriers `turn`), so one warpgroup's
  softmax runs while the other's products occupy the tensor cores (FlashAttention-3's
  ping-pong schedule);
- within a warpgroup, the next block's S_j is issued with P_{j-1} V_{j-1} and only S_j is
  waited for before the softmax: P V runs under it.
"""

import triton.experimental.gluon.language as gl
from triton.experimental import gluon
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

LOG2E = gl.constexpr(1.4426950408889634)


@gluon.jit
def _producer(q_desc, k_desc, v_desc, c_desc, q_bufs, k_bufs, v_bufs, c_bufs, q_bar, k_ready, v_ready, k_empty,
              v_empty, b, h, hk, bh, m0, n_lo, n_hi, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr):
    """Load the query tile (two halves) once, then K, c and V of key blocks [n_lo, n_hi)."""
    q_rows: gl.constexpr = q_desc.block_type.shape[1]
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    for w in gl.static_range(2):
        tma.async_copy_global_to_shared(q_desc, [b, m0 + w * q_rows, h, 0], q_bar, q_bufs.index(w))
    for j in range(n_lo, n_hi):
        i = j - n_lo
        s = i % NUM_STAGES
        # a fresh mbarrier counts as having completed phase 1: the first round passes
        free_phase = ((i // NUM_STAGES) & 1) ^ 1
        n0 = j * BLOCK_N
        mbarrier.wait(k_empty.index(s), free_phase)
        fence_async_shared()  # the consumers read c of this slot with plain shared loads
        mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes + c_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [b, n0, hk, 0], k_ready.index(s), k_bufs.index(s))
        tma.async_copy_global_to_shared(c_desc, [bh, n0], k_ready.index(s), c_bufs.index(s))
        mbarrier.wait(v_empty.index(s), free_phase)
        mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [b, n0, hk, 0], v_ready.index(s), v_bufs.index(s))


@gluon.jit
def _softmax_block(S, c_bufs, s, j, m_i, offs_m, c_ref, n_full, qk_scale,
                   S_LAYOUT: gl.constexpr, BLOCK_N: gl.constexpr):
    """Logits of key block j (base 2, row term dropped) -> new row max, p, the rescale factor."""
    ck = c_bufs.index(s).reshape([BLOCK_N]).load(gl.SliceLayout(0, S_LAYOUT)) * LOG2E - c_ref
    x = S * qk_scale - gl.expand_dims(ck, 0)
    if j >= n_full:  # the diagonal block: causal mask
        offs_n = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_LAYOUT))
        x = gl.where(gl.expand_dims(offs_n, 0) <= gl.expand_dims(offs_m, 1), x, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(x, 1))
    p = gl.exp2(x - gl.expand_dims(m_new, 1))
    alpha = gl.exp2(m_i - m_new)
    return m_new, p, alpha


@gluon.jit
def _take_turn(turn, k, W: gl.constexpr):
    # turn k of warpgroup W; a fresh mbarrier counts as having completed phase 1, so
    # warpgroup 0's first wait passes and warpgroup 1 waits for warpgroup 0's first arrive
    mbarrier.wait(turn.index(W), (k & 1) ^ (1 - W))


@gluon.jit
def _consumer(q_bufs, k_bufs, v_bufs, c_bufs, q_bar, k_ready, v_ready, k_empty, v_empty, turn, CQ, OUT, LSE,
              b, h, bh, m0, n_lo, n_hi, n_full, T, s_ob, s_ot, s_oh, qk_scale,
              HEAD_DIM: gl.constexpr, WG_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
              W: gl.constexpr):
    """Warpgroup W: rows m0 + W * WG_M .. + WG_M of the query block."""
    S_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    O_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    P_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_LAYOUT, k_width=2)
    ROW: gl.constexpr = gl.SliceLayout(1, S_LAYOUT)
    O_ROW: gl.constexpr = gl.SliceLayout(1, O_LAYOUT)
    other = 1 - W

    r0 = m0 + W * WG_M
    offs_m = r0 + gl.arange(0, WG_M, layout=ROW)
    c_ref = gl.load(CQ + bh.to(gl.int64) * T + m0) * LOG2E
    mbarrier.wait(q_bar, 0)
    q = q_bufs.index(W).reshape([WG_M, HEAD_DIM])
    dtype: gl.constexpr = q_bufs.dtype

    # first key block: S and its softmax; its P V goes out with the next block's S
    mbarrier.wait(k_ready.index(0), 0)
    _take_turn(turn, 0, W)
    S = warpgroup_mma(q, k_bufs.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)),
                      gl.zeros([WG_M, BLOCK_N], gl.float32, S_LAYOUT), use_acc=False, is_async=True)
    mbarrier.arrive(turn.index(other), count=1)
    S = warpgroup_mma_wait(0, deps=(S,))
    m_i = gl.full([WG_M], -1.0e30, gl.float32, ROW)
    m_i, p, alpha = _softmax_block(S, c_bufs, 0, n_lo, m_i, offs_m, c_ref, n_full, qk_scale, S_LAYOUT, BLOCK_N)
    mbarrier.arrive(k_empty.index(0), count=1)
    l_i = gl.sum(p, 1)
    P = gl.convert_layout(p.to(dtype), P_LAYOUT)
    acc = gl.zeros([WG_M, HEAD_DIM], gl.float32, O_LAYOUT)

    for j in range(n_lo + 1, n_hi):
        i = j - n_lo
        s = i % NUM_STAGES
        sp = (i - 1) % NUM_STAGES
        mbarrier.wait(k_ready.index(s), (i // NUM_STAGES) & 1)
        mbarrier.wait(v_ready.index(sp), ((i - 1) // NUM_STAGES) & 1)
        _take_turn(turn, i, W)
        S = warpgroup_mma(q, k_bufs.index(s).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)),
                          gl.zeros([WG_M, BLOCK_N], gl.float32, S_LAYOUT), use_acc=False, is_async=True)
        acc = warpgroup_mma(P, v_bufs.index(sp).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
        mbarrier.arrive(turn.index(other), count=1)
        S = warpgroup_mma_wait(1, deps=(S,))  # MMAs complete in order: S_j is done, P V may run on
        m_i, p, alpha = _softmax_block(S, c_bufs, s, j, m_i, offs_m, c_ref, n_full, qk_scale, S_LAYOUT, BLOCK_N)
        mbarrier.arrive(k_empty.index(s), count=1)
        l_i = l_i * alpha + gl.sum(p, 1)
        P_next = gl.convert_layout(p.to(dtype), P_LAYOUT)
        acc, P = warpgroup_mma_wait(0, deps=(acc, P))
        mbarrier.arrive(v_empty.index(sp), count=1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, O_ROW), 1)
        P = P_next

    i_last = n_hi - 1 - n_lo
    s_last = i_last % NUM_STAGES
    mbarrier.wait(v_ready.index(s_last), (i_last // NUM_STAGES) & 1)
    _take_turn(turn, i_last + 1, W)
    acc = warpgroup_mma(P, v_bufs.index(s_last).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
    mbarrier.arrive(turn.index(other), count=1)
    acc, P = warpgroup_mma_wait(0, deps=(acc, P))
    mbarrier.arrive(v_empty.index(s_last), count=1)

    o = acc / gl.expand_dims(gl.convert_layout(l_i, O_ROW), 1)
    rows = r0 + gl.arange(0, WG_M, layout=O_ROW)
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, O_LAYOUT))
    ptrs = OUT + b.to(gl.int64) * s_ob + h * s_oh + gl.expand_dims(rows, 1) * s_ot + gl.expand_dims(offs_d, 0)
    gl.store(ptrs, o.to(OUT.dtype.element_ty), mask=gl.expand_dims(rows < T, 1))
    row_ok = offs_m < T
    cq = gl.load(CQ + bh.to(gl.int64) * T + offs_m, mask=row_ok, other=0.0) * LOG2E
    gl.store(LSE + bh.to(gl.int64) * T + offs_m, m_i + gl.log2(l_i) + (cq - c_ref), mask=row_ok)


# Worker partitions take one tuple (all workers must share a signature); block sizes come
# from the buffers' shapes: q [2, 1, WG_M, 1, D], k [NUM_STAGES, 1, BLOCK_N, 1, D].
@gluon.jit
def _consumer_of(a, W: gl.constexpr):
    _consumer(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15],
              a[16], a[17], a[18], a[19], a[20], a[21], a[22], a[23], a[24],
              a[0].shape[4], a[0].shape[2], a[1].shape[2], a[1].shape[0], W)


@gluon.jit
def _consumer0(a):
    _consumer_of(a, 0)


@gluon.jit
def _consumer1(a):
    _consumer_of(a, 1)


@gluon.jit
def _producer_of(a):
    _producer(a[25], a[26], a[27], a[28], a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[13], a[14],
              a[29], a[15], a[16], a[17], a[18], a[1].shape[2], a[1].shape[0])


@gluon.jit
def gluon_fwd_kernel(q_desc, k_desc, v_desc, c_desc, CQ, START, OUT, LSE,
                     s_ob, s_ot, s_oh, T, H, NBM, qk_scale,
                     GROUP: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr):
    """q/k/v_desc: 4-d TMA descriptors of Q [B,T,H,D], K/V [B,T,H/GROUP,D] with blocks
    [1, BLOCK_M // 2 or BLOCK_N, 1, D]; c_desc: [B*H, T] float32 prefix sums (natural log),
    blocks [1, BLOCK_N]; CQ the same prefix sums as a pointer; START [B*H, NBM] first key
    block -> OUT like Q (pointer, strides s_o*), LSE [B*H, T] (base 2). Launch with
    num_warps = 4 (the first consumer warpgroup; the second and the producer warp are
    workers) and maxnreg = 168 (consumers get 240 registers, the producer 24)."""
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
    k_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES] + v_desc.block_type.shape, v_desc.layout)
    c_bufs = gl.allocate_shared_memory(gl.float32, [NUM_STAGES] + c_desc.block_type.shape, c_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for s in gl.static_range(NUM_STAGES):
        mbarrier.init(k_ready.index(s), count=1)
        mbarrier.init(v_ready.index(s), count=1)
        mbarrier.init(k_empty.index(s), count=2)  # both consumer warpgroups release a slot
        mbarrier.init(v_empty.index(s), count=2)
    for w in gl.static_range(2):
        mbarrier.init(turn.index(w), count=1)

    args = (q_bufs, k_bufs, v_bufs, c_bufs, q_bar, k_ready, v_ready, k_empty, v_empty, turn, CQ, OUT, LSE,
            b, h, bh, m0, n_lo, n_hi, n_full, T, s_ob, s_ot, s_oh, qk_scale,
            q_desc, k_desc, v_desc, c_desc, hk)
    gl.warp_specialize([(_consumer0, (args,)), (_consumer1, (args,)), (_producer_of, (args,))], [4, 1], [240, 24])


# (block_m, block_n, stages) per head_dim: block sizes as the Triton forward's tile; two
# stages (three were slower). Head_dim 64 stays with the Triton forward, which was faster
# there (H100, docs/kernel_notes.md step 21).
TILES = {128: (128, 128, 2)}


def launch_forward(q, k, v, cq, ck_rows, start, qk_scale):
    """q [B, T, H, D], k, v [B, T, Hkv, D] (16-bit, strides TMA can take), cq [B, H, T] and
    ck_rows [B*H, T] (16-byte aligned rows) float32 prefix sums at query and key positions,
    start [B*H, T / block_m] int32 first key block, qk_scale = sm_scale * log2(e)
    -> o [B, T, H, D], lse [B, H, T] float32 (base 2)."""
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    B, T, H, D = q.shape
    block_m, block_n, stages = TILES[D]
    o = torch.empty_like(q)  # q's memory order (the store takes o's strides)
    lse2 = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16

    def desc(t, rows):
        block = [1, rows, 1, D]
        return TensorDescriptor(t, list(t.shape), list(t.stride()), block,
                                gl.NVMMASharedLayout.get_default_for(block, gdt))

    c_block = [1, block_n]
    c_desc = TensorDescriptor(ck_rows, list(ck_rows.shape), [ck_rows.stride(0), 1], c_block,
                              gl.NVMMASharedLayout.get_default_for(c_block, gl.float32))
    nbm = -(-T // block_m)
    gluon_fwd_kernel[(nbm, B * H)](
        desc(q, block_m // 2), desc(k, block_n), desc(v, block_n), c_desc, cq, start, o, lse2,
        o.stride(0), o.stride(1), o.stride(2), T, H, nbm, qk_scale,
        GROUP=H // k.shape[2], BLOCK_M=block_m, BLOCK_N=block_n, NUM_STAGES=stages, num_warps=4, maxnreg=168,
    )
    return o, lse2
