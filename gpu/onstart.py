"""What a new vast.ai instance runs at boot: the model manifest, the provisioning script, onstart, env.

Models reach the instance like this (vast.ai allows env values of at most 256
characters and an onstart of at most 4096): a bash provisioning script is generated
from the manifest (the ModelFile rows of the default workflow): it installs
ComfyUI-GGUF if missing and downloads each model from R2 by a presigned URL into
`ComfyUI/models/<folder>/`, checking size and sha256 when known and skipping files
already there. The vast.ai base image runs `/provisioning.sh` once at boot while its
portal serves the "not ready" placeholder (env `PROVISIONING_SCRIPT` must be set, and
an existing /provisioning.sh is not downloaded again). When the script fits, onstart
writes it inline; when the presigned URLs make it too long (the usual case: one R2
presigned URL is ~500 characters), the script is stored as a short-lived R2 object
(`i2v/provisioning/<uuid>.sh`, deleted once the instance is ready or destroyed) and
onstart downloads it by a single presigned URL. Either way onstart ends by starting
the image's usual `entrypoint.sh`.
"""

import logging
import re

from gpu import r2
from gpu.domain import ProvisioningError
from gpu.models import GpuConfig, ModelFile, VastInstance
from gpu.vastai import ONSTART_MAX

log = logging.getLogger(__name__)

PORTAL_CONFIG = "localhost:1111:11111:/:Instance Portal|localhost:8188:18188:/:ComfyUI"
COMFYUI_ARGS = "--disable-auto-launch --port 18188 --enable-cors-header"
PROVISIONING_PATH = "/provisioning.sh"
PROVISIONING_PREFIX = "i2v/provisioning/"
COMFYUI_GGUF = "https://github.com/city96/ComfyUI-GGUF"
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
SAFE_HEX = re.compile(r"^[0-9a-fA-F]{64}$")


def manifest(config=None) -> list:
    """The ModelFile rows an instance must have: those of the default workflow."""
    config = config or GpuConfig.get()
    return list(ModelFile.for_workflow(config.default_workflow))


def _quote(value: str) -> str:
    if "'" in value:
        raise ProvisioningError(f"Cannot put {value[:40]!r} in a shell script (it contains a quote).")
    return f"'{value}'"


def provisioning_script(models, urls: dict) -> str:
    """The bash script an instance runs once at boot: ComfyUI-GGUF, then each model (urls: name → URL)."""
    lines = [
        "#!/bin/bash",
        "# i2v provisioning (generated): ComfyUI-GGUF if missing, then each model file of the manifest",
        "# from R2, size and sha256 checked when known; files already there are kept.",
        "set -u",
        'COMFY=""',
        'for d in "${COMFYUI_DIR:-}" "${WORKSPACE:-/workspace}/ComfyUI" /opt/workspace-internal/ComfyUI /workspace/ComfyUI; do',
        '  if [ -n "$d" ] && [ -d "$d" ]; then COMFY="$d"; break; fi',
        "done",
        '[ -n "$COMFY" ] || { echo "i2v: ComfyUI directory not found"; exit 1; }',
        'PIP=pip; [ -x /venv/main/bin/pip ] && PIP=/venv/main/bin/pip',
        'if [ ! -d "$COMFY/custom_nodes/ComfyUI-GGUF" ]; then',
        f'  git clone --depth 1 {COMFYUI_GGUF} "$COMFY/custom_nodes/ComfyUI-GGUF" &&',
        '    "$PIP" install -q -r "$COMFY/custom_nodes/ComfyUI-GGUF/requirements.txt" || { echo "i2v: ComfyUI-GGUF install failed"; exit 1; }',
        "fi",
        "failed=0",
        "fetch() {",
        '  local url="$1" rel="$2" size="$3" sha="$4" dest="$COMFY/models/$2"',
        '  if [ -f "$dest" ] && { [ -z "$size" ] || [ "$(stat -c %s "$dest")" = "$size" ]; }; then',
        '    echo "i2v: $rel is already there"; return 0',
        "  fi",
        '  mkdir -p "$(dirname "$dest")"',
        '  echo "i2v: downloading $rel"',
        '  curl -fL --retry 5 --retry-delay 5 --retry-all-errors -C - -o "$dest.part" "$url" ||',
        '    { echo "i2v: download of $rel failed"; return 1; }',
        '  if [ -n "$size" ] && [ "$(stat -c %s "$dest.part")" != "$size" ]; then',
        '    echo "i2v: $rel has the wrong size"; rm -f "$dest.part"; return 1',
        "  fi",
        '  if [ -n "$sha" ] && ! echo "$sha  $dest.part" | sha256sum -c --status; then',
        '    echo "i2v: $rel has the wrong sha256"; rm -f "$dest.part"; return 1',
        "  fi",
        '  mv -f "$dest.part" "$dest"',
        "}",
    ]
    for model in models:
        if not SAFE_NAME.match(model.folder or "") or not SAFE_NAME.match(model.filename or ""):
            raise ProvisioningError(f"Model {model.name}: folder {model.folder!r} and file name {model.filename!r} may only "
                                    "contain letters, digits and . _ + - (fix it in admin → Model files).")
        sha = model.sha256 or ""
        if sha and not SAFE_HEX.match(sha):
            raise ProvisioningError(f"Model {model.name}: sha256 {sha[:20]!r}… is not 64 hex digits.")
        size = str(model.size) if model.size else ""
        lines.append(f"fetch {_quote(urls[model.name])} {_quote(f'{model.folder}/{model.filename}')} "
                     f"{_quote(size)} {_quote(sha.lower())} || failed=1")
    lines.append('[ "$failed" = 0 ] && echo "i2v: provisioning complete"')
    lines.append('exit "$failed"')
    return "\n".join(lines) + "\n"


