"""float32 CPU convolutions that take oneDNN where PyTorch would take its slow kernel.

PyTorch sends a batch-1 float32 3D convolution to its slow reference kernel
(``slow_conv3d``) when batch x channels x depth x height is at most 20480
(``ConvParams::use_mkldnn``), a rule made for 2D images. In a 3D U-Net that is
every level below the first: in the built-in CT model's fp32 forward of a 32 x 96
x 96 window those convolutions took 69% of the time, and oneDNN runs one of them
10-30 times faster with the same result (float rounding aside).
"""

from __future__ import annotations

import torch

__all__ = ["OneDNNConv3d", "onednn_convolutions", "plain_conv"]

#: PyTorch's limit on batch x channels x depth x height for its slow kernel.
_SLOW_CONV_LIMIT = 20480


def _direct(conv, x) -> bool:
    """Whether ``conv(x)`` should call oneDNN directly: where PyTorch's rule would
    pick its slow kernel, with no autograd, autocast, tracing or scripting."""
    return (x.dim() == 5 and x.shape[0] == 1 and x.device.type == "cpu"
            and x.dtype == torch.float32 and conv.weight.dtype == torch.float32
            and int(x.shape[1]) * int(x.shape[2]) * int(x.shape[3]) <= _SLOW_CONV_LIMIT
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and tuple(conv.kernel_size) != (1, 1, 1)
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and not torch.jit.is_tracing() and not torch.jit.is_scripting()
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


class OneDNNConv3d(torch.nn.Conv3d):
    """A ``Conv3d`` whose small float32 CPU inference calls take oneDNN."""

    def _conv_forward(self, x, weight, bias):
        if _direct(self, x):
            try:
                return torch.mkldnn_convolution(x, weight, bias, list(self.padding),
                                                list(self.stride), list(self.dilation),
                                                self.groups)
            except (RuntimeError, AttributeError):  # a build without it: the usual path
                pass
        return super()._conv_forward(x, weight, bias)


def plain_conv(m) -> bool:
    """Whether ``m`` is a stock ``nn.Conv2d`` / ``nn.Conv3d`` or an
    :class:`OneDNNConv3d` (the same computation), not a subclass with its own forward."""
    return type(m) in (torch.nn.Conv2d, torch.nn.Conv3d, OneDNNConv3d)


def onednn_convolutions(net):
    """Let the float32 CPU inference of ``net``'s 3D convolutions always take oneDNN.

    Each plain ``nn.Conv3d`` of ``net`` becomes an :class:`OneDNNConv3d`, which
    calls ``torch.mkldnn_convolution`` exactly where PyTorch would take its slow
    kernel (see the module notes), under no autograd and no autocast (training,
    bf16 and batches keep PyTorch's own choice). Parameters and ``state_dict``
    keys do not change. TorchScript modules are left as they are. Returns ``net``.
    """
    if isinstance(net, torch.jit.ScriptModule) or not isinstance(net, torch.nn.Module):
        return net
    for m in net.modules():
        if type(m) is torch.nn.Conv3d:
            m.__class__ = OneDNNConv3d
    return net
