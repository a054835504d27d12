"""What the budget counts, measured on real ComfyUI models: the reservation before a load, patch
backups while a patched clone is loaded, and RAM mapped from a file apart from private RAM."""

from __future__ import annotations

import torch

from comfyui_memkit.model_cache import comfy_models
from comfyui_memkit.model_cache.loads import Load
from comfyui_memkit.model_cache.recipe import ModelKind

WAN_TINY = "memkit-wan21-t2v-tiny.safetensors"


def test_the_reservation_of_a_vae_is_what_comfyui_then_holds(make_service):
    """The SD VAE file is fp16; on a CPU ComfyUI holds it in float32: twice the file."""
    service = make_service()
    recipe = service.recipe(Load.loader(ModelKind.VAE, ["memkit-sd-vae.safetensors"], {}))
    outcome = service.request(Load.loader(ModelKind.VAE, ["memkit-sd-vae.safetensors"], {}))
    held = outcome.entry.footprint.ram
    assert abs(comfy_models.expected_ram(recipe) - held) <= 0.05 * held, (comfy_models.expected_ram(recipe), held)
    assert held > 1.8 * recipe.file_bytes, "the float32 model, not the fp16 file"
    assert comfy_models.load_peak_ram(recipe) == recipe.file_bytes + comfy_models.expected_ram(recipe)


def test_the_reservation_of_a_text_encoder_keeps_its_16_bit_weights(make_service):
    service = make_service()
    names = ["memkit-clip-l.safetensors"]
    load = Load.loader(ModelKind.TEXT_ENCODER, names, {"type": "stable_diffusion", "device": "default"})
    recipe = service.recipe(load)
    held = service.request(load).entry.footprint.ram
    assert abs(comfy_models.expected_ram(recipe) - held) <= 0.05 * held, (comfy_models.expected_ram(recipe), held)


def test_backups_of_weights_patched_in_place_count_against_the_budget(make_service):
    """A LoRA patched into a clone's weights makes ComfyUI keep the originals (the clone shares its
    parent's backup dict): memory the cached model costs while the clone is loaded."""
    service = make_service()
    outcome = service.request(Load.loader(ModelKind.DIFFUSION_MODEL, [WAN_TINY], {"weight_dtype": "default"}))
    before = comfy_models.footprint(outcome.value).ram
    model = outcome.value.parts[0]
    clone = model.clone()
    names = [name for name, _ in model.model.named_parameters() if name.endswith(".weight")][:4]
    weights = dict(model.model.named_parameters())
    clone.add_patches({name: (torch.ones_like(weights[name]),) for name in names}, 0.5)
    clone.patch_model(device_to=torch.device("cpu"))
    try:
        backed_up = sum(weights[name].numel() * weights[name].element_size() for name in names)
        assert comfy_models.footprint(outcome.value).ram == before + backed_up
    finally:
        clone.unpatch_model(device_to=torch.device("cpu"))
    assert comfy_models.footprint(outcome.value).ram == before


def test_weights_mapped_from_a_file_are_reported_apart_from_private_ram(tmp_path):
    """A loader that memory-maps its file (ComfyUI-GGUF, newer ComfyUI): the page cache holds
    those pages; only private memory is budgeted."""
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(4 * 2**20))
    mapped = torch.from_file(str(path), shared=False, size=2**20, dtype=torch.float32)
    private = torch.zeros(2**18)
    module = torch.nn.Module()
    module.register_buffer("mapped", mapped)
    module.register_buffer("private", private)
    measured = comfy_models.footprint(comfy_models.LoadedValue((module,)))
    assert measured.mapped == 4 * 2**20
    assert measured.ram == 2**20


def test_the_reservation_of_a_checkpoint_upcasts_its_unet_and_vae_but_not_its_text_encoder(make_service):
    service = make_service()
    names = ["memkit-sd15.safetensors"]
    recipe = service.recipe(Load.loader(ModelKind.CHECKPOINT, names, {}))
    held = service.request(Load.loader(ModelKind.CHECKPOINT, names, {})).entry.footprint.ram
    assert abs(comfy_models.expected_ram(recipe) - held) <= 0.05 * held, (comfy_models.expected_ram(recipe), held)
