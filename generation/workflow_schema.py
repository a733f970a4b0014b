"""ComfyUI workflows as data: check a graph against a server's /object_info,
fill job parameters into it, and list the model files it needs.

Pure Python on purpose (no Django, no network): the admin, the
`load_workflows` command, the health check and the tests all use it.

A workflow file in `generation/workflows/` is
`{"slug", "name", "description", "output_node", "bindings", "graph", "models",
"defaults"}`. Bindings map a job parameter to a list of `[node_id, input_name]`
entries, optionally with a third element naming a transform applied to the
value first (`"half"`: integer half, for the end/start step split of a
two-pass sampler).
"""

import copy
import json
from pathlib import Path

WORKFLOWS_DIR = Path(__file__).resolve().parent / "workflows"
MANIFEST_PATH = WORKFLOWS_DIR / "models.json"

# The job parameters a binding may name.
PARAMETERS = (
    "image",
    "prompt",
    "negative_prompt",
    "seed",
    "width",
    "height",
    "frames",
    "fps",
    "steps",
    "filename_prefix",
)

TRANSFORMS = {
    "half": lambda value: value // 2,
}

WORKFLOW_KEYS = ("slug", "name", "description", "output_node", "bindings", "graph", "models", "defaults")
MANIFEST_KEYS = ("name", "filename", "folder", "r2_key", "size", "sha256", "source")

# (class_type, input) -> the folder key to ask ComfyUI about: GET /models/<key>.
MODEL_INPUTS = {
    ("UnetLoaderGGUF", "unet_name"): "unet_gguf",
    ("UnetLoaderGGUFAdvanced", "unet_name"): "unet_gguf",
    ("UNETLoader", "unet_name"): "diffusion_models",
    ("LoraLoaderModelOnly", "lora_name"): "loras",
    ("LoraLoader", "lora_name"): "loras",
    ("CLIPLoader", "clip_name"): "text_encoders",
    ("CLIPLoaderGGUF", "clip_name"): "clip_gguf",
    ("VAELoader", "vae_name"): "vae",
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
}
# Any other loader: its model-file combo is recognised by the input name.
MODEL_INPUT_NAMES = {
    "unet_name": "diffusion_models",
    "clip_name": "text_encoders",
    "lora_name": "loras",
    "vae_name": "vae",
    "ckpt_name": "checkpoints",
}
# VAELoader offers these names without a file of that name in models/vae.
VIRTUAL_VAE_NAMES = frozenset({"pixel_space", "taesd", "taesdxl", "taesd3", "taef1"})

UPLOAD_FLAGS = ("image_upload", "video_upload", "file_upload")


# --------------------------------------------------------------------------- files


def load_workflow_file(path) -> dict:
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        workflow = json.load(f)
    if not isinstance(workflow, dict):
        raise ValueError(f"{path}: a workflow file holds a JSON object")
    missing = [key for key in WORKFLOW_KEYS if key not in workflow]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}")
    return workflow


def shipped_workflows() -> list[dict]:
    return [
        load_workflow_file(path)
        for path in sorted(WORKFLOWS_DIR.glob("*.json"))
        if path.name != MANIFEST_PATH.name
    ]


def load_manifest(path=MANIFEST_PATH) -> list[dict]:
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        manifest = json.load(f)
    if not isinstance(manifest, list):
        raise ValueError(f"{path}: the model manifest is a JSON list")
    for i, entry in enumerate(manifest):
        missing = [key for key in MANIFEST_KEYS if key not in entry]
        if missing:
            raise ValueError(f"{path}: entry {i} ({entry.get('name')!r}) misses {', '.join(missing)}")
    return manifest


def manifest_model_files(manifest: list[dict]) -> dict[str, list[str]]:
    """What ComfyUI's `GET /models/<key>` would list once every manifest file
    is in place, keyed like `required_models` (e.g. a .gguf in models/unet is
    listed under `unet_gguf`, not `diffusion_models`)."""
    files: dict[str, list[str]] = {}
    for entry in manifest:
        filename, folder = entry["filename"], entry["folder"]
        gguf = filename.lower().endswith(".gguf")
        if folder in ("unet", "diffusion_models"):
            key = "unet_gguf" if gguf else "diffusion_models"
        elif folder in ("text_encoders", "clip"):
            key = "clip_gguf" if gguf else "text_encoders"
        else:
            key = folder
        files.setdefault(key, []).append(filename)
    return files


# --------------------------------------------------------------------------- schema helpers


def _input_spec(schema: dict, name: str):
    """(category, type, extra) of one input in an /object_info entry, or None."""
    for category in ("required", "optional"):
        spec = schema.get("input", {}).get(category, {}).get(name)
        if spec is not None:
            if isinstance(spec, str):
                return category, spec, {}
            extra = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            return category, spec[0], extra
    return None


