"""Test-only ComfyUI nodes (installed into the e2e servers' custom_nodes, never shipped).

``MemKitTestPatchInPlace`` does what careless third-party nodes do: it patches the MODEL and CLIP
it is given *in place* (no clone) with a strong weight patch and a model_options change. If a
cached loader handed out its cached object, the next prompt would inherit the patch.

``MemKitTestEditWeightsInPlace`` writes into the MODEL's weight tensors themselves (the shared
weight store's isolation check).

``MemKitTestThirdPartyLoader`` mimics a third-party loader: it registers its own model folder
(``memkit_test_models``, .safetensors) at import and returns a custom type, ``MEMKIT_TEST_MODEL``,
an object without a ``clone`` method that records which load produced it.
``MemKitTestUseModel`` is an output node that consumes it and reports the weight's sum, the
object's id and its load number, so tests can tell a fresh load from a shared object.

``MemKitTestRememberConditioning`` stands for an earlier run that encoded a prompt with a text
encoder too large for the test machine (umt5-xxl): it puts a seeded conditioning into MemKit's
conditioning cache (RAM and disk) under the very key ``MemKitTextEncodeByName`` computes, so a
workflow that names that encoder must run without ever loading it (its ``device`` input, optional,
gives the key of an encoder loaded on that device).

``MemKitTestSlowLoader`` is a loader that takes its time, for faults injected during a preload: it
appends a line to its ``started_file``, then waits (at most ``wait_seconds``, ignoring /interrupt
as a loader reading a big file does) until its ``release_file`` exists, and returns a small object.

``MEMKIT_TEST_AUTH_LAYER`` (env) puts an authentication layer in front of this ComfyUI, as a login
node or a proxy does: ``1`` answers 401 to ``POST /prompt`` without an ``X-Test-Token`` header,
``redirect`` answers 302 to ``MEMKIT_TEST_REDIRECT_TO`` (another host). ``POST
/memkit_test/auth_layer`` with ``{"mode": "1" | "redirect"}`` switches between them at run time.
"""

import importlib
import logging
import os
import sys
import time

import comfy.utils
import folder_paths
import torch
from aiohttp import web

TEST_MODELS_FOLDER = "memkit_test_models"


def _register_test_models_folder() -> None:
    """The e2e servers' extra_model_paths.yaml (read before custom nodes are imported) may already
    have added the folder, with no extension filter; keep its paths, filter on .safetensors."""
    paths, extensions = folder_paths.folder_names_and_paths.get(TEST_MODELS_FOLDER, ([], set()))
    folder_paths.folder_names_and_paths[TEST_MODELS_FOLDER] = (paths, set(extensions) | {".safetensors"})
    folder_paths.add_model_folder_path(TEST_MODELS_FOLDER, os.path.join(folder_paths.models_dir, TEST_MODELS_FOLDER))


_register_test_models_folder()


class MemKitTestPatchInPlace:
    CATEGORY = "memkit_tests"
    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's V1 node API)
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",)}}

    def patch(self, model, clip):
        key = next(k for k in model.model_state_dict() if k.endswith("input_blocks.0.0.weight"))
        weight = model.model_state_dict()[key]
        model.add_patches({key: (torch.full_like(weight, 0.5),)}, strength_patch=4.0)
        model.model_options.setdefault("transformer_options", {})["memkit_test_marker"] = True
        clip_key = next(k for k in clip.get_sd() if k.endswith("token_embedding.weight"))
        clip.add_patches({clip_key: (torch.ones_like(clip.get_sd()[clip_key]),)}, strength_patch=2.0)
        origin = getattr(model, "_memkit_origin", None)  # set by MemKit on every clone it hands out
        cached = origin.parts if origin is not None else ()
        handed = "cached object" if any(model is p or clip is p for p in cached) else "clone"
        return (model, clip, f"memkit handed out: {handed}")


class MemKitTestEditWeightsInPlace:
    """Writes into the weights of the MODEL it is given (no patch, no clone): what a node that
    edits weights in place does. The cached model of this process changes for good; with shared
    weights, no other process and not the store file may see it."""

    CATEGORY = "memkit_tests"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "edit"

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's V1 node API)
        return {"required": {"model": ("MODEL",)}}

    def edit(self, model):
        weight = model.model.diffusion_model.input_blocks[0][0].weight
        with torch.no_grad():
            weight.mul_(3.0).add_(0.5)
        return (model,)


class MemKitTestModel:
    """What a third-party loader might return: a plain object, no ``clone``."""

    loads = 0  # loads in this process, over all instances

    def __init__(self, weight: torch.Tensor, mode: str, source: str):
        MemKitTestModel.loads += 1
        self.load_number = MemKitTestModel.loads  # which load produced this instance
        self.weight = weight
        self.mode = mode
        self.source = source


class MemKitTestThirdPartyLoader:
    CATEGORY = "memkit_tests"
    RETURN_TYPES = ("MEMKIT_TEST_MODEL", "STRING")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's V1 node API)
        return {"required": {
            "model_name": (folder_paths.get_filename_list(TEST_MODELS_FOLDER),),
            "scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.1}),
            "mode": (["fast", "exact"],),
        }}

    def load(self, model_name, scale, mode):
        path = folder_paths.get_full_path_or_raise(TEST_MODELS_FOLDER, model_name)
        weight = comfy.utils.load_torch_file(path)["weight"] * scale
        model = MemKitTestModel(weight, mode, model_name)
        return (model, f"{model_name} scale={scale} mode={mode} load={model.load_number}")


