"""Upload the model manifest's files to R2 (what vast.ai instances download at boot)."""

import os
import time
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from gpu import r2
from gpu.models import ModelFile

MiB = 1024 * 1024


class Progress:
    """One progress line per file: rewritten in place on a terminal, every 10% otherwise."""

    def __init__(self, out, label, total):
        self.out, self.label, self.total = out, label, max(1, total)
        self.tty = hasattr(out, "isatty") and out.isatty()
        self.started = time.monotonic()
        self.last_step = -1

    def __call__(self, done, total=None):
        pct = min(100, int(done * 100 / self.total))
        rate = done / MiB / max(1e-6, time.monotonic() - self.started)
        line = f"  {self.label}: {done / MiB:,.1f}/{self.total / MiB:,.1f} MiB ({pct}%) {rate:,.1f} MiB/s"
        if self.tty:
            self.out.write("\r" + line, ending="")
            self.out.flush()
        elif pct // 10 != self.last_step:
            self.last_step = pct // 10
            self.out.write(line)

    def end(self):
        if self.tty:
            self.out.write("")


class Command(BaseCommand):
    help = ("Upload the manifest's model files to R2 (multipart, resumable) and record their size and sha256. "
            "Files already in R2 with the same size and sha256 are skipped.")

    def add_arguments(self, parser):
        parser.add_argument("--only", metavar="NAME", help="one model: its manifest name or file name")
        parser.add_argument("--dir", default=os.environ.get("I2V_MODELS_DIR") or str(Path(settings.DATA_DIR) / "models"),
                            help="where the files are: DIR/<folder>/<file> or DIR/<file> (default $I2V_MODELS_DIR or "
                                 "$I2V_DATA_DIR/models)")

    def handle(self, *args, only=None, dir=None, **options):
        if not r2.configured():
            raise CommandError("R2 is not configured: set R2_BUCKET, R2_ENDPOINT_URL (or R2_ACCOUNT_ID), "
                               "R2_ACCESS_KEY_ID and R2_SECRET_ACCESS_KEY.")
        models = list(ModelFile.objects.order_by("name"))
        if only:
            models = [m for m in models if only in (m.name, m.filename)]
            if not models:
                names = ", ".join(ModelFile.objects.order_by("name").values_list("name", flat=True))
                raise CommandError(f"No model {only!r} in the manifest; known: {names}")
        base = Path(dir)
        s3 = r2.client()
        missing, uploaded, skipped = [], 0, 0
        for model in models:
            path = next((p for p in (base / model.folder / model.filename, base / model.filename) if p.is_file()), None)
            if path is None:
                missing.append(f"{model.name} (expected at {base / model.folder / model.filename})")
                self.stderr.write(f"{model.name}: not found under {base}")
                continue
            size = path.stat().st_size
            progress = Progress(self.stdout, f"hashing {model.filename}", size)
            sha = r2.file_sha256(path, progress=progress)
            progress.end()
            try:
                there = r2.head(model.r2_key, s3=s3)
            except r2.R2Error as exc:
                raise CommandError(str(exc)) from None
            if there and there.get("ContentLength") == size and (there.get("Metadata") or {}).get("sha256") == sha:
                self.stdout.write(f"{model.name}: already in R2 ({size / MiB:,.1f} MiB, sha256 {sha[:12]}…), skipped")
                skipped += 1
            else:
                progress = Progress(self.stdout, f"uploading {model.filename}", size)
                try:
                    result = r2.upload_resumable(path, model.r2_key, size=size, sha256=sha, progress=progress, s3=s3)
                except r2.R2Error as exc:
                    progress.end()
                    raise CommandError(f"{model.name}: {exc} — run the command again to resume") from None
                progress.end()
                resumed = f", {result['reused']} of {result['parts']} parts kept from an interrupted upload" if result["reused"] else ""
                self.stdout.write(f"{model.name}: uploaded to {model.r2_key} ({size / MiB:,.1f} MiB{resumed})")
                uploaded += 1
            ModelFile.objects.filter(pk=model.pk).update(size=size, sha256=sha)
        self.stdout.write(f"Done: {uploaded} uploaded, {skipped} already there, {len(missing)} not found.")
        if missing:
            raise CommandError("Not found: " + "; ".join(missing))
