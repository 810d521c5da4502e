"""DVAE decoder (`tts.dvae.`): 4-codebook codes -> 100-bin mel at 2 frames per code.

codes (B, T, 4) -> GFSQ embedding (B, 1024, T) -> (B, 512, 2T) -> ConvNeXt decoder -> out_conv -> * coef.
The DVAE encoder path is not built: it is unused at inference (see UNUSED_AT_INFERENCE). Sizes are fixed by
upstream (not in config.json).
"""

from __future__ import annotations

import torch
from torch import nn
from vector_quantize_pytorch import GroupedResidualFSQ

from services.common.checkpoint import CheckpointReader, load_module
from services.tts_decoder.model import with_prefix

DVAE_PREFIX = "tts.dvae."
NUM_MEL_BINS = 100
VQ_DIM = 1024
FSQ_LEVELS = (5, 5, 5, 5)  # 5**4 = 625 codes; id 625 is the TTS eos
GROUPS, RESIDUALS = 2, 2


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block with a dilated depthwise conv and a `coef` layer scale.

    Written here rather than taken from vocos.modules: that block has no dilation and names its scale `gamma`,
    while the DVAE checkpoint needs dilation 2 and `coef`.
    """

    def __init__(self, dim: int, intermediate_dim: int, kernel: int, dilation: int):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel, padding=dilation * (kernel // 2), dilation=dilation, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.coef = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).transpose(1, 2)  # (B, C, T) -> (B, T, C)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y)))) * self.coef
        return x + y.transpose(1, 2)


class DVAEDecoder(nn.Module):
    def __init__(self, idim: int = 512, odim: int = 512, n_layer: int = 12, bn_dim: int = 128, hidden: int = 256,
                 kernel: int = 7, dilation: int = 2):
        super().__init__()
        self.conv_in = nn.Sequential(nn.Conv1d(idim, bn_dim, 3, 1, 1), nn.GELU(), nn.Conv1d(bn_dim, hidden, 3, 1, 1))
        self.decoder_block = nn.ModuleList(ConvNeXtBlock(hidden, hidden * 4, kernel, dilation) for _ in range(n_layer))
        self.conv_out = nn.Conv1d(hidden, odim, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_in(x)
        for block in self.decoder_block:
            y = block(y)
        return self.conv_out(y)


class GFSQ(nn.Module):
    """Grouped residual FSQ lookup: codes -> quantized features (vector-quantize-pytorch does the maths)."""

    def __init__(self):
        super().__init__()
        self.quantizer = GroupedResidualFSQ(dim=VQ_DIM, levels=list(FSQ_LEVELS), num_quantizers=RESIDUALS,
                                            groups=GROUPS)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, T, G*R) codes -> (B, 1024, T); the 4 codebooks are (group, residual) in row-major order."""
        b, t, _ = codes.shape
        indices = codes.reshape(b, t, GROUPS, RESIDUALS).permute(2, 0, 1, 3)
        return self.quantizer.get_output_from_indices(indices).transpose(1, 2)


class DVAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.coef = nn.Parameter(torch.ones(1, NUM_MEL_BINS, 1))
        self.decoder = DVAEDecoder()
        self.out_conv = nn.Conv1d(512, NUM_MEL_BINS, 3, 1, 1, bias=False)
        self.vq_layer = GFSQ()

    def vq_features(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, T, 4) -> (B, 1024, T) in the decoder's dtype (the FSQ lookup itself stays float32)."""
        return self.vq_layer(codes).to(self.coef.dtype)

    def decoder_out(self, vq_feats: torch.Tensor) -> torch.Tensor:
        """(B, 1024, T) -> (B, 512, 2T): channel halves interleaved in time, then the ConvNeXt decoder."""
        b, c, t = vq_feats.shape
        x = vq_feats.view(b, 2, c // 2, t).permute(0, 2, 3, 1).flatten(2)
        return self.decoder(x)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, T, 4) int codes in [0, 624] -> mel (B, 100, 2T)."""
        return self.out_conv(self.decoder_out(self.vq_features(codes))) * self.coef


def load_dvae(reader: CheckpointReader, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32, progress: bool = False) -> DVAE:
    # Built on the target device, not meta: the FSQ keeps non-persistent buffers (levels, basis) that the
    # checkpoint does not hold.
    with torch.device(device):
        dvae = DVAE()
    load_module(with_prefix(DVAE_PREFIX, dvae), reader, (DVAE_PREFIX,), dtype=dtype, device=device, progress=progress)
    dvae.to(dtype).vq_layer.float()  # FSQ maths in float32, as vector-quantize-pytorch expects
    return dvae.eval()
