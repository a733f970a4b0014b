import os

import django
from django.conf import settings
from django.test.utils import override_settings

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "i2v.settings")
django.setup(set_prefix=False)

from servestatic import ServeStaticASGI  # noqa: E402  (after Django is set up)

from i2v.handler import ASGIHandler  # noqa: E402
from i2v.middleware import on_the_loop  # noqa: E402
from i2v.static import serve  # noqa: E402

# Django's handler, its requests' threads pooled (i2v/handler.py). It loads its middlewares when
# built: Django's, with their hooks on the event loop (i2v/middleware.py). Static files are answered
# in front of it (i2v/static.py).
with override_settings(MIDDLEWARE=on_the_loop(settings.MIDDLEWARE)):
    application = ASGIHandler()
application = serve(ServeStaticASGI, application)
