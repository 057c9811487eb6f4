"""CPU decode kernels for sparse models: activation-sparse and weight-sparse GEMV (C++, with a
pure-PyTorch fallback), the modules that use them, and a timed greedy decoding loop.

``prepare_decode(model)`` swaps in the kernel-backed modules; ``prunekit generate`` and
``prunekit bench`` use it. See docs/activation_sparsity.md.
"""

from .build import available, why_unavailable
from .generate import Generation, greedy
from .ops import BitmaskT, CSR16, gemv_bitmask, gemv_csr16, gemv_t, pack_bitmask, pack_csr16, sparse_ffn, unpack_bitmask
from .runtime import DecodeHandle, DecodeLinear, SparseFFN, prepare_decode

__all__ = ["BitmaskT", "CSR16", "DecodeHandle", "DecodeLinear", "Generation", "SparseFFN", "available", "gemv_bitmask",
           "gemv_csr16", "gemv_t", "greedy", "pack_bitmask", "pack_csr16", "prepare_decode", "sparse_ffn",
           "unpack_bitmask", "why_unavailable"]
