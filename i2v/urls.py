from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.templatetags.static import static
from django.urls import include, path
from django.views.generic import RedirectView

from i2v import views
from i2v.api import api

admin.site.site_header = "i2v administration"
admin.site.site_title = "i2v admin"

urlpatterns = [
    path("admin/", admin.site.urls),
    # Browsers ask for /favicon.ico on every page that names none (the admin, /api/docs).
    path("favicon.ico", RedirectView.as_view(url=static("favicon.svg"), permanent=True)),
    path("api/", api.urls),
    path("accounts/login/", views.LoginView.as_view(), name="login"),
    path("account/", views.account, name="account"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("", include("generation.urls")),
    path("gpu/", include("gpu.urls")),
]

handler404 = "i2v.views.not_found"
handler500 = "i2v.views.server_error"
