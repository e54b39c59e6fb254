"""MONAI bundle folders: ``configs/`` + ``models/model.pt`` (or ``model.ts``).

The network is built from the inference config's ``network_def`` by a small
resolver of our own rather than MONAI's ``ConfigParser``, because a bundle
config may hold ``$`` Python expressions that the parser would evaluate. Here
``_target_`` must name a class of an explicit list of MONAI networks
(:data:`ALLOWED_NETWORKS`, and the blocks they take, :data:`ALLOWED_BLOCKS`;
never a function such as ``monai.networks.utils.save_state``, never with
``pretrained=True`` or another argument that downloads), ``@id`` references
are followed, and any ``$`` expression or ``%`` file reference in the network
definition is refused. Every file read from the bundle must lie inside it
(a symlink pointing outside is refused). Weights are read with ``torch.load(weights_only=True)``;
``models/model.ts`` (TorchScript) is used when there is no ``model.pt``.

The card is derived from ``configs/metadata.json`` (name, version, license,
channels, classes) and from the preprocessing transforms (``Spacingd`` ->
target spacing, ``Orientationd`` -> orientation, ``ScaleIntensityRanged`` -> CT
window, ``NormalizeIntensityd`` -> z-score) and the inferer's ``roi_size``; a
napari-medseg ``card.yaml`` in the bundle folder overrides any of it. MONAI
arrays are ``(x, y, z)`` ordered, so the predictor transposes around the
network.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from ..errors import MedSegError
from .card import ModelCard, read_card
from .weights import inside_package

__all__ = ["bundle_card", "load_bundle", "build_network_def", "ALLOWED_NETWORKS", "ALLOWED_BLOCKS"]

log = logging.getLogger(__name__)


def _read_config(path: Path) -> dict:
    cfg_dir = path / "configs"
    for name in ("inference.json", "inference.yaml", "inference.yml"):
        f = cfg_dir / name
        if f.is_file():
            text = inside_package(path, f).read_text(encoding="utf-8")
            try:
                if name.endswith(".json"):
                    return json.loads(text)
                import yaml

                return yaml.safe_load(text) or {}
            except Exception as exc:
                raise MedSegError(f"cannot parse the bundle config ({exc})", str(f)) from exc
    raise MedSegError("MONAI bundle has no configs/inference.json or .yaml", str(path))


def _read_metadata(path: Path) -> dict:
    f = path / "configs" / "metadata.json"
    if not f.is_file():
        return {}
    try:
        return json.loads(inside_package(path, f).read_text(encoding="utf-8"))
    except ValueError as exc:
        raise MedSegError(f"configs/metadata.json is not valid JSON ({exc})", str(path)) from exc


def _lookup(cfg: dict, ref: str):
    node = cfg
    for part in ref.replace("#", "::").split("::"):
        if isinstance(node, list):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise MedSegError(f"bundle config reference @{ref} does not exist")
    return node


#: The only classes a bundle's ``network_def`` may build: ``monai.networks.nets``
#: networks (and their common aliases) and the ``monai.networks.blocks`` they
#: take as arguments. Functions (``monai.networks.utils.save_state`` writes
#: files), factories and networks that fetch weights from the internet
#: (HoVerNet, Transchex, TorchVisionFCModel, ...) are not in it.
ALLOWED_NETWORKS = frozenset({
    "AHNet", "AttentionUnet", "AutoEncoder", "BasicUNet", "BasicUnet", "BasicUNetPlusPlus",
    "Classifier", "Critic", "DenseNet", "DenseNet121", "DenseNet169", "DenseNet201",
    "DenseNet264", "DiNTS", "Discriminator", "DynUNet", "DynUnet", "EfficientNetBN",
    "FlexibleUNet", "Generator", "GlobalNet", "HighResNet", "LocalNet", "MedNeXt", "RegUNet",
    "Regressor", "ResNet", "SegResNet", "SegResNetDS", "SegResNetDS2", "SegResNetVAE",
    "SwinUNETR", "UNet", "Unet", "UNETR", "VarAutoEncoder", "ViT", "ViTAutoEnc", "VNet",
})
ALLOWED_BLOCKS = frozenset({
    "TopologyInstance", "Convolution", "ResidualUnit", "UnetBasicBlock", "UnetResBlock",
    "UnetUpBlock", "UnetOutBlock",
})
#: Keyword arguments that make a network download weights when truthy.
_DOWNLOAD_KW = re.compile(r"pretrain|url|download|repo_id|^weights$", re.I)


def _network_class(target: str):
    """The allowed MONAI class a ``_target_`` names, else :class:`MedSegError`."""
    import importlib

    module, _, name = target.rpartition(".")
    allowed = name in ALLOWED_NETWORKS or name in ALLOWED_BLOCKS
    where = "monai.networks.nets" if name in ALLOWED_NETWORKS else "monai.networks.blocks"
    if not allowed or (module and module != where and not module.startswith(where + ".")):
        raise MedSegError(f"refused _target_ {target!r}: bundle configs may only build "
                          "MONAI network classes (e.g. UNet, SegResNet, SwinUNETR); "
                          "napari-medseg runs no other code from configs")
    try:
        pkg = importlib.import_module(where)
    except ImportError as exc:
        raise MedSegError("MONAI bundles need MONAI; install napari-medseg[monai]") from exc
    cls = getattr(pkg, name, None)
    if cls is None or not isinstance(cls, type):
        raise MedSegError(f"network class {target!r} is not in this MONAI version "
                          f"({where}); update MONAI")
    return cls


def build_network_def(node, cfg: dict, depth: int = 0):
    """Instantiate a bundle ``network_def`` without evaluating any expression.

    Only classes in :data:`ALLOWED_NETWORKS` / :data:`ALLOWED_BLOCKS` are
    built, never with a truthy ``pretrained`` (or any argument that downloads
    weights); ``$`` expressions and ``%`` file references are refused.

    Raises
    ------
    MedSegError
        ``$`` expressions, refused classes or arguments, or bad references.
    """
    if depth > 50:
        raise MedSegError("bundle config references are circular")
    if isinstance(node, str):
        if node.startswith("$"):
            raise MedSegError(f"refused: the network definition holds a Python expression "
                              f"({node[:40]!r}); napari-medseg does not run code from configs")
        if node.startswith("%"):
            raise MedSegError(f"refused: the network definition refers to another file "
                              f"({node[:40]!r}); put the network in configs/inference.json")
        if node.startswith("@"):
            return build_network_def(_lookup(cfg, node[1:]), cfg, depth + 1)
        return node
    if isinstance(node, list):
        return [build_network_def(v, cfg, depth + 1) for v in node]
    if isinstance(node, dict):
        if "_target_" in node:
            target = str(node["_target_"])
            cls = _network_class(target)
            if str(node.get("_mode_", "default")) != "default" or node.get("_disabled_"):
                raise MedSegError(f"refused _mode_ / _disabled_ on {target!r}: the network "
                                  "must be built as a plain instance")
            kwargs = {k: build_network_def(v, cfg, depth + 1) for k, v in node.items()
                      if not k.startswith("_")}
            for k, v in kwargs.items():
                if _DOWNLOAD_KW.search(k) and v not in (False, None, "", 0):
                    raise MedSegError(f"refused {target}({k}={v!r}): napari-medseg never "
                                      "downloads weights; the bundle's models/model.pt holds "
                                      f"them; set {k} to false")
            try:
                return cls(**kwargs)
            except Exception as exc:  # noqa: BLE001 - any constructor error is the config's
                msg = " ".join(str(exc).split())[:160]
                raise MedSegError(f"bundle network {target}: {msg}") from exc
        return {k: build_network_def(v, cfg, depth + 1) for k, v in node.items()}
    return node


def _transforms(node):
    """All dicts with a ``_target_`` anywhere in a config (for reading settings)."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield node
        for v in node.values():
            yield from _transforms(v)
    elif isinstance(node, list):
        for v in node:
            yield from _transforms(v)


