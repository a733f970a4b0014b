"""Why a job failed, as a class with its own advice.

The classes come from what a real ComfyUI 0.3.64 with ComfyUI-GGUF answers (recorded in
tests/fixtures/comfyui_errors.json): a model file that is not in ComfyUI's list is refused by
`POST /prompt` (`value_not_in_list` on a loader's file input); one that is listed but empty or cut
short fails in its loader at run time (`SafetensorError: Error while deserializing header: header
too small`, `ValueError: cannot mmap an empty file`, ...); one deleted after listing raises
`FileNotFoundError: Model in folder 'vae' with filename ...`; an unknown node class is
`invalid_prompt` "Cannot execute because node X does not exist."; out of memory is
`torch.OutOfMemoryError` with ComfyUI's "ran out of memory on your GPU" tip.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from generation.models import VideoJob
from generation.workflow_schema import MODEL_INPUT_NAMES, MODEL_INPUTS
from gpu.models import ModelFile

EC = VideoJob.ErrorClass

# ComfyUI's model folder keys → the directory under models/ a user puts the file in (the other
# keys are directories of the same name).
DIRECTORY_OF_KEY = {"unet_gguf": "unet", "clip_gguf": "text_encoders"}
MODEL_INPUT_SET = set(MODEL_INPUT_NAMES) | {name for _, name in MODEL_INPUTS} | {"clip_name1", "clip_name2"}
MODEL_EXTENSIONS = (".gguf", ".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")
# Node classes a custom node pack provides, for "install this pack" advice.
CUSTOM_NODE_PACKS = {
    "ComfyUI-GGUF (https://github.com/city96/ComfyUI-GGUF)": (
        "UnetLoaderGGUF", "UnetLoaderGGUFAdvanced", "CLIPLoaderGGUF", "DualCLIPLoaderGGUF", "TripleCLIPLoaderGGUF",
        "QuadrupleCLIPLoaderGGUF",
    ),
    "ComfyUI-VideoHelperSuite (https://github.com/Kosinkadink/ComfyUI-VideoHelperSuite)": ("VHS_VideoCombine", "VHS_LoadVideo"),
}
GPU_CLASSES = {EC.MISSING_MODEL, EC.CORRUPT_MODEL, EC.OUT_OF_MEMORY, EC.CUSTOM_NODE_MISSING, EC.COMFYUI_UNREACHABLE, EC.NO_GPU}


@dataclass
class Failure:
    error_class: str
    info: dict = field(default_factory=dict)


def _folder(class_type: str, input_name: str, filename: str) -> str:
    row = ModelFile.objects.filter(filename=filename).values_list("folder", flat=True).first()
    key = MODEL_INPUTS.get((class_type, input_name)) or MODEL_INPUT_NAMES.get(input_name.rstrip("12"), "")
    return row or DIRECTORY_OF_KEY.get(key, key)


def from_execution_error(data: dict) -> Failure:
    """A websocket/history `execution_error` event's data → its class."""
    exc_type = str(data.get("exception_type") or "")
    message = str(data.get("exception_message") or "")
    node_type = str(data.get("node_type") or "")
    info = {"node": str(data.get("node_id") or ""), "class_type": node_type, "exception": exc_type.rsplit(".", 1)[-1]}
    if "OutOfMemory" in exc_type or "out of memory" in message.lower():
        return Failure(EC.OUT_OF_MEMORY, info)
    missing = re.search(r"Model in folder '([^']+)' with filename '([^']+)' not found", message)
    if missing:
        return Failure(EC.MISSING_MODEL, {**info, "folder": missing.group(1), "file": missing.group(2)})
    inputs = data.get("current_inputs") if isinstance(data.get("current_inputs"), dict) else {}
    for name, values in inputs.items():
        value = values[0] if isinstance(values, list) and values else values
        if name in MODEL_INPUT_SET and isinstance(value, str) and value:
            # The loader found the file in its list but could not read it: empty or cut short.
            return Failure(EC.CORRUPT_MODEL, {**info, "file": value, "folder": _folder(node_type, name, value)})
    return Failure(EC.NODE_ERROR, info)


