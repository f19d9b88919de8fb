"""`compute_trust_region_mask` on CPU, one torch thread in the block loop (the default) against all of the caller's
threads (the previous loop), with and without a controlled competitor, interleaved.

Each repetition runs, without and then with one busy process pinned to core 0 (`bench_masking.start_load`), the
default call, the all-threads call and the bandwidth floor (one read of each input), so a change of background load
hits every variant alike. float32 inputs from `bench_masking.make_inputs`, mode `trm`. JSON to
``results/bench_masking_load_<B>x<T>.json``.

    .venv/bin/python benchmarks/bench_masking_load.py --shape 256 8192 --repeats 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_masking import RESULTS, all_threads, machine_info, make_inputs, start_load, stop_load  # noqa: E402

from trl_trm.masking import compute_trust_region_mask  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=2, default=[256, 8192], metavar=("B", "T"))
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args(argv)
    batch, length = args.shape
    theta, roll, mask, _ = make_inputs(batch, length, torch.float32)
    fns = {
        "one_thread": lambda: compute_trust_region_mask(theta, roll, mask),
        "all_threads": lambda: all_threads(theta, roll, mask),
        "floor": lambda: [t.sum() for t in (theta, roll, mask)],
    }
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {f"{k}@load{n}": [] for k in fns for n in (0, 1)}
    load_before = os.getloadavg()
    for _ in range(args.repeats):
        for n in (0, 1):
            procs = start_load(n)
            try:
                for name, fn in fns.items():
                    start = time.perf_counter()
                    fn()
                    times[f"{name}@load{n}"].append(time.perf_counter() - start)
            finally:
                stop_load(procs)
    medians = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    report = {
        "benchmark": "compute_trust_region_mask under a controlled load",
        "machine": machine_info(),
        "shape": [batch, length],
        "repeats": args.repeats,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "median_ms": medians,
        "raw_s": times,
    }
    print(json.dumps({k: round(v, 1) for k, v in medians.items()}))
    out = RESULTS / f"bench_masking_load_{batch}x{length}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
