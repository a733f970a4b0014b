from django import forms
from django.contrib import admin, messages
from django.shortcuts import redirect
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from gpu import capacity, domain
from gpu.adoption import AdoptionError, adopt
from gpu.models import ComfyUIServer, GpuConfig, GpuConfigChange, ModelFile, VastInstance
from gpu.urls_check import split_token, validate_service_url


def human_duration(seconds):
    if seconds is None:
        return "—"
    seconds = int(seconds)
    hours, rem = divmod(seconds, 3600)
    minutes, secs = divmod(rem, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


class GpuConfigForm(forms.ModelForm):
    comfyui_token = forms.CharField(
        required=False,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Write-only. Leave empty to keep the current token.",
    )
    clear_comfyui_token = forms.BooleanField(required=False, label="Clear the ComfyUI token")

    class Meta:
        model = GpuConfig
        exclude = ()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        is_set = bool(self.instance and self.instance.comfyui_token)
        self.fields["comfyui_token"].help_text = (
            f"Currently {'set' if is_set else 'not set'}. Write-only: leave empty to keep it."
        )

    def clean_comfyui_token(self):
        value = self.cleaned_data.get("comfyui_token")
        if self.cleaned_data.get("clear_comfyui_token"):
            return ""
        return value or self.instance.comfyui_token

    def clean(self):
        data = super().clean()
        url = data.get("comfyui_url")
        if url:
            # A vast.ai "Open" URL carries ?token=…: keep the URL clean, the token write-only.
            data["comfyui_url"], token = split_token(url)
            if token and not self.data.get("comfyui_token"):
                data["comfyui_token"] = token
        vast_id = data.get("vastai_instance_id")
        if vast_id is not None and "vastai_instance_id" in self.changed_data:
            # Any instance on the account may be named: one rented in the vast.ai console is adopted.
            try:
                adopt(vast_id, comfyui_url=data.get("comfyui_url") or "", token=data.get("comfyui_token") or "",
                      user=getattr(self, "request_user", None))
            except AdoptionError as exc:
                self.add_error("vastai_instance_id", str(exc).removeprefix("vastai_instance_id: "))
        return data


@admin.register(GpuConfig)
class GpuConfigAdmin(admin.ModelAdmin):
    form = GpuConfigForm
    change_form_template = "admin/gpu/gpuconfig/change_form.html"
    fieldsets = (
        ("Where jobs run", {"fields": ("gpu_provider", "comfyui_url", "swarmui_url", "comfyui_token", "clear_comfyui_token", "vastai_instance_id", "default_workflow")}),
        ("vast.ai provisioning policy", {"fields": (
            "min_vram_gb", "gpu_names", "max_dph", "min_reliability", "min_inet_down_mbps", "verified_only",
            "min_direct_ports", "disk_gb", "docker_image", "template_hash", "max_instances", "idle_minutes",
            "boot_timeout_minutes", "scale_out_wait_seconds", "max_daily_spend")}),
    )

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def changelist_view(self, request, extra_context=None):
        config = GpuConfig.get()
        return redirect(reverse("admin:gpu_gpuconfig_change", args=[config.pk]))

    def get_urls(self):
        return [
            path("test-connection/", self.admin_site.admin_view(self.test_connection), name="gpu_gpuconfig_test"),
        ] + super().get_urls()

    def test_connection(self, request):
        from gpu.probe import probe

        config = GpuConfig.get()
        if request.method == "POST":
            for label, url in (("ComfyUI", config.comfyui_url), ("SwarmUI", config.swarmui_url)):
                if not url:
                    continue
                result = probe(url, token=config.comfyui_token)
                level = messages.SUCCESS if result["ready"] else messages.ERROR
                extra = ""
                devices = result["details"].get("devices")
                if devices:
                    extra = " — " + ", ".join(f"{d['name']} ({d['vram_total_gb']} GB)" for d in devices)
                messages.add_message(request, level, f"{label} at {url}: {result['message']}{extra}")
            if not (config.comfyui_url or config.swarmui_url):
                messages.warning(request, "No ComfyUI or SwarmUI URL is configured yet.")
        return redirect(reverse("admin:gpu_gpuconfig_change", args=[config.pk]))

    def get_form(self, request, obj=None, **kwargs):
        form = super().get_form(request, obj, **kwargs)
        form.request_user = request.user
        return form

    def save_model(self, request, obj, form, change):
        domain.save_config(obj, user=request.user, source="admin")


@admin.register(GpuConfigChange)
class GpuConfigChangeAdmin(admin.ModelAdmin):
    list_display = ("at", "user", "source", "field", "old_value", "new_value")
    list_filter = ("field", "source")
    readonly_fields = ("at", "user", "source", "field", "old_value", "new_value")

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(VastInstance)
class VastInstanceAdmin(admin.ModelAdmin):
    list_display = ("vast_id", "state", "actual_status", "gpu_name", "dph_total", "uptime", "cost", "origin", "auto_destroy",
                    "active_jobs", "status_msg", "created_at")
    list_filter = ("state", "origin", "auto_destroy", "gpu_name")
    search_fields = ("vast_id", "gpu_name", "id", "comfyui_url")
    readonly_fields = (
        "id", "vast_id", "offer_id", "machine_id", "gpu_name", "num_gpus", "gpu_ram_mb", "dph_total", "state",
        "actual_status", "status_msg", "error", "comfyui_url", "portal_url", "origin", "attempt", "created_by",
        "created_at", "state_changed_at", "checked_at", "comfyui_seen_at", "ready_at", "last_busy_at",
        "destroyed_at", "destroy_reason", "cost", "what_i2v_can_do",
    )
    exclude = ("web_password", "cost_usd", "provisioning_key", "tunnel_checked_at")
    actions = ["destroy_selected", "auto_destroy_on", "auto_destroy_off"]
    change_list_template = "admin/gpu/vastinstance/change_list.html"

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        # Deleting a row would orphan a paid rental; "Destroy" ends the rental and keeps the record.
        return False

    def get_urls(self):
        return [
            path("rent/", self.admin_site.admin_view(self.rent), name="gpu_vastinstance_rent"),
        ] + super().get_urls()

    def rent(self, request):
        """POST: rent the cheapest GPU matching the policy (what the "Rent a GPU" buttons post to)."""
        from gpu import lifecycle

        if request.method == "POST":
            if not self.has_change_permission(request):
                messages.error(request, "You may not rent vast.ai instances.")
            else:
                try:
                    instance = lifecycle.create_instance(user=request.user)
                except lifecycle.ProvisioningError as exc:
                    messages.error(request, f"No instance rented: {exc}")
                else:
                    messages.success(request, f"Rented vast.ai instance {instance.vast_id} ({instance.gpu_name}, "
                                              f"${instance.dph_total:.3f}/h); it is booting and becomes ready in a few minutes.")
        return redirect(reverse("admin:gpu_vastinstance_changelist"))

    @admin.action(description="Destroy selected instances (stops billing)")
    def destroy_selected(self, request, queryset):
        from gpu import lifecycle

        done, failed = 0, []
        for instance in queryset:
            try:
                lifecycle.destroy_instance(instance, f"destroyed by {request.user.get_username()} in the admin")
                done += 1
            except lifecycle.ProvisioningError as exc:
                failed.append(f"{instance.vast_id}: {exc}")
        if done:
            messages.success(request, f"Destroyed {done} instance(s).")
        for line in failed:
            messages.error(request, f"Not destroyed (retried by the reconciler) — {line}")

    @admin.action(description="Switch auto-destroy on (idle reaper, daily spend cap)")
    def auto_destroy_on(self, request, queryset):
        count = queryset.update(auto_destroy=True)
        messages.success(request, f"Auto-destroy is on for {count} instance(s).")

    @admin.action(description="Switch auto-destroy off (i2v never destroys them on its own)")
    def auto_destroy_off(self, request, queryset):
        count = queryset.update(auto_destroy=False)
        messages.success(request, f"Auto-destroy is off for {count} instance(s).")

    @admin.display(description="What i2v can and cannot do with it")
    def what_i2v_can_do(self, obj):
        template = obj.template or {}
        lines = [f"✓ {line}" for line in template.get("can") or []] + [f"✗ {line}" for line in template.get("cannot") or []]
        return format_html_join(mark_safe("<br>"), "{}", ((line,) for line in lines)) or "—"

    @admin.display(description="Active jobs")
    def active_jobs(self, obj):
        return capacity.active_jobs(obj.pk)

    @admin.display(description="Uptime")
    def uptime(self, obj):
        end = obj.destroyed_at or timezone.now()
        return human_duration((end - obj.created_at).total_seconds())

    @admin.display(description="Cost so far")
    def cost(self, obj):
        return format_html("${}", f"{obj.accrued_cost():.2f}")


@admin.register(ModelFile)
class ModelFileAdmin(admin.ModelAdmin):
    list_display = ("name", "filename", "folder", "size", "has_sha256")
    search_fields = ("name", "filename")

    @admin.display(boolean=True, description="sha256")
    def has_sha256(self, obj):
        return bool(obj.sha256)


class ComfyUIServerForm(forms.ModelForm):
    token = forms.CharField(required=False, widget=forms.PasswordInput(render_value=False),
                            help_text="Sent as Authorization: Bearer. Write-only: leave empty to keep the current one.")

    class Meta:
        model = ComfyUIServer
        fields = ("name", "url", "token", "enabled", "slots", "dph", "gpu_name")

    def clean_url(self):
        try:
            return validate_service_url(self.cleaned_data["url"])
        except ValueError as exc:
            raise forms.ValidationError(str(exc))

    def save(self, commit=True):
        if not self.cleaned_data.get("token") and self.instance.pk:
            self.instance.token = ComfyUIServer.objects.filter(pk=self.instance.pk).values_list("token", flat=True).first()
        return super().save(commit)


@admin.register(ComfyUIServer)
class ComfyUIServerAdmin(admin.ModelAdmin):
    """Further ComfyUIs jobs may run on, besides the GPU configuration's URL (a home GPU, a second tunnel)."""

    form = ComfyUIServerForm
    list_display = ("name", "url", "enabled", "slots", "dph", "gpu_name")
    list_filter = ("enabled",)
