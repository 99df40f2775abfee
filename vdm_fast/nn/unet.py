"""The VDM score network (official CIFAR-10 ``ScoreUNet``), NCHW.

All blocks run at full resolution: ``n_layer`` ResNet blocks down, a middle of ResNet +
attention + ResNet, ``n_layer + 1`` ResNet blocks up with skip concatenation. The network
predicts ``eps`` and adds its input (``eps_hat = net(z) + z``), as the official code does.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vdm_fast.nn.blocks import AttnBlock, GroupNormSiLU, conv3x3, dense
from vdm_fast.nn.dropout import Dropout
from vdm_fast.diffusion.features import fourier_features, timestep_embedding


class ResnetBlock(nn.Module):
    """The official ``ResnetBlock``: GroupNorm+SiLU, conv, the conditioning added before the
    second GroupNorm+SiLU, dropout, a zero-initialised conv, and the skip path (a 1x1 projection
    where the width changes). ``block(x, cond)`` with ``cond [B, cond_dim]``."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, dropout: float):
        super().__init__()
        self.norm1 = GroupNormSiLU(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels)
        self.cond_proj = dense(cond_dim, out_channels, bias=False, zero=True)
        self.norm2 = GroupNormSiLU(out_channels)
        self.dropout = Dropout(dropout)
        self.conv2 = conv3x3(out_channels, out_channels, zero=True)
        # A 1x1 projection of the skip path where the width changes (flax Dense on channels).
        self.nin_shortcut = dense(in_channels, out_channels) if in_channels != out_channels else None

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        h = self.conv1(self.norm1(x))
        h = self.norm2(h, cond=self.cond_proj(cond))
        h = self.conv2(self.dropout(h))
        if self.nin_shortcut is not None:
            x = F.conv2d(x, self.nin_shortcut.weight[:, :, None, None], self.nin_shortcut.bias)
        return x + h


class ScoreUNet(nn.Module):
    """``eps_hat = ScoreUNet(z, gamma_t)``.

    Args:
        in_channels: channels of the images.
        n_embd: width of every block (128 in the official CIFAR-10 model).
        n_layer: ResNet blocks on the way down (32 officially; ``n_layer + 1`` on the way up).
        dropout: dropout rate inside the ResNet blocks (0.1 officially).
        attention: ``"middle"`` (official) or ``"all"`` (also after every down/up block).
        gamma_min: the *configured* schedule's gamma(0), which with ``gamma_max`` normalises the
            time input.
        gamma_max: the *configured* schedule's gamma(1).
        fourier_features: concatenate ``sin/cos(2^k 2 pi z)``, ``k = 6, 7``, to the input.
        num_classes: the number of classes; above 0 adds a label embedding (``num_classes + 1``
            entries, the last one the null class of classifier-free guidance) to the time
            conditioning.

    Its GroupNorms and attention run ``vdm_fast.ops`` (fused kernels on CUDA); for an A/B run
    against the reference, call it inside ``with vdm_fast.backend.use("reference"):``.
    """

    def __init__(self, in_channels: int = 3, n_embd: int = 128, n_layer: int = 32, dropout: float = 0.1,
                 attention: str = "middle", gamma_min: float = -13.3, gamma_max: float = 5.0,
                 fourier_features: bool = True, num_classes: int = 0):
        super().__init__()
        if attention not in ("middle", "all"):
            raise ValueError(f"attention must be 'middle' or 'all', got {attention!r}")
        if n_embd % 32:
            raise ValueError(f"n_embd must be a multiple of 32 (GroupNorm's 32 groups), got {n_embd}")
        if n_layer < 0:
            raise ValueError(f"n_layer must be >= 0, got {n_layer}")
        self.in_channels, self.n_embd = in_channels, n_embd
        self.gamma_min, self.gamma_max = float(gamma_min), float(gamma_max)
        self.fourier_features = fourier_features
        cond_dim = 4 * n_embd

        # The official time input also carries a scalar "conditioning" (zero when unconditional).
        self.dense0 = dense(n_embd + 1, cond_dim)
        self.dense1 = dense(cond_dim, cond_dim)
        self.num_classes = num_classes
        self.label_embedding = nn.Embedding(num_classes + 1, cond_dim) if num_classes else None
        in_features = in_channels * (5 if fourier_features else 1)  # z + sin/cos at 2 frequencies
        self.conv_in = conv3x3(in_features, n_embd)

        every = attention == "all"
        self.down = nn.ModuleList(ResnetBlock(n_embd, n_embd, cond_dim, dropout) for _ in range(n_layer))
        self.down_attn = nn.ModuleList(AttnBlock(n_embd) for _ in range(n_layer)) if every else None
        self.mid_block1 = ResnetBlock(n_embd, n_embd, cond_dim, dropout)
        self.mid_attn = AttnBlock(n_embd)
        self.mid_block2 = ResnetBlock(n_embd, n_embd, cond_dim, dropout)
        self.up = nn.ModuleList(ResnetBlock(2 * n_embd, n_embd, cond_dim, dropout) for _ in range(n_layer + 1))
        self.up_attn = nn.ModuleList(AttnBlock(n_embd) for _ in range(n_layer + 1)) if every else None
        self.norm_out = GroupNormSiLU(n_embd)
        self.conv_out = conv3x3(n_embd, in_channels, zero=True)

    def forward(self, z: Tensor, gamma_t: Tensor, labels: Optional[Tensor] = None,
                conditioning: Optional[Tensor] = None) -> Tensor:
        """``conditioning``: the official scalar input of each example ``[B]`` (default 0), e.g.
        the augmentation flag of the official augmented CIFAR-10 model (0 to evaluate and sample)."""
        if z.dim() != 4 or z.shape[1] != self.in_channels:
            raise ValueError(f"z must be [B, {self.in_channels}, H, W], got {tuple(z.shape)}")
        B = z.shape[0]
        if gamma_t.shape != (B,):
            raise ValueError(f"gamma_t must have shape ({B},), got {tuple(gamma_t.shape)}")
        if conditioning is None:
            conditioning = z.new_zeros(B)
        elif conditioning.shape != (B,) or not conditioning.is_floating_point():
            raise ValueError(f"conditioning must be a float tensor of shape ({B},), got {conditioning.dtype} "
                             f"{tuple(conditioning.shape)}")
        t = (gamma_t - self.gamma_min) / (self.gamma_max - self.gamma_min)
        temb = timestep_embedding(1000.0 * t.to(z.dtype), self.n_embd)
        cond = torch.cat([temb, conditioning.to(z.device, z.dtype)[:, None]], dim=1)
        cond = F.silu(self.dense1(F.silu(self.dense0(cond))))
        if self.label_embedding is not None:
            if labels is None:
                raise ValueError("this ScoreUNet is class-conditional: pass labels (num_classes = no class)")
            cond = cond + self.label_embedding(labels)

        h = torch.cat([z, fourier_features(z)], dim=1) if self.fourier_features else z
        hs = [self.conv_in(h)]
        for i, block in enumerate(self.down):
            h = block(hs[-1], cond)
            if self.down_attn is not None:
                h = self.down_attn[i](h)
            hs.append(h)
        h = self.mid_block2(self.mid_attn(self.mid_block1(hs[-1], cond)), cond)
        for i, block in enumerate(self.up):
            h = block(torch.cat([h, hs.pop()], dim=1), cond)
            if self.up_attn is not None:
                h = self.up_attn[i](h)
        return self.conv_out(self.norm_out(h)) + z
