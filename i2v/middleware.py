"""Django's own middlewares, with their hooks run on the event loop under ASGI.

Under ASGI, Django's `MiddlewareMixin.__acall__` runs every `process_request` and
`process_response` through `sync_to_async`: a hop to a thread and back, twice per middleware,
on every request. Measured in-process on this project's stack, that was 3.4 ms of a 6.8 ms
`GET /api/ping` (README, "Dispatch"), and a job takes two requests or more. The hooks
of the middlewares below only set headers and cookies and attach lazy objects, so they run on
the loop here; the one case that does I/O (saving a changed session or its messages) still
goes to a thread. Should a hook ever touch the database on the loop, Django's guard raises
SynchronousOnlyOperation rather than block it. In sync mode (WSGI, the test client) nothing
changes.

MIDDLEWARE keeps Django's own paths (its deploy checks look for them by name); i2v/asgi.py builds
the handler with these subclasses in their place (on_the_loop). Hand-written: Django's built-in middlewares have no async hooks of their own, and no
maintained package provides them.
"""

from asgiref.sync import sync_to_async
from csp.middleware import CSPMiddleware as _CSP
from django.conf import settings
from django.contrib.auth.middleware import AuthenticationMiddleware as _Authentication
from django.contrib.messages.middleware import MessageMiddleware as _Message
from django.contrib.sessions.middleware import SessionMiddleware as _Session
from django.middleware.clickjacking import XFrameOptionsMiddleware as _XFrameOptions
from django.middleware.common import CommonMiddleware as _Common
from django.middleware.csrf import CsrfViewMiddleware as _Csrf
from django.middleware.security import SecurityMiddleware as _Security


class OnTheLoop:
    """`__acall__` without thread hops; `response_needs_thread` names the responses whose
    `process_response` does I/O."""

    def response_needs_thread(self, request) -> bool:
        return False

    async def __acall__(self, request):
        response = None
        if hasattr(self, "process_request"):
            response = self.process_request(request)
        response = response or await self.get_response(request)
        if hasattr(self, "process_response"):
            if self.response_needs_thread(request):
                response = await sync_to_async(self.process_response, thread_sensitive=True)(request, response)
            else:
                response = self.process_response(request, response)
        return response


class SecurityMiddleware(OnTheLoop, _Security):
    pass


class SessionMiddleware(OnTheLoop, _Session):
    """The session is read lazily (not in process_request); a changed one is saved on a thread."""

    def response_needs_thread(self, request) -> bool:
        session = getattr(request, "session", None)
        return session is not None and (session.modified or settings.SESSION_SAVE_EVERY_REQUEST)


class CommonMiddleware(OnTheLoop, _Common):
    pass


class CsrfViewMiddleware(OnTheLoop, _Csrf):
    """With CSRF_USE_SESSIONS the secret lives in the session (I/O): then Django's own hops."""

    async def __acall__(self, request):
        if settings.CSRF_USE_SESSIONS:
            return await _Csrf.__acall__(self, request)
        return await super().__acall__(request)


class AuthenticationMiddleware(OnTheLoop, _Authentication):
    pass  # process_request attaches a lazy user; reading it off the loop is the views' business


class MessageMiddleware(OnTheLoop, _Message):
    """Messages shown or added are stored on a thread (the session storage writes the session)."""

    def response_needs_thread(self, request) -> bool:
        storage = getattr(request, "_messages", None)
        return storage is not None and (storage.used or storage.added_new)


class XFrameOptionsMiddleware(OnTheLoop, _XFrameOptions):
    pass


class CSPMiddleware(OnTheLoop, _CSP):
    pass


ON_THE_LOOP = {
    "django.middleware.security.SecurityMiddleware": SecurityMiddleware,
    "django.contrib.sessions.middleware.SessionMiddleware": SessionMiddleware,
    "django.middleware.common.CommonMiddleware": CommonMiddleware,
    "django.middleware.csrf.CsrfViewMiddleware": CsrfViewMiddleware,
    "django.contrib.auth.middleware.AuthenticationMiddleware": AuthenticationMiddleware,
    "django.contrib.messages.middleware.MessageMiddleware": MessageMiddleware,
    "django.middleware.clickjacking.XFrameOptionsMiddleware": XFrameOptionsMiddleware,
    "csp.middleware.CSPMiddleware": CSPMiddleware,
}


def on_the_loop(paths) -> list[str]:
    """MIDDLEWARE with each middleware named in ON_THE_LOOP replaced by its subclass here."""
    return [f"{__name__}.{ON_THE_LOOP[path].__name__}" if path in ON_THE_LOOP else path for path in paths]

