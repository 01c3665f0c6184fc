"""Reusable Flax (Linen) layers: channels-last, 2-D and 3-D, float32 and bfloat16.

This package imports only jax, flax and numpy, so it can be dropped into any JAX code base.
"""

from jaxmed.layers._attention import CBAM as CBAM
from jaxmed.layers._attention import ChannelAttention as ChannelAttention
from jaxmed.layers._attention import SpatialAttention as SpatialAttention
from jaxmed.layers._conv import BlockConvTranspose as BlockConvTranspose
from jaxmed.layers._conv import Conv as Conv
from jaxmed.layers._conv import conv as conv
from jaxmed.layers._conv import conv_gradient as conv_gradient
from jaxmed.layers._pyramid import PyramidPooling as PyramidPooling
from jaxmed.layers._resample import adaptive_avg_pool as adaptive_avg_pool
from jaxmed.layers._resample import resample as resample
from jaxmed.layers._resample import resize_align_corners as resize_align_corners
from jaxmed.layers._second_order import SecondOrderPooling as SecondOrderPooling
from jaxmed.layers._tensor_train import TTConv as TTConv
from jaxmed.layers._tensor_train import TTDense as TTDense
from jaxmed.layers._tensor_train import tt_full_weight as tt_full_weight
from jaxmed.layers._tensor_train import tt_num_params as tt_num_params
from jaxmed.layers._threshold import ThresholdSuppression as ThresholdSuppression
from jaxmed.layers._threshold import suppress_discriminative as suppress_discriminative
from jaxmed.layers._threshold import suppress_irrelevant as suppress_irrelevant

__all__ = [
    "BlockConvTranspose",
    "CBAM",
    "ChannelAttention",
    "Conv",
    "PyramidPooling",
    "SecondOrderPooling",
    "SpatialAttention",
    "TTConv",
    "TTDense",
    "ThresholdSuppression",
    "adaptive_avg_pool",
    "conv",
    "conv_gradient",
    "resample",
    "resize_align_corners",
    "suppress_discriminative",
    "suppress_irrelevant",
    "tt_full_weight",
    "tt_num_params",
]
