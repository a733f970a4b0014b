import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "i2v.settings")
application = get_wsgi_application()

from servestatic import ServeStatic  # noqa: E402  (after Django is set up)

from i2v.static import serve  # noqa: E402

application = serve(ServeStatic, application)
