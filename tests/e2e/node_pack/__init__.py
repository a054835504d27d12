"""Test-only ComfyUI nodes (installed into the e2e servers' custom_nodes, never shipped).

``MemKitTestPatchInPlace`` does what careless third-party nodes do: it patches the MODEL and CLIP
it is given *in place* (no clone) with a strong weight patch and a model_options change. If a
cached loader handed out its cached object, the next prompt would inherit the patch.
"""

import torch


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


NODE_CLASS_MAPPINGS = {"MemKitTestPatchInPlace": MemKitTestPatchInPlace}
