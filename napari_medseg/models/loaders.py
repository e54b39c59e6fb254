"""Load models from local files, never running code hidden in them.

Formats (detected by :func:`load_path`):

* **our package**: a folder or ``.zip`` holding ``card.yaml`` (or ``card.json``)
  and the weights the card names: a ``state_dict`` for a network the card
  describes (read with ``torch.load(weights_only=True)``), a TorchScript file
  or an ONNX file;
* **bare TorchScript / ONNX file** with a card beside it (same stem,
  ``.yaml``/``.yml``/``.json``);
* **MONAI bundle** folder (``configs/metadata.json``, ``configs/inference.json``
  or ``.yaml``, ``models/model.pt`` or ``models/model.ts``) - see
  :mod:`napari_medseg.models.bundle`;
* **nnU-Net v2** result folder (``plans.json``, ``dataset.json``, ``fold_*/``) -
  see :mod:`napari_medseg.models.nnunet`.

Pickled weights are only ever read with ``weights_only=True``: a file whose
unpickling would import or call anything beyond tensors and plain containers
is refused with a :class:`~napari_medseg.errors.MedSegError` before any of its
code runs.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

from ..errors import MedSegError
from .card import ModelCard, card_from_text
from .predictor import Model, TorchModel
from .weights import inside_package, is_torchscript, load_torchscript, load_weights

__all__ = ["load_path", "load_weights", "load_torchscript", "is_torchscript", "CARD_NAMES"]

log = logging.getLogger(__name__)

CARD_NAMES = ("card.yaml", "card.yml", "card.json")
_CARD_SUFFIXES = (".yaml", ".yml", ".json")


# Reading weights and checking package paths live in .weights (shared with .bundle);
# the names are kept here for older imports.
__all__ += ["inside_package"]


# ------------------------------------------------------------------ package
class _Files:
    """Read files from a folder or a zip archive by relative name."""

    def __init__(self, path: Path):
        self.path = path
        self.zip = None
        self.prefix = ""
        if path.is_file():
            try:
                self.zip = zipfile.ZipFile(path)
            except zipfile.BadZipFile as exc:
                raise MedSegError("not a valid .zip model package", str(path)) from exc
            cards = [n for n in self.zip.namelist() if n.rsplit("/", 1)[-1] in CARD_NAMES]
            if not cards:
                raise MedSegError("the .zip holds no card.yaml / card.json; not a model "
                                  "package", str(path))
            self.prefix = min(cards, key=len).rpartition("/")[0]
            self.prefix = self.prefix + "/" if self.prefix else ""

    def exists(self, name: str) -> bool:
        if self.zip is None:
            return (self.path / name).is_file()
        return (self.prefix + name) in self.zip.namelist()

    def read(self, name: str) -> bytes:
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise MedSegError(f"file name {name!r} in the card leaves the package", str(self.path))
        if not self.exists(name):
            raise MedSegError(f"the package has no file {name!r} (named in its card)",
                              str(self.path))
        if self.zip is None:
            return inside_package(self.path, self.path / name).read_bytes()
        return self.zip.read(self.prefix + name)


def read_package_card(path) -> ModelCard:
    """The card of a package folder or ``.zip`` (cheap: weights are not read)."""
    files = _Files(Path(path))
    for name in CARD_NAMES:
        if files.exists(name):
            return card_from_text(files.read(name).decode("utf-8"), f"{path}/{name}",
                                  json_first=name.endswith(".json"))
    raise MedSegError("no card.yaml or card.json found; a model package needs one", str(path))


def load_package(path) -> Model:
    """Load our own package (folder or ``.zip``): card + weights.

    Raises
    ------
    MedSegError
        Missing card or weights, unsafe weights, or weights that do not fit the
        network the card describes.
    """
    path = Path(path)
    card = read_package_card(path)
    files = _Files(path)
    weights = card.weights or {"torchscript": "model.ts", "onnx": "model.onnx"}.get(
        card.format, "model.pt")
    model = _model_from_bytes(card, files.read(weights), f"{path}/{weights}")
    model.source = str(path)
    return model


def _model_from_bytes(card: ModelCard, data: bytes, source: str) -> Model:
    if card.format == "onnx":
        from .onnx import OnnxModel

        return OnnxModel(card, data, source)
    if card.format == "torchscript" or is_torchscript(data):
        return TorchModel(card, load_torchscript(data, source), source,
                          card.extra.get("axis_order", "zyx"))
    if card.format != "state_dict" or not card.network:
        raise MedSegError(f"card format {card.format!r} needs 'network' and a state_dict "
                          "(or format torchscript / onnx)", source)
    from .networks import build_network

    net = build_network(card.network)
    state = load_weights(data, source)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise MedSegError("the weights do not fit the network the card describes: "
                          f"{str(exc).splitlines()[0]}", source) from exc
    return TorchModel(card, net, source, card.extra.get("axis_order", "zyx"))


def card_beside(path: Path) -> Path | None:
    """``model.yaml``/``.yml``/``.json`` next to ``model.ts`` (same stem), if any."""
    for suffix in _CARD_SUFFIXES:
        c = path.with_suffix(suffix)
        if c.is_file():
            return c
    return None


def load_file(path: Path) -> Model:
    """A bare TorchScript / ONNX / state_dict file with a card beside it."""
    from .card import read_card

    card_path = card_beside(path)
    if card_path is None:
        raise MedSegError(f"no model card beside the file; add {path.stem}.yaml describing "
                          "its inputs, spacing, normalization and classes", str(path))
    card = read_card(card_path)
    if path.suffix.lower() == ".onnx" and card.format != "onnx":
        card.format = "onnx"
    return _model_from_bytes(card, path.read_bytes(), str(path))


# -------------------------------------------------------------------- entry
def detect_format(path) -> str | None:
    """``"package"``, ``"file"``, ``"monai-bundle"``, ``"nnunet"`` or None."""
    path = Path(path)
    if path.is_dir():
        if (path / "configs").is_dir() and (path / "models").is_dir():
            return "monai-bundle"
        if any((path / n).is_file() for n in CARD_NAMES):
            return "package"
        if (path / "plans.json").is_file() and (path / "dataset.json").is_file():
            return "nnunet"
        return None
    if path.is_file():
        if path.suffix.lower() == ".zip" and not is_torchscript(path):
            return "package"
        if path.suffix.lower() in (".ts", ".pt", ".pth", ".onnx", ".zip", ".jit"):
            return "file"
    return None


def load_path(path) -> Model:
    """Load a model from any supported local path (see module notes).

    Raises
    ------
    MedSegError
        The path does not exist, is not a recognised model, or is unsafe.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise MedSegError("no such model file or folder", str(path))
    kind = detect_format(path)
    log.info("loading %s model from %s", kind, path)
    if kind == "package":
        return load_package(path)
    if kind == "file":
        return load_file(path)
    if kind == "monai-bundle":
        from .bundle import load_bundle

        return load_bundle(path)
    if kind == "nnunet":
        from .nnunet import load_nnunet

        return load_nnunet(path)
    raise MedSegError("not a model: expected a package (card.yaml + weights, folder or "
                      ".zip), a TorchScript/ONNX file with a card beside it, a MONAI bundle "
                      "or an nnU-Net result folder", str(path))
