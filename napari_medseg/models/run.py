"""Running a model: load it if needed, predict, and turn failures into clear errors.

:func:`run_model` is what the Segment widget (in a worker thread), the command
line and batch runs call. It adds to :meth:`Model.predict`:

* loading by registry name or path (:func:`~napari_medseg.models.load_model`);
* cancel inside a network's forward pass, between its layers, not only between
  windows (:func:`cancel_inside_forward`);
* out of memory as one :class:`~napari_medseg.errors.MedSegError` with a hint
  on what to change (:func:`napari_medseg.core.policy.out_of_memory_error`).

No napari, no Qt.
"""

from __future__ import annotations

import contextlib
import logging

from ..core.policy import OOM_HINT, OutOfMemory, is_out_of_memory, out_of_memory_error
from ..errors import MedSegError, check_cancel
from .checks import check_input, check_prediction

log = logging.getLogger(__name__)

__all__ = ["run_model", "cancel_inside_forward", "set_model_options", "add_model_option_args",
           "precision_name", "precision_choosable", "OOM_HINT"]


#: ``--precision`` choices: the network's mixed precision (:func:`set_model_options`).
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
#: What the choices mean (``--precision``'s help, the Segment dock's tooltip).
PRECISION_HELP = ("the network's precision: auto (default: bf16 on CPUs with native bf16 and on "
                  "GPUs that have it, else fp32), bf16, fp16 (GPUs) or fp32 (the same result on "
                  "every CPU; slower where bf16 is native)")
#: Card formats whose models take a precision (``Model.precision_option``): PyTorch
#: networks (``TorchModel``: packages, TorchScript files, MONAI bundles) and nnU-Net
#: result folders (``NnunetModel``). TotalSegmentator tasks, ONNX and DeepBET keep their own.
PRECISION_FORMATS = ("state_dict", "torchscript", "monai-bundle", "nnunet")


def precision_choosable(entry) -> bool:
    """Whether ``entry`` takes a precision: a loaded model by its
    ``precision_option``, a registry entry (``card`` and ``source``, not loaded)
    by its card's format."""
    if hasattr(entry, "predict"):
        return bool(getattr(entry, "precision_option", False))
    card = getattr(entry, "card", None)
    return (getattr(entry, "source", "") != "totalseg"
            and getattr(card, "format", "") in PRECISION_FORMATS)


def add_model_option_args(parser) -> None:
    """Add ``--backend``, ``--roi-subset`` and ``--precision`` to an argparse (sub)parser
    (predict, batch)."""
    parser.add_argument("--backend", choices=("native", "nnunetv2"), default=None,
                        help="nnU-Net / TotalSegmentator models: the plugin's engine (native, "
                        "default) or nnU-Net's own nnUNetPredictor (reference)")
    parser.add_argument("--roi-subset", nargs="+", metavar="CLASS", default=None,
                        help="TotalSegmentator tasks: run only the parts holding these "
                        "classes (names as in `napari-medseg models`) and keep only them")
    parser.add_argument("--precision", choices=PRECISIONS, default=None, help=PRECISION_HELP)


def precision_name(amp) -> str:
    """``"fp32"`` for a run without autocast, else its autocast dtype's name
    (``Prediction.info["amp"]``)."""
    return "fp32" if amp in (None, "off") else str(amp)