def _is_combo(input_type) -> bool:
    # V1 combos give the options as the type itself; V3 combos say "COMBO".
    return isinstance(input_type, list) or input_type == "COMBO"


def _types_compatible(received, expected) -> bool:
    """ComfyUI's validate_node_input: equal, a "*" wildcard on either side, or
    comma-separated unions that share a member."""
    if _is_combo(received) and _is_combo(expected):
        return True
    if not isinstance(received, str) or not isinstance(expected, str):
        return False
    if received == expected:
        return True
    received_set = {t.strip() for t in received.split(",")}
    expected_set = {t.strip() for t in expected.split(",")}
    if "*" in received_set or "*" in expected_set:
        return True
    return bool(received_set & expected_set)


def _is_link(value) -> bool:
    # ComfyUI treats every list input value as a link ["node_id", slot].
    return isinstance(value, list)


def _model_folder(class_type: str, input_name: str, value) -> str | None:
    folder = MODEL_INPUTS.get((class_type, input_name)) or MODEL_INPUT_NAMES.get(input_name)
    # CLIPLoaderGGUF offers plain text_encoders files as well as .gguf ones,
    # but GET /models/clip_gguf lists only the .gguf files.
    if folder == "clip_gguf" and isinstance(value, str) and not value.lower().endswith(".gguf"):
        return "text_encoders"
    return folder


def _type_name(input_type) -> str:
    return "COMBO" if isinstance(input_type, list) else str(input_type)


def _show_options(options: list) -> str:
    shown = ", ".join(repr(o) for o in options[:10])
    return shown + (f", ... ({len(options)} in all)" if len(options) > 10 else "")


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------- validation


def validate_graph(
    graph: dict,
    object_info: dict,
    *,
    bindings: dict | None = None,
    output_node: str | None = None,
    model_files: dict[str, list[str]] | None = None,
) -> list[str]:
    """Human-readable problems with an API-format graph (empty: it is valid).

    Follows what ComfyUI's POST /prompt checks, against `object_info` (a
    GET /object_info answer). Model-file names are checked only when
    `model_files` ({folder key: [file names]}, see `required_models`) is given,
    because they depend on what the target server has downloaded.
    """
    if not isinstance(graph, dict) or not graph:
        return ["the graph has no nodes"]
    errors = []
    for node_id, node in graph.items():
        errors += _validate_node(graph, str(node_id), node, object_info, model_files)
    if bindings is not None:
        errors += _validate_bindings(graph, bindings, object_info)
    if output_node is not None:
        errors += _validate_output_node(graph, str(output_node), object_info)
    elif not any(
        object_info.get(node.get("class_type"), {}).get("output_node")
        for node in graph.values()
        if isinstance(node, dict)
    ):
        errors.append("the graph has no output node, so ComfyUI would run nothing")
    return errors


def _validate_node(graph, node_id, node, object_info, model_files) -> list[str]:
    if not isinstance(node, dict) or "class_type" not in node:
        return [f"node {node_id}: has no class_type"]
    class_type = node["class_type"]
    label = f"node {node_id} ({class_type})"
    schema = object_info.get(class_type)
    if schema is None:
        return [f"{label}: unknown class_type {class_type!r} (not in this server's /object_info; is its custom node installed?)"]
    inputs = node.get("inputs", {})
    if not isinstance(inputs, dict):
        return [f"{label}: inputs must be an object"]

    errors = []
    # Hidden inputs are filled by the server; inputs the schema does not name
    # are ignored by ComfyUI, so neither is checked.
    for category in ("required", "optional"):
        for name in schema.get("input", {}).get(category, {}):
            if name not in inputs:
                if category == "required":
                    errors.append(f"{label}: required input {name} is missing")
                continue
            _, input_type, extra = _input_spec(schema, name)
            value = inputs[name]
            if _is_link(value):
                errors += _check_link(graph, object_info, label, name, input_type, value)
            else:
                errors += _check_literal(label, class_type, name, input_type, extra, value, model_files)
    return errors


def _check_link(graph, object_info, label, name, input_type, link) -> list[str]:
    if len(link) != 2:
        return [f"{label}: {name} is a link {link!r}, which must be [node_id, output_slot]"]
    source_id, slot = link
    if not isinstance(source_id, str) or source_id not in graph:
        return [f"{label}: {name} links to node {source_id!r}, which is not in the graph"]
    source = graph[source_id]
    source_schema = object_info.get(source.get("class_type")) if isinstance(source, dict) else None
    if source_schema is None:
        return []  # the unknown source node is reported on its own
    source_label = f"node {source_id} ({source['class_type']})"
    outputs = source_schema.get("output", [])
    if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < len(outputs):
        return [f"{label}: {name} links to output {slot!r} of {source_label}, which has {len(outputs)} output(s)"]
    received = outputs[slot]
    if not _types_compatible(received, input_type):
        return [
            f"{label}: {name} expects {_type_name(input_type)} but output {slot} of "
            f"{source_label} is {_type_name(received)}"
        ]
    return []


