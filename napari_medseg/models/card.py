"""Model cards: what a model expects, what it outputs and how it was made.

A card is a small YAML or JSON file beside the weights. Example::

    name: abdomen-ct-small
    version: 1.0.0
    task: abdominal organ and lesion segmentation (CT)
    license: BSD-3-Clause
    channels: [{name: CT, modality: CT}]
    target_spacing: [5.0, 3.0, 3.0]        # (z, y, x) mm
    orientation: LPS                        # or null: use the file's own axes
    normalization: [{kind: ct, window: [-200, 300]}]
    patch_size: [32, 64, 64]
    classes: {1: {name: liver, color: [0.8, 0.3, 0.2]}, ...}
    format: state_dict                      # or torchscript, monai-bundle, nnunet, onnx
    weights: model.pt
    network: {class: UNet3D, kwargs: {in_channels: 1, out_channels: 6}}
    training: how it was trained
    body_region: abdomen                    # what the image must show (or any)
    plausible_ml: {liver: [600, 4000], ...} # predicted volumes outside warn
    metrics:
      real:                                 # measured on real scans, shown first
      - {scans: [ct_abdomen_dicom], reference: TotalSegmentator output,
         dice: {liver: 0.93, spleen: 0.0}}
      synthetic: {dice: {liver: 0.97, ...}, held_out: {...}}   # phantom scores

A card with only today's ``metrics: {dice: ...}`` keeps loading: its Dice is
read as synthetic (or, where ``held_out.reference`` names real labels, as a
real entry; fine-tuned packages say ``corrected labels``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import MedSegError

__all__ = ["ModelCard", "FORMATS", "NORMALIZATIONS", "BODY_REGIONS", "read_card",
           "DEFAULT_COLORS", "real_metrics", "synthetic_metrics", "metric_lines"]

FORMATS = ("state_dict", "torchscript", "monai-bundle", "nnunet", "onnx", "deepbet")
NORMALIZATIONS = ("ct", "mr", "none", "zscore", "minmax", "percentile")
#: What a card's ``body_region`` may say (``any``: no region check).
#: Window overlap of a run whose caller and card name none (nnU-Net's tile step 0.5).
DEFAULT_OVERLAP = 0.5
BODY_REGIONS = ("any", "head", "brain", "neck", "chest", "abdomen", "pelvis", "trunk",
                "limb", "whole-body")
_ORIENT_LETTERS = ({"L", "R"}, {"P", "A"}, {"I", "S"})

#: Colours for classes whose card gives none (tab10-like, RGB floats).
DEFAULT_COLORS = [
    (0.12, 0.47, 0.71), (1.0, 0.5, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16),
    (0.58, 0.4, 0.74), (0.55, 0.34, 0.29), (0.89, 0.47, 0.76), (0.5, 0.5, 0.5),
    (0.74, 0.74, 0.13), (0.09, 0.75, 0.81),
]


@dataclass
class ModelCard:
    """Everything needed to run a model and to judge whether to trust it.

    Attributes
    ----------
    name, version, task, license : str
        Identity and terms of use.
    channels : list of dict
        One ``{"name", "modality"}`` per input channel, in order.
    target_spacing : tuple of 3 float or None
        Voxel size ``(z, y, x)`` in mm the model works at; None keeps the input's.
    orientation : str or None
        Three-letter code (``"LPS"``, ``"RAS"``) of the voxel axes ``i, j, k`` the
        model expects, or None to keep the input's axes.
    normalization : list of dict
        One per channel: ``{"kind": "ct", "window": [lo, hi]}`` (clip HU, scale),
        ``{"kind": "mr"}`` (percentile clip + z-score) or ``{"kind": "none"}``.
    patch_size : tuple of 3 int
        Sliding-window size ``(z, y, x)`` in voxels of the model grid.
    train_patch_size : tuple of 3 int or None
        Window fine-tuning trains on unless told otherwise (None: ``patch_size``);
        for a model trained on windows of several sizes that runs a larger one.
    classes : dict
        ``{id: {"name": str, "color": [r, g, b]}}``; id 0 (background) omitted.
    training : str
        How it was trained (data, schedule, seeds).
    metrics : dict
        Held-out results: ``{"real": [{"scans": [...], "reference": str,
        "dice": {class: float}}, ...], "synthetic": {"dice": {...}, ...}}``
        (see :func:`real_metrics`, :func:`synthetic_metrics`); a legacy
        ``{"dice": {...}}`` is read as synthetic.
    body_region : str
        The part of the body the model's images show, one of
        :data:`BODY_REGIONS` (``"any"`` when it does not matter).
    plausible_ml : dict
        ``{class name: [low, high]}`` volumes in mL a correct prediction
        falls in; one outside warns after a run.
    format : str
        One of :data:`FORMATS`.
    weights : str or None
        Weights file name inside the package.
    network : dict or None
        ``{"class": ..., "kwargs": {...}}`` for ``state_dict`` packages.
    mirror_axes : tuple of int
        Spatial axes (0=z, 1=y, 2=x of the model grid) along which mirror
        test-time augmentation is valid; models with left/right classes use
        ``(0, 1)``.
    default_tta : bool
        Run mirror test-time augmentation unless the caller turns it off (as
        nnU-Net mirrors by default): for models whose real-scan figures were
        measured with it. Needs ``mirror_axes``.
    default_overlap : float or None
        Overlap of neighbouring sliding windows, in [0, 0.9], used unless the
        caller sets one (:data:`DEFAULT_OVERLAP`, nnU-Net's 0.5, when absent);
        a model whose figures hold with less overlap says so here (each
        halving of the step costs about 2**3 the windows in 3D).
    postprocessing : dict
        Applied to the labels on the input grid:
        ``{"largest_component": [class ids]}`` keeps only the largest
        connected piece of each listed class (organs that come in one piece).
    extra : dict
        Anything format specific.
    """

    name: str
    version: str = "0.0.0"
    task: str = ""
    license: str = "unknown"
    channels: list = field(default_factory=lambda: [{"name": "image", "modality": "unknown"}])
    target_spacing: tuple | None = None
    orientation: str | None = None
    normalization: list = field(default_factory=lambda: [{"kind": "none"}])
    patch_size: tuple = (64, 64, 64)
    train_patch_size: tuple | None = None
    classes: dict = field(default_factory=dict)
    training: str = ""
    metrics: dict = field(default_factory=dict)
    format: str = "state_dict"
    weights: str | None = None
    network: dict | None = None
    mirror_axes: tuple = (0, 1, 2)
    default_tta: bool = False
    default_overlap: float | None = None
    postprocessing: dict = field(default_factory=dict)
    body_region: str = "any"
    plausible_ml: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    # --------------------------------------------------------------- checks
    def validate(self) -> "ModelCard":
        """Normalise types and check every field; raise :class:`MedSegError` if wrong."""
        where = f"model card {self.name!r}"

        def bad(msg):
            raise MedSegError(f"{where}: {msg}; fix the card file")

        if not isinstance(self.name, str) or not self.name.strip():
            bad("'name' must be a non-empty string")
        self.version = str(self.version)
        if not isinstance(self.channels, list) or not self.channels:
            bad("'channels' must be a non-empty list of {name, modality}")
        self.channels = [_channel(c, i, bad) for i, c in enumerate(self.channels)]
        if self.target_spacing is not None:
            self.target_spacing = _triple(self.target_spacing, float, "target_spacing", bad)
            if any(not math.isfinite(s) or s <= 0 for s in self.target_spacing):
                bad("'target_spacing' must be three positive numbers (mm)")
        if self.orientation is not None:
            code = str(self.orientation).upper()
            groups = [next((i for i, g in enumerate(_ORIENT_LETTERS) if ch in g), -1)
                      for ch in code]
            if len(code) != 3 or sorted(groups) != [0, 1, 2]:
                bad(f"'orientation' {self.orientation!r} is not a code like LPS or RAS")
            self.orientation = code
        norm = self.normalization
        if isinstance(norm, dict):
            norm = [norm]
        if not isinstance(norm, list) or len(norm) not in (1, len(self.channels)):
            bad("'normalization' needs one entry per channel")
        if len(norm) == 1 and len(self.channels) > 1:
            norm = norm * len(self.channels)
        self.normalization = [_norm(n, bad) for n in norm]
        self.patch_size = _triple(self.patch_size, int, "patch_size", bad)
        if any(p <= 0 for p in self.patch_size):
            bad("'patch_size' must be three positive integers")
        if self.train_patch_size is not None:
            self.train_patch_size = _triple(self.train_patch_size, int, "train_patch_size", bad)
            if any(p <= 0 for p in self.train_patch_size):
                bad("'train_patch_size' must be three positive integers")
        self.classes = _classes(self.classes, bad)
        if self.format not in FORMATS:
            bad(f"'format' {self.format!r} is not one of {FORMATS}")
        if self.network is not None and (not isinstance(self.network, dict)
                                         or "class" not in self.network):
            bad("'network' must be {class: ..., kwargs: {...}}")
        if not isinstance(self.metrics, dict) or not isinstance(self.extra, dict):
            bad("'metrics' and 'extra' must be mappings")
        _check_metrics(self.metrics, bad)
        region = str(self.body_region or "any").strip().lower()
        if region not in BODY_REGIONS:
            bad(f"'body_region' {self.body_region!r} is not one of {BODY_REGIONS}")
        self.body_region = region
        self.plausible_ml = _plausible(self.plausible_ml, bad)
        axes = tuple(int(a) for a in (self.mirror_axes or ()))
        if any(a not in (0, 1, 2) for a in axes):
            bad("'mirror_axes' must hold axes 0, 1, 2")
        self.mirror_axes = axes
        if not isinstance(self.default_tta, bool):
            bad("'default_tta' must be true or false")
        if self.default_tta and not axes:
            bad("'default_tta' needs 'mirror_axes' to mirror along")
        if self.default_overlap is not None:
            try:
                ov = float(self.default_overlap)
            except (TypeError, ValueError):
                ov = float("nan")
            if isinstance(self.default_overlap, bool) or not 0.0 <= ov <= 0.9:
                bad("'default_overlap' must be a number in [0, 0.9]")
            self.default_overlap = ov
        post = dict(self.postprocessing or {})
        if set(post) - {"largest_component"}:
            bad(f"unknown postprocessing steps {sorted(set(post) - {'largest_component'})}")
        try:
            post = {k: [int(c) for c in v] for k, v in post.items()}
        except (TypeError, ValueError):
            bad("'postprocessing' lists must hold class ids")
        self.postprocessing = post
        self.training = str(self.training or "")
        return self

    # --------------------------------------------------------- derived facts
    @property
    def n_channels(self) -> int:
        """Number of input channels."""
        return len(self.channels)

    @property
    def n_classes(self) -> int:
        """Number of output classes, background included (max id + 1)."""
        return max(self.classes, default=0) + 1

    @property
    def label_names(self) -> dict:
        """``{id: name}`` for the foreground classes."""
        return {k: v["name"] for k, v in self.classes.items()}

    @property
    def label_colors(self) -> dict:
        """``{id: (r, g, b)}`` for the foreground classes."""
        return {k: tuple(v["color"]) for k, v in self.classes.items()}

    @property
    def real_metrics(self) -> list:
        """Figures measured on real scans (see :func:`real_metrics`)."""
        return real_metrics(self.metrics)

    @property
    def synthetic_metrics(self) -> dict:
        """Figures measured on synthetic phantoms (see :func:`synthetic_metrics`)."""
        return synthetic_metrics(self.metrics)

    def overlap(self, overlap=None) -> float:
        """The window overlap of a run: ``overlap`` if given, else the card's
        ``default_overlap``, else :data:`DEFAULT_OVERLAP`."""
        if overlap is not None:
            return float(overlap)
        return float(DEFAULT_OVERLAP if self.default_overlap is None else self.default_overlap)

    # ---------------------------------------------------------- conversion
    def to_dict(self) -> dict:
        """A JSON/YAML-safe dict (class ids as ints, tuples as lists)."""
        d = asdict(self)
        for key in ("target_spacing", "patch_size", "train_patch_size", "mirror_axes"):
            if d[key] is not None:
                d[key] = list(d[key])
        d["classes"] = {int(k): {"name": v["name"], "color": list(v["color"])}
                        for k, v in self.classes.items()}
        d["plausible_ml"] = {k: list(v) for k, v in self.plausible_ml.items()}
        return d

    @classmethod
    def from_dict(cls, data: dict, source: str | None = None) -> "ModelCard":
        """Build a card from a mapping; unknown keys go to ``extra``.

        Raises
        ------
        MedSegError
            Missing name or invalid fields (the message names ``source``).
        """
        if not isinstance(data, dict):
            raise MedSegError("model card must be a mapping of fields", source)
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = dict(kwargs.pop("extra", None) or {})
        extra.update({k: v for k, v in data.items() if k not in known})
        if "name" not in kwargs:
            raise MedSegError("model card has no 'name'; add one", source)
        try:
            return cls(**kwargs, extra=extra)
        except MedSegError as exc:
            raise MedSegError(str(exc), source) from None

    def to_json(self) -> str:
        """The card as indented JSON text."""
        return json.dumps(self.to_dict(), indent=2)

    def to_yaml(self) -> str:
        """The card as YAML text."""
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True,
                              default_flow_style=None)

    def save(self, path) -> Path:
        """Write the card atomically as YAML (``.yaml``/``.yml``) or JSON (``.json``)."""
        from ..io.atomic import atomic_path

        path = Path(path)
        text = self.to_json() if path.suffix.lower() == ".json" else self.to_yaml()
        with atomic_path(path, overwrite=True) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return path

    @classmethod
    def load(cls, path) -> "ModelCard":
        """Read a card from a YAML or JSON file (see :func:`read_card`)."""
        return read_card(path)


def read_card(path) -> ModelCard:
    """Read a ``.yaml``/``.yml``/``.json`` model card.

    Raises
    ------
    MedSegError
        The file is missing, not valid YAML/JSON, or the card is invalid.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MedSegError(f"cannot read the model card ({exc.strerror or exc})",
                          str(path)) from exc
    return card_from_text(text, str(path), json_first=path.suffix.lower() == ".json")


def card_from_text(text: str, source: str, json_first: bool = False) -> ModelCard:
    """Parse card text (YAML is a superset of JSON, so YAML parsing covers both)."""
    import yaml

    try:
        data = json.loads(text) if json_first else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise MedSegError(f"model card is not valid {'JSON' if json_first else 'YAML'}: "
                          f"{str(exc).splitlines()[0]}", source) from exc
    return ModelCard.from_dict(data, source)


# ------------------------------------------------------------------ metrics
def real_metrics(metrics: dict | None) -> list:
    """Entries measured on real scans, each ``{"scans", "reference", "dice", ...}``.

    ``metrics["real"]`` as written, plus, for a legacy card whose
    ``held_out.reference`` names the labels (a fine-tuned model's "corrected
    labels"), its ``dice`` as one entry over the held-out cases.
    """
    metrics = metrics or {}
    out = [dict(e) for e in metrics.get("real") or []]
    held = metrics.get("held_out")
    if ("synthetic" not in metrics and isinstance(metrics.get("dice"), dict)
            and isinstance(held, dict) and held.get("reference")):
        cases = held.get("cases")
        out.append({"scans": [str(c) for c in cases] if isinstance(cases, list) else
                    [f"{cases} held-out case(s)"], "reference": str(held["reference"]),
                    "dice": dict(metrics["dice"])})
    return out


def synthetic_metrics(metrics: dict | None) -> dict:
    """Figures measured on synthetic phantoms: ``metrics["synthetic"]``.

    A legacy card (``metrics.dice`` and no ``synthetic``/``real``) is read as
    synthetic: its ``dice``, ``dice_*`` and ``held_out`` entries, unless
    ``held_out.reference`` says the labels were real (see :func:`real_metrics`).
    """
    metrics = metrics or {}
    if "synthetic" in metrics:
        return dict(metrics.get("synthetic") or {})
    held = metrics.get("held_out")
    if isinstance(held, dict) and held.get("reference"):
        return {}
    return {k: v for k, v in metrics.items()
            if k == "held_out" or (k.startswith("dice") and k != "dice_before")}


def metric_lines(metrics: dict | None, digits: int = 2) -> list:
    """Short text lines, real figures first, synthetic ones labelled as such.

    Examples
    --------
    >>> metric_lines({"dice": {"liver": 0.97}})
    ['synthetic (phantom) dice: liver 0.97']
    """
    def fmt(d):
        return ", ".join(f"{k} {v:.{digits}f}" if _num(v) else f"{k} {v}"
                         for k, v in (d or {}).items())

    lines = []
    for e in real_metrics(metrics):
        scans = e.get("scans") or []
        scans = ", ".join(scans) if isinstance(scans, list) else str(scans)
        lines.append(f"real dice ({scans}; reference: {e.get('reference', '?')}): "
                     f"{fmt(e.get('dice'))}")
    syn = synthetic_metrics(metrics)
    for key, vals in syn.items():
        if key.startswith("dice") and isinstance(vals, dict) and vals:
            what = "dice" if key == "dice" else key.replace("_", " ")
            lines.append(f"synthetic (phantom) {what}: {fmt(vals)}")
    if not lines and isinstance((metrics or {}).get("note"), str):
        lines.append(f"metrics: {metrics['note']}")
    return lines


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_metrics(metrics: dict, bad) -> None:
    real = metrics.get("real")
    if real is not None:
        if not isinstance(real, list):
            bad("'metrics.real' must be a list of {scans, reference, dice}")
        for i, e in enumerate(real):
            if not isinstance(e, dict) or not e.get("scans") or not e.get("reference"):
                bad(f"'metrics.real' entry {i} needs 'scans' and 'reference'")
            if isinstance(e["scans"], str):
                e["scans"] = [e["scans"]]
            e["scans"] = [str(x) for x in e["scans"]]
            e["reference"] = str(e["reference"])
            dice = e.get("dice")
            if not isinstance(dice, dict) or not all(_num(v) for v in dice.values()):
                bad(f"'metrics.real' entry {i} needs 'dice': {{class: number}}")
    if "synthetic" in metrics and not isinstance(metrics["synthetic"], dict):
        bad("'metrics.synthetic' must be a mapping, e.g. {dice: {class: number}}")


def _plausible(ranges, bad) -> dict:
    if not isinstance(ranges, dict):
        bad("'plausible_ml' must map class name to [low, high] mL")
    out = {}
    for name, rng in ranges.items():
        try:
            lo, hi = (float(x) for x in rng)
        except (TypeError, ValueError):
            bad(f"'plausible_ml' of {name!r} must be [low, high] in mL")
        if not 0 <= lo < hi:
            bad(f"'plausible_ml' of {name!r} needs 0 <= low < high")
        out[str(name)] = (lo, hi)
    return out


# ------------------------------------------------------------------ helpers
def _triple(v, typ, key, bad):
    try:
        out = tuple(typ(x) for x in v)
    except (TypeError, ValueError):
        bad(f"'{key}' must be three numbers (z, y, x)")
    if len(out) != 3:
        bad(f"'{key}' must be three numbers (z, y, x), got {len(out)}")
    return out


def _channel(c, i, bad):
    if isinstance(c, str):
        c = {"name": c, "modality": c}
    if not isinstance(c, dict):
        bad(f"channel {i} must be {{name, modality}}")
    return {"name": str(c.get("name", f"channel{i}")),
            "modality": str(c.get("modality", "unknown"))}


def _norm(n, bad):
    if isinstance(n, str):
        n = {"kind": n}
    if not isinstance(n, dict) or n.get("kind") not in NORMALIZATIONS:
        bad(f"normalization {n!r} must have 'kind' in {NORMALIZATIONS}")
    n = dict(n)
    if n["kind"] == "ct":
        w = n.get("window")
        try:
            lo, hi = (float(x) for x in w)
        except (TypeError, ValueError):
            bad("CT normalization needs 'window': [low, high] in HU")
        if not lo < hi:
            bad("CT normalization window must have low < high")
        n["window"] = [lo, hi]
    return n


def _classes(classes, bad):
    if not isinstance(classes, dict):
        bad("'classes' must map class id to {name, color}")
    out = {}
    for k, v in classes.items():
        try:
            cid = int(k)
        except (TypeError, ValueError):
            bad(f"class id {k!r} is not an integer")
        if cid <= 0 or cid > 65535:
            bad(f"class id {cid} must be in 1..65535 (0 is background)")
        if isinstance(v, str):
            v = {"name": v}
        if not isinstance(v, dict) or not v.get("name"):
            bad(f"class {cid} needs a 'name'")
        color = v.get("color") or DEFAULT_COLORS[(cid - 1) % len(DEFAULT_COLORS)]
        try:
            color = [float(c) for c in color]
        except (TypeError, ValueError):
            bad(f"class {cid} colour must be 3 or 4 numbers in [0, 1]")
        if len(color) not in (3, 4) or any(not 0 <= c <= 1 for c in color):
            bad(f"class {cid} colour must be 3 or 4 numbers in [0, 1]")
        out[cid] = {"name": str(v["name"]), "color": color}
    return dict(sorted(out.items()))
