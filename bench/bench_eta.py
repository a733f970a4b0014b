"""How right is the ETA? Replays recorded runs (bench/data/eta_runs.json: real ComfyUI runs with
their per-node times, in the order they ran) and, for each run with at least MIN_HISTORY earlier
runs of the same workflow, size and frames on the same GPU, asks generation/progress.py at the
moment progress reaches 50 %: how many seconds are left? Prints the median and 90th-percentile
relative error of that answer against the seconds that were really left.

    .venv/bin/python bench/bench_eta.py
"""

import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "i2v.settings")

import django  # noqa: E402

django.setup()

from generation import progress  # noqa: E402

MIN_HISTORY = 3
STEP = 0.001  # seconds of replayed time between two looks at the progress


def at_half(estimate, timings):
    """(seconds since the start, seconds the estimate says are left) when progress first reaches 0.5."""
    end = timings[-1][2] + timings[-1][3]
    t = 0.0
    while t <= end:
        done = [e[0] for e in timings if e[2] + e[3] <= t]
        current = next((e for e in timings if e[2] <= t < e[2] + e[3]), None)
        value, left = estimate.at(done, current[0] if current else None, 0.0, t - current[2] if current else 0.0)
        if value >= 0.5:
            return t, left
        t += STEP
    return end, 0.0


def main():
    runs = json.loads((ROOT / "bench/data/eta_runs.json").read_text())["runs"]
    errors, rows = [], []
    for i, run in enumerate(runs):
        key = (run["workflow"], run["width"], run["height"], run["frames"], run["gpu"])
        history = [r["node_timings"] for r in runs[:i]
                   if (r["workflow"], r["width"], r["height"], r["frames"], r["gpu"]) == key][-progress.HISTORY_RUNS:]
        if len(history) < MIN_HISTORY:
            continue
        estimate = progress.Estimate(progress.expected_seconds(history))
        timings = run["node_timings"]
        total = timings[-1][2] + timings[-1][3]
        t, predicted = at_half(estimate, timings)
        actual = total - t
        errors.append(abs(predicted - actual) / actual)
        rows.append(f"{run['width']}x{run['height']}x{run['frames']}: at {t:.2f} s of {total:.2f} s, "
                    f"ETA {predicted:.2f} s, really {actual:.2f} s left ({errors[-1]:.0%} off)")
    print("\n".join(rows))
    print(f"runs scored: {len(errors)} of {len(runs)} (each needs {MIN_HISTORY} earlier runs like it)")
    print(f"median ETA error at 50 % progress: {statistics.median(errors):.1%}")
    print(f"90th percentile: {statistics.quantiles(errors, n=10)[-1]:.1%}")


if __name__ == "__main__":
    main()
