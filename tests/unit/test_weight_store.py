"""The shared weight store's core: real files in /dev/shm, real flock, real child processes.

Every store lives in a fresh ``/dev/shm/memkit-unit-<uuid>`` folder of its own (the store wants a
directory of this user's, mode 0700). Child processes load ``weight_store.py`` straight from its
file (it imports nothing of the package), so they run exactly the code under test.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from comfyui_memkit.model_cache import weight_store
from comfyui_memkit.model_cache.weight_store import ALIGN, StoreError, WeightStore, unavailable_reason

pytestmark = pytest.mark.skipif(sys.platform != "linux" or not Path("/dev/shm").is_dir(),
                                reason="the weight store needs Linux and /dev/shm")

DEADLINE_S = 60.0  # generous: a loaded 2-core machine imports torch in a child in a few seconds
MODULE_FILE = Path(weight_store.__file__).resolve()

# Run in a child: the module loaded from its file, a store on argv[1], the key argv[2], a marker argv[3].
CHILD_PRELUDE = textwrap.dedent(f"""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("memkit_weight_store_child", {str(MODULE_FILE)!r})
    ws = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = ws
    spec.loader.exec_module(ws)
    directory, key, marker = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    store = ws.WeightStore(directory, max_bytes=1 << 40)
""")

HOLD_WRITER_LOCK = """
with store.writer_lock(key, 60) as held:
    assert held, "the child could not take the writer lock"
    marker.touch()
    sys.stdin.read()  # until the test closes our stdin
"""

HOLD_MAPPING = """
mapping = store.open(key)
assert mapping is not None, "the child found no file to map"
assert mapping.tensors()["w"].sum().item() > 0
marker.touch()
sys.stdin.read()  # until the test closes our stdin
"""

# Writes ~200 MB under one new key after another (removing each once written) until it is killed.
WRITE_FOREVER = """
import torch

data = torch.ones(200 * 2**20, dtype=torch.uint8)
for index in range(100_000):
    name = f"{key[:24]}{index:08x}"
    with store.writer_lock(name, 60) as held:
        assert held
        store.write(name, [("w", data)], {"index": index})
    store.remove_if_unmapped(name)
