import copy
import json
from pathlib import Path

import pytest

from generation.workflow_schema import (
    WORKFLOWS_DIR,
    fill,
    load_manifest,
    load_workflow_file,
    manifest_model_files,
    required_models,
    shipped_workflows,
    validate_graph,
    validate_workflow,
)

OBJECT_INFO_PATH = Path(__file__).resolve().parents[1] / "fixtures/comfyui_object_info.json"


@pytest.fixture(scope="module")
def object_info():
    return json.loads(OBJECT_INFO_PATH.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def manifest():
    return load_manifest()


@pytest.fixture
def wan():
    return load_workflow_file(WORKFLOWS_DIR / "wan22-i2v.json")


@pytest.fixture
def smoke():
    return load_workflow_file(WORKFLOWS_DIR / "smoke.json")


def check(workflow, object_info, **kwargs):
    return validate_graph(
        workflow["graph"],
        object_info,
        bindings=workflow["bindings"],
        output_node=workflow["output_node"],
        **kwargs,
    )


# --------------------------------------------------------------------------- shipped data


def test_shipped_workflows_lists_wan_and_smoke_but_not_manifest():
    assert sorted(wf["slug"] for wf in shipped_workflows()) == ["smoke", "wan22-i2v"]


@pytest.mark.parametrize("slug", ["wan22-i2v", "smoke"])
def test_shipped_workflow_valid_against_object_info_with_manifest_models(slug, object_info, manifest):
    workflow = next(wf for wf in shipped_workflows() if wf["slug"] == slug)
    errors = validate_workflow(
        workflow, object_info, manifest=manifest, model_files=manifest_model_files(manifest)
    )
    assert errors == []


def test_shipped_workflow_valid_with_params_filled(object_info):
    params = {
        "image": "uploads/abc.png",
        "prompt": "a cat",
        "negative_prompt": "",
        "seed": 2**64 - 1,
        "width": 480,
        "height": 832,
        "frames": 49,
        "fps": 24,
        "steps": 6,
        "filename_prefix": "video/job-1",
    }
    for workflow in shipped_workflows():
        filled = fill(workflow["graph"], workflow["bindings"], params)
        assert validate_graph(filled, object_info, output_node=workflow["output_node"]) == []


def test_manifest_entries_complete_and_consistent(manifest):
    names = [entry["name"] for entry in manifest]
    assert len(names) == len(set(names))
    for entry in manifest:
        assert entry["r2_key"] == f"models/{entry['folder']}/{entry['filename']}"
        assert entry["folder"] in {"unet", "diffusion_models", "loras", "text_encoders", "vae"}
        assert entry["size"] is None or isinstance(entry["size"], int)
        assert entry["sha256"] is None or len(entry["sha256"]) == 64


def test_workflow_models_all_in_manifest(manifest, object_info):
    by_name = {entry["name"]: entry for entry in manifest}
    for workflow in shipped_workflows():
        assert set(workflow["models"]) <= set(by_name)
        listed = {by_name[name]["filename"] for name in workflow["models"]}
        referenced = {filename for _, filename in required_models(workflow["graph"], object_info)}
        assert referenced == listed


def test_wan_model_files_offered_by_real_server(wan, object_info):
    # object_info.json came from a server with these exact files installed.
    for node in wan["graph"].values():
        for name in ("unet_name", "clip_name", "lora_name", "vae_name"):
            if name in node["inputs"]:
                options = object_info[node["class_type"]]["input"]["required"][name][0]
                assert node["inputs"][name] in options


def test_wan_lora_on_high_noise_pass_only(wan):
    graph = wan["graph"]
    assert "102" not in graph
    assert graph["103"]["inputs"]["model"] == ["96", 0]
    assert graph["104"]["inputs"]["model"] == ["101", 0]
    assert graph["101"]["inputs"]["model"] == ["95", 0]
    assert graph["96"]["inputs"]["unet_name"] == "wan22EnhancedNSFWCameraPrompt_nsfwFASTMOVEV2Q8H.gguf"


def test_wan_defaults_match_graph(wan):
    filled = fill(wan["graph"], wan["bindings"], wan["defaults"])
    assert filled == wan["graph"]
    assert wan["defaults"] == {"width": 832, "height": 480, "frames": 81, "fps": 16, "steps": 4}


# --------------------------------------------------------------------------- required_models


def test_required_models_wan_folder_keys(wan, object_info):
    assert required_models(wan["graph"], object_info) == [
        ("text_encoders", "umt5_xxl_fp8_e4m3fn_scaled.safetensors"),
        ("vae", "wan_2.1_vae.safetensors"),
        ("unet_gguf", "Wan2.2-I2V-A14B-HighNoise-Q4_K_M.gguf"),
        ("unet_gguf", "wan22EnhancedNSFWCameraPrompt_nsfwFASTMOVEV2Q8H.gguf"),
        ("loras", "wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors"),
    ]


def test_required_models_smoke_none(smoke, object_info):
    assert required_models(smoke["graph"], object_info) == []


def test_required_models_other_loaders_folder_keys(object_info):
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "a.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "b.safetensors"}},
        "3": {"class_type": "CLIPLoaderGGUF", "inputs": {"clip_name": "c.gguf", "type": "wan"}},
        "4": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
        "5": {"class_type": "LoraLoader", "inputs": {"lora_name": "d.safetensors"}},
    }
    assert required_models(graph, object_info) == [
        ("diffusion_models", "a.safetensors"),
        ("checkpoints", "b.safetensors"),
        ("clip_gguf", "c.gguf"),
        ("loras", "d.safetensors"),
    ]