def set_model_options(model, backend=None, roi_subset=None, name: str = "",
                      precision=None):
    """Choose the pipeline of an nnU-Net / TotalSegmentator model and its class subset.

    Parameters
    ----------
    model : Model
        A loaded model.
    backend : {"native", "nnunetv2"}, optional
        ``"native"``: the plugin's engine; ``"nnunetv2"``: nnU-Net's own
        ``nnUNetPredictor`` (the reference path). Only nnU-Net result folders
        and TotalSegmentator tasks have both.
    roi_subset : list of str, optional
        TotalSegmentator class names: only the part models holding them run,
        and only these classes are kept.
    name : str
        The model as the user named it, for messages.
    precision : {"auto", "bf16", "fp16", "fp32"}, optional
        The network's mixed precision in the plugin's engine (``model.amp``;
        ``"fp32"``: no autocast). PyTorch models and nnU-Net folders only.

    Returns
    -------
    Model
        ``model``, changed in place.

    Raises
    ------
    MedSegError
        An option the model does not have, an unknown backend or class name.
    """
    name = name or model.card.name
    if backend is not None:
        from .nnunet import BACKENDS

        if not hasattr(model, "backend"):
            raise MedSegError("a backend can be chosen only for nnU-Net result folders and "
                              "TotalSegmentator tasks; drop --backend", name)
        if backend not in BACKENDS:
            raise MedSegError(f"unknown backend {backend!r}; use one of "
                              f"{', '.join(BACKENDS)}", name)
        model.backend = backend
    if roi_subset:
        if not hasattr(model, "parts_for"):
            raise MedSegError("a class subset (--roi-subset) applies to TotalSegmentator "
                              "tasks only; drop it", name)
        model.parts_for(list(roi_subset))  # unknown class names: one line naming them
        model.roi_subset = list(roi_subset)
    if precision is not None:
        if precision not in PRECISIONS:
            raise MedSegError(f"unknown precision {precision!r}; use one of "
                              f"{', '.join(PRECISIONS)}", name)
        if not getattr(model, "precision_option", False):
            raise MedSegError("a precision can be chosen only for PyTorch models and nnU-Net "
                              "folders run by the plugin's engine; drop --precision", name)
        model.amp = precision  # policy.resolve_amp reads "fp32" as no autocast
    return model


@contextlib.contextmanager
def cancel_inside_forward(model, cancel):
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


def run_model(model, volumes, *, name: str = "", progress=None, cancel=None, warn=None,
              model_options: dict | None = None, **options):
    """Load ``model`` if needed and predict on ``volumes`` (labels on the input grid).

    Parameters
    ----------
    model : str, path or loaded model
        A registry name or path (given to ``load_model``) or a loaded model
        (anything with ``card`` and ``predict``).
    volumes : list of Volume
        ``(Z, Y, X)`` channels in the order of the model card.
    name : str
        What the user calls the input (a layer or file name), for messages.
    progress, cancel : callable, optional
        ``progress(done, total)`` and ``cancel() -> bool``.
    warn : callable, optional
        ``warn(text)`` for each mismatch as soon as it is found: input checks
        before the run, predicted volumes after it
        (:mod:`napari_medseg.models.checks`). All of them are also in
        ``prediction.info["warnings"]``.
    model_options : dict, optional
        ``backend``, ``roi_subset`` and ``precision`` for :func:`set_model_options`, set on the
        model before this run (a subset left from an earlier run is cleared
        first); None leaves the model as it is (the command line sets them itself).
    **options
        Passed to ``model.predict`` (device, overlap, tta, fast, region, uncertainty).

    Returns
    -------
    (model, Prediction)
        The loaded model (to reuse) and its prediction.

    Raises
    ------
    MedSegError
        Bad inputs, an unknown model, and out of memory (with :data:`OOM_HINT`).
    Cancelled
        When ``cancel()`` turned True.
    """
    try:
        if isinstance(model, str) or hasattr(model, "__fspath__"):
            from . import load_model

            model = load_model(model)
        if model_options is not None:
            if hasattr(model, "parts_for"):
                model.roi_subset = None
            set_model_options(model, **model_options)
        check_cancel(cancel)
        found = _checked(check_input, model.card, volumes, warn=warn)
        with cancel_inside_forward(model, cancel):
            pred = model.predict(volumes, progress=progress, cancel=cancel, **options)
    except OutOfMemory as exc:  # raised inside the engine: name the input here
        if exc.source is None and name:
            raise out_of_memory_error(exc, name) from exc
        raise
    except MedSegError:
        raise
    except Exception as exc:
        if is_out_of_memory(exc):
            raise out_of_memory_error(exc, name or None) from exc
        raise
    found += _checked(check_prediction, model.card, pred.labels,
                      options.get("region") is None, warn=warn)
    pred.info = dict(pred.info or {}, warnings=found)
    return model, pred


def _checked(check, *args, warn=None) -> list:
    """Run one of :mod:`.checks`; hand each warning to ``warn`` and return them all."""
    found = check(*args)
    for text in found:
        log.info("check: %s", text)
        if warn is not None:
            warn(text)
    return found
