"""Model cache manager: preload at start-up, hand out clones instantly, evict under a budget.

One job per module: ``cache`` (the store and its policy), ``recipe`` (what a load is keyed on),
``config`` (preload_config.json), ``aliases`` (cache keys), ``preload`` (progress, page-cache
reads), ``status`` (the report) are plain Python; ``comfy_models`` holds every call into ComfyUI
and ``service`` ties them together for the nodes and routes.
"""
