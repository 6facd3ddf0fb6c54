"""Weight quantization (OPSC, paper eq. (1)) and KV-cache quantization (eq. (2)) for the edge."""

from splitcli.quant.kv_format import KVQuantConfig, fp_kv_bytes_per_token, kv_bytes_per_token
from splitcli.quant.modules import (
    Int4Linear, Int8Linear, QuantEmbedding, QuantLinear, int4_kernel_supports, int8_kernel_supports,
    use_int4_act_bits_,
)
from splitcli.quant.rtn import (
    KEEP_BITS,
    SUPPORTED_BITS,
    dequantize_groupwise,
    pack_codes,
    packed_width,
    quantize_groupwise,
    quantize_symmetric_rows,
    unpack_codes,
    valid_group_sizes,
)
from splitcli.quant.transform import (
    LayerShapes,
    default_group_size,
    dequantize_weight,
    fake_quantized_weight,
    layer_shapes_of,
    layer_weight_bytes,
    linear_matrix_bytes,
    llama_layer_shapes,
    load_quantized_,
    load_quantized_layers_,
    opsc_bits,
    opsc_weight_bytes,
    quantize_layers_,
    quantize_weight,
    quantized_matrix_bytes,
    quantized_state_dict,
)

_LAZY = {"QuantizedKVCache", "QuantizedKVLayer"}  # need transformers: imported on first use


def __getattr__(name):
    if name in _LAZY:
        from splitcli.quant import kv_cache

        return getattr(kv_cache, name)
    raise AttributeError(f"module 'splitcli.quant' has no attribute {name!r}")


__all__ = sorted([name for name in dir() if not name.startswith("_")] + list(_LAZY))
