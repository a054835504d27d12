"""How MemKit reads ComfyUI's RAM-pressure headroom from its --cache-ram value, old and new forms."""

import pytest

from comfyui_memkit.model_cache.comfy_models import headroom_from_args


@pytest.mark.parametrize(("cache_ram", "default", "total", "expected"), [
    (0, False, 24, 0.0),            # 0.3.x, RAM-pressure caching off
    (4.0, False, 24, 4.0),          # 0.3.x --cache-ram (its const 4.0)
    (100000, False, 24, 100000.0),
    ([6.0, 64.0], True, 24, 6.0),   # v0.23+: [active_GB, inactive_GB]
    ([], True, 24, 2.4),            # v0.23+ default mode, no value: 10% of RAM ...
    (None, True, 8, 2.0),           # ... at least 2 GB
    (None, True, 512, 10.0),        # ... at most 10 GB
    (None, False, 24, 0.0),         # another cache mode chosen
])
def test_headroom_from_args(cache_ram, default, total, expected):
    assert headroom_from_args(cache_ram, ram_pressure_is_default=default, total_ram_gb=total) == pytest.approx(expected)