"""


# --- helpers --------------------------------------------------------------------------------------

def new_key() -> str:
    return uuid.uuid4().hex  # 32 hex digits: a valid store key


def files_of(store: WeightStore, key: str) -> list[str]:
    return sorted(p.name for p in store.directory.iterdir() if p.name.startswith(key))


def tmp_files(store: WeightStore) -> list[str]:
    return sorted(p.name for p in store.directory.iterdir() if ".tmp." in p.name)


def wait_for(condition: Callable[[], bool], what: str, child: subprocess.Popen | None = None) -> None:
    """Poll until ``condition()`` holds; fail (with the child's stderr) if the child dies first."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if child is not None and child.poll() is not None:
            raise AssertionError(f"the child exited ({child.returncode}) before {what}: "
                                 f"{child.stderr.read().decode(errors='replace')[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {DEADLINE_S:.0f} s waiting for {what}")
        time.sleep(0.002)


def finish(child: subprocess.Popen) -> None:
    """Let a child waiting on its stdin exit, and check it did so cleanly."""
    child.stdin.close()
    assert child.wait(DEADLINE_S) == 0, child.stderr.read().decode(errors="replace")[-2000:]


@pytest.fixture
def root():
    path = Path("/dev/shm") / f"memkit-unit-{uuid.uuid4().hex}"
    path.mkdir(mode=0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def store(root) -> WeightStore:
    created = WeightStore(root / "store", max_bytes=2**30)
    created.prepare()
    return created


@pytest.fixture
def spawn(root):
    """Start ``python -c <prelude + body> <store dir> <key> <marker>``; kills leftovers afterwards."""
    children: list[subprocess.Popen] = []

    def start(body: str, store: WeightStore, key: str, marker: Path) -> subprocess.Popen:
        child = subprocess.Popen([sys.executable, "-c", CHILD_PRELUDE + body, str(store.directory), key, str(marker)],
                                 stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        children.append(child)
        return child

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
        child.wait(DEADLINE_S)
        for stream in (child.stdin, child.stderr):
            if stream is not None:
                stream.close()


def sample_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    grid = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    return {
        "f32": torch.randn(3, 5, generator=generator),
        "f16": torch.randn(7, generator=generator).to(torch.float16),
        "bf16": torch.randn(2, 3, generator=generator).to(torch.bfloat16),
        "i64": torch.arange(-5, 6, dtype=torch.int64),
        "flags": torch.tensor([True, False, True, True]),
        "empty": torch.empty(0, 4),
        "transposed": grid.t(),  # not contiguous
        "slice": torch.arange(100, dtype=torch.int32)[10:30],  # a storage offset
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "bytes": torch.arange(3, dtype=torch.uint8),  # 3 bytes: the next tensor needs padding
        "after": torch.full((5,), -2.0),
    }


def read(store: WeightStore, key: str) -> dict[str, torch.Tensor]:
    """A fresh mapping's tensors, copied, the mapping closed (an unclosed one keeps its lock)."""
    mapping = store.open(key)
    assert mapping is not None, key
    try:
        return {name: view.clone() for name, view in mapping.tensors().items()}
    finally:
        mapping.close()


def write_one(store: WeightStore, key: str, value: float = 1.0, count: int = 1024, **info) -> torch.Tensor:
    tensor = torch.full((count,), value, dtype=torch.float32)
    store.write(key, [("w", tensor)], info)
    return tensor


# --- 1. round trip ----------------------------------------------------------------------------------

def test_written_tensors_map_back_equal_by_name_aligned_with_their_info(store):
    key, expected = new_key(), sample_tensors()
    assert not expected["transposed"].is_contiguous()
    info = {"class": "SDXL", "config": {"layers": [1, 2, 3], "scale": 0.5}, "note": "ü"}

    written = store.write(key, expected.items(), info)
    mapping = store.open(key)

    assert mapping is not None
    assert store.keys() == [key]
    assert mapping.manifest == written == store.manifest(key)
    assert mapping.manifest.info == info
    got = mapping.tensors()
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name
    items = sorted(mapping.manifest.tensors, key=lambda t: t.offset)
    assert all(item.offset % ALIGN == 0 for item in items)
    assert all(a.offset + a.nbytes <= b.offset for a, b in itertools.pairwise(items))  # no overlap
    assert mapping.manifest.size == (store.directory / f"{key}.weights").stat().st_size
    assert mapping.manifest.size % ALIGN == 0
    assert all(view.data_ptr() % ALIGN == 0 for view in got.values() if view.numel())
    assert all(mapping.holds(view) for name, view in got.items() if name != "empty")
    assert not mapping.holds(torch.zeros(4))
    assert not mapping.holds(expected["f32"])
    assert not mapping.holds(got["f32"].clone())


def test_a_rewritten_key_leaves_an_existing_mapping_on_the_old_data(store):
    key = new_key()
    old = write_one(store, key, 1.0)
    first = store.open(key)
    new = write_one(store, key, 2.0)
    second = store.open(key)
    assert torch.equal(first.tensors()["w"], old)
    assert torch.equal(second.tensors()["w"], new)
    assert store.keys() == [key]
    assert tmp_files(store) == []


def test_a_dtype_the_store_cannot_hold_is_refused_before_any_file_is_written(store):
    with pytest.raises(StoreError, match="complex128"):
        store.write(new_key(), [("ok", torch.ones(3)), ("z", torch.ones(3, dtype=torch.complex128))], {})
    assert list(store.directory.iterdir()) == []


def test_a_key_that_is_not_hex_is_refused(store):
    for bad in ("../../etc/passwd", "ABCDEF0123456789", "abc", "g" * 32):
        with pytest.raises(StoreError, match="not a store key"):
            store.open(bad)
    assert store.open(new_key()) is None  # a valid key with no file is a plain miss
    assert store.manifest(new_key()) is None


# --- 2. copy-on-write --------------------------------------------------------------------------------

def test_an_in_place_patch_stays_in_its_own_mapping(store):
    key = new_key()
    original = torch.arange(4096, dtype=torch.float32)  # 16 KB: four pages
    store.write(key, [("w", original)], {})
    file_bytes = (store.directory / f"{key}.weights").read_bytes()
    a, b = store.open(key), store.open(key)
    view_a, view_b = a.tensors()["w"], b.tensors()["w"]

    view_a.add_(1)

    assert torch.equal(view_a, original + 1)
    assert a.holds(view_a)  # patched in place: still the mapping's memory
    assert torch.equal(view_b, original)
    assert torch.equal(read(store, key)["w"], original)
    assert (store.directory / f"{key}.weights").read_bytes() == file_bytes
    assert a.private_bytes() >= original.nbytes  # the patched pages became A's own
    assert b.private_bytes() == 0


# --- 3. a writer killed mid-write ---------------------------------------------------------------------

def test_a_writer_killed_mid_write_leaves_nothing_a_reader_uses(store, root, spawn):
    prefix = new_key()
    for _attempt in range(5):  # a retry only if the kill lands just after a rename (rare)
        child = spawn(WRITE_FOREVER, store, prefix, root / "unused")
        wait_for(lambda: bool(tmp_files(store)), "the child's first temporary file", child)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(DEADLINE_S) == -signal.SIGKILL
        leftovers = tmp_files(store)
        if leftovers:
            break
    else:
        pytest.fail("five writers were never killed with a temporary file in place")
    killed = {name.split(".", 1)[0] for name in leftovers}
    assert len(killed) == 1
    key = killed.pop()
    assert all(name.endswith(f".tmp.{child.pid}") for name in leftovers)
    live_tmp = store.directory / f"{'e' * 16}.weights.tmp.{os.getpid()}"  # a live writer's: kept
    live_tmp.write_bytes(b"")

    assert store.open(key) is None
    assert store.manifest(key) is None
    assert key not in set(store.keys())
    with store.writer_lock(key, 5) as held:  # the kernel let go of the dead writer's lock
        assert held is True
    with store.writer_lock("e" * 16, 5) as writing:  # a live writer holds its key's lock
        assert writing is True
        removed = store.sweep(lambda manifest: False)

    assert set(leftovers) <= set(removed)
    assert tmp_files(store) == [live_tmp.name], "a temporary file whose writer holds the lock is kept"
    assert not (store.directory / f"{key}.weights").exists()  # also when killed between the two renames
    assert not (store.directory / f"{key}.json").exists()


# --- 4. the writer lock --------------------------------------------------------------------------------

def test_a_writer_lock_held_by_another_process_is_waited_for_then_free(store, root, spawn):
    key, marker = new_key(), root / "locked"
    child = spawn(HOLD_WRITER_LOCK, store, key, marker)
    wait_for(marker.exists, "the child to take the writer lock", child)

    started = time.monotonic()
    with store.writer_lock(key, wait_seconds=0.5) as held:
        assert held is False
    assert time.monotonic() - started >= 0.5

    finish(child)
    with store.writer_lock(key, wait_seconds=0.5) as held:
        assert held is True


def test_a_writer_lock_is_exclusive_and_an_interrupt_ends_the_wait(store):
    key = new_key()
    with store.writer_lock(key, 0) as first:
        assert first is True
        with store.writer_lock(key, 0.3) as second:  # another open file: flock excludes it too
            assert second is False
        started = time.monotonic()
        with store.writer_lock(key, 5, interrupted=lambda: True) as third:
            assert third is False
        assert time.monotonic() - started < 2.5
    with store.writer_lock(key, 0) as again:
        assert again is True


# --- 5. the cap ------------------------------------------------------------------------------------

def test_the_cap_removes_the_least_recently_mapped_unmapped_file(root):
    count = 16384  # float32: 64 KB a file
    store = WeightStore(root / "store", max_bytes=2 * 4 * count + 1000)  # two files fit, not three
    store.prepare()
    a, b, c, d, e = (new_key() for _ in range(5))

    def age(key: str, seconds: float) -> None:
        os.utime(store.directory / f"{key}.json", (seconds, seconds))

    write_one(store, a, 1.0, count)
    write_one(store, b, 2.0, count)
    age(a, 1000)
    age(b, 2000)
    store.open(a).close()  # mapping a makes it the most recently mapped
    write_one(store, c, 3.0, count)
    assert store.keys() == sorted([a, c])  # b was the least recently mapped
    assert files_of(store, b) == []

    mapped_a = store.open(a)  # a is mapped by this process from here on
    view_a = mapped_a.tensors()["w"]
    age(a, 1000)  # the oldest, but mapped
    age(c, 2000)
    write_one(store, d, 4.0, count)
    assert store.keys() == sorted([a, d])
    assert torch.equal(read(store, a)["w"], torch.full((count,), 1.0))

    mapped_d = store.open(d)
    with pytest.raises(StoreError, match="cap"):
        write_one(store, e, 5.0, count)
    assert store.keys() == sorted([a, d])
    assert files_of(store, e) == []
    assert tmp_files(store) == []

    mapped_a.close()  # lets go of the file's lock; the view keeps its memory
    mapped_d.close()
    age(a, 1000)
    age(d, 2000)
    write_one(store, e, 5.0, count)
    assert store.keys() == sorted([d, e])
    assert torch.equal(view_a, torch.full((count,), 1.0))  # still readable with its file removed


# --- 6. mappers ------------------------------------------------------------------------------------

def test_mappers_counts_the_processes_that_map_a_file(store, root, spawn):
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            locks.read()
    except OSError as error:
        pytest.skip(f"/proc/locks cannot be read: {error}")
    key, marker = new_key(), root / "mapped"
    write_one(store, key, 1.0)
    assert store.mappers(key) == 0
    remover = os.open(store.directory / f"{key}.weights", os.O_RDONLY)
    try:
        fcntl.flock(remover, fcntl.LOCK_EX)  # as remove_if_unmapped takes it: not a mapper
        assert store.mappers(key) == 0
    finally:
        os.close(remover)

    first, second = store.open(key), store.open(key)
    assert store.mappers(key) == 1  # one process, however many mappings
    child = spawn(HOLD_MAPPING, store, key, marker)
    wait_for(marker.exists, "the child to map the file", child)
    assert store.mappers(key) == 2

    finish(child)
    assert store.mappers(key) == 1
    first.close()
    assert store.mappers(key) == 1
    second.close()
    assert store.mappers(key) == 0
    assert store.mappers(new_key()) is None  # no such file


# --- 7. a damaged file -------------------------------------------------------------------------------

def _truncate_weights(weights: Path, manifest: Path) -> None:
    os.truncate(weights, 64)


def _garble_manifest(weights: Path, manifest: Path) -> None:
    manifest.write_text('{"format": 1, "key": ', encoding="utf-8")


def _rewrite_manifest(change: Callable[[dict], None]) -> Callable[[Path, Path], None]:
    def damage(weights: Path, manifest: Path) -> None:
        raw = json.loads(manifest.read_text(encoding="utf-8"))
        change(raw)
        manifest.write_text(json.dumps(raw), encoding="utf-8")
    return damage


@pytest.mark.parametrize("damage", [
    _truncate_weights,
    _garble_manifest,
    _rewrite_manifest(lambda raw: raw.update(key="0" * 32)),
    _rewrite_manifest(lambda raw: raw.update(format=99)),
    _rewrite_manifest(lambda raw: raw["tensors"][0].__setitem__(1, "float128")),
    _rewrite_manifest(lambda raw: raw["tensors"][0].__setitem__(slice(2, 4), [[1000], 8])),  # in bounds, unaligned
    _rewrite_manifest(lambda raw: raw["tensors"][0].__setitem__(3, 64)),  # aligned, past the end
    _rewrite_manifest(lambda raw: raw.update(bytes=raw["bytes"] + 64)),  # not the file's size
    _rewrite_manifest(lambda raw: raw.pop("tensors")),
], ids=["truncated-weights", "garbled-manifest", "other-key", "other-format", "unknown-dtype",
        "unaligned-offset", "offset-past-end", "size-mismatch", "no-tensors"])
def test_a_file_that_does_not_match_its_manifest_is_a_miss_and_removed(store, damage):
    key, other = new_key(), new_key()
    write_one(store, key, 1.0)
    write_one(store, other, 2.0)
    damage(store.directory / f"{key}.weights", store.directory / f"{key}.json")

    assert store.open(key) is None

    assert files_of(store, key) == []
    assert store.keys() == [other]
    assert torch.equal(read(store, other)["w"], torch.full((1024,), 2.0))


@pytest.mark.parametrize("text", ["[]", "null", "1", '"text"'])
def test_a_manifest_that_is_json_but_not_an_object_is_a_miss(store, text):
    key = new_key()
    write_one(store, key, 1.0)
    (store.directory / f"{key}.json").write_text(text, encoding="utf-8")

    assert store.manifest(key) is None
    assert store.open(key) is None
    assert files_of(store, key) == []


# --- 8. the directory ----------------------------------------------------------------------------------

def test_prepare_creates_a_private_directory_and_accepts_it_again(root):
    store = WeightStore(root / "store", max_bytes=2**20)
    store.prepare()
    assert stat.S_IMODE(os.stat(store.directory).st_mode) == 0o700
    store.prepare()
    os.chmod(store.directory, 0o755)  # readable by others is fine: nobody else can write
    store.prepare()


@pytest.mark.parametrize("mode", [0o777, 0o720, 0o702], ids=oct)
def test_prepare_refuses_a_directory_others_can_write(root, mode):
    store = WeightStore(root / "store", max_bytes=2**20)
    store.prepare()
    os.chmod(store.directory, mode)
    with pytest.raises(StoreError, match=f"writable by others .*{oct(mode)}"):
        store.prepare()


def test_prepare_refuses_a_file_a_symlink_and_a_missing_parent(root):
    (root / "plain").write_text("not a directory")
    with pytest.raises(StoreError, match=r"File exists|not a directory"):
        WeightStore(root / "plain", max_bytes=2**20).prepare()
    (root / "real").mkdir(mode=0o700)
    (root / "link").symlink_to(root / "real")
    with pytest.raises(StoreError, match="not a directory"):
        WeightStore(root / "link", max_bytes=2**20).prepare()
    with pytest.raises(StoreError, match="cannot use"):
        WeightStore(root / "missing" / "store", max_bytes=2**20).prepare()
    assert "does not exist" in unavailable_reason(root / "missing" / "store")
    assert unavailable_reason(root / "store") is None


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to give a directory away")
def test_prepare_refuses_a_directory_of_another_user(root):
    store = WeightStore(root / "store", max_bytes=2**20)
    store.prepare()
    os.chown(store.directory, 65534, -1)
    with pytest.raises(StoreError, match="belongs to uid 65534"):
        store.prepare()


# --- 9. sweep ----------------------------------------------------------------------------------------

def test_sweep_removes_stale_unmapped_files_and_keeps_mapped_ones(store):
    stale, stale_mapped, fresh = new_key(), new_key(), new_key()
    write_one(store, stale, 1.0, model="old")
    write_one(store, stale_mapped, 2.0, model="old")
    write_one(store, fresh, 3.0, model="new")
    mapping = store.open(stale_mapped)
    seen = []

    def is_stale(manifest) -> bool:
        seen.append(manifest.key)
        return manifest.info["model"] == "old"

    assert store.sweep(is_stale) == [stale]
    assert sorted(seen) == sorted([stale, stale_mapped, fresh])
    assert files_of(store, stale) == []
    assert store.keys() == sorted([stale_mapped, fresh])
    assert torch.equal(mapping.tensors()["w"], torch.full((1024,), 2.0))

    mapping.close()
    assert store.sweep(is_stale) == [stale_mapped]
    assert store.keys() == [fresh]


def test_sweep_removes_weights_without_a_manifest_only_once_their_writer_is_gone(store):
    key = new_key()
    write_one(store, key, 1.0)
    (store.directory / f"{key}.json").unlink()  # as if its writer stopped between the two renames
    with store.writer_lock(key, 0) as held:
        assert held
        assert store.sweep(lambda manifest: True) == []
        assert (store.directory / f"{key}.weights").exists()
    assert store.sweep(lambda manifest: True) == [key]
    assert files_of(store, key) == []
