"""megatron_fox: the Forgetting Transformer with Adaptive Computation Pruning on Megatron-Core."""

__version__ = "0.1.0"