class MemKitTestUseModel:
    CATEGORY = "memkit_tests"
    RETURN_TYPES = ("STRING",)
    FUNCTION = "use"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's V1 node API)
        return {"required": {"test_model": ("MEMKIT_TEST_MODEL",)}}

    def use(self, test_model):
        text = (f"sum={test_model.weight.sum().item():.6f} id={id(test_model)} "
                f"load={test_model.load_number} mode={test_model.mode}")
        return {"ui": {"text": [text]}, "result": (text,)}


MEMKIT_PACKAGE = "comfyui-memkit"  # the folder name the e2e servers link the repository under


def _memkit_module(module):
    """A module of MemKit in this server (ComfyUI names a custom-node module after its folder path)."""
    name = next(n for n in list(sys.modules) if n == MEMKIT_PACKAGE or n.endswith("/" + MEMKIT_PACKAGE))
    return importlib.import_module(f"{name}.model_cache.{module}")


class MemKitTestRememberConditioning:
    CATEGORY = "memkit_tests"
    RETURN_TYPES = ("STRING",)
    FUNCTION = "remember"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's V1 node API)
        return {"required": {"clip_name": ("STRING", {"default": ""}), "type": ("STRING", {"default": "wan"}),
                             "text": ("STRING", {"multiline": True}), "seed": ("INT", {"default": 0}),
                             "tokens": ("INT", {"default": 16}), "width": ("INT", {"default": 4096})},
                "optional": {"device": ("STRING", {"default": "default"})}}

    @classmethod
    def IS_CHANGED(cls, **inputs):  # noqa: N802 (ComfyUI's V1 node API)
        return float("nan")  # always run

    def remember(self, clip_name, type, text, seed, tokens, width, device="default"):
        service = _memkit_module("service").get_service()
        text_encoder = _memkit_module("recipe").ModelKind.TEXT_ENCODER
        load = _memkit_module("loads").Load.loader(text_encoder, [clip_name], {"type": type, "device": device})
        key, _ = service.by_name_key(load, text)
        generator = torch.Generator().manual_seed(seed)
        conditioning = [[torch.randn((1, tokens, width), generator=generator) * 0.5, {}]]
        service.conditioning.put(key, conditioning, disk=True)
        return {"ui": {"text": [key]}, "result": (key,)}


class MemKitTestSlowLoader:
    CATEGORY = "memkit_tests"
    RETURN_TYPES = ("MEMKIT_TEST_MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's V1 node API)
        return {"required": {"started_file": ("STRING", {"default": ""}), "release_file": ("STRING", {"default": ""}),
                             "wait_seconds": ("INT", {"default": 120, "min": 0, "max": 600})}}

    def load(self, started_file, release_file, wait_seconds):
        with open(started_file, "a") as marker:  # one line per load: a test counts the loads that began
            marker.write(f"started {time.time()}\n")
        deadline = time.monotonic() + wait_seconds
        while not os.path.exists(release_file) and time.monotonic() < deadline:
            time.sleep(0.05)
        return (MemKitTestModel(torch.ones((4, 4)), "slow", os.path.basename(release_file)),)


AUTH_LAYER_ENV = "MEMKIT_TEST_AUTH_LAYER"
REDIRECT_ENV = "MEMKIT_TEST_REDIRECT_TO"
TOKEN_HEADER = "X-Test-Token"
_auth = {"mode": os.environ.get(AUTH_LAYER_ENV, "")}


@web.middleware
async def _auth_layer(request: web.Request, handler):
    """Refuse ``POST /prompt`` without the token, as a login node or a proxy would."""
    refused = request.method == "POST" and request.path in ("/prompt", "/api/prompt")
    if refused and not request.headers.get(TOKEN_HEADER):
        if _auth["mode"] == "redirect":
            return web.Response(status=302, headers={"Location": os.environ.get(REDIRECT_ENV, "http://127.0.0.2/")})
        return web.json_response({"error": "login required"}, status=401)
    return await handler(request)


def _install_auth_layer() -> None:
    from server import PromptServer

    server = getattr(PromptServer, "instance", None)
    if server is None:
        return
    server.app.middlewares.append(_auth_layer)

    @server.routes.post("/memkit_test/auth_layer")
    async def switch_auth_layer(request: web.Request) -> web.Response:
        _auth["mode"] = (await request.json())["mode"]
        return web.json_response(_auth)

    logging.getLogger("memkit.tests").info("test auth layer in front of POST /prompt: %s", _auth["mode"])


if _auth["mode"]:
    _install_auth_layer()


NODE_CLASS_MAPPINGS = {
    "MemKitTestSlowLoader": MemKitTestSlowLoader,
    "MemKitTestRememberConditioning": MemKitTestRememberConditioning,
    "MemKitTestPatchInPlace": MemKitTestPatchInPlace,
    "MemKitTestEditWeightsInPlace": MemKitTestEditWeightsInPlace,
    "MemKitTestThirdPartyLoader": MemKitTestThirdPartyLoader,
    "MemKitTestUseModel": MemKitTestUseModel,
}
