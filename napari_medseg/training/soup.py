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

Weights are read as every package is (:func:`~napari_medseg.models.weights.load_weights`:
tensors only, from inside the package) and the soup is written as fine-tuned
packages are (:func:`~napari_medseg.models.weights.write_state_package`: a hidden
folder beside ``DIR``, renamed into place).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import MedSegError
from ..models.card import ModelCard


def _read(pkg: Path):
    from ..models.weights import inside_package, load_weights

    card_path = pkg / "card.yaml"
    if not card_path.is_file():
        raise MedSegError("not a model package (no card.yaml); give package folders",
                          str(pkg))
    card = ModelCard.load(card_path)
    if card.format != "state_dict" or not card.weights:
        raise MedSegError(f"a soup needs state_dict packages, not {card.format!r}", str(pkg))
    weights = inside_package(pkg, pkg / card.weights)
    return card, load_weights(weights, str(weights))


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
    from ..models.weights import write_state_package

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
    write_state_package(card, state, out, overwrite=overwrite)
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