# --------------------------------------------------------------------------- negative cases


def test_validate_graph_unknown_class(wan, object_info):
    wan["graph"]["87"]["class_type"] = "VAEDecodeTurbo"
    assert check(wan, object_info) == [
        "node 87 (VAEDecodeTurbo): unknown class_type 'VAEDecodeTurbo' "
        "(not in this server's /object_info; is its custom node installed?)"
    ]


def test_validate_graph_missing_required_input(wan, object_info):
    del wan["graph"]["98"]["inputs"]["batch_size"]
    assert check(wan, object_info) == ["node 98 (WanImageToVideo): required input batch_size is missing"]


def test_validate_graph_optional_and_hidden_inputs_may_be_absent(wan, object_info):
    del wan["graph"]["84"]["inputs"]["device"]  # optional
    # SaveVideo's hidden prompt/extra_pnginfo are never in the graph
    assert check(wan, object_info) == []


def test_validate_graph_dangling_link(wan, object_info):
    wan["graph"]["87"]["inputs"]["samples"] = ["999", 0]
    assert check(wan, object_info) == [
        "node 87 (VAEDecode): samples links to node '999', which is not in the graph"
    ]


def test_validate_graph_link_slot_out_of_range(wan, object_info):
    wan["graph"]["87"]["inputs"]["samples"] = ["85", 1]
    assert check(wan, object_info) == [
        "node 87 (VAEDecode): samples links to output 1 of node 85 (KSamplerAdvanced), which has 1 output(s)"
    ]


def test_validate_graph_wrong_output_slot_type(wan, object_info):
    wan["graph"]["86"]["inputs"]["latent_image"] = ["98", 0]
    assert check(wan, object_info) == [
        "node 86 (KSamplerAdvanced): latent_image expects LATENT but output 0 of "
        "node 98 (WanImageToVideo) is CONDITIONING"
    ]


def test_validate_graph_wildcard_and_union_types_accepted(object_info):
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
    }
    assert validate_graph(graph, object_info, output_node="2") == []


def test_validate_graph_number_above_maximum(wan, object_info):
    wan["graph"]["98"]["inputs"]["width"] = 20000
    assert check(wan, object_info) == [
        "node 98 (WanImageToVideo): width 20000 is above the maximum 16384"
    ]


def test_validate_graph_number_below_minimum(wan, object_info):
    wan["graph"]["94"]["inputs"]["fps"] = 0.5
    assert check(wan, object_info) == ["node 94 (CreateVideo): fps 0.5 is below the minimum 1"]


def test_validate_graph_wrong_literal_type(wan, object_info):
    wan["graph"]["98"]["inputs"]["length"] = "81"
    wan["graph"]["93"]["inputs"]["text"] = 5
    wan["graph"]["98"]["inputs"]["vae"] = "wan_2.1_vae.safetensors"
    assert sorted(check(wan, object_info)) == sorted([
        "node 98 (WanImageToVideo): length must be an integer, not '81'",
        "node 93 (CLIPTextEncode): text must be a string, not 5",
        "node 98 (WanImageToVideo): vae must be a link to a VAE output, not the value 'wan_2.1_vae.safetensors'",
    ])


def test_validate_graph_bad_combo_value(wan, object_info):
    wan["graph"]["86"]["inputs"]["scheduler"] = "warp"
    wan["graph"]["108"]["inputs"]["format"] = "gif"  # a V3 COMBO
    errors = check(wan, object_info)
    assert len(errors) == 2
    assert errors[0].startswith("node 86 (KSamplerAdvanced): scheduler 'warp' is not one of 'simple', ")
    assert errors[1] == "node 108 (SaveVideo): format 'gif' is not one of 'auto', 'mp4'"


def test_validate_graph_load_image_accepts_any_file_name(wan, object_info):
    wan["graph"]["97"]["inputs"]["image"] = "jobs/3f2a/input.png"
    assert check(wan, object_info) == []


def test_validate_graph_model_files_unchecked_without_model_files(wan, object_info):
    wan["graph"]["95"]["inputs"]["unet_name"] = "not-downloaded.gguf"
    assert check(wan, object_info) == []


