#!/usr/bin/env python
"""Regenerate the sample volumes (deterministic, byte-identical).

Writes ``napari_medseg/data/*.nii.gz`` (shipped in the wheel) and the copies in
``sample_data/``::

    python scripts/make_sample_data.py            # both folders
    python scripts/make_sample_data.py --out DIR  # somewhere else
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from napari_medseg.data import DATA_DIR, write_sample_files

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, action="append",
                        help="output folder (repeatable); default: the package data "
                             "folder and sample_data/")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for folder in args.out or [DATA_DIR, ROOT / "sample_data"]:
        for path in write_sample_files(folder):
            print(f"{path}  {path.stat().st_size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
