"""Fine-tuning that does not forget: partial labels, replay, layer-wise rates, new classes.

* **Partial labels.** A corrected case supervises the classes it shows (and,
  with a ledger, those the model predicted there: a class the user deleted is
  supervised as absent). The classes it lacks are not penalised: where its
  labels say background, the base model's own prediction of an unsupervised
  class is kept as the target (:func:`fill_unsupervised`). That is a replay of
  the base model's predictions on the training images, so classes nobody
  corrected keep what the base model did (the "learning without forgetting"
  idea with hard targets).
* **Lower learning rate on early layers** (:func:`param_groups`): the first
  third of the network's parameter tensors (the encoder's first levels, in
  definition order) train at ``early_lr_factor`` x the rate.
* **A new class** (:func:`add_output_classes`): the output convolution gets
  more channels; the old ones keep their weights, each new one starts as a
  copy of the background channel with its bias lowered so it starts off, and
  that convolution trains at :data:`NEW_HEAD_LR_FACTOR` x the rate (AdamW moves
  each weight by about the rate per step: too little, in a short run, to lift
  a new channel above the background's).
* **Replay of synthetic cases** (:func:`synthetic_replay`): for abdominal CT
  models, phantoms like those the base model was trained on, with their full
  labels, make a share of the training windows.
* **Forgetting check** (:func:`synthetic_check`): Dice per class before and
  after on held-out synthetic phantoms the base model was trained on.
"""

from __future__ import annotations

import logging

import numpy as np

from ..errors import MedSegError

log = logging.getLogger(__name__)

__all__ = ["supervised_classes", "fill_unsupervised", "param_groups", "base_weights",
           "anchor_penalty", "output_head",
           "add_output_classes", "synthetic_check", "synthetic_replay", "largest_drop"]


def supervised_classes(labels: np.ndarray, prediction: np.ndarray | None = None) -> set:
    """Foreground classes a corrected case supervises.

    Parameters
    ----------
    labels : (Z, Y, X) int array
        The corrected labels.
    prediction : (Z, Y, X) int array, optional
        The model's original prediction (from the ledger).

    Returns
    -------
    set of int
        Classes present in ``labels`` or in ``prediction`` (background excluded).

    Examples
    --------
    >>> sorted(supervised_classes(np.array([0, 1, 1, 5]), np.array([0, 1, 2, 0])))
    [1, 2, 5]
    """
    out = {int(c) for c in np.unique(labels) if c != 0}
    if prediction is not None:
        out |= {int(c) for c in np.unique(prediction) if c != 0}
    return out


def fill_unsupervised(labels: np.ndarray, base_prediction: np.ndarray, supervised) -> np.ndarray:
    """Labels with the base model's unsupervised classes filled into their background.

    Parameters
    ----------
    labels : (Z, Y, X) int array
    base_prediction : (Z, Y, X) int array
        The base model's labels on the same grid.
    supervised : collection of int
        Classes ``labels`` speaks for (:func:`supervised_classes`).

    Returns
    -------
    numpy.ndarray
        A copy of ``labels`` where ``labels == 0`` and the base model predicts
        a class outside ``supervised``, that class.

    Examples
    --------
    >>> fill_unsupervised(np.array([0, 0, 1, 0]), np.array([3, 2, 2, 0]), {1, 2}).tolist()
    [3, 0, 1, 0]
    """
    lab = np.asarray(labels)
    base = np.asarray(base_prediction)
    if base.shape != lab.shape:
        raise MedSegError(f"the base prediction {base.shape} is not on the label grid "
                          f"{lab.shape}")
    sup = np.zeros(max(int(base.max(initial=0)), int(lab.max(initial=0))) + 1, bool)
    for c in supervised:
        if 0 <= int(c) < len(sup):
            sup[int(c)] = True
    sup[0] = True
    take = (lab == 0) & ~sup[base]
    out = lab.copy()
    out[take] = base[take].astype(out.dtype, copy=False)
    return out


#: Learning-rate factor of the output convolution when classes were added: its new
#: channels start as a copy of the background's, and AdamW moves each weight by about
#: ``lr`` per step, too little in a few hundred steps to lift a new class above it.
NEW_HEAD_LR_FACTOR = 20.0


