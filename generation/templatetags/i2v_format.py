"""Small formatting filters for the pages: durations, dollars, percentages."""

from datetime import timedelta
from decimal import ROUND_HALF_UP, Decimal

from django import template

register = template.Library()


@register.filter
def duration(value):
    """Seconds (or a timedelta) as '12s', '3m 05s', '1h 02m'."""
    if value is None or value == "":
        return "—"
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


@register.filter
def usd(value):
    """Dollars with cents, or with four decimals below a cent."""
    if value is None or value == "":
        return "—"
    amount = Decimal(str(value))
    if amount and abs(amount) < Decimal("0.01"):
        return f"${amount.quantize(Decimal('0.0001'), rounding=ROUND_HALF_UP)}"
    return f"${amount.quantize(Decimal('0.01'), rounding=ROUND_HALF_UP):,}"


@register.filter
def model_label(job):
    """The model as the generate page's dropdown names it."""
    if job.backend == "fal":
        return "Wan 2.2 (fal.ai)"
    if job.workflow_slug == "wan22-i2v":
        return "Wan 2.2 (GPU)"
    return job.workflow.name if job.workflow_id and job.workflow else job.workflow_slug
