"""Server-side SVG charts: jobs and money per day on the jobs page, a job's node timeline.

Drawn here as plain SVG markup (escaped with format_html) rather than with a charting library:
two bar charts and one Gantt row need no script, no CDN and nothing the Content-Security-Policy
must allow; colours come from classes in i2v.css.
"""

from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal

from django.db.models import Count, Q, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

from generation.models import VideoJob

S = VideoJob.Status
DAYS = 14
WIDTH, HEIGHT, LEFT, BOTTOM, TOP = 900, 170, 64, 22, 30


@dataclass
class Day:
    day: date
    done: int = 0
    failed: int = 0
    gpu_usd: Decimal = Decimal("0")
    fal_usd: Decimal = Decimal("0")


def daily(owner, days: int = DAYS, today: date | None = None) -> list[Day]:
    """Jobs done and failed, and money spent on the GPU and on fal.ai, per day (by finish time)."""
    today = today or timezone.localdate()
    first = today - timedelta(days=days - 1)
    rows = (
        VideoJob.objects.filter(owner=owner, finished_at__date__gte=first, status__in=(S.COMPLETED, S.FAILED))
        .annotate(day=TruncDate("finished_at"))
        .values("day")
        .annotate(
            done=Count("pk", filter=Q(status=S.COMPLETED)), failed=Count("pk", filter=Q(status=S.FAILED)),
            gpu=Sum("cost_usd", filter=Q(backend=VideoJob.Backend.COMFYUI)),
            fal=Sum("cost_usd", filter=Q(backend=VideoJob.Backend.FAL)),
        )
    )
    by_day = {row["day"]: row for row in rows}
    out = []
    for i in range(days):
        d = first + timedelta(days=i)
        row = by_day.get(d) or {}
        out.append(Day(d, row.get("done", 0), row.get("failed", 0), row.get("gpu") or Decimal("0"), row.get("fal") or Decimal("0")))
    return out


def _bars(days: list[Day], series: list[tuple[str, str, callable]], title: str, fmt) -> SafeString:
    """One stacked bar per day; series are (css class, label, value of a Day)."""
    top = max([sum(float(get(d)) for _, _, get in series) for d in days] + [0.0])
    scale = (HEIGHT - BOTTOM - TOP) / top if top else 0.0
    slot = (WIDTH - LEFT) / len(days)
    parts = []
    for i, d in enumerate(days):
        x = LEFT + i * slot + slot * 0.15
        y = HEIGHT - BOTTOM
        for css, label, get in series:
            value = float(get(d))
            if value <= 0:
                continue
            h = value * scale
            y -= h
            parts.append(format_html(
                '<rect class="{}" x="{}" y="{}" width="{}" height="{}"><title>{} {}: {}</title></rect>',
                css, _n(x), _n(y), _n(slot * 0.7), _n(h), d.day.strftime("%b %-d"), label, fmt(get(d))))
        if i % 2 == 0 or len(days) <= 7:
            parts.append(format_html('<text class="axis" x="{}" y="{}" text-anchor="middle">{}</text>',
                                     _n(x + slot * 0.35), HEIGHT - 6, d.day.strftime("%-d %b")))
    legend = format_html_join(" ", "<tspan class=\"{}-key\">■</tspan> {}", ((css, label) for css, label, _ in series))
    summary = "; ".join(f"{label} {fmt(sum(get(d) for d in days))}" for _, label, get in series)
    return format_html(
        '<svg class="chart" viewBox="0 0 {} {}" role="img" aria-label="{}, last {} days: {}">'
        '<text class="chart-title" x="0" y="14">{}</text>'
        '<text class="axis" x="{}" y="14" text-anchor="end">{}</text>'
        '<line class="baseline" x1="{}" x2="{}" y1="{}" y2="{}"></line>{}'
        '<text class="axis" x="{}" y="{}" text-anchor="end">max {}</text></svg>',
        WIDTH, HEIGHT, title, len(days), summary, title, WIDTH, legend,
        LEFT, WIDTH, HEIGHT - BOTTOM, HEIGHT - BOTTOM, mark_safe("".join(parts)),
        LEFT - 6, TOP + 4, fmt(top),
    )


def _n(value: float) -> str:
    return f"{value:.1f}"


def _usd(value) -> str:
    return f"${float(value):.2f}"


def jobs_chart(days: list[Day]) -> SafeString:
    return _bars(days, [("bar-done", "done", lambda d: d.done), ("bar-failed", "failed", lambda d: d.failed)],
                 "Jobs per day", lambda v: f"{int(v)}")


def money_chart(days: list[Day]) -> SafeString:
    return _bars(days, [("bar-gpu", "GPU", lambda d: d.gpu_usd), ("bar-fal", "fal.ai", lambda d: d.fal_usd)],
                 "Money per day", _usd)


def node_timeline(job: VideoJob) -> SafeString:
    """The run as a Gantt row per node (and the upload): when it started and how long it took."""
    rows = [list(entry) for entry in job.node_timings or []]
    if not rows:
        return mark_safe("")
    now = (timezone.now() - (job.submitted_at or job.created_at)).total_seconds()
    end = max([r[2] + (r[3] if r[3] is not None else max(0.0, now - r[2])) for r in rows] + [0.001])
    label_w, row_h = 170, 18
    width = WIDTH
    scale = (width - label_w - 10) / end
    parts = []
    for i, (node, class_type, start, seconds) in enumerate(rows):
        running = seconds is None
        seconds = max(0.0, now - start) if running else seconds
        y = 4 + i * row_h
        parts.append(format_html(
            '<text class="axis" x="{}" y="{}" text-anchor="end">{} {}</text>'
            '<rect class="{}" x="{}" y="{}" width="{}" height="{}"><title>{} {}: {} s from {} s{}</title></rect>',
            label_w - 6, y + 12, node if node != "upload" else "", class_type if node != "upload" else "Upload to storage",
            "bar-running" if running else ("bar-upload" if node == "upload" else "bar-node"),
            _n(label_w + start * scale), y + 2, _n(max(1.0, seconds * scale)), row_h - 5,
            node, class_type, f"{seconds:.2f}", f"{start:.2f}", " (running)" if running else ""))
    height = 4 + len(rows) * row_h + 18
    return format_html(
        '<svg class="chart timeline-chart" viewBox="0 0 {} {}" role="img" aria-label="Node timeline: {} parts over {} s">{}'
        '<text class="axis" x="{}" y="{}">0 s</text><text class="axis" x="{}" y="{}" text-anchor="end">{} s</text></svg>',
        width, height, len(rows), _n(end), mark_safe("".join(parts)), label_w, height - 4, width - 10, height - 4, _n(end),
    )
