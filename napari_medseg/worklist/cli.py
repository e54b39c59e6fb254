"""``napari-medseg worklist DIR``: the status table of a worklist folder.

::

    napari-medseg worklist DIR [--order list|uncertainty] [--json]
                  [--predict MODEL [--device cpu] [--workers N]] [--training-dir FOLDER]

``--predict`` predicts every case without a cached prediction (labels and an
entropy uncertainty map into the worklist's work folder) before printing.
"""

from __future__ import annotations

import json
import sys

__all__ = ["add_cli_parser", "cmd_worklist", "format_table"]

_COLUMNS = ("case", "status", "annotator", "minutes", "edits", "uncertainty",
            "training_case")


def add_cli_parser(sub, progress_bar=None) -> None:
    """Add the ``worklist`` subcommand to the ``napari-medseg`` argument parser."""
    w = sub.add_parser("worklist", help="status table of a worklist folder (cases, "
                       "statuses, annotators, time, edits, uncertainty)")
    w.add_argument("folder", help="folder of images / DICOM series, or an nnU-Net raw "
                   "dataset folder")
    w.add_argument("--order", choices=("list", "uncertainty"), default="list",
                   help="folder order, or most uncertain first")
    w.add_argument("--json", action="store_true", help="print the rows as JSON")
    w.add_argument("--predict", metavar="MODEL", help="predict the cases that have no "
                   "prediction yet (labels + uncertainty), then print")
    w.add_argument("--device", default="auto", help="device for --predict")
    w.add_argument("--workers", type=int, default=0,
                   help="--predict with the batch runner's N worker processes (0: here, "
                   "one case after the other)")
    w.add_argument("--training-dir", metavar="FOLDER", help="set the training dataset "
                   "folder (nnU-Net raw DatasetXXX_Name) approved cases go to, once")
    w.set_defaults(func=cmd_worklist, progress_bar=progress_bar)


def format_table(rows: list) -> str:
    """Rows (dicts) as an aligned plain-text table."""
    cells = [list(_COLUMNS)] + [["" if r[c] is None else str(r[c]) for c in _COLUMNS]
                                for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip()
                     for row in cells)


def cmd_worklist(args) -> int:
    """Print the status table; exit status 0."""
    from .core import Worklist

    with Worklist(args.folder) as wl:
        if args.training_dir:
            wl.set_training_dir(args.training_dir)
        if args.predict and args.workers > 0:
            wl.predict_all(args.predict, workers=args.workers,
                           device="cpu" if args.device == "auto" else args.device)
        elif args.predict:
            todo = [c for c in wl.cases() if c.model is None
                    or not wl.prediction_path(c.case_id).is_file()]
            make_bar = getattr(args, "progress_bar", None)
            for i, c in enumerate(todo):
                bar = make_bar(f"{c.case_id} ({i + 1}/{len(todo)})") if make_bar else None
                try:
                    wl.predict_case(c.case_id, args.predict, device=args.device, progress=bar)
                finally:
                    if bar is not None:
                        bar.close()
        by_id = {r["case"]: r for r in wl.table()}
        rows = [by_id[c.case_id] for c in wl.ordered(args.order)]
        if args.json:
            print(json.dumps({"folder": str(wl.root), "database": str(wl.db_path),
                              "journal": wl.journal_mode, "counts": wl.counts(),
                              "training_dir": None if wl.training_dir is None
                              else str(wl.training_dir), "cases": rows}, indent=2))
            return 0
        print(format_table(rows))
        counts = ", ".join(f"{n} {s}" for s, n in wl.counts().items() if n)
        print(f"\n{len(rows)} cases: {counts}", file=sys.stderr)
        print(f"state: {wl.db_path} ({wl.journal_mode} journal)", file=sys.stderr)
        if wl.training_dir:
            print(f"training dataset: {wl.training_dir}", file=sys.stderr)
    return 0
