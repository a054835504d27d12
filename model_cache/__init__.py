"""Model cache manager: preload at start-up, hand out clones instantly, evict under a budget.

``manager``, ``recipe`` and ``config`` are plain Python; ``comfy_models`` and ``service`` talk
to ComfyUI's loaders and model management.
"""