def _inline_onstart(script: str) -> str:
    return (
        "#!/bin/bash\n"
        "# i2v: write the provisioning script the base image runs at boot, then boot as usual.\n"
        f"cat > {PROVISIONING_PATH} <<'I2V_PROVISIONING'\n{script}I2V_PROVISIONING\n"
        f"chmod +x {PROVISIONING_PATH}\n"
        "entrypoint.sh\n"
    )


def _fetching_onstart(url: str) -> str:
    return (
        "#!/bin/bash\n"
        "# i2v: fetch this instance's provisioning script (a short-lived R2 object), then boot as usual.\n"
        f"[ -s {PROVISIONING_PATH} ] || curl -fsSL --retry 5 --retry-delay 5 -o {PROVISIONING_PATH} {_quote(url)}\n"
        f"chmod +x {PROVISIONING_PATH}\n"
        "entrypoint.sh\n"
    )


def url_lifetime(config) -> int:
    """Seconds the presigned URLs stay valid: the whole boot window plus an hour."""
    return config.boot_timeout_minutes * 60 + 3600


def require_r2_for(models, config):
    if models and not r2.configured():
        raise ProvisioningError(
            f"The workflow {config.default_workflow!r} needs {len(models)} model file(s), which vast.ai instances download "
            "from R2: set R2_BUCKET, R2_ENDPOINT_URL (or R2_ACCOUNT_ID), R2_ACCESS_KEY_ID and R2_SECRET_ACCESS_KEY, "
            "then run `python manage.py upload_models_to_r2`.",
            status=409,
        )


def build_onstart(instance, config, models=None) -> tuple[str, str]:
    """(onstart, R2 key of the stored script or ""). See the module docstring for the choice."""
    models = manifest(config) if models is None else models
    require_r2_for(models, config)
    lifetime = url_lifetime(config)
    urls = {}
    s3 = r2.client() if models else None
    for model in models:
        urls[model.name] = r2.presigned_get(model.r2_key, lifetime, s3=s3)
    script = provisioning_script(models, urls)
    inline = _inline_onstart(script)
    if len(inline) <= ONSTART_MAX:
        return inline, ""
    key = f"{PROVISIONING_PREFIX}{instance.id}.sh"
    try:
        r2.put_text(key, script, s3=s3)
        url = r2.presigned_get(key, lifetime, s3=s3)
    except r2.R2Error as exc:
        raise ProvisioningError(f"Could not store the provisioning script in R2: {exc}", status=503, transient=True) from None
    onstart = _fetching_onstart(url)
    if len(onstart) > ONSTART_MAX:
        raise ProvisioningError(f"The onstart script is {len(onstart)} characters; vast.ai allows {ONSTART_MAX}.")
    return onstart, key


def instance_env(instance) -> dict:
    """The container environment: the portal's ports, the per-instance password, the provisioning hook."""
    return {
        "-p 1111:1111": "1",
        "-p 8188:8188": "1",
        "OPEN_BUTTON_PORT": "1111",
        "OPEN_BUTTON_TOKEN": "1",
        "WEB_PASSWORD": instance.web_password,
        "PORTAL_CONFIG": PORTAL_CONFIG,
        "COMFYUI_ARGS": COMFYUI_ARGS,
        # Any value makes the base image run /provisioning.sh; onstart has already put it there.
        "PROVISIONING_SCRIPT": f"file://{PROVISIONING_PATH}",
    }


def drop_provisioning_script(instance):
    if not instance.provisioning_key or not r2.configured():
        return
    try:
        r2.delete(instance.provisioning_key)
    except r2.R2Error as exc:
        log.warning("could not delete %s: %s", instance.provisioning_key, exc)
        return
    VastInstance.objects.filter(pk=instance.pk).update(provisioning_key="")
    instance.provisioning_key = ""