def _check_literal(label, class_type, name, input_type, extra, value, model_files) -> list[str]:
    folder = _model_folder(class_type, name, value)
    if folder is not None and _is_combo(input_type):
        if not isinstance(value, str):
            return [f"{label}: {name} must be a file name, not {value!r}"]
        if model_files is None or (class_type == "VAELoader" and value in VIRTUAL_VAE_NAMES):
            return []
        if value not in model_files.get(folder, ()):
            return [f"{label}: {name} {value!r} is not among the {folder} models"]
        return []

    if any(extra.get(flag) for flag in UPLOAD_FLAGS):
        # Server-side the file only has to exist in input/; it is uploaded per job.
        if not isinstance(value, str):
            return [f"{label}: {name} must be a file name, not {value!r}"]
        return []

    if _is_combo(input_type):
        options = input_type if isinstance(input_type, list) else extra.get("options", [])
        if value not in options:
            return [f"{label}: {name} {value!r} is not one of {_show_options(options)}"]
        return []

    if input_type == "INT":
        if not isinstance(value, int) or isinstance(value, bool):
            return [f"{label}: {name} must be an integer, not {value!r}"]
    elif input_type == "FLOAT":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return [f"{label}: {name} must be a number, not {value!r}"]
    elif input_type == "STRING":
        if not isinstance(value, str):
            return [f"{label}: {name} must be a string, not {value!r}"]
        return []
    elif input_type == "BOOLEAN":
        if not isinstance(value, bool):
            return [f"{label}: {name} must be true or false, not {value!r}"]
        return []
    elif input_type == "*":
        return []
    else:
        return [f"{label}: {name} must be a link to a {_type_name(input_type)} output, not the value {value!r}"]

    if "min" in extra and value < extra["min"]:
        return [f"{label}: {name} {_number(value)} is below the minimum {_number(extra['min'])}"]
    if "max" in extra and value > extra["max"]:
        return [f"{label}: {name} {_number(value)} is above the maximum {_number(extra['max'])}"]
    return []


def _validate_bindings(graph, bindings, object_info) -> list[str]:
    if not isinstance(bindings, dict):
        return ["bindings must be an object of parameter -> [[node_id, input_name], ...]"]
    errors = []
    for param, entries in bindings.items():
        where = f"binding {param}"
        if param not in PARAMETERS:
            errors.append(f"{where}: not a job parameter (one of {', '.join(PARAMETERS)})")
            continue
        if not isinstance(entries, list):
            errors.append(f"{where}: must be a list of [node_id, input_name] entries")
            continue
        for entry in entries:
            if not isinstance(entry, list) or len(entry) not in (2, 3):
                errors.append(f"{where}: {entry!r} must be [node_id, input_name] or [node_id, input_name, transform]")
                continue
            node_id, name = str(entry[0]), entry[1]
            if len(entry) == 3 and entry[2] not in TRANSFORMS:
                errors.append(f"{where}: unknown transform {entry[2]!r} (known: {', '.join(TRANSFORMS)})")
            node = graph.get(node_id)
            if not isinstance(node, dict):
                errors.append(f"{where}: node {node_id} is not in the graph")
                continue
            class_type = node.get("class_type")
            schema = object_info.get(class_type)
            if schema is None:
                continue  # reported with the node
            label = f"node {node_id} ({class_type})"
            if _input_spec(schema, name) is None:
                errors.append(f"{where}: {label} has no input {name!r}")
            elif _is_link(node.get("inputs", {}).get(name)):
                errors.append(f"{where}: {label} input {name} is a link; a binding must replace a value")
    return errors


def _validate_output_node(graph, output_node, object_info) -> list[str]:
    node = graph.get(output_node)
    if not isinstance(node, dict):
        return [f"output node {output_node} is not in the graph"]
    schema = object_info.get(node.get("class_type"))
    if schema is None:
        return []  # reported with the node
    if not schema.get("output_node"):
        return [f"output node {output_node} ({node['class_type']}) is not an output node: it saves nothing"]
    return []


