"""The kernels' batch stride of the document maps (`doc_batch_stride`)."""

import pytest
import torch

from megatron_fox.ops.forgetting_attn.common import doc_batch_stride


def test_doc_batch_stride_shared_per_row_and_bad_maps():
    T = 12
    assert doc_batch_stride(None, 3) == 0
    assert doc_batch_stride(torch.zeros(T, dtype=torch.int32), 3) == 0  # one packed row's map
    assert doc_batch_stride(torch.zeros(1, T, dtype=torch.int32), 3) == 0  # [1, T]: shared, not read past
    assert doc_batch_stride(torch.zeros(3, T, dtype=torch.int32), 3) == T
    with pytest.raises(ValueError, match="one row per batch row"):
        doc_batch_stride(torch.zeros(2, T, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="contiguous"):
        doc_batch_stride(torch.zeros(T, 3, dtype=torch.int32).t(), 3)