def from_rejection(node_errors: dict, message: str) -> Failure:
    """A `POST /prompt` refusal (its node_errors, and our message of it) → its class."""
    first = {}
    for node_id, entry in (node_errors or {}).items():
        class_type = entry.get("class_type") or ""
        for err in entry.get("errors") or []:
            extra = err.get("extra_info") or {}
            input_name = extra.get("input_name") or ""
            received = str(extra.get("received_value", ""))
            if err.get("type") == "value_not_in_list" and (
                input_name in MODEL_INPUT_SET or received.lower().endswith(MODEL_EXTENSIONS)
            ):
                return Failure(EC.MISSING_MODEL, {"node": str(node_id), "class_type": class_type, "file": received,
                                                  "folder": _folder(class_type, input_name, received)})
            if not first:
                first = {"node": str(node_id), "class_type": class_type, "input": input_name or str(err.get("details", "")),
                         "reason": str(err.get("message") or err.get("type") or "")}
    unknown = re.search(r"node (\S+?) does not exist|Node '([^']+)' not found", message)
    if not first and unknown:
        class_type = unknown.group(1) or unknown.group(2)
        pack = next((name for name, classes in CUSTOM_NODE_PACKS.items() if class_type in classes), "")
        return Failure(EC.CUSTOM_NODE_MISSING, {"class_type": class_type, "pack": pack})
    return Failure(EC.WORKFLOW_REJECTED, first)


# Messages the runners write themselves, for failures that carry no structure.
TEXT_CLASSES = (
    (EC.NO_GPU, ("no gpu is configured", "no vast.ai gpu")),
    (EC.TIMEOUT, ("took longer than",)),
    (EC.STORAGE_REFUSED, ("could not upload the video to the storage",)),
    (EC.FAL_CONTENT_POLICY, ("content_policy_violation", "flagged by a content checker")),
    (EC.FAL_BAD_INPUT, ("fal.ai rejected the input", "fal.ai needs")),
    (EC.FAL_ERROR, ("fal.ai",)),
    (EC.COMFYUI_UNREACHABLE, ("cannot reach comfyui", "failed to authenticate", "did not answer", "still starting",
                              "cannot open comfyui's websocket", "dropped the connection", "has been unreachable")),
    (EC.CUSTOM_NODE_MISSING, ("does not exist", "custom node may not be installed")),
    (EC.MISSING_MODEL, ("is not on the server — model", "model file")),
    (EC.WORKFLOW_REJECTED, ("rejected the workflow", "refused the workflow")),
    (EC.NODE_ERROR, ("comfyui failed while running",)),
)


def from_text(message: str) -> Failure:
    text = (message or "").lower()
    for error_class, needles in TEXT_CLASSES:
        if any(needle.lower() in text for needle in needles):
            return Failure(error_class)
    return Failure(EC.OTHER)


def short_reason(text: str) -> str:
    """A few words on why ComfyUI did not answer ("connection refused"), for a waiting job's note."""
    lowered = text.lower()
    for needle, words in (("refused", "connection refused"), ("dns", "DNS lookup failed"), ("tls", "TLS failed"),
                          ("timed out", "timed out"), ("did not answer", "no answer"), ("still starting", "still starting"),
                          ("dropped", "connection dropped"), ("authenticate", "authentication failed")):
        if needle in lowered:
            return words
    return text.split(":", 1)[0] or "no answer"


def fail_job(job: VideoJob, message: str, failure: Failure | None = None, *,
             settle: Callable[[Callable[[], None]], None] = lambda then: then()) -> bool:
    """Mark the job failed with its message and class (compare-and-set; False if it already ended),
    then settle its cost and webhook (through `settle`, e.g. transaction.on_commit)."""
    from generation.runner import finish_accounting  # noqa: PLC0415 -- runner imports this module

    failure = failure or from_text(message)
    job.refresh_from_db()
    if job.is_terminal:
        return False
    info = dict(failure.info)
    if job.instance_id and job.instance is not None:
        info.setdefault("vast_id", job.instance.vast_id)
    fields = {"error": message[:4000], "error_class": failure.error_class, "error_info": info, "eta_at": None}
    if job.note.startswith("ComfyUI at "):
        fields["note"] = ""  # the "unreachable since" note: the error says the rest
    if not job.transition(VideoJob.Status.FAILED, **fields):
        return False
    settle(lambda: finish_accounting(job))
    return True


