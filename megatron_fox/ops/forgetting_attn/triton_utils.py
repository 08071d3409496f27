"""Small Triton helpers shared by the forward and backward kernels."""

import triton
import triton.language as tl


@triton.jit
def mm(a, b, DOT_PREC: tl.constexpr):
    """a @ b with float32 accumulation. DOT_PREC "ieee"/"tf32" go to tl.dot; "upcast"
    computes in float32 (the Triton 3.6 interpreter multiplies bf16 operands as raw bits)."""
    if DOT_PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)
