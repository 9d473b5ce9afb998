"""Flow layers. Each is called as `layer(z, ldj, reverse=False, **conditioning) -> (z, ldj)`,
z: [B, C, H, W], ldj: [B], on the device and in the float dtype of its input."""
from flowbook.layers.coupling import CouplingLayer, create_channel_mask, create_checkerboard_mask
from flowbook.layers.dequantization import Dequantization, NoiseAugmentation, VariationalDequantization
from flowbook.layers.glow import ActNorm, GlowStep, InvConv1x1
from flowbook.layers.multiscale import SplitFlow, SqueezeFlow
from flowbook.layers.tarflow import TarFlowBlock, causal_mask, patchify, unpatchify
from flowbook.nets import ConcatELU, GatedConv, GatedConvNet, LayerNormChannels

__all__ = [
    "ActNorm", "GlowStep", "InvConv1x1", "ConcatELU", "CouplingLayer", "Dequantization", "GatedConv", "GatedConvNet",
    "LayerNormChannels", "NoiseAugmentation", "SplitFlow", "SqueezeFlow", "TarFlowBlock", "VariationalDequantization",
    "causal_mask", "create_channel_mask", "create_checkerboard_mask", "patchify", "unpatchify",
]