def _literal(v, cfg):
    for _ in range(10):
        if isinstance(v, str) and v.startswith("@"):
            try:
                v = _lookup(cfg, v[1:])
            except (MedSegError, ValueError, IndexError):
                return None
        else:
            break
    if isinstance(v, str) and v.startswith("$"):
        return None
    return v


def bundle_card(path) -> ModelCard:
    """A card for a MONAI bundle folder (metadata + transforms, overridden by card.yaml)."""
    path = Path(path)
    cfg, meta = _read_config(path), _read_metadata(path)
    fmt = meta.get("network_data_format", {})
    inputs = fmt.get("inputs", {}) or {}
    outputs = fmt.get("outputs", {}) or {}
    inp = next(iter(inputs.values()), {}) if inputs else {}
    out = next(iter(outputs.values()), {}) if outputs else {}
    n_in = int(inp.get("num_channels", 1) or 1)
    modality = str(inp.get("modality", "unknown"))
    channel_def = inp.get("channel_def") or {}
    channels = [{"name": str(channel_def.get(str(i), modality if n_in == 1 else f"channel{i}")),
                 "modality": modality} for i in range(n_in)]
    classes = {}
    for k, name in (out.get("channel_def") or {}).items():
        if str(k).isdigit() and int(k) > 0:
            classes[int(k)] = {"name": str(name)}
    if not classes:
        n_out = int(out.get("num_channels", 2) or 2)
        classes = {i: {"name": f"class {i}"} for i in range(1, n_out)}
    data = {
        "name": meta.get("name") or path.name, "version": meta.get("version", "0.0.0"),
        "task": meta.get("task") or meta.get("description", ""),
        "license": meta.get("license") or _license(path),
        "channels": channels, "classes": classes, "format": "monai-bundle",
        "training": meta.get("data_source") or meta.get("description", ""),
        "extra": {"axis_order": "xyz"}, "target_spacing": None, "orientation": None,
        "normalization": [{"kind": "none"}], "patch_size": [96, 96, 96],
    }
    spatial = inp.get("spatial_shape")
    for t in _transforms(cfg):
        kind = str(t["_target_"]).rsplit(".", 1)[-1]
        if kind in ("Spacingd", "Spacing"):
            pix = _literal(t.get("pixdim"), cfg)
            if isinstance(pix, (list, tuple)) and len(pix) >= 3:
                data["target_spacing"] = [float(v) for v in pix[:3]][::-1]
        elif kind in ("Orientationd", "Orientation"):
            ax = _literal(t.get("axcodes"), cfg)
            if isinstance(ax, str) and len(ax) == 3:
                data["orientation"] = ax.upper()
        elif kind in ("ScaleIntensityRanged", "ScaleIntensityRange"):
            lo, hi = _literal(t.get("a_min"), cfg), _literal(t.get("a_max"), cfg)
            if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
                data["normalization"] = [{"kind": "ct", "window": [lo, hi]}]
        elif kind in ("NormalizeIntensityd", "NormalizeIntensity"):
            nonzero = bool(_literal(t.get("nonzero", False), cfg))
            data["normalization"] = [{"kind": "mr" if nonzero else "zscore"}]
        elif kind.endswith("SlidingWindowInferer"):
            roi = _literal(t.get("roi_size"), cfg)
            if isinstance(roi, (list, tuple)) and len(roi) == 3:
                spatial = roi
    if isinstance(spatial, (list, tuple)) and len(spatial) == 3 and \
            all(isinstance(v, int) and v > 0 for v in spatial):
        data["patch_size"] = list(spatial)[::-1]
    for suffix in ("card.yaml", "card.yml", "card.json"):
        own = path / suffix
        if own.is_file():
            inside_package(path, own)
            over = read_card(own).to_dict()
            given = _given_keys(own)
            data.update({k: v for k, v in over.items() if k in given})
            data["extra"] = {**{"axis_order": "xyz"}, **over.get("extra", {})}
            data["format"] = "monai-bundle"
    return ModelCard.from_dict(data, str(path))


