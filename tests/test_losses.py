"""The soft Dice loss shared by training and fine-tuning."""

import torch

from napari_medseg.training.losses import soft_dice_loss


def test_perfect_prediction_has_zero_loss_and_wrong_one_high():
    target = torch.randint(0, 3, (2, 4, 5, 6), generator=torch.Generator().manual_seed(0))
    onehot = torch.nn.functional.one_hot(target, 3).permute(0, 4, 1, 2, 3).float()
    assert float(soft_dice_loss(onehot * 30, target)) < 1e-3
    assert float(soft_dice_loss(-onehot * 30, target)) > 0.9


def test_background_is_not_scored():
    target = torch.zeros((1, 4, 4, 4), dtype=torch.long)
    logits = torch.zeros((1, 2, 4, 4, 4))
    logits[:, 1] = 30.0          # everything called foreground, none is
    # foreground Dice is (0 + 1) / (64 + 1): background agreement does not help
    assert abs(float(soft_dice_loss(logits, target)) - (1 - 1 / 65)) < 1e-4
