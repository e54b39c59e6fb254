"""Running a model for the Segment widget, and its model card as short text.

Nothing here touches Qt: :func:`segment_volumes` runs in a worker thread,
:func:`card_html` formats a card for a label.
"""

from __future__ import annotations

import contextlib
import html
import logging

from .._napari.prediction import card_classes, card_to_dict
from ..errors import MedSegError, check_cancel

log = logging.getLogger(__name__)

__all__ = ["segment_volumes", "available_devices", "card_html", "OOM_HINT"]

OOM_HINT = ("out of memory; try a smaller region (current view or a box), the fast mode, "
            "or the cpu device")


def available_devices() -> dict[str, bool]:
    """``{"auto", "cpu", "cuda", "mps"}`` -> whether torch can use it here."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    return {"auto": True, "cpu": True, "cuda": bool(torch.cuda.is_available()),
            "mps": bool(mps is not None and mps.is_available())}


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    oom_type = getattr(__import__("torch"), "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text
                                               or "can't allocate memory" in text)


@contextlib.contextmanager
def _cancel_inside_forward(model, cancel):
    """Let ``cancel`` interrupt a torch network between its layers, not only between windows.

    One batch of windows can take seconds on a CPU; a forward pre-hook on each
    submodule checks ``cancel`` so that a cancel takes effect within one layer.
    Networks that take no hooks (TorchScript) are left alone.
    """
    network = getattr(model, "network", None)
    handles = []
    if cancel is not None and network is not None and hasattr(network, "modules"):
        def hook(module, args):
            check_cancel(cancel)

        try:
            handles = [m.register_forward_pre_hook(hook) for m in network.modules()]
        except (AttributeError, RuntimeError):  # scripted modules
            log.debug("cannot hook %s; cancel works between windows", type(network))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def segment_volumes(model, volumes, *, name: str = "", progress=None, cancel=None,
                    **options):
    """Load ``model`` if needed and predict on ``volumes`` (input grid).

    Parameters
    ----------
    model : str, path or loaded model
        A registry name or path (given to ``load_model``) or a loaded model.
    volumes : list of Volume
        ``(Z, Y, X)`` channels in the order of the model card.
    name : str
        The image layer name, for messages.
    progress, cancel : callable, optional
        See :class:`~napari_medseg._widgets._common.Job`.
    **options
        Passed to ``model.predict`` (device, overlap, tta, fast, region, uncertainty).

    Returns
    -------
    (model, Prediction)

    Raises
    ------
    MedSegError
        Including out-of-memory, with a hint on what to change.
    """
    try:
        if isinstance(model, str) or hasattr(model, "__fspath__"):
            from ..models import load_model

            model = load_model(model)
        check_cancel(cancel)
        with _cancel_inside_forward(model, cancel):
            pred = model.predict(volumes, progress=progress, cancel=cancel, **options)
    except MedSegError:
        raise
    except Exception as exc:
        if _is_oom(exc):
            raise MedSegError(f"{OOM_HINT} ({type(exc).__name__})", name) from exc
        raise
    return model, pred



def card_html(card) -> str:
    """The model card as short rich text: classes with colours, spacing, license, metrics."""
    d = card_to_dict(card)
    esc = html.escape
    names, colors = card_classes(card)
    parts = [f"<b>{esc(str(d.get('name', '')))}</b> {esc(str(d.get('version', '')))}"]
    if d.get("task"):
        parts.append(esc(str(d["task"])))
    swatches = []
    for i, n in names.items():
        rgb = colors.get(i, (0.5, 0.5, 0.5))
        hexc = "#%02x%02x%02x" % tuple(int(round(255 * c)) for c in rgb[:3])
        swatches.append(f"<span style='color:{hexc}'>&#9632;</span>&nbsp;{esc(n)}")
    if swatches:
        parts.append("Classes: " + " &nbsp;".join(swatches))
    info = []
    if d.get("target_spacing"):
        info.append("spacing " + " x ".join(f"{float(s):g}" for s in d["target_spacing"])
                    + " mm")
    if d.get("patch_size"):
        info.append("patch " + " x ".join(str(int(p)) for p in d["patch_size"]))
    if d.get("license"):
        info.append(f"license {esc(str(d['license']))}")
    if info:
        parts.append(" · ".join(info))
    metrics = d.get("metrics") or {}
    lines = _metric_lines(metrics)
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