def _given_keys(card_path: Path) -> set:
    import yaml

    try:
        return set((yaml.safe_load(card_path.read_text(encoding="utf-8")) or {}).keys())
    except Exception:  # already validated by read_card
        return set()


def _license(path: Path) -> str:
    for name in ("LICENSE", "docs/LICENSE", "LICENSE.txt"):
        f = path / name
        if f.is_file():
            text = inside_package(path, f).read_text(encoding="utf-8", errors="replace")
            first = text.strip().splitlines()
            return first[0][:80] if first else "see LICENSE"
    return "unknown"


def load_bundle(path):
    """Load a MONAI bundle folder as a :class:`~napari_medseg.models.predictor.TorchModel`.

    Raises
    ------
    MedSegError
        Missing files, refused config content, unsafe or mismatching weights.
    """
    from .weights import load_torchscript, load_weights
    from .predictor import TorchModel

    path = Path(path)
    card = bundle_card(path)
    pt, ts = path / "models" / "model.pt", path / "models" / "model.ts"
    axis_order = card.extra.get("axis_order", "xyz")
    if pt.is_file():
        inside_package(path, pt)
        cfg = _read_config(path)
        if "network_def" not in cfg:
            raise MedSegError("bundle config has no network_def to load models/model.pt into",
                              str(path))
        net = build_network_def(cfg["network_def"], cfg)
        try:
            net.load_state_dict(load_weights(pt.read_bytes(), str(pt)), strict=True)
        except RuntimeError as exc:
            raise MedSegError("models/model.pt does not fit the bundle's network_def: "
                              f"{str(exc).splitlines()[0]}", str(path)) from exc
        return TorchModel(card, net, str(path), axis_order)
    if ts.is_file():
        inside_package(path, ts)
        return TorchModel(card, load_torchscript(ts, str(ts)), str(path), axis_order)
    raise MedSegError("MONAI bundle has neither models/model.pt nor models/model.ts",
                      str(path))
