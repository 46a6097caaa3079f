"""`spdbench doctor`: what this machine can run, on one screen, and what to fix first.

Why: a protocol run lasts hours on a GPU that is lent for short windows. A missing GPU, a broken
torch/torchvision pair, a dtype the device cannot run or a disk too small for SD1.5 should show up
in seconds here, not at hour two of a run. Every fact is measured (a tiny op per dtype, a real load
of each built-in target), never guessed from version numbers alone. The GPU benchmark lives in
`doctor_bench.py` (`spdbench doctor --bench`), the protocol cost model in `doctor_cost.py`.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from rich.console import Console
from rich.table import Table

from spdbench.targets import SD15_HUB_ID, load_target
from spdbench.targets.sd15_arch import SD15_TEXT, SD15_UNET, SD15_VAE

#: the levels of a check, mildest first; "error" means a built-in feature is unusable here
LEVELS = ("ok", "info", "warn", "error")
#: what a Stable Diffusion 1.5 download (fp32 safetensors of unet, vae, text encoder) takes on disk
SD15_DOWNLOAD_GB = 5.0
#: what one sd15-spd attack writes (int16 perturbations of 100 images x 5 eps, records) plus the
#: clean-edit cache (400 float32 edits at 512 px)
PROTOCOL_RUN_GB = 2.5
LIBRARIES = ("spdbench", "torch", "torchvision", "diffusers", "transformers", "huggingface_hub", "accelerate",
             "piq", "safetensors", "numpy", "rich")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class Check:
    """One line of the report: a fact, how it looks, and what to do about it when it looks bad."""

    section: str
    name: str
    value: str
    level: str = "ok"
    hint: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB"


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _short(exc: BaseException, limit: int = 160) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- machine and torch -------------------------------------------------------------------------
def _memory() -> tuple[Optional[int], Optional[int]]:
    """(total, available) RAM in bytes where the OS says (Linux: /proc/meminfo)."""
    total = avail = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    return total, avail


def _gpu_hardware_present() -> bool:
    """An NVIDIA device node or nvidia-smi: a GPU is there whether or not torch can use it."""
    return Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is not None


def machine_checks() -> list[Check]:
    total, avail = _memory()
    ram = " / ".join(x for x in (_gib(avail) + " free" if avail else "", _gib(total) + " total" if total else "") if x)
    return [
        Check("machine", "python", f"{platform.python_version()} ({platform.python_implementation()})"),
        Check("machine", "platform", platform.platform()),
        Check("machine", "cpu", f"{os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads"),
        Check("machine", "memory", ram or "unknown", "ok" if ram else "info"),
    ]


def torch_checks() -> list[Check]:
    """torch's build (CUDA, cuDNN) against the hardware, with the mismatch that costs the most time."""
    out = [Check("torch", "torch", torch.__version__)]
    built_cuda = torch.version.cuda
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    out.append(Check("torch", "build", f"CUDA {built_cuda}, cuDNN {cudnn}" if built_cuda else "CPU-only build"))
    available = torch.cuda.is_available()
    hardware = _gpu_hardware_present()
    if built_cuda and not available:
        hint = ("a GPU device is present but torch cannot use it: the NVIDIA driver may be too old for "
                f"CUDA {built_cuda}, or CUDA_VISIBLE_DEVICES hides it" if hardware else
                "fine for CPU runs (tests, --quick); on a CPU-only machine torch's CPU build is a much "
                "smaller install; SD1.5 runs need a GPU")
        out.append(Check("torch", "cuda", f"not available (CUDA {built_cuda} wheel, no usable GPU)", "warn", hint))
    elif not built_cuda and hardware:
        out.append(Check("torch", "cuda", "CPU-only torch on a machine with an NVIDIA GPU", "warn",
                         "install a CUDA build of torch (and the matching torchvision) to use the GPU"))
    elif available:
        out.append(Check("torch", "cuda", f"available, {torch.cuda.device_count()} device(s)"))
    else:
        out.append(Check("torch", "cuda", "no GPU (CPU only)", "info", "SD1.5 runs need a GPU; tests and --quick run here"))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append(Check("torch", "mps", "available (Apple GPU)", "info"))
    return out


