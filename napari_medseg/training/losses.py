"""Losses shared by the training scripts and fine-tuning."""

from __future__ import annotations


def soft_dice_loss(logits, target):
    """Soft Dice loss over the foreground classes, pooled over the batch.

    Parameters
    ----------
    logits : torch.Tensor
        ``(B, K, Z, Y, X)`` network output.
    target : torch.Tensor
        ``(B, Z, Y, X)`` integer class map.

    Returns
    -------
    torch.Tensor
        ``1 - mean Dice`` over classes ``1..K-1`` (with +1 smoothing).
    """
    import torch.nn.functional as F

    prob = logits.float().softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 4, 1, 2, 3).float()
    dims = (0, 2, 3, 4)
    inter = (prob * onehot).sum(dims)
    denom = prob.sum(dims) + onehot.sum(dims)
    return 1 - ((2 * inter + 1) / (denom + 1))[1:].mean()
