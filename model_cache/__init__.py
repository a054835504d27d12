"""Model cache manager: preload at start-up, hand out clones instantly, evict under a budget.

One job per module, plain Python unless named: ``cache`` (the store, its budget and eviction
policy), ``loads`` (what is asked for: a node call under a kind label; the four model kinds are
sugar for ComfyUI's loaders), ``recipe`` (what a load is keyed on: the call, its files and their
identity on disk),
``config`` (preload_config.json, validated), ``cache_keys`` (the names users see, and which
ones a selector offers), ``node_inputs`` (a loader node's inputs checked against its schema),
``preload`` (the preload lifecycle and page-cache reads), ``conditioning`` (cached text-encoder
outputs, in RAM and on disk), ``bounded`` (bounded echoes of untrusted input) and ``status`` (the
one report the routes, panel and Cache Info read). ``comfy_models`` holds every call into ComfyUI
(and reads the running prompt and ComfyUI's RAM headroom), and ``service`` ties them together:
its entry points do a node's whole turn, so a node's ``execute`` is one call.
"""
