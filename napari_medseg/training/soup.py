"""Average the weights of model packages trained from one base (a uniform "model soup").

    python -m napari_medseg.training.soup --out DIR PACKAGE PACKAGE [PACKAGE ...]
                                          [--version V] [--overwrite]

Networks fine-tuned from the same weights stay close in weight space, and the mean
of their weights often does better on new data than each of them, at no extra
inference cost (Wortsman et al., "Model soups", ICML 2022). Every package must be a
``state_dict`` package of the same network (class, arguments, tensor names and
shapes) and the same classes. The soup keeps the first package's card, with its
``training`` text extended by the ingredients and this command; its measured
figures are dropped, since they belonged to the first package: measure the soup
again (``benchmarks/eval_real_builtin.py DIR --write-card``,
``napari_medseg.training.train_builtin.evaluate``).

Weights are read with ``torch.load(weights_only=True)``: a package can only hold
tensors. The package is written to a hidden folder beside ``DIR`` and renamed
into place.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..errors import MedSegError
from ..models.card import ModelCard


def _read(pkg: Path):
    import torch

    card_path = pkg / "card.yaml"
    if not card_path.is_file():
        raise MedSegError("not a model package (no card.yaml); give package folders",
                          str(pkg))
    card = ModelCard.load(card_path)
    if card.format != "state_dict" or not card.weights:
        raise MedSegError(f"a soup needs state_dict packages, not {card.format!r}", str(pkg))
    try:
        state = torch.load(pkg / card.weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or hostile file: one message
        raise MedSegError(f"cannot read the weights ({exc}); the file is damaged or is not "
                          "a tensor-only state dict", str(pkg / card.weights)) from exc
    if not isinstance(state, dict):
        raise MedSegError("the weights are not a state dict", str(pkg / card.weights))
    return card, state


def average_states(states: list[dict], names: list[str]) -> dict:
    """The element-wise mean of ``states`` (same keys and shapes); integer tensors
    (counters) are taken from the first."""
    first = states[0]
    for state, name in zip(states[1:], names[1:]):
        if set(state) != set(first):
            diff = sorted(set(state) ^ set(first))[:3]
            raise MedSegError(f"its tensors differ from {names[0]}'s ({', '.join(diff)}...); "
                              "a soup needs packages of one network", name)
        for k, v in state.items():
            if tuple(v.shape) != tuple(first[k].shape):
                raise MedSegError(f"tensor {k} is {tuple(v.shape)}, in {names[0]} "
                                  f"{tuple(first[k].shape)}; a soup needs one network", name)
    out = {}
    for k, v in first.items():
        if v.is_floating_point():
            mean = sum(s[k].double() for s in states) / len(states)
            out[k] = mean.to(v.dtype).contiguous()
        else:
            out[k] = v.clone()
    return out


def make_soup(packages, out, version: str | None = None, overwrite: bool = False) -> Path:
    """Write the uniform weight average of ``packages`` as a package at ``out``."""
    import torch

    packages = [Path(p) for p in packages]
    if len(packages) < 2:
        raise MedSegError("a soup needs at least two packages")
    out = Path(out)
    if out.exists() and not overwrite:
        raise MedSegError("the output folder exists; choose another or pass --overwrite",
                          str(out))
    read = [_read(p) for p in packages]
    cards = [c for c, _ in read]
    for card, pkg in zip(cards[1:], packages[1:]):
        if card.network != cards[0].network or card.classes != cards[0].classes:
            raise MedSegError(f"its network or classes differ from {packages[0]}'s; a soup "
                              "needs packages of one network", str(pkg))
    state = average_states([s for _, s in read], [str(p) for p in packages])
    card = ModelCard.from_dict(cards[0].to_dict())
    if version:
        card.version = str(version)
    card.metrics = {}
    parts = "; ".join(f"{p.name} ({c.name} {c.version})" for p, c in zip(packages, cards))
    card.training = (f"{cards[0].training} Uniform weight average (model soup) of "
                     f"{len(packages)} packages: {parts}. Made by python -m "
                     f"napari_medseg.training.soup --out <folder> "
                     + " ".join(f"<{p.name}>" for p in packages)).strip()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent))
    try:
        torch.save(state, tmp / card.weights)
        card.save(tmp / "card.yaml")
        if out.exists():  # overwrite: the old package goes only once the new one is whole
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("packages", nargs="+", type=Path, help="model package folders")
    p.add_argument("--out", type=Path, required=True, help="the soup's package folder")
    p.add_argument("--version", default=None, help="the soup's card version")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    try:
        path = make_soup(a.packages, a.out, a.version, a.overwrite)
    except MedSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
