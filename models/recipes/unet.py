"""A small quantization-friendly U-Net for 2D image-to-image translation.

Only Conv, ReLU, MaxPool, nearest Resize and Concat: every op has an int8 kernel in
onnxruntime on x86 without VNNI (no ConvTranspose, which falls back to float there).
``edge`` adds a Neg and an Add at full resolution, which stay in float.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True))


class Up(nn.Module):
    """1x1 conv to the skip's width, nearest x2 resize, concat with the skip, 3x3 conv.

    The 1x1 conv runs before the resize: nearest resize commutes with a 1x1 conv, so this
    equals resize-then-conv at a quarter of the cost."""

    def __init__(self, c_in: int, c_skip: int, c_out: int) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(c_in, c_out, 1), nn.ReLU(inplace=True))
        self.resize = nn.Upsample(scale_factor=2, mode="nearest")
        self.fuse = conv_relu(c_out + c_skip, c_out)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.resize(self.reduce(x))
        out: torch.Tensor = self.fuse(torch.cat([x, skip], dim=1))
        return out


class UNetLite(nn.Module):
    """U-Net with ``len(widths)`` resolution levels; input [N, in_channels, H, W] (one
    channel for a 2D model, 2k + 1 neighbouring slices for a 2.5D one), H and W divisible
    by 2 ** (levels - 1). In eval mode the output is non-negative (ReLU), on the target's
    fixed scale."""

    def __init__(self, widths: tuple[int, ...] = (12, 24, 48, 64), in_channels: int = 1,
                 stem: int = 1, refine: int = 0, head: int = 1, edge: bool = False) -> None:
        super().__init__()
        self.widths = widths
        self.in_channels = in_channels
        self.stem = stem
        # refine > 0: a small full-resolution correction after the depth-to-space output,
        # from the input and that output (two 3x3 convs, ``refine`` channels between them),
        # added to it; for the detail at edges that a space-to-depth stem loses.
        self.refine: nn.Module | None = None
        if refine:
            last = nn.Conv2d(refine, 1, 3, padding=1, bias=False)
            nn.init.zeros_(last.weight)  # starts as the identity on the coarse output
            self.refine = nn.Sequential(conv_relu(in_channels + 1, refine), last)
        # stem > 1: space-to-depth in, depth-to-space out, so that no conv runs at full
        # resolution on a handful of channels (where int8 kernels without dot product
        # spend their time on memory traffic and requantization, not on MACs).
        # edge: each input channel also enters as x - min(x over its 3 x 3 neighbourhood),
        # computed at full resolution before the stem (no MACs: a max-pool), so that where an
        # image ends (a skull-stripped brain's last pixels) the stem sees it to the pixel.
        self.edge = edge
        self.unshuffle = nn.PixelUnshuffle(stem) if stem > 1 else nn.Identity()
        self.shuffle = nn.PixelShuffle(stem) if stem > 1 else nn.Identity()
        self.down = nn.ModuleList()
        c_prev = in_channels * (2 if edge else 1) * stem * stem
        for w in widths:
            self.down.append(nn.Sequential(conv_relu(c_prev, w), conv_relu(w, w)))
            c_prev = w
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(
            Up(widths[i + 1], widths[i], widths[i]) for i in reversed(range(len(widths) - 1))
        )
        # head = 3: each output block also sees its neighbours' features (a 1 x 1 head gives
        # the stem * stem pixels of a block from that block's features alone).
        self.head = nn.Conv2d(widths[0], stem * stem, head, padding=head // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = x
        if self.edge:
            x = torch.cat([x, x + F.max_pool2d(-x, 3, stride=1, padding=1)], dim=1)
        x = self.unshuffle(x)
        skips: list[torch.Tensor] = []
        for i, block in enumerate(self.down):
            if i > 0:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        skips.pop()
        for up in self.up:
            x = up(x, skips.pop())
        out: torch.Tensor = self.shuffle(self.head(x))
        if self.refine is not None:
            out = out + self.refine(torch.cat([inputs, out], dim=1))
        # Linear head while training (a ReLU there can die and stall training); the
        # exported (eval) graph ends in a ReLU so the output is never negative.
        return out if self.training else torch.relu(out)


def count_macs(model: nn.Module, height: int = 256, width: int = 256) -> int:
    """Multiply-accumulates of one forward pass on a 1 x C x H x W input (Conv2d only;
    ReLU, pooling, resize and concat are not MACs)."""
    total = 0

    def hook(module: nn.Module, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(module, nn.Conv2d)
        k = module.kernel_size[0] * module.kernel_size[1]
        per_output = k * module.in_channels // module.groups
        total += int(out.numel()) * per_output

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(torch.zeros(1, getattr(model, "in_channels", 1), height, width))
    finally:
        for h in handles:
            h.remove()
    return total


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