UNREACHABLE_ADVICE = (
    "Check that ComfyUI is running and reachable at the configured URL: Test connection on the GPU page (or POST "
    "/api/gpu/test-connection) tells whether it answers and is ready. A vast.ai tunnel URL changes when the instance "
    "restarts: copy the new one from the instance's Open button. Then retry."
)


def advice(job: VideoJob) -> str:
    """What a person can do about this failed job, from its class and what the class names."""
    if job.status != VideoJob.Status.FAILED:
        return ""
    info = job.error_info or {}
    cls = job.error_class or from_text(job.error).error_class
    file, folder = info.get("file") or "the model file", info.get("folder") or ""
    where = f"models/{folder}/" if folder else "ComfyUI's models folder"
    if cls == EC.MISSING_MODEL:
        text = (f"ComfyUI has no {file} in {where}. Download it there (the GPU page lists every file the workflow "
                "needs), or run `python manage.py upload_models_to_r2` so new vast.ai instances fetch it, then retry.")
        if info.get("vast_id"):
            text += (f" This job ran on vast.ai instance {info['vast_id']}: its provisioning log (vast.ai console → "
                     f"Instances → Logs, or `vastai logs {info['vast_id']}`) shows why the download failed "
                     "(lines starting with 'i2v:').")
        return text
    if cls == EC.CORRUPT_MODEL:
        return (f"{file} is in {where} but could not be read: it is empty or incomplete (an interrupted download). "
                f"Re-download it, or re-run `python manage.py upload_models_to_r2` and start a fresh instance, then retry.")
    if cls == EC.OUT_OF_MEMORY:
        gpu = info.get("gpu") or "The GPU"
        vram = f" ({info['vram_gb']} GB VRAM)" if info.get("vram_gb") else ""
        return (f"{gpu}{vram} ran out of memory at {job.width}×{job.height}, {job.frames} frames. Retry with a lower "
                "resolution (e.g. 832×480) or fewer frames (e.g. 49) under Advanced, or use a GPU with more VRAM.")
    if cls == EC.WORKFLOW_REJECTED:
        node = f"node {info['node']} ({info.get('class_type')})" if info.get("node") else "the workflow"
        what = f", input '{info['input']}'" if info.get("input") else ""
        return (f"ComfyUI's validator refused {node}{what}. Fix that value in the workflow (admin → Workflows) or in "
                "what you sent, then retry.")
    if cls == EC.CUSTOM_NODE_MISSING:
        pack = info.get("pack") or "the custom node pack that provides it"
        return (f"ComfyUI does not have the node {info.get('class_type') or 'the workflow uses'}. Install {pack} "
                "into ComfyUI/custom_nodes (with its requirements.txt) and restart ComfyUI, then retry.")
    if cls == EC.COMFYUI_UNREACHABLE:
        return UNREACHABLE_ADVICE
    if cls == EC.NO_GPU:
        return "Set a ComfyUI URL or rent a GPU on the GPU page, then retry."
    if cls == EC.STORAGE_REFUSED:
        return ("The video was made but the storage refused it: check the R2 settings (R2_BUCKET, the keys, the "
                "endpoint) and Cloudflare's status, or the free disk space for local files, then retry.")
    if cls == EC.FAL_CONTENT_POLICY:
        return ("fal.ai's content checker flagged the prompt or the image. Change them and retry, or run the job on "
                "your own GPU.")
    if cls == EC.FAL_BAD_INPUT:
        return "fal.ai refused a value of this job: change the field it names (under Advanced) and retry."
    if cls == EC.FAL_ERROR:
        return ("fal.ai could not make this video. Its dashboard (fal.ai/dashboard/requests) shows the request; "
                "retry, or run the job on your own GPU.")
    if cls == EC.TIMEOUT:
        return "The run took longer than I2V_JOB_TIMEOUT allows: retry with fewer frames or a lower resolution."
    if cls == EC.NODE_ERROR:
        node = f"Node {info['node']} ({info.get('class_type')})" if info.get("node") else "A node"
        return (f"{node} raised an error while running. The message above is ComfyUI's; its console log has the "
                "full traceback. Check that node's inputs, then retry.")
    return "Retry; if it fails again, the message above and the worker's log say what went wrong."