def validate_workflow(
    workflow: dict,
    object_info: dict,
    *,
    manifest: list[dict] | None = None,
    model_files: dict[str, list[str]] | None = None,
) -> list[str]:
    """`validate_graph` on a whole workflow file, plus: the graph stays valid
    once its defaults are filled in, and (with `manifest`) every model it
    loads is a manifest entry that the workflow lists in `models`."""
    missing = [key for key in WORKFLOW_KEYS if key not in workflow]
    if missing:
        return [f"workflow {workflow.get('slug')!r}: missing {', '.join(missing)}"]
    graph, bindings = workflow["graph"], workflow["bindings"]
    errors = validate_graph(
        graph, object_info, bindings=bindings, output_node=workflow["output_node"], model_files=model_files
    )
    if not errors:
        filled = fill(graph, bindings, workflow["defaults"])
        errors += [f"with the defaults: {e}" for e in validate_graph(filled, object_info, model_files=model_files)]
    if manifest is not None:
        by_name = {entry["name"]: entry for entry in manifest}
        unknown = [name for name in workflow["models"] if name not in by_name]
        errors += [f"models: {name!r} is not in the model manifest" for name in unknown]
        listed = {by_name[name]["filename"] for name in workflow["models"] if name in by_name}
        for folder, filename in required_models(graph, object_info):
            if filename not in listed:
                errors.append(f"models: the graph loads {filename!r} ({folder}), which the workflow's models do not list")
    return errors


# --------------------------------------------------------------------------- filling


def fill(graph: dict, bindings: dict, params: dict) -> dict:
    """A deep copy of `graph` with each bound parameter written into its
    inputs. Parameters without a binding, and None values, are skipped."""
    filled = copy.deepcopy(graph)
    for param, value in params.items():
        if value is None:
            continue
        for entry in bindings.get(param, ()):
            node_id, name = str(entry[0]), entry[1]
            if len(entry) > 2:
                if entry[2] not in TRANSFORMS:
                    raise ValueError(f"binding {param}: unknown transform {entry[2]!r}")
                node_value = TRANSFORMS[entry[2]](value)
            else:
                node_value = value
            filled[node_id].setdefault("inputs", {})[name] = node_value
    return filled


# --------------------------------------------------------------------------- models


def required_models(graph: dict, object_info: dict) -> list[tuple[str, str]]:
    """(folder key, file name) of every model file the graph loads, in graph
    order without repeats; ask ComfyUI `GET /models/<folder key>` for each."""
    found: list[tuple[str, str]] = []
    for node in graph.values():
        if not isinstance(node, dict):
            continue
        class_type = node.get("class_type")
        schema = object_info.get(class_type)
        for name, value in (node.get("inputs") or {}).items():
            if not isinstance(value, str):
                continue  # links, and non-file values
            folder = _model_folder(class_type, name, value)
            if folder is None:
                continue
            if schema is not None:
                spec = _input_spec(schema, name)
                if spec is None or not _is_combo(spec[1]):
                    continue
            if class_type == "VAELoader" and value in VIRTUAL_VAE_NAMES:
                continue
            if (folder, value) not in found:
                found.append((folder, value))
    return found


def structural_errors(graph, bindings, output_node) -> list[str]:
    """Checks that need no server schema: shape, links to existing nodes, bindings, output node."""
    if not isinstance(graph, dict) or not graph:
        return ["the graph must be a non-empty object of nodes"]
    errors = []
    for node_id, node in graph.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            errors.append(f"node {node_id}: needs a class_type")
            continue
        for name, value in (node.get("inputs") or {}).items():
            if _is_link(value) and str(value[0]) not in graph:
                errors.append(f"node {node_id} ({node['class_type']}): input {name} links to missing node {value[0]}")
    if str(output_node) not in graph:
        errors.append(f"output node {output_node} is not in the graph")
    if not isinstance(bindings, dict):
        return errors + ["bindings must be an object"]
    for param, targets in bindings.items():
        if param not in PARAMETERS:
            errors.append(f"binding {param!r} is not a job parameter ({', '.join(PARAMETERS)})")
            continue
        for target in targets if isinstance(targets, list) else [None]:
            if not (isinstance(target, list) and len(target) in (2, 3) and str(target[0]) in graph):
                errors.append(f"binding {param}: {target!r} must be [node_id, input_name] of a node in the graph")
            elif target[1] not in (graph[str(target[0])].get("inputs") or {}):
                errors.append(f"binding {param}: node {target[0]} has no input {target[1]!r}")
    return errors


def graph_models(slug: str) -> list[tuple[str, str]]:
    """(ComfyUI's model list name, file name) of every model the workflow's graph loads."""
    from generation.models import Workflow  # noqa: PLC0415 -- schema checks run before apps load (migrations, tests)

    wf = Workflow.objects.filter(slug=slug).first()
    if wf is None:
        return []
    wanted = []
    for node in wf.graph.values():
        for (cls, inp), folder in MODEL_INPUTS.items():
            if node.get("class_type") == cls and isinstance(node.get("inputs", {}).get(inp), str):
                wanted.append((folder, node["inputs"][inp]))
    return wanted
