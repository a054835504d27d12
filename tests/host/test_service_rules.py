"""Rules of the service against the real ComfyUI modules: interrupts, broken parts."""

from __future__ import annotations

import logging
import threading

import pytest

from comfyui_memkit.model_cache.loads import Load
from comfyui_memkit.model_cache.recipe import ModelKind

SD_VAE = "memkit-sd-vae.safetensors"
VAE = Load.loader(ModelKind.VAE, [SD_VAE])


def test_a_prompt_waiting_for_another_threads_load_honours_comfyui_interrupt(comfy_host, make_service, caplog):
    import comfy.model_management as mm

    service = make_service()
    recipe = service.recipe(VAE)
    started, release = threading.Event(), threading.Event()

    def slow_real_load():
        started.set()
        assert release.wait(30)
        from comfyui_memkit.model_cache import comfy_models

        return comfy_models.load(VAE.call, VAE.kind.kept_outputs)

    owner = threading.Thread(target=lambda: service.cache.get_or_load(recipe, slow_real_load, cache_key="vae:sd"))
    owner.start()
    assert started.wait(30)
    mm.interrupt_current_processing(True)  # what POST /interrupt does
    with caplog.at_level(logging.WARNING, logger="memkit"), pytest.raises(mm.InterruptProcessingException):
        service.request(VAE, executing_thread=True)
    assert not mm.processing_interrupted(), "the interrupt was consumed, as ComfyUI's own check does"
    assert "stopped waiting for vae:sd, which another thread is loading" in caplog.text
    release.set()
    owner.join(60)
    outcome = service.request(VAE, executing_thread=True)
    assert outcome.hit, "the load that was waited on finished and was cached"
    assert service.cache.loads == 1


def test_a_wait_off_the_executing_thread_ignores_a_prompt_interrupt(comfy_host, make_service):
    """An interrupt is for the running prompt; a start-up preload waiting for a load must not give up."""
    import comfy.model_management as mm

    from comfyui_memkit.model_cache import comfy_models

    service = make_service()
    recipe = service.recipe(VAE)
    cache_key = f"vae:{SD_VAE}"
    started, release = threading.Event(), threading.Event()

    def slow_real_load():
        started.set()
        assert release.wait(30)
        return comfy_models.load(VAE.call, VAE.kind.kept_outputs)

    owner = threading.Thread(target=lambda: service.cache.get_or_load(recipe, slow_real_load, cache_key=cache_key))
    owner.start()
    assert started.wait(30)
    mm.interrupt_current_processing(True)
    result, errors = {}, []

    def wait_off_thread():
        try:
            result["outcome"] = service.request(VAE, executing_thread=False)
        except BaseException as error:
            errors.append(error)

    waiter = threading.Thread(target=wait_off_thread)
    waiter.start()
    try:
        while service.cache.loading() != [(cache_key, 1)]:  # the waiter is inside the wait, interrupt pending
            assert waiter.is_alive(), errors
    finally:
        release.set()
        waiter.join(60)
        owner.join(60)
        interrupted = mm.processing_interrupted()
        mm.interrupt_current_processing(False)
    assert errors == []
    assert result["outcome"].hit
    assert interrupted, "the interrupt was left for the prompt it was meant for"


class BrokenSchemaNode:
    """A node written for another ComfyUI: its schema uses an input type this one lacks."""

    @classmethod
    def GET_SCHEMA(cls):  # noqa: N802 (ComfyUI's name)
        from comfy_api.latest import io

        return io.SomeInputTypeFromTheFuture.Input("x")


def test_one_node_whose_api_differs_is_left_out_with_one_line_and_the_rest_register(comfy_host, caplog):
    from types import SimpleNamespace

    from comfyui_memkit.nodes import cached_loaders, extension

    module = SimpleNamespace(NODES=[cached_loaders.MemKitVAELoader, BrokenSchemaNode,
                                    cached_loaders.MemKitCheckpointLoader])
    with caplog.at_level(logging.ERROR, logger="memkit"):
        nodes = extension._node_list("loaders_for_another_comfyui", module)
    assert nodes == [cached_loaders.MemKitVAELoader, cached_loaders.MemKitCheckpointLoader]
    (line,) = caplog.messages
    assert line.startswith("[memkit] node BrokenSchemaNode (nodes/loaders_for_another_comfyui.py) is left out on "
                           "ComfyUI 0.3.75: AttributeError")


def test_a_node_module_that_cannot_import_is_left_out_with_one_line(comfy_host, caplog):
    from comfyui_memkit.nodes import extension

    with caplog.at_level(logging.ERROR, logger="memkit"):
        assert extension._import_node_module("module_for_a_newer_comfyui") is None
    (line,) = caplog.messages
    assert "nodes/module_for_a_newer_comfyui.py could not be loaded on ComfyUI 0.3.75, its nodes are left out" in line


def test_every_shipped_node_registers_on_this_comfyui(comfy_host):
    import asyncio

    from comfyui_memkit.nodes import extension

    nodes = asyncio.run(extension.MemKitExtension.get_node_list(object.__new__(extension.MemKitExtension)))
    assert {n.GET_SCHEMA().node_id for n in nodes} >= {
        "MemKitCheckpointLoader", "MemKitTextEncoderLoader", "MemKitDiffusionModelLoader", "MemKitVAELoader",
        "MemKitCheckpointSelector", "MemKitTextEncoderSelector", "MemKitDiffusionModelSelector", "MemKitVAESelector",
        "MemKitCacheInfo", "MemKitCacheStatus", "MemKitPreload", "MemKitTiledVAEDecode", "MemKitTextEncode",
        "MemKitTextEncodeByName", "MemKitCachedNode", "MemKitReleaseEvicted"}


class InterruptedLoader:
    """A loader node that meets ComfyUI's /interrupt while it loads."""

    RETURN_TYPES = ("STRING",)
    FUNCTION = "load"
    CATEGORY = "memkit/tests"

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's name)
        return {"required": {}}

    def load(self):
        import comfy.model_management as mm

        mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()


def test_an_interrupt_during_a_load_is_an_interrupt_not_a_failed_load(comfy_host, make_service, monkeypatch):
    """Before ComfyUI 0.20 InterruptProcessingException is an Exception: the load's error handling
    must still let it through (no failure recorded, no stale copy served, the preload stops)."""
    import comfy.model_management as mm

    monkeypatch.setitem(comfy_host.nodes.NODE_CLASS_MAPPINGS, "MemKitTestInterruptedLoader", InterruptedLoader)
    service = make_service()
    with pytest.raises(mm.InterruptProcessingException):
        service.request(Load.node("MemKitTestInterruptedLoader", {}), executing_thread=True)
    assert service.cache.snapshot().entries == []
    assert service.cache.loading() == []
    assert not mm.processing_interrupted(), "consumed, as ComfyUI's own check does"
