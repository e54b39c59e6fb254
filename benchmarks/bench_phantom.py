#!/usr/bin/env python
"""Time the phantom generators (target: abdomen 64x128x128 with vary=True < 0.5 s).

    python benchmarks/bench_phantom.py [--repeat 5]

Prints one JSON object: median seconds per call for each generator and mode.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from napari_medseg.core.phantom import make_abdomen_ct, make_head_mr


def _median_seconds(fn, repeat, **kw):
    times = []
    for seed in range(repeat):
        t = time.perf_counter()
        fn(seed=seed, **kw)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    out = {}
    for name, fn in (("abdomen_ct", make_abdomen_ct), ("head_mr", make_head_mr)):
        for vary in (False, True):
            out[f"{name}{'_vary' if vary else ''}_s"] = round(
                _median_seconds(fn, args.repeat, vary=vary), 4)
    out["abdomen_ct_vary_target_s"] = 0.5
    out["abdomen_ct_vary_ok"] = out["abdomen_ct_vary_s"] < 0.5
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
