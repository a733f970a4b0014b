from django import forms
from django.contrib import admin
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from generation import scheduler
from generation.models import UserQuota, VideoJob, WebhookDelivery, Workflow
from generation.workflow_schema import structural_errors, validate_graph
from gpu.admin import human_duration


class WorkflowForm(forms.ModelForm):
    class Meta:
        model = Workflow
        exclude = ()

    def clean(self):
        """Check the graph: against the configured ComfyUI's /object_info when it answers,
        else the checks that need no schema."""
        data = super().clean()
        graph, bindings, output_node = data.get("graph"), data.get("bindings") or {}, data.get("output_node")
        if graph is None or output_node is None:
            return data
        errors = structural_errors(graph, bindings, output_node)
        if not errors:
            schema = _server_schema()
            if schema:
                errors = validate_graph(graph, schema, bindings=bindings, output_node=str(output_node))
        if errors:
            raise forms.ValidationError([forms.ValidationError(e) for e in errors[:20]])
        return data


def _server_schema():
    from gpu.comfyui import ComfyUIClient, ComfyUIError
    from gpu.models import GpuConfig

    config = GpuConfig.get()
    if not config.comfyui_url:
        return None
    client = ComfyUIClient(config.comfyui_url, token=config.comfyui_token or None, connect_timeout=3, read_timeout=15, retries=0)
    try:
        return client.object_info()
    except ComfyUIError:
        return None
    finally:
        client.close()


@admin.register(Workflow)
class WorkflowAdmin(admin.ModelAdmin):
    form = WorkflowForm
    list_display = ("slug", "name", "output_node", "is_active", "updated_at")
    list_filter = ("is_active",)
    search_fields = ("slug", "name")
    filter_horizontal = ("model_files",)


class WebhookDeliveryInline(admin.TabularInline):
    model = WebhookDelivery
    extra = 0
    can_delete = False
    readonly_fields = ("attempt", "at", "url", "status_code", "ok", "error", "duration_ms")

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(VideoJob)
class VideoJobAdmin(admin.ModelAdmin):
    list_display = ("id", "owner", "status", "error_class", "backend", "workflow_slug", "progress_pct", "duration", "cost",
                    "created_at")
    list_filter = ("status", "error_class", "backend", "workflow_slug")
    search_fields = ("id", "prompt", "owner__username", "prompt_id", "request_id")
    date_hierarchy = "created_at"
    inlines = [WebhookDeliveryInline]
    # The file fields are shown as links to the auth-checked views (their storage URL is not served).
    readonly_fields = [f.name for f in VideoJob._meta.fields
                       if f.name not in ("lease_token", "input_image", "video", "node_timings")] + [
        "input_link", "player", "timings", "duration", "cost"]
    exclude = ("lease_token", "input_image", "video", "node_timings")

    def has_add_permission(self, request):
        return False

    @admin.display(description="Progress")
    def progress_pct(self, obj):
        if obj.steps_total:
            return f"{obj.step}/{obj.steps_total} ({obj.progress:.0%})"
        return f"{obj.progress:.0%}"

    @admin.display(description="Duration")
    def duration(self, obj):
        return human_duration(obj.duration_seconds())

    @admin.display(description="Cost")
    def cost(self, obj):
        return "—" if obj.cost_usd is None else f"${obj.cost_usd:.4f}"

    @admin.display(description="Input image")
    def input_link(self, obj):
        if not obj.input_image:
            return "—"
        return format_html('<a href="{}">{}</a>', reverse("generation:job_image", args=[obj.id]), obj.input_image.name)

    @admin.display(description="Video")
    def player(self, obj):
        if not obj.video:
            return "—"
        from generation.domain import video_url

        url = video_url(obj)
        return format_html('<video src="{}" controls preload="metadata" width="480"></video><br><a href="{}">{}</a>',
                           url, url, obj.video.name)

    @admin.display(description="Node timings")
    def timings(self, obj):
        """Each node that ran (and the upload): when it started after submission and how long it took."""
        rows = obj.node_timings or []
        if not rows:
            return "—"
        return format_html_join(
            "", "<div>{} {}: +{} s, {} s</div>",
            ((node, class_type, f"{start:.1f}", "…" if seconds is None else f"{seconds:.2f}")
             for node, class_type, start, seconds in rows),
        )


@admin.register(UserQuota)
class UserQuotaAdmin(admin.ModelAdmin):
    """Per-user share of the GPUs and limits; users without a row get the I2V_MAX_* defaults."""

    list_display = ("user", "weight", "waiting_limit", "running_limit", "fal_limit", "waiting_now")
    search_fields = ("user__username",)

    @admin.display(description="Waiting now")
    def waiting_now(self, obj):
        return scheduler.waiting_count(obj.user_id)
