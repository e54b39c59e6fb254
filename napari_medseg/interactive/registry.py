"""Interactive engines register here with their card and what they can do.

An :class:`EngineInfo` names the engine, says how to build it (a
``"module:attribute"`` factory, imported only when the engine is made, so
listing engines loads no torch), what it was trained on and where its figures
were measured (:class:`EngineCard`), and its capabilities: the prompts it uses
(clicks, boxes, scribbles), the modes (2D slice, 3D object) and whether it needs
a path from the user (a checkpoint file or a model folder). The Interactive
widget asks the registry what each engine supports; adding an engine is one
:func:`register_engine` call.

>>> engine_info("classical").needs_path
False
>>> engine_info("nnInteractive").path
'folder'
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

from ..errors import MedSegError

__all__ = ["EngineCard", "EngineInfo", "ENGINE_REGISTRY", "register_engine", "engine_info",
           "engine_names", "make_engine", "PROMPTS", "MODES"]

#: Prompt kinds an engine may use.
PROMPTS = ("clicks", "boxes", "scribbles")
#: Modes an engine may run in.
MODES = ("2d", "3d")


@dataclass(frozen=True)
class EngineCard:
    """What an engine learned from and where its figures come from (honest, short).

    Attributes
    ----------
    trained_on : str
        Its training data ("no training" for engines without weights).
    measured_on : str
        Where the figures quoted for it were measured (synthetic phantom or a
        named real scan, with the reference), or that none were.
    """

    trained_on: str
    measured_on: str


@dataclass(frozen=True)
class EngineInfo:
    """An interactive engine and its capabilities.

    Attributes
    ----------
    name : str
        Shown in the widget's engine picker.
    factory : str or callable
        ``factory(path, **kwargs) -> Engine``, or ``"module:attribute"`` of one
        (relative modules start with a dot and are found in this package).
    card : EngineCard
    prompts : tuple of str
        Which of :data:`PROMPTS` it uses.
    modes : tuple of str
        Which of :data:`MODES` it runs in.
    path : {None, "file", "folder"}
        What the user must choose: a checkpoint file, a model folder, or
        nothing.
    path_optional : bool
        The path may be left empty (e.g. other weights than the shipped ones).
    first_sizes_mm : tuple of float
        Edges (mm) of the regions a first click can be seen in, finest first,
        chosen through the engine's ``first_size`` attribute (an index);
        empty for engines without that choice.
    """

    name: str
    factory: str | Callable
    card: EngineCard
    prompts: tuple = PROMPTS
    modes: tuple = MODES
    path: str | None = None
    path_optional: bool = False
    first_sizes_mm: tuple = ()
    extra: dict = field(default_factory=dict)

    @property
    def needs_path(self) -> bool:
        """True when the engine cannot be made without a path from the user."""
        return self.path is not None and not self.path_optional

    def supports(self, what: str) -> bool:
        """Whether the engine uses a prompt kind or runs in a mode."""
        return what in self.prompts or what in self.modes

    def make(self, path=None, **kwargs):
        """Build the engine (imports its module now).

        Raises
        ------
        MedSegError
            A required path is missing.
        """
        if self.needs_path and not path:
            what = "model folder" if self.path == "folder" else "checkpoint file"
            raise MedSegError(f"choose a local {what} for {self.name} first", self.name)
        factory = self.factory
        if isinstance(factory, str):
            module, _, attr = factory.partition(":")
            mod = importlib.import_module(module, package=__package__)
            factory = getattr(mod, attr)
        return factory(path, **kwargs)


#: name -> EngineInfo, in the order the widget offers them.
ENGINE_REGISTRY: dict[str, EngineInfo] = {}


def register_engine(info: EngineInfo) -> EngineInfo:
    """Add (or replace) an engine; returns it."""
    bad = set(info.prompts) - set(PROMPTS) or set(info.modes) - set(MODES)
    if bad or info.path not in (None, "file", "folder"):
        raise ValueError(f"engine {info.name!r}: unknown capabilities {sorted(bad)} "
                         f"or path kind {info.path!r}")
    ENGINE_REGISTRY[info.name] = info
    from . import ENGINES  # the name -> needs-path view kept for older callers

    ENGINES[info.name] = info.needs_path
    return info


def engine_names() -> list[str]:
    """Registered engine names, in registration order."""
    return list(ENGINE_REGISTRY)


def engine_info(name: str) -> EngineInfo:
    """The registered engine ``name``.

    Raises
    ------
    MedSegError
        Unknown name.
    """
    try:
        return ENGINE_REGISTRY[name]
    except KeyError:
        raise MedSegError(f"unknown engine {name!r}; choose one of {engine_names()}",
                          "engine") from None


def make_engine(name: str, path=None, **kwargs):
    """Create the engine registered as ``name`` (see :meth:`EngineInfo.make`)."""
    return engine_info(name).make(path, **kwargs)


# ------------------------------------------------------------ the built-ins
def _classical(path, **kwargs):
    from .classical import ClassicalEngine

    return ClassicalEngine(**kwargs)


def _click_model(path, **kwargs):
    from .click_model import ClickModelEngine

    return ClickModelEngine(weights=path, **kwargs)


def _with_path(module: str, cls: str):
    def make(path, **kwargs):
        mod = importlib.import_module(module, package=__package__)
        return getattr(mod, cls)(path, **kwargs)
    return make


_BUILTIN = (
    EngineInfo("classical", _classical, EngineCard(
        trained_on="no training: seeded, edge-aware region growing (no weights)",
        measured_on="60 objects of the shared real CT, MR and PET scans: Dice 0.56 after "
                    "5 clicks, 0.65 after a 2D box and 5 clicks (benchmarks/"
                    "bench_interactive.py --real); 0.89 on 9 synthetic phantom objects")),
    EngineInfo("click model", _click_model, EngineCard(
        trained_on="domain-randomised synthetic volumes, the CT / MR phantoms and "
                   "pseudo-objects (supervoxels, never the reference labels) on the images "
                   "of TotalSegmentator's test CT (Apache-2.0), sarcoma cases STS_001-005 "
                   "in CT / MR / PET (TCIA Soft-tissue-Sarcoma via the IBSI, CC BY 3.0; "
                   "Vallieres et al. 2015) and voxelmorph's T1 MR (Apache-2.0); two networks "
                   "averaged (napari_medseg.training.train_click_model)",
        measured_on="60 objects of the shared real CT, MR and PET scans (references: "
                    "TotalSegmentator output for the abdominal CT, manual otherwise): Dice "
                    "0.74 after 5 clicks, 0.79 after a 2D box and 5 clicks (0.73 / 0.79 on "
                    "the 20 objects of images never seen in training); 6 % of clicks "
                    "lowered Dice (7 % after a box); 0.55 after one stroke along the "
                    "object, 0.74 after it and 5 clicks (benchmarks/bench_interactive.py "
                    "--real, --protocol scribble+clicks; docs/models.md)"),
        prompts=("clicks", "boxes", "scribbles"), path="file", path_optional=True,
        first_sizes_mm=(64.0, 128.0, 256.0)),
    EngineInfo("Segment Anything", _with_path(".sam", "SamEngine"), EngineCard(
        trained_on="the checkpoint's own data (SAM: SA-1B natural images; MedSAM: public "
                   "medical images); nothing trained here",
        measured_on="not measured here; see the checkpoint's publication"),
        prompts=("clicks", "boxes"), path="file"),
    EngineInfo("SAM2", _with_path(".sam2", "Sam2Engine"), EngineCard(
        trained_on="the checkpoint's own data (SAM 2: SA-V videos; MedSAM2: public medical "
                   "volumes); nothing trained here",
        measured_on="not measured here; see the checkpoint's publication"),
        path="file"),
    EngineInfo("nnInteractive", _with_path(".nninteractive", "NNInteractiveEngine"),
               EngineCard(trained_on="the model folder's own data (nnInteractive: public 3D "
                                     "medical datasets); nothing trained here",
                          measured_on="not measured here; see the nnInteractive publication"),
               path="folder"),
)
