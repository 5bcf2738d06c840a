"""Pallas (Mosaic GPU) paged-attention kernels, their plain-jnp references and tuning tables.

Independent of jaxpaged: inputs are plain arrays (queries, the per-layer K/V pool, block
tables, sequence lengths, query_start_loc). See docs/kernels.md.
"""

from pallas_kernels.common import DEFAULT_LAYOUT, LAYOUTS, kv_cache_shape
from pallas_kernels.decode import decode_paged_attention
from pallas_kernels.kv_write import write_kv
from pallas_kernels.ragged import ragged_paged_attention
from pallas_kernels.reference import (
    decode_paged_attention_reference,
    ragged_paged_attention_reference,
    write_kv_reference,
)
from pallas_kernels.tuning import KernelConfig, decode_config, ragged_config

__all__ = [
    "DEFAULT_LAYOUT",
    "LAYOUTS",
    "KernelConfig",
    "decode_config",
    "decode_paged_attention",
    "decode_paged_attention_reference",
    "kv_cache_shape",
    "ragged_config",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
    "write_kv",
    "write_kv_reference",
]
