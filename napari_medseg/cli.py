"""The ``napari-medseg`` command line.

::

    napari-medseg models [--json]
    napari-medseg predict INPUT [INPUT ...] -m MODEL -o OUTPUT [--device auto]
                  [--overlap F] [--[no-]tta] [--fast] [--uncertainty PATH] [--overwrite]
                  [--backend native|nnunetv2] [--roi-subset CLASS ...]
    napari-medseg finetune MODEL DATASET_FOLDER [--iterations 200] [--lr 3e-4]
                  [--name NAME] [--out FOLDER] [--patch-size Z Y X] [--val-fraction 0.25]
                  [--resume] [--add-class ID NAME] [--corrected-weight 3] [--no-guard]
    napari-medseg view [PATHS ...] [--sample KEY] [--screenshot PNG] [--widgets ...]
    napari-medseg batch INPUTS ... -m MODEL -o OUTDIR [--workers 1] [--scheduler ADDRESS]
                  [--device cpu] [--overlap F] [--[no-]tta] [--fast] [--suffix .nii.gz]
                  [--backend native|nnunetv2] [--roi-subset CLASS ...]
    napari-medseg worklist DIR [--order list|uncertainty] [--json] [--predict MODEL]
                  [--training-dir FOLDER]

``predict`` with an ``.ome.zarr`` output streams big volumes (:mod:`napari_medseg.bigvolume`);
``batch`` is :mod:`napari_medseg.batch`.

Problems the user can fix print one line on stderr and exit with status 2.
Importing this module loads neither napari nor Qt (only ``view`` does).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from . import __version__
from .errors import Cancelled, MedSegError

__all__ = ["main", "ProgressBar"]

log = logging.getLogger("napari_medseg.cli")


class ProgressBar:
    """A one-line text progress bar on a stream (stderr by default).

    Call it as ``bar(done, total)``; :meth:`close` ends the line.
    """

    def __init__(self, label: str = "", stream=None, width: int = 30):
        self.label, self.stream, self.width = label, stream or sys.stderr, width
        self.t0 = time.perf_counter()
        self._shown = False

    def __call__(self, done: int, total: int) -> None:
        total = max(int(total), 1)
        frac = min(max(done / total, 0.0), 1.0)
        n = int(round(frac * self.width))
        elapsed = time.perf_counter() - self.t0
        self.stream.write(f"\r{self.label} [{'#' * n}{'.' * (self.width - n)}] "
                          f"{done}/{total} {elapsed:5.1f}s")
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False


# ------------------------------------------------------------------ commands
def cmd_models(args) -> int:
    from .models import list_models
    from .models.card import metric_lines

    infos = list_models()
    if args.json:
        print(json.dumps([i.to_dict() for i in infos], indent=2))
        return 0
    if not infos:
        print("no models found")
        return 0
    for i in infos:
        c = i.card
        print(f"{c.name}  [{i.source}]  v{c.version}  {c.license}")
        print(f"    task:     {c.task}")
        chans = ", ".join(f"{ch['name']} ({ch['modality']})" for ch in c.channels)
        print(f"    inputs:   {chans}; spacing {c.target_spacing or 'as input'} mm; "
              f"orientation {c.orientation or 'as input'}")
        print(f"    classes:  {', '.join(f'{k}={n}' for k, n in c.label_names.items())}")
        print(f"    region:   {c.body_region}")
        for line in metric_lines(c.metrics, digits=3):  # real scans first, then phantoms
            print(f"    {line}")
        print(f"    path:     {i.path}")
    return 0


def cmd_predict(args) -> int:
    if str(args.output).lower().rstrip("/").endswith(".zarr"):  # labels written lazily
        from .bigvolume import cmd_predict_zarr

        return cmd_predict_zarr(args, ProgressBar)
    import math

    from .core.inference import keep_freed_memory
    from .io import read_volume, write_labels, write_volume
    from .io.atomic import all_or_none
    from .io.validate import check_image_values, check_outputs
    from .models import load_model
    from .models.run import precision_name, run_model, set_model_options

    # outputs (format, folder, never an input) are checked before the model runs
    check_outputs([args.output], args.input, args.overwrite,
                  extensions=_label_extensions(args))
    check_outputs([args.uncertainty], args.input, args.overwrite, others=[args.output])
    model = set_model_options(load_model(args.model), backend=args.backend,
                              roi_subset=args.roi_subset, name=args.model,
                              precision=args.precision)
    vols = [read_volume(p, lazy=True) for p in args.input]
    keep_freed_memory(sum(math.prod(v.data.shape) for v in vols))  # one image, then exit
    for i, (p, v) in enumerate(zip(args.input, vols)):  # constant or absurd images
        expect = model.card.channels[i]["modality"] if i < len(model.card.channels) else None
        for w in check_image_values(v, str(p), expect):
            print(f"warning: {w}", file=sys.stderr)
    bar = ProgressBar(f"{model.card.name}")
    held = []  # input / output checks; shown once the model took the input (a refused
    # input stays one error line), one "warning:" line each, never silent

    def show_held():
        if held:
            bar.close()
            for text in held:
                print(f"warning: {text}", file=sys.stderr)
            held.clear()

    def progress(done, total):
        show_held()
        bar(done, total)

    try:
        _, pred = run_model(model, vols, name=", ".join(str(p) for p in args.input),
                            device=args.device, overlap=args.overlap, tta=args.tta,
                            fast=args.fast, uncertainty=args.uncertainty_kind
                            if args.uncertainty else None, progress=progress,
                            warn=held.append, crop_to_body=True)
    finally:
        bar.close()
    show_held()
    from .io.sidecar import sidecar_path

    targets = [p for p in (args.output, args.uncertainty) if p]
    targets += [sidecar_path(p) for p in targets if str(p).lower().endswith((".nii", ".nii.gz"))]
    with all_or_none(targets):  # labels, uncertainty and names: all written or none
        out = _write_prediction(args, pred.labels, vols[0], write_labels)
        msg = f"wrote {out}"
        if args.uncertainty and pred.uncertainty is not None:
            unc = pred.uncertainty.with_data(pred.uncertainty.data.astype("float32"))
            msg += f" and {write_volume(args.uncertainty, unc, overwrite=args.overwrite)}"
    counts = _counts(pred)
    if hasattr(model, "backend"):  # nnU-Net / TotalSegmentator: say which pipeline ran
        msg += f" with the {(pred.info or {}).get('backend', model.backend)} backend"
    if args.precision:  # asked for: say what ran
        msg += f" in {precision_name((pred.info or {}).get('amp'))}"
    print(f"{msg} ({pred.seconds:.1f} s; {counts})", file=sys.stderr)
    return 0


def _label_extensions(args) -> tuple:
    """Suffixes ``-o`` may take; ``.dcm`` (SEG / RTSTRUCT) only for one DICOM input.

    Checked before the model loads, so a wrong suffix never costs a run.
    """
    from .io import WRITE_EXTENSIONS, format_of

    if not str(args.output).lower().endswith(".dcm"):
        return WRITE_EXTENSIONS
    kind = "RTSTRUCT" if args.dicom_kind == "rtstruct" else "DICOM SEG"
    if len(args.input) != 1 or format_of(args.input[0]) != "dicom":
        raise MedSegError(f"a {kind} must reference a DICOM series: give one DICOM folder "
                          "as input, or write .nii.gz / .nrrd / .seg.nrrd", str(args.output))
    if args.dicom_kind == "seg":
        try:
            import highdicom  # noqa: F401
        except ImportError:
            raise MedSegError("writing DICOM SEG needs highdicom: pip install "
                              "'napari-medseg[dicomseg]'", str(args.output)) from None
    return (*WRITE_EXTENSIONS, ".dcm")


def _write_prediction(args, labels, image, write_labels):
    """Write the predicted labels: DICOM SEG / RTSTRUCT for ``.dcm``, else by suffix."""
    if not str(args.output).lower().endswith(".dcm"):
        return write_labels(args.output, labels, overwrite=args.overwrite)
    if args.dicom_kind == "rtstruct":
        from .io.export.rtstruct import export_rtstruct

        return export_rtstruct(args.output, labels, source=image, overwrite=args.overwrite)
    from .io.export import export_dicom_seg

    return export_dicom_seg(args.output, labels, source=image, algorithm_type="AUTOMATIC",
                            algorithm_name=args.model, overwrite=args.overwrite)


def _counts(pred) -> str:
    import numpy as np

    from .core.labelmap import label_counts

    data = np.asarray(pred.labels.data)
    ml = pred.labels.voxel_volume_ml
    bins = label_counts(data)
    parts = [f"{pred.labels.label_names.get(k, k)} {n * ml:.1f} mL"
             for k, n in enumerate(bins) if k and n]
    return ", ".join(parts) or "no foreground found"


def cmd_view(args) -> int:
    from .launch import view

    view(paths=args.paths, sample=args.sample, widgets=args.widgets or ("Segment",),
         screenshot=args.screenshot, ndisplay=args.ndisplay)
    return 0


# ------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="napari-medseg",
                                description="Deep-learning segmentation of 3D medical volumes.")
    p.add_argument("--version", action="version", version=f"napari-medseg {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="list available models and their cards")
    m.add_argument("--json", action="store_true", help="print the cards as JSON")
    m.set_defaults(func=cmd_models)

    r = sub.add_parser("predict", help="segment a volume with a model")
    r.add_argument("input", nargs="+", help="image file(s) or DICOM folder(s), one per "
                   "model input channel")
    r.add_argument("-m", "--model", required=True, help="model name or path")
    r.add_argument("-o", "--output", required=True,
                   help="labels file (.nii.gz, .nrrd, .seg.nrrd, .mha, .tif; .dcm for a DICOM "
                   "SEG or RTSTRUCT of a DICOM series input)")
    r.add_argument("--dicom-kind", choices=("seg", "rtstruct"), default="seg",
                   help="what a .dcm output is: DICOM SEG (default) or RTSTRUCT")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    r.add_argument("--overlap", type=float, default=None,
                   help="window overlap in [0, 1) (default: the card's default_overlap or 0.5)")
    r.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="mirror test-time augmentation on / off (default: the model card's)")
    r.add_argument("--fast", action="store_true", help="quick preview (less overlap, no TTA)")
    r.add_argument("--uncertainty", metavar="PATH", help="also write an uncertainty map")
    r.add_argument("--uncertainty-kind", choices=("entropy", "tta"), default="entropy")
    r.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    from .models.run import add_model_option_args  # light: argparse only

    add_model_option_args(r)
    r.set_defaults(func=cmd_predict)

    v = sub.add_parser("view", help="open napari with the napari-medseg widgets")
    v.add_argument("paths", nargs="*", help="files or DICOM folders to open")
    v.add_argument("--sample", help="sample data key, e.g. abdomen-ct or head-mr")
    v.add_argument("--screenshot", metavar="PNG", help="save a screenshot and exit")
    v.add_argument("--widgets", nargs="*", help="dock widgets to open (display names)")
    v.add_argument("--ndisplay", type=int, choices=(2, 3), default=2)
    v.set_defaults(func=cmd_view)

    from .training.finetune import add_cli_parser  # light: torch loads only when run

    add_cli_parser(sub, ProgressBar)

    from .batch import add_cli_parser as add_batch_parser  # light: nothing heavy at import

    add_batch_parser(sub)

    from .worklist.cli import add_cli_parser as add_worklist_parser  # light: sqlite only

    add_worklist_parser(sub, ProgressBar)
    return p


def main(argv=None) -> int:
    """Run the command line; return the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except MedSegError as exc:
        print(f"napari-medseg: error: {exc}", file=sys.stderr)
        return 2
    except Cancelled:
        print("napari-medseg: cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("napari-medseg: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
