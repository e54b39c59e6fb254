"""Networks the built-in models use, in plain torch (MONAI is not needed for them).

A model package names its network in the card (``network: {class, kwargs}``);
:func:`build_network` turns that into a module. Names without a dot are looked up
in :data:`NETWORKS` (our own); dotted names must live under ``monai.networks``
(imported only then), so a card cannot make us import arbitrary code.
"""

from __future__ import annotations

import importlib
from typing import Sequence

import torch
from torch import nn

from ..errors import MedSegError

__all__ = ["UNet3D", "NETWORKS", "build_network", "count_parameters"]


class _Block(nn.Module):
    """Two ``3x3x3`` convolutions, each followed by instance norm and LeakyReLU."""

    def __init__(self, c_in: int, c_out: int, stride: Sequence[int] | int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.InstanceNorm3d(c_out, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv3d(c_out, c_out, 3, padding=1, bias=False),
            nn.InstanceNorm3d(c_out, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class UNet3D(nn.Module):
    """A small 3D U-Net (strided-convolution encoder, transposed-convolution decoder).

    Parameters
    ----------
    in_channels : int
        Input channels ``C``.
    out_channels : int
        Output classes ``K`` (background included); the output is logits.
    features : sequence of int
        Channels per level, finest first. ``len(features) - 1`` downsamplings,
        so patch sides must be divisible by ``2 ** (len(features) - 1)``.

    Notes
    -----
    Input ``(B, C, Z, Y, X)`` float32, output ``(B, K, Z, Y, X)`` logits.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 2,
                 features: Sequence[int] = (8, 16, 32, 64)):
        super().__init__()
        features = [int(f) for f in features]
        self.encoders = nn.ModuleList([_Block(in_channels, features[0])])
        for a, b in zip(features[:-1], features[1:]):
            self.encoders.append(_Block(a, b, stride=2))
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for a, b in zip(features[::-1][:-1], features[::-1][1:]):
            self.ups.append(nn.ConvTranspose3d(a, b, 2, stride=2))
            self.decoders.append(_Block(2 * b, b))
        self.head = nn.Conv3d(features[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.ups, self.decoders):
            x = up(x)
            x = dec(torch.cat([x, skips.pop()], dim=1))
        return self.head(x)


#: Networks a card may name without a module path.
NETWORKS = {"UNet3D": UNet3D}


def build_network(spec: dict) -> nn.Module:
    """Build the network a card describes.

    Parameters
    ----------
    spec : dict
        ``{"class": "UNet3D" | "monai.networks.nets.<Name>", "kwargs": {...}}``.

    Raises
    ------
    MedSegError
        Unknown class, a class outside ``monai.networks``, MONAI not installed,
        or arguments the class does not take.
    """
    name = str(spec.get("class", ""))
    kwargs = dict(spec.get("kwargs") or {})
    if name in NETWORKS:
        cls = NETWORKS[name]
    elif name.startswith("monai.networks."):
        module, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except ImportError as exc:
            raise MedSegError(f"network {name} needs MONAI; install napari-medseg[monai]") from exc
        except AttributeError as exc:
            raise MedSegError(f"network {name} does not exist in this MONAI version") from exc
    else:
        raise MedSegError(f"unknown network class {name!r}; use one of {sorted(NETWORKS)} "
                          "or a monai.networks class")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise MedSegError(f"network {name} does not take these arguments: {exc}") from exc


def count_parameters(net: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)
