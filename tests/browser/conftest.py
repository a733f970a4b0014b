"""Browser tests: pytest-playwright driving Debian's Chromium against pytest-django's live_server."""

import io
import os
import threading
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
REPO = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(config, items):
    # Playwright's sync API keeps an event loop running in the main thread for the rest of the
    # session once it starts, and Django refuses ORM calls from a thread with a running loop.
    # Running the browser tests last keeps every other test away from that loop.
    items.sort(key=lambda item: item.get_closest_marker("browser") is not None)


@pytest.fixture(scope="session", autouse=True)
def _orm_beside_playwright():
    """The tests' own ORM calls run in the thread where Playwright's loop runs (see above)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        yield


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium); never `playwright install`.")
    return {**browser_type_launch_args, "executable_path": CHROMIUM, "args": CHROMIUM_ARGS, "headless": True}


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args):
    return {**browser_context_args, "viewport": {"width": 1280, "height": 860}, "locale": "en-US"}


@pytest.fixture
def page(page):
    """Every browser test also checks that the pages ran under the Content-Security-Policy without
    Chromium reporting a violation (it logs each one to the console)."""
    page.set_default_timeout(15_000)
    page.csp_violations = []

    def on_console(message):
        if "Content Security Policy" in message.text:
            page.csp_violations.append(f"{message.text} at {message.location} on {page.url}")

    page.on("console", on_console)
    yield page
    assert page.csp_violations == [], page.csp_violations


@pytest.fixture
def shots(tmp_path):
    """save(page, name): a full-page screenshot, into docs/screenshots/ with I2V_SCREENSHOTS=1."""
    folder = REPO / "docs" / "screenshots" if os.environ.get("I2V_SCREENSHOTS") == "1" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)

    def save(page, name):
        path = folder / f"{name}.png"
        page.screenshot(path=str(path), full_page=True, animations="disabled", caret="hide")
        assert path.stat().st_size > 5000
        return path

    return save


def sample_image(width=832, height=480) -> bytes:
    """A small landscape picture (sky, sun, hills), so previews and thumbnails look like something."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(img)
    for y in range(height):
        t = y / height
        draw.line([(0, y), (width, y)], fill=(int(70 + 150 * t), int(110 + 90 * t), int(200 - 40 * t)))
    draw.ellipse([width * 0.62, height * 0.18, width * 0.62 + 90, height * 0.18 + 90], fill=(255, 214, 120))
    draw.polygon([(0, height), (0, height * 0.7), (width * 0.3, height * 0.5), (width * 0.6, height * 0.72),
                  (width, height * 0.55), (width, height)], fill=(46, 94, 64))
    draw.polygon([(0, height), (width * 0.2, height * 0.8), (width * 0.55, height * 0.9), (width, height * 0.78),
                  (width, height)], fill=(30, 66, 45))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class JobWorker:
    """Runs generation.tasks.run_job for one job in a thread until it ends, like the django-q2 worker
    would (enqueue is patched out, so each slice is re-run here)."""

    def __init__(self, job_id):
        self.job_id = str(job_id)
        self.stop = threading.Event()
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        from django.db import connection

        from generation import tasks
        from generation.models import VideoJob

        try:
            while not self.stop.is_set():
                tasks.run_job(self.job_id)
                if VideoJob.objects.get(pk=self.job_id).is_terminal:
                    return
        except BaseException as exc:  # surfaced by join()
            self.error = exc
        finally:
            connection.close()

    def start(self):
        self.thread.start()
        return self

    def join(self, timeout=30):
        self.thread.join(timeout)
        if self.error:
            raise self.error
        assert not self.thread.is_alive(), "the job worker did not finish"


@pytest.fixture
def worker_for(monkeypatch, settings):
    """worker_for(job_id) starts a JobWorker; all are stopped at the end of the test."""
    from generation import tasks

    monkeypatch.setattr(tasks, "enqueue", lambda *args: None)
    monkeypatch.setattr("django_q.tasks.async_task", lambda *args, **kw: None)
    settings.I2V_FOLLOW_SLICE = 2
    workers = []

    def start(job_id):
        workers.append(JobWorker(job_id).start())
        return workers[-1]

    yield start
    for worker in workers:
        worker.stop.set()
        worker.thread.join(30)