def devices() -> list[str]:
    out = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append("mps")
    return out


def device_checks() -> list[Check]:
    out = []
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(i)
        try:
            free, total = torch.cuda.mem_get_info(i)
            mem = f"{_gib(free)} free / {_gib(total)}"
        except RuntimeError:
            mem = _gib(props.total_memory)
        out.append(Check("devices", f"cuda:{i}", f"{props.name}, {mem}, compute {props.major}.{props.minor}"))
    return out


def _dtype_probe(device: str, dtype: torch.dtype) -> float:
    """Seconds for a small conv + matmul forward and backward in `dtype` (after one warm-up call);
    raises where the device cannot run the dtype, and on a non-finite result."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 16, 64, 64, generator=gen).to(device, dtype).requires_grad_(True)
    w = (torch.rand(16, 16, 3, 3, generator=gen) * 0.1).to(device, dtype)
    m = (torch.rand(64, 64, generator=gen) * 0.1).to(device, dtype)

    def once() -> torch.Tensor:
        y = torch.nn.functional.conv2d(x, w, padding=1) @ m
        (g,) = torch.autograd.grad(y.float().square().mean(), x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return g

    once()
    seconds, g = min((_timed(once) for _ in range(3)), key=lambda r: r[0])
    if not bool(torch.isfinite(g).all()):
        raise FloatingPointError("non-finite gradient")
    return seconds


def dtype_checks(device_list: Optional[list[str]] = None) -> list[Check]:
    """Which dtypes each device runs (a real op, forward and backward), and how fast vs float32."""
    out = []
    for device in device_list or devices():
        results, base = [], None
        level, hint = "ok", ""
        for name in DTYPES:
            try:
                seconds = _dtype_probe(device, getattr(torch, name))
            except Exception as exc:  # noqa: BLE001 - any failure is the fact we report
                results.append(f"{name} FAILS ({_short(exc, 60)})")
                level = "error" if name == "float32" else max(level, "warn", key=LEVELS.index)
                hint = hint or f"pass --dtype float32 (or a dtype marked ok) on {device}"
                continue
            base = seconds if name == "float32" else base
            ratio = seconds / base if base else 1.0
            results.append(f"{name} ok" + (f" ({ratio:.1f}x f32 time)" if name != "float32" else ""))
            if device == "cpu" and name == "float16" and ratio > 3:
                level = max(level, "info", key=LEVELS.index)
                hint = hint or (f"float16 runs {ratio:.0f}x slower than float32 on this CPU (no native kernels):"
                                " use float32 or bfloat16 on CPU")
        out.append(Check("dtypes", device, ", ".join(results), level, hint))
    return out


# --- libraries ---------------------------------------------------------------------------------
def expected_torchvision(torch_version: str) -> Optional[str]:
    """The torchvision minor series a torch 2.x release pairs with (2.0 -> 0.15, ..., 2.14 -> 0.29)."""
    parts = torch_version.split("+")[0].split(".")
    if len(parts) < 2 or parts[0] != "2" or not parts[1].isdigit():
        return None
    return f"0.{int(parts[1]) + 15}"


def torchvision_problem(torch_version: str, tv_version: Optional[str]) -> Optional[str]:
    """Why this torchvision does not pair with this torch (version series or CUDA tag), or None."""
    if tv_version is None:
        return "torchvision is not installed (piq imports it)"
    want = expected_torchvision(torch_version)
    have = ".".join(tv_version.split("+")[0].split(".")[:2])
    if want is not None and have != want:
        return f"torch {torch_version} pairs with torchvision {want}.x, found {tv_version}"
    tag_t = torch_version.split("+")[1] if "+" in torch_version else None
    tag_v = tv_version.split("+")[1] if "+" in tv_version else None
    if tag_t and tag_v and tag_t != tag_v:
        return f"torch is a {tag_t} build but torchvision a {tag_v} build"
    return None


def library_checks() -> list[Check]:
    out = []
    versions = {name: _version(name) for name in LIBRARIES}
    required = [n for n in LIBRARIES if n not in ("rich",)]
    line = ", ".join(f"{n} {versions[n]}" for n in LIBRARIES if versions[n] and n not in ("spdbench", "torch"))
    out.append(Check("libraries", "versions", line))
    missing = [n for n in required if versions[n] is None]
    if missing:
        out.append(Check("libraries", "missing", ", ".join(missing), "error",
                         "reinstall spdbench with its dependencies: pip install -e ."))
    problem = torchvision_problem(torch.__version__, versions["torchvision"])
    try:  # the symptom of a mismatched pair is an import error or a missing C++ operator
        import torchvision  # deferred: the check is whether it imports beside this torch

        boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
        torchvision.ops.nms(boxes, torch.tensor([1.0, 0.5]), 0.5)
        importlib.import_module("piq")
    except Exception as exc:  # noqa: BLE001 - the failing import is the fact
        problem = f"{problem + '; ' if problem else ''}import fails: {_short(exc, 100)}"
    if problem:
        out.append(Check("libraries", "torch/torchvision", problem, "warn" if "import fails" not in problem else "error",
                         f"install the pair together: pip install torch=={torch.__version__.split('+')[0]} "
                         f"torchvision=={expected_torchvision(torch.__version__) or '<matching>'}.*"
                         " from the same package index"))
    else:
        out.append(Check("libraries", "torch/torchvision", f"pair ok ({versions['torchvision']})"))
    return out


# --- targets -----------------------------------------------------------------------------------
def _sd15_arch_meta() -> str:
    """Builds SD1.5's three models on the meta device (no memory, no time): checks that this diffusers /
    transformers accept the configs and counts parameters."""
    # deferred: diffusers takes seconds to import; only this check needs it
    from diffusers import AutoencoderKL, UNet2DConditionModel
    # deferred: transformers is slow to import; only this check needs it
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        models = (AutoencoderKL(**SD15_VAE), UNet2DConditionModel(**SD15_UNET),
                  CLIPTextModel(CLIPTextConfig(**SD15_TEXT)))
    n = sum(p.numel() for m in models for p in m.parameters())
    return f"{n / 1e9:.2f} B parameters, weights {_gib(4 * n)} fp32 / {_gib(2 * n)} fp16"


def _hub_cached(repo: str) -> Optional[str]:
    """The local snapshot folder of `repo` if its model_index.json is in the hub cache; never uses the network."""
    try:
        from huggingface_hub import try_to_load_from_cache  # deferred: a broken hub install is a finding, not a crash

        path = try_to_load_from_cache(repo, "model_index.json")
    except Exception:  # noqa: BLE001 - an unreadable cache is "not cached"
        return None
    return str(Path(path).parent) if isinstance(path, str) else None


def target_checks(build_all: bool = False) -> list[Check]:
    """Load each built-in target for real (the trained tiny one also encodes an image); the SD1.5
    architecture is only instantiated on the meta device unless `build_all`; the hub id is looked up
    in the local cache only."""
    out = []
    probe = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for name in ("tiny", "tiny-random"):
        try:
            seconds, target = _timed(lambda n=name: load_target(n))
            latent = target.encode(probe).mean
            if not bool(torch.isfinite(latent).all()):
                raise FloatingPointError("encoding a test image gave NaN/Inf")
            out.append(Check("targets", name, f"loads and encodes ({seconds:.1f} s)"))
        except Exception as exc:  # noqa: BLE001
            out.append(Check("targets", name, f"FAILS: {_short(exc)}", "error",
                             "reinstall spdbench (the tiny target ships in the package)"))
    try:
        if build_all:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            seconds, _ = _timed(lambda: load_target("sd15-arch-random", device=device))
            out.append(Check("targets", "sd15-arch-random", f"builds on {device} ({seconds:.1f} s); {_sd15_arch_meta()}"))
        else:
            out.append(Check("targets", "sd15-arch-random",
                             f"config ok, {_sd15_arch_meta()} (not built: ~15 s on CPU; --build-all builds it)"))
    except Exception as exc:  # noqa: BLE001
        out.append(Check("targets", "sd15-arch-random", f"FAILS: {_short(exc)}", "error",
                         "the installed diffusers/transformers reject SD1.5's configs; install the pinned versions "
                         "(pip install -c constraints.txt -e .)"))
    cached = _hub_cached(SD15_HUB_ID)
    if cached:
        out.append(Check("targets", "SD1.5 weights", f"{SD15_HUB_ID} cached in {cached}"))
    else:
        offline = "HF_HUB_OFFLINE=1" if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") else "hub not contacted"
        out.append(Check("targets", "SD1.5 weights", f"{SD15_HUB_ID} not cached ({offline}; local cache only)", "info",
                         f"sd15 suites need it: `hf download {SD15_HUB_ID} --local-dir DIR`, then "
                         "--target DIR"))
    return out


# --- folders and disk --------------------------------------------------------------------------
def cache_folders() -> dict[str, Path]:
    """Where spdbench and its libraries write: hub downloads, torch hub, compile cache, run folders."""
    try:
        from huggingface_hub import constants  # deferred: a broken hub install is a finding, not a crash

        hub = Path(constants.HF_HUB_CACHE)
    except Exception:  # noqa: BLE001
        hub = Path.home() / ".cache" / "huggingface" / "hub"
    user = os.environ.get("USER") or os.environ.get("USERNAME") or "user"
    inductor = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(tempfile.gettempdir(), f"torchinductor_{user}")
    return {"hub cache": hub, "torch hub": Path(torch.hub.get_dir()), "compile cache": Path(inductor),
            "runs (./spdbench-runs)": Path.cwd() / "spdbench-runs"}


def _free_bytes(path: Path) -> Optional[int]:
    """Free bytes on the filesystem that holds (or will hold) `path`."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def disk_checks(sd15_cached: bool) -> list[Check]:
    out = []
    for label, path in cache_folders().items():
        free = _free_bytes(path)
        state = "exists" if path.exists() else "not created yet"
        value = f"{path} ({state}; {_gib(free) + ' free' if free is not None else 'free space unknown'})"
        level, hint = "ok", ""
        if free is not None and label == "hub cache" and not sd15_cached and free < SD15_DOWNLOAD_GB * 2**30:
            level, hint = "warn", (f"SD1.5 needs ~{SD15_DOWNLOAD_GB:.0f} GB here; free space or set HF_HOME to a "
                                   "larger disk")
        if free is not None and label.startswith("runs") and free < PROTOCOL_RUN_GB * 2**30:
            level, hint = "warn", (f"an sd15-spd attack writes ~{PROTOCOL_RUN_GB} GB (perturbations, clean-edit "
                                   "cache); pass --out on a larger disk")
        out.append(Check("folders", label, value, level, hint))
    return out


