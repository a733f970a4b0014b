from django.contrib import admin, messages

from i2v.core.tokens import ApiToken, hash_token


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ("prefix", "user", "name", "created_at", "last_used_at", "revoked_at")
    list_filter = (("revoked_at", admin.EmptyFieldListFilter),)
    search_fields = ("user__username", "name", "prefix")
    readonly_fields = ("prefix", "created_at", "last_used_at")
    fields = ("user", "name", "prefix", "created_at", "last_used_at", "revoked_at")
    actions = ["revoke"]

    def save_model(self, request, obj, form, change):
        if not change:
            import secrets

            from i2v.core.tokens import TOKEN_PREFIX

            key = TOKEN_PREFIX + secrets.token_urlsafe(32)
            obj.prefix, obj.key_hash = key[:10], hash_token(key)
            super().save_model(request, obj, form, change)
            messages.warning(request, f"New API token for {obj.user}: {key} — copy it now, it will not be shown again.")
        else:
            super().save_model(request, obj, form, change)

    @admin.action(description="Revoke selected tokens")
    def revoke(self, request, queryset):
        for token in queryset:
            token.revoke()
        self.message_user(request, f"Revoked {queryset.count()} token(s).")