def test_validate_graph_missing_model_file_with_model_files(wan, object_info, manifest):
    model_files = manifest_model_files(manifest)
    model_files["loras"] = []
    assert check(wan, object_info, model_files=model_files) == [
        "node 101 (LoraLoaderModelOnly): lora_name "
        "'wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors' is not among the loras models"
    ]


def test_validate_graph_binding_to_nonexistent_input(wan, object_info):
    wan["bindings"]["width"] = [["98", "widht"]]
    wan["bindings"]["height"] = [["500", "height"]]
    assert check(wan, object_info) == [
        "binding width: node 98 (WanImageToVideo) has no input 'widht'",
        "binding height: node 500 is not in the graph",
    ]


def test_validate_graph_binding_unknown_parameter_or_transform(wan, object_info):
    wan["bindings"]["promt"] = [["93", "text"]]
    wan["bindings"]["steps"].append(["85", "steps", "third"])
    errors = check(wan, object_info)
    assert len(errors) == 2
    assert errors[0] == "binding steps: unknown transform 'third' (known: half)"
    assert errors[1].startswith("binding promt: not a job parameter")


def test_validate_graph_binding_onto_link(wan, object_info):
    wan["bindings"]["image"] = [["98", "start_image"]]
    assert check(wan, object_info) == [
        "binding image: node 98 (WanImageToVideo) input start_image is a link; a binding must replace a value"
    ]


def test_validate_graph_output_node_not_output(wan, object_info):
    wan["output_node"] = "94"
    assert check(wan, object_info) == ["output node 94 (CreateVideo) is not an output node: it saves nothing"]


def test_validate_graph_output_node_missing(wan, object_info):
    wan["output_node"] = "7"
    assert check(wan, object_info) == ["output node 7 is not in the graph"]


def test_validate_graph_without_any_output_node(smoke, object_info):
    del smoke["graph"]["6"]
    assert validate_graph(smoke["graph"], object_info) == [
        "the graph has no output node, so ComfyUI would run nothing"
    ]


# --------------------------------------------------------------------------- fill


def test_fill_applies_params_and_steps_split(wan):
    original = copy.deepcopy(wan["graph"])
    filled = fill(
        wan["graph"],
        wan["bindings"],
        {
            "image": "in/job.png",
            "prompt": "a cat walks",
            "negative_prompt": "blurry",
            "seed": 42,
            "width": 480,
            "height": 832,
            "frames": 49,
            "fps": 24,
            "steps": 8,
            "filename_prefix": "video/job-7",
        },
    )
    assert wan["graph"] == original
    inputs = {node_id: node["inputs"] for node_id, node in filled.items()}
    assert inputs["97"]["image"] == "in/job.png"
    assert inputs["93"]["text"] == "a cat walks"
    assert inputs["89"]["text"] == "blurry"
    assert inputs["86"]["noise_seed"] == inputs["85"]["noise_seed"] == 42
    assert (inputs["98"]["width"], inputs["98"]["height"], inputs["98"]["length"]) == (480, 832, 49)
    assert inputs["94"]["fps"] == 24
    assert inputs["86"]["steps"] == inputs["85"]["steps"] == 8
    assert (inputs["86"]["start_at_step"], inputs["86"]["end_at_step"]) == (0, 4)
    assert (inputs["85"]["start_at_step"], inputs["85"]["end_at_step"]) == (4, 8)
    assert inputs["108"]["filename_prefix"] == "video/job-7"


def test_fill_odd_steps_split_rounds_down(wan):
    filled = fill(wan["graph"], wan["bindings"], {"steps": 5})
    assert filled["86"]["inputs"]["end_at_step"] == filled["85"]["inputs"]["start_at_step"] == 2
    assert filled["85"]["inputs"]["end_at_step"] == 5


def test_fill_unbound_and_none_params_ignored(smoke):
    filled = fill(smoke["graph"], smoke["bindings"], {"prompt": "ignored", "steps": 30, "seed": None})
    assert filled == smoke["graph"]
    assert filled is not smoke["graph"]


def test_fill_returns_deep_copy(smoke):
    filled = fill(smoke["graph"], smoke["bindings"], {"seed": 7})
    filled["2"]["inputs"]["image"][0] = "changed"
    assert smoke["graph"]["2"]["inputs"]["image"] == ["1", 0]
    assert smoke["graph"]["4"]["inputs"]["seed"] == 0
    assert filled["4"]["inputs"]["seed"] == 7


# --------------------------------------------------------------------------- files


def test_load_workflow_file_missing_keys(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text(json.dumps({"slug": "broken", "graph": {}}))
    with pytest.raises(ValueError, match="missing name, description, output_node, bindings, models, defaults"):
        load_workflow_file(path)