def param_groups(net, lr: float, early_lr_factor: float = 1.0, head=None,
                 head_lr_factor: float = NEW_HEAD_LR_FACTOR) -> list:
    """AdamW parameter groups: the first third of the tensors at ``lr * early_lr_factor``.

    Parameters
    ----------
    head : torch.nn.Module, optional
        The output convolution that got new classes: its tensors train at
        ``lr * head_lr_factor``.

    Returns
    -------
    list of dict
        One group when the factor is 1 and there is no ``head``.
    """
    params = _body_parameters(net, head)
    groups = []
    if early_lr_factor == 1.0 or len(params) < 3:
        groups.append({"params": params, "lr": lr})
    else:
        k = len(params) // 3
        groups += [{"params": params[:k], "lr": lr * float(early_lr_factor), "name": "early"},
                   {"params": params[k:], "lr": lr, "name": "rest"}]
    if head is not None:
        groups.append({"params": [p for p in head.parameters() if p.requires_grad],
                       "lr": lr * float(head_lr_factor), "name": "new head"})
    return groups


def _body_parameters(net, head=None) -> list:
    """The trainable parameters of ``net`` outside ``head`` (a grown output convolution)."""
    skip = {id(p) for p in head.parameters()} if head is not None else set()
    return [p for p in net.parameters() if p.requires_grad and id(p) not in skip]


def base_weights(net, head=None) -> list:
    """``(parameter, copy of its current value)`` pairs for :func:`anchor_penalty`.

    Parameters
    ----------
    net : torch.nn.Module
        The network about to be fine-tuned (its weights are the anchor).
    head : torch.nn.Module, optional
        The output convolution that got new classes: left free.
    """
    return [(p, p.detach().clone()) for p in _body_parameters(net, head)]


def anchor_penalty(pairs):
    """L2-SP penalty ``sum((w - w_base) ** 2)`` over :func:`base_weights` pairs.

    Fine-tuning with it added to the loss keeps the weights near the base
    model's where the new data does not pull them away (Li et al., "Explicit
    inductive bias for transfer learning with convolutional networks", ICML
    2018), which limits forgetting of what the corrections do not show.

    Examples
    --------
    >>> import torch
    >>> w = torch.nn.Parameter(torch.zeros(3))
    >>> pairs = base_weights(torch.nn.ParameterList([w]))
    >>> with torch.no_grad():
    ...     _ = w.add_(1.0)
    >>> float(anchor_penalty(pairs))
    3.0
    """
    return sum(((p - p0) ** 2).sum() for p, p0 in pairs)


def output_head(net, n_classes: int):
    """The output convolution of ``net`` giving ``n_classes`` channels, or None."""
    found = _output_conv(net, n_classes)
    return None if found is None else found[2]


def _output_conv(net, n_classes: int):
    """``(parent module, attribute name, conv)`` of the last conv giving ``n_classes``."""
    import torch.nn as nn

    found = None
    for name, mod in net.named_modules():
        if isinstance(mod, (nn.Conv3d, nn.ConvTranspose3d)) and mod.out_channels == n_classes:
            found = (name, mod)
    if found is None:
        return None
    name, mod = found
    parent = net
    *path, attr = name.split(".")
    for p in path:
        parent = getattr(parent, p)
    return parent, attr, mod


def add_output_classes(net, card, new_classes: dict):
    """Give a network and its card more output classes.

    Parameters
    ----------
    net : torch.nn.Module
        Changed in place (its output convolution is replaced).
    card : ModelCard
    new_classes : dict[int, str]
        New class ids (``card.n_classes``, ``+1``...) and names.

    Returns
    -------
    ModelCard
        The card with the classes added and the network's ``out_channels``.

    Raises
    ------
    MedSegError
        Ids not following the card's classes, or no output convolution found.
    """
    import torch
    import torch.nn as nn

    from ..models.card import ModelCard

    k = card.n_classes
    ids = sorted(int(i) for i in new_classes)
    if ids != list(range(k, k + len(ids))):
        raise MedSegError(f"new classes must take the ids after the model's {k} classes "
                          f"({list(range(k, k + len(ids)))}), got {ids}")
    found = _output_conv(net, k)
    if found is None:
        raise MedSegError(f"model {card.name}: no output convolution with {k} channels "
                          "found; a class cannot be added to this network")
    parent, attr, old = found
    n = k + len(ids)
    conv_t = isinstance(old, nn.ConvTranspose3d)
    kwargs = dict(kernel_size=old.kernel_size, stride=old.stride, padding=old.padding,
                  bias=old.bias is not None)
    new = (nn.ConvTranspose3d if conv_t else nn.Conv3d)(old.in_channels, n, **kwargs)
    with torch.no_grad():
        w = old.weight
        dim = 1 if conv_t else 0
        parts = [w] + [w.narrow(dim, 0, 1).clone() for _ in ids]
        new.weight.copy_(torch.cat(parts, dim=dim))
        if old.bias is not None:
            new.bias.copy_(torch.cat([old.bias, old.bias[:1].repeat(len(ids)) - 2.0]))
    setattr(parent, attr, new.to(w.device, w.dtype))
    d = card.to_dict()
    classes = dict(d.get("classes") or {})
    palette = [(0.9, 0.1, 0.5), (0.1, 0.9, 0.9), (0.6, 0.9, 0.1), (0.9, 0.5, 0.1)]
    for j, i in enumerate(ids):
        classes[i] = {"name": str(new_classes[i]), "color": list(palette[j % len(palette)])}
    d["classes"] = classes
    net_spec = dict(d.get("network") or {})
    kw = dict(net_spec.get("kwargs") or {})
    for key in ("out_channels", "num_classes", "n_classes"):
        if key in kw:
            kw[key] = n
            break
    else:
        kw["out_channels"] = n
    net_spec["kwargs"] = kw
    d["network"] = net_spec
    return ModelCard.from_dict(d, card.name)


