"""Generation business logic: creating, running and finishing VideoJobs."""

from django.conf import settings
from django.core.files.storage import default_storage
from django.urls import reverse


def video_url(job) -> str:
    """Where the job's video can be fetched: R2 (presigned or public) or the local auth-checked view."""
    if not job.video:
        return ""
    if settings.R2_BUCKET:
        return default_storage.url(job.video.name)
    return reverse("generation:job_video", args=[job.id])


def sync_shipped_workflows(Workflow, ModelFile) -> list[str]:
    """Create or update the Workflow and ModelFile rows from generation/workflows/*.json.

    Takes the model classes so the data migration can pass its historical models.
    """
    from generation.workflow_schema import load_manifest, shipped_workflows

    by_name = {}
    for entry in load_manifest():
        row, _ = ModelFile.objects.update_or_create(
            name=entry["name"],
            defaults={
                "filename": entry["filename"],
                "folder": entry["folder"],
                "r2_key": entry["r2_key"],
                "size": entry.get("size"),
                "sha256": entry.get("sha256") or "",
                "source": entry.get("source") or "",
            },
        )
        by_name[row.name] = row
    slugs = []
    for data in shipped_workflows():
        wf, _ = Workflow.objects.update_or_create(
            slug=data["slug"],
            defaults={
                "name": data["name"],
                "description": data.get("description", ""),
                "graph": data["graph"],
                "bindings": data["bindings"],
                "output_node": data["output_node"],
                "defaults": data.get("defaults", {}),
            },
        )
        wf.model_files.set([by_name[name] for name in data.get("models", [])])
        slugs.append(wf.slug)
    return slugs
