"""The model card as short rich text for the Segment widget.

Running a model is :func:`napari_medseg.models.run.run_model` (Qt-free, also
used by the command line); the names below are kept for older imports.
"""

from __future__ import annotations

import html
import logging

from ..core.policy import OOM_HINT, available_devices
from ..models.card import metric_lines
from ..models.run import run_model

log = logging.getLogger(__name__)

__all__ = ["segment_volumes", "available_devices", "card_html", "OOM_HINT"]

#: Kept for older imports: :func:`napari_medseg.models.run.run_model`.
segment_volumes = run_model


def card_html(card) -> str:
    """A :class:`~napari_medseg.models.card.ModelCard` as short rich text.

    Classes with colours, spacing, patch, license and the first metrics.
    """
    esc = html.escape
    parts = [f"<b>{esc(card.name)}</b> {esc(card.version)}"]
    if card.task:
        parts.append(esc(card.task))
    swatches = []
    colors = card.label_colors
    for i, n in card.label_names.items():
        rgb = colors.get(i, (0.5, 0.5, 0.5))
        hexc = "#%02x%02x%02x" % tuple(int(round(255 * c)) for c in rgb[:3])
        swatches.append(f"<span style='color:{hexc}'>&#9632;</span>&nbsp;{esc(n)}")
    if swatches:
        parts.append("Classes: " + " &nbsp;".join(swatches))
    info = []
    if card.target_spacing:
        info.append("spacing " + " x ".join(f"{float(s):g}" for s in card.target_spacing)
                    + " mm")
    if card.patch_size:
        info.append("patch " + " x ".join(str(int(p)) for p in card.patch_size))
    if card.license:
        info.append(f"license {esc(card.license)}")
    if info:
        parts.append(" · ".join(info))
    # real scans first; phantom scores labelled "synthetic (phantom)"
    lines = metric_lines(card.metrics)[:3]
    if card.body_region != "any":
        info_region = f"for the {card.body_region}"
        lines.insert(0, f"inputs: {', '.join(c['modality'] for c in card.channels)} "
                        f"{info_region}")
    if lines:
        parts.append("<br>".join(esc(line) for line in lines))
    return "<br>".join(parts)


def _metric_lines(metrics: dict, groups: int = 2) -> list[str]:
    """One line per group of numeric metrics, e.g. ``"dice: liver 0.96, spleen 0.90"``."""
    lines = []
    flat = [f"{k} {_fmt(v)}" for k, v in metrics.items() if _is_number(v)]
    if flat:
        lines.append("metrics: " + ", ".join(flat))
    for key, vals in metrics.items():
        if isinstance(vals, dict) and vals and all(_is_number(v) for v in vals.values()):
            lines.append(f"{key}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in vals.items()))
    return lines[:groups]


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)