def synthetic_check(model, n_cases: int = 2, seed0: int = 200001, cancel=None) -> dict | None:
    """Dice per class of ``model`` on held-out synthetic phantoms, or None.

    Only for one-channel CT models of the abdomen (the phantoms the built-in
    model was trained on: :func:`~napari_medseg.core.phantom.make_abdomen_ct`
    with ``vary=True``, seeds ``seed0...``, never used in training), and only
    the phantom classes the card names the same way.
    """
    from ..core.phantom import make_abdomen_ct
    from ..errors import check_cancel
    from .metrics import dice_per_class

    names = _phantom_names(model.card)
    if n_cases <= 0 or not names:
        return None
    per = []
    for s in range(seed0, seed0 + int(n_cases)):
        check_cancel(cancel)
        img, lab = make_abdomen_ct(seed=s, vary=True)
        pred = model.predict(img, device="cpu", overlap=0.25, cancel=cancel)
        per.append(dice_per_class(np.asarray(pred.labels.data), np.asarray(lab.data), names))
    keys = sorted({k for p in per for k in p})
    return {k: round(float(np.mean([p[k] for p in per if k in p])), 4) for k in keys}


def _phantom_names(card) -> dict:
    """Classes of ``card`` that the abdomen phantoms label the same way, or {}."""
    from ..core.phantom import ABDOMEN_LABELS

    if (card.n_channels != 1 or card.channels[0].get("modality") != "CT"
            or "abdomen" not in str(card.body_region or "")):
        return {}
    return {i: n for i, n in card.label_names.items() if ABDOMEN_LABELS.get(i) == n}


def synthetic_replay(card, train_card, patch, n_cases: int, folder, seed0: int = 700001,
                     cancel=None) -> list:
    """Synthetic training cases on the model grid, for replay against forgetting.

    Parameters
    ----------
    card : ModelCard
        The base model's card (decides whether phantoms fit: abdominal CT).
    train_card : ModelCard
        The card being trained (its grid; classes the phantoms lack are 0).
    patch : tuple of 3 int
    n_cases : int
        Phantoms (``make_abdomen_ct(vary=True)``, seeds ``seed0...``; never the
        seeds of :func:`synthetic_check`).
    folder : path
        Scratch folder for the phantom files.

    Returns
    -------
    list of TrainingCase
        Empty when the model is not an abdominal CT one.
    """
    from pathlib import Path

    from ..core.phantom import make_abdomen_ct
    from ..errors import check_cancel
    from ..io import write_labels, write_volume
    from .data import DatasetCase, load_case

    names = _phantom_names(card)
    if n_cases <= 0 or not names:
        return []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for s in range(seed0, seed0 + int(n_cases)):
        check_cancel(cancel)
        img, lab = make_abdomen_ct(seed=s, vary=True)
        y = np.asarray(lab.data).copy()
        y[~np.isin(y, list(names))] = 0
        ip, lp = folder / f"replay_{s}_0000.nii.gz", folder / f"replay_{s}.nii.gz"
        write_volume(ip, img, overwrite=True)
        write_labels(lp, lab.with_data(y), overwrite=True)
        tc, _, _ = load_case(DatasetCase(f"replay_{s}", [ip], lp), train_card, patch, seed=s)
        out.append(tc)
    return out


def largest_drop(before: dict, after: dict, exclude=()) -> float:
    """The largest ``before - after`` over classes in both (0 when none dropped)."""
    drops = [before[k] - after[k] for k in before if k in after and k not in exclude]
    return round(max([0.0] + drops), 4)
