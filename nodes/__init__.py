"""Thin ComfyUI adapters (V3 nodes, HTTP routes) over the ``model_cache`` and ``vae_tiling`` cores."""
