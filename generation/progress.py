"""Honest progress and an ETA for a ComfyUI run, learned from past runs.

A run is its nodes in order (model loading, text encoding, each sampler pass, VAE decode, video
encode) and then the upload of the video to storage. Past completed jobs of the same workflow,
size and frame count on the same GPU recorded how long each of those took (`VideoJob.node_timings`,
from ComfyUI's `executing` events); the median of each part is its weight. Progress is the
expected seconds done over the expected seconds in all; it reaches 1.0 only when the video is
stored. Without past runs, progress falls back to sampler steps, scaled so it never claims the end.
"""

import statistics
from datetime import timedelta

from django.utils import timezone

from generation.models import VideoJob

UPLOAD = "upload"
HISTORY_RUNS = 10  # past runs a profile is learned from
NO_HISTORY_CAP = 0.9  # the most a run without past timings shows before its upload
RUNNING_CAP = 0.99  # the most any running or uploading job shows


def past_timings(job: VideoJob, limit: int = HISTORY_RUNS) -> list[list]:
    """node_timings of the last completed runs like this one: same workflow, size and frames on the same GPU."""
    qs = VideoJob.objects.filter(
        status=VideoJob.Status.COMPLETED, backend=VideoJob.Backend.COMFYUI, workflow_slug=job.workflow_slug,
        width=job.width, height=job.height, frames=job.frames,
    ).exclude(pk=job.pk).exclude(node_timings=[])
    # The kind of GPU (the scheduler's gpu_class), else the same ComfyUI.
    qs = qs.filter(gpu_class=job.gpu_class) if job.gpu_class else qs.filter(comfyui_url=job.comfyui_url)
    return list(qs.order_by("-finished_at").values_list("node_timings", flat=True)[:limit])


def expected_seconds(runs: list[list]) -> dict[str, float]:
    """Median seconds of each part over past runs (a part a run skipped, e.g. a cached loader, counts 0)."""
    keys = []
    for run in runs:
        for entry in run:
            if entry[0] not in keys:
                keys.append(entry[0])
    out = {}
    for key in keys:
        values = [next((e[3] for e in run if e[0] == key), 0.0) for run in runs]
        out[key] = float(statistics.median(values))
    return out


class Estimate:
    """Progress (0..1) and seconds left for a run in progress, from the expected seconds per part."""

    def __init__(self, expected: dict[str, float], cached: set[str] = frozenset()):
        self.expected = {k: v for k, v in expected.items() if k not in cached}
        self.total = sum(self.expected.values())

    @property
    def known(self) -> bool:
        return self.total > 0

    def at(self, done: list[str], current: str | None, fraction: float, elapsed: float) -> tuple[float, float]:
        """(progress, seconds left) with the parts in `done` finished and `current` running for `elapsed`
        seconds; `fraction` is what the node itself reports (sampler steps), else time decides."""
        done_seconds = sum(self.expected.get(key, 0.0) for key in set(done))
        current_expected = self.expected.get(current, 0.0) if current else 0.0
        if current and current_expected > 0:
            by_time = min(0.95, elapsed / current_expected)
            part = max(fraction, by_time) if fraction else by_time
            current_done = current_expected * part
            current_left = max(0.0, current_expected - elapsed) if not fraction else current_expected * (1 - part)
        else:
            current_done = current_left = 0.0
        finished = set(done) | ({current} if current else set())
        later = sum(v for k, v in self.expected.items() if k not in finished)
        progress = (done_seconds + current_done) / self.total
        return min(RUNNING_CAP, progress), later + current_left


def eta_at(seconds_left: float | None):
    return timezone.now() + timedelta(seconds=seconds_left) if seconds_left is not None else None