# --- the report --------------------------------------------------------------------------------
def collect(build_all: bool = False) -> list[Check]:
    """Every check, in display order. Nothing here touches the network."""
    checks = machine_checks() + torch_checks() + device_checks() + dtype_checks() + library_checks()
    checks += target_checks(build_all)
    checks += disk_checks(_hub_cached(SD15_HUB_ID) is not None)
    return checks


def worst(checks: list[Check]) -> str:
    return max((c.level for c in checks), key=LEVELS.index, default="ok")


def render(checks: list[Check], console=None) -> None:
    """One table, then one line per warning with what to do."""
    console = console or Console()
    style = {"ok": "green", "info": "cyan", "warn": "yellow", "error": "bold red"}
    table = Table(title="spdbench doctor", show_header=False, expand=False, padding=(0, 1))
    table.add_column("check", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_column("level", justify="right", no_wrap=True)
    section = None
    for c in checks:
        if section is not None and c.section != section:
            table.add_section()
        table.add_row(c.name, c.value, f"[{style[c.level]}]{c.level}[/]")
        section = c.section
    console.print(table)
    for c in checks:
        if c.level in ("warn", "error") or (c.level == "info" and c.hint):
            console.print(f"[{style[c.level]}]{c.level.upper()}[/] {c.name}: {c.hint or c.value}")
    n_warn = sum(c.level == "warn" for c in checks)
    n_err = sum(c.level == "error" for c in checks)
    console.print(f"{n_err} error(s), {n_warn} warning(s)" + ("" if n_err else "; this machine can run spdbench"))
