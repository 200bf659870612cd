"""What this machine can train: CUDA GPUs, Apple MPS, CPU and RAM, bitsandbytes, and what fits.

Light by design: without an NVIDIA GPU nothing heavy is imported (GPUs are found through NVML,
the driver's own library, via ``pynvml``). torch and bitsandbytes are imported only once NVML has
reported a GPU, to check bf16 and run a real 4-bit forward pass on it.
"""

from __future__ import annotations

import os
import platform
import re
import warnings
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version

from ftkit.errors import UsageError

GIB = 1024**3
METHODS = ("full", "lora", "qlora")
BNB_CPU_4BIT_SINCE = (0, 48)  # bitsandbytes releases from here on run 4-bit layers on CPU

_UNITS = {"": GIB, "g": GIB, "gb": GIB, "gib": GIB, "m": 1024**2, "mb": 1024**2, "mib": 1024**2,
          "t": 1024**4, "tb": 1024**4, "tib": 1024**4}
_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_memory_size(text: str, option: str = "--gpu-mem") -> int:
    """Bytes in a memory size such as ``24``, ``24GB``, ``24GiB``, ``80G`` or ``7.5 GB``.

    A plain number is GiB. GB and G are read as GiB too: that is what GPU makers mean (a "24 GB"
    card has 24 GiB). MB/MiB/M and TB/TiB/T work the same way.
    """
    match = _MEMORY_RE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise UsageError(
            f"{option} {text!r}: expected a memory size such as 24, 24GB, 24GiB or 80G (plain number = GiB)"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def format_gib(n_bytes: int | None) -> str:
    """``25769803776`` -> ``"24.0 GiB"``; ``None`` -> ``"?"``."""
    return "?" if n_bytes is None else f"{n_bytes / GIB:.1f} GiB"


@dataclass
class CudaDevice:
    """One NVIDIA GPU as NVML sees it (indices are NVML's, which ignore CUDA_VISIBLE_DEVICES)."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    compute_capability: str  # "8.6"
    bf16: bool  # compute capability >= 8.0 (Ampere or newer): the rule torch applies, checked with torch below


def probe_cuda() -> tuple[list[CudaDevice], dict]:
    """NVIDIA GPUs through NVML, without torch; ``([], nvml)`` with ``nvml["error"]`` saying why when none."""
    nvml = {"available": False, "driver_version": None, "cuda_driver_version": None, "error": None}
    try:
        import pynvml
    except ImportError:
        nvml["error"] = "nvidia-ml-py is not installed (pip install nvidia-ml-py), so GPUs cannot be listed"
        return [], nvml
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        nvml["error"] = "no NVIDIA driver here (the NVML library was not found)"
        return [], nvml
    except pynvml.NVMLError as error:
        nvml["error"] = f"the NVIDIA driver did not answer: {error}"
        return [], nvml
    devices: list[CudaDevice] = []
    try:
        nvml["available"] = True
        nvml["driver_version"] = _text(pynvml.nvmlSystemGetDriverVersion())
        cuda = pynvml.nvmlSystemGetCudaDriverVersion()  # 12040 -> "12.4"
        nvml["cuda_driver_version"] = f"{cuda // 1000}.{cuda % 1000 // 10}"
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            devices.append(CudaDevice(index, _text(pynvml.nvmlDeviceGetName(handle)), int(memory.total),
                                      int(memory.free), f"{major}.{minor}", major >= 8))
        if not devices:
            nvml["error"] = "the NVIDIA driver is installed but reports no GPU"
    except pynvml.NVMLError as error:
        nvml["error"] = f"NVML failed while listing GPUs: {error}"
    finally:
        pynvml.nvmlShutdown()
    return devices, nvml


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def check_torch_cuda() -> dict:
    """torch's view of the GPUs NVML found: can it use them, and does it allow bf16 (imports torch)."""
    report = {"version": None, "cuda_version": None, "cuda_available": False, "device_count": 0, "bf16": None,
              "error": None}
    try:
        import torch
    except ImportError as error:
        report["error"] = f"torch cannot be imported ({error}); install it with CUDA support"
        return report
    report["version"], report["cuda_version"] = torch.__version__, torch.version.cuda
    if torch.version.cuda is None:
        report["error"] = (f"torch {torch.__version__} is a CPU-only build: reinstall torch with CUDA "
                           "(https://pytorch.org/get-started/locally/)")
        return report
    with warnings.catch_warnings(record=True) as caught:  # e.g. "driver too old": part of the answer
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if not available:
        hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = (str(caught[0].message).splitlines()[0] if caught
               else f"check that the driver supports CUDA {torch.version.cuda}")
        report["error"] = ("torch sees no GPU" + (f" (CUDA_VISIBLE_DEVICES={hidden!r})" if hidden is not None else "")
                           + f": {why}")
        return report
    report["cuda_available"] = True
    report["device_count"] = torch.cuda.device_count()
    try:
        report["bf16"] = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before 2.4 has no `including_emulation`
        report["bf16"] = torch.cuda.is_bf16_supported()
    return report


def check_bitsandbytes_4bit_on_cuda() -> str | None:
    """Quantize a small Linear to NF4 on the GPU and run it; ``None`` if that works, else the error."""
    try:
        import bitsandbytes as bnb
        import torch

        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float16, quant_type="nf4")
        layer = layer.to("cuda")  # the weight is quantized on this move
        out = layer(torch.randn(4, 64, device="cuda", dtype=torch.float16))
        torch.cuda.synchronize()
        if not bool(torch.isfinite(out).all()):
            return "the 4-bit layer returned non-finite values"
        return None
    except Exception as error:  # noqa: BLE001 - any failure here is the answer to report
        return f"{type(error).__name__}: {error}".splitlines()[0]


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def probe_bitsandbytes(cuda_usable: bool) -> dict:
    """bitsandbytes' version (read from metadata, not imported) and, with a usable GPU, a real 4-bit check."""
    try:
        installed = version("bitsandbytes")
    except PackageNotFoundError:
        installed = None
    cpu_capable = installed is not None and _version_tuple(installed) >= BNB_CPU_4BIT_SINCE
    report = {"version": installed, "four_bit_cuda_ok": None, "four_bit_cpu_capable": cpu_capable,
              "error": None, "note": ""}
    if installed is None:
        report["note"] = "not installed: QLoRA needs it (pip install bitsandbytes)"
    elif cuda_usable:
        report["error"] = check_bitsandbytes_4bit_on_cuda()
        report["four_bit_cuda_ok"] = report["error"] is None
        report["note"] = ("4-bit NF4 forward pass on the GPU works" if report["error"] is None
                          else "4-bit on the GPU failed: QLoRA will not run here until this is fixed")
    else:
        report["note"] = ("4-bit not tested (no usable CUDA GPU); "
                          + ("this version also runs 4-bit on CPU, slowly" if cpu_capable
                             else "bitsandbytes >= 0.48 also runs 4-bit on CPU, slowly"))
    return report


def probe_mps() -> dict:
    """Apple MPS from the platform alone: confirming it would mean importing torch."""
    system, machine = platform.system(), platform.machine()
    if system != "Darwin":
        return {"likely_available": False, "note": f"no (MPS is Apple's; this is {system})"}
    if machine != "arm64":
        return {"likely_available": False, "note": f"unlikely (Intel Mac, {machine}): MPS training needs Apple silicon"}
    return {"likely_available": True,
            "note": "likely available on this Apple-silicon Mac (not checked: that would mean importing torch)"}


def parse_meminfo(text: str) -> tuple[int | None, int | None]:
    """``(total, available)`` bytes from the text of ``/proc/meminfo``; ``None`` for what is missing."""
    fields = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[name.strip()] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    available = fields.get("MemAvailable")
    if available is None and "MemFree" in fields:  # kernels before 3.14 have no MemAvailable
        available = fields["MemFree"] + fields.get("Buffers", 0) + fields.get("Cached", 0)
    return fields.get("MemTotal"), available


def probe_cpu() -> dict:
    """CPU cores (all, and usable by this process) and RAM (total, available)."""
    total = available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            total, available = parse_meminfo(meminfo.read())
    except OSError:  # not Linux
        pass
    if total is None:
        total = _sysconf_bytes("SC_PHYS_PAGES")
        available = _sysconf_bytes("SC_AVPHYS_PAGES")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"logical_cores": os.cpu_count(), "usable_cores": usable, "machine": platform.machine(),
            "ram_total_bytes": total, "ram_available_bytes": available}


def _sysconf_bytes(pages_name: str) -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf(pages_name)
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name (macOS)
        return None


def compute_fits(gpu_bytes: int, seq: int) -> dict[str, dict]:
    """Per method: the largest model size whose batch-1 estimate fits ``gpu_bytes``, and its largest batch."""
    from ftkit.estimator import Settings, estimate, largest_batch
    from ftkit.model_configs import SIZES, resolve_shape

    methods = {}
    for method in METHODS:
        settings = Settings(seq=seq, batch=1, method=method)
        methods[method] = {"largest_model": None, "largest_batch": 0, "batch1_bytes": None}
        for size in reversed(SIZES):
            shape = resolve_shape(size)
            needed = estimate(shape, settings).total
            batch = largest_batch(shape, settings, gpu_bytes) if needed <= gpu_bytes else 0
            if batch >= 1:
                methods[method] = {"largest_model": size, "largest_batch": batch, "batch1_bytes": needed}
                break
    return methods


def recommendations(has_cuda: bool, fits: dict | None) -> list[dict[str, str]]:
    """Commands worth running next here, each ``{"command": ..., "why": ...}``."""
    steps = [{"command": "ftkit run recipes/quickstart.toml",
              "why": "fine-tune a real 135M model end to end" + ("" if has_cuda else " on this CPU") + " (minutes)"}]
    qlora = (fits or {}).get("methods", {}).get("qlora", {})
    if fits is not None and qlora.get("largest_model"):
        gpu = f"{fits['gpu_mem_bytes'] / GIB:.0f}GiB"
        steps.append({"command": f"ftkit estimate --model {qlora['largest_model']} --gpu-mem {gpu}",
                      "why": "the memory estimate for the largest QLoRA fit, part by part"})
    else:
        steps.append({"command": "ftkit estimate --model 1.5B --gpu-mem 24GB",
                      "why": "plan a GPU run: the memory one model needs on one card"})
    if not has_cuda and fits is None:
        steps.append({"command": "ftkit probe --gpu-mem 24GB", "why": "what fits on a 24 GiB card you don't have"})
    return steps


def probe_machine(gpu_mem: int | None = None, seq: int = 512) -> dict:
    """The whole report, as the stable JSON shape ``ftkit probe --json`` prints.

    :param gpu_mem: bytes to compute fits for instead of the largest probed GPU's total memory.
    :param seq: sequence length the fits are computed at.
    """
    devices, nvml = probe_cuda()
    torch_report = check_torch_cuda() if devices else None
    cuda_usable = bool(torch_report and torch_report["cuda_available"])
    if gpu_mem is not None:
        fits_bytes, source = gpu_mem, "--gpu-mem"
    elif devices:
        fits_bytes, source = max(d.total_bytes for d in devices), "probed"
    else:
        fits_bytes, source = None, None
    fits = None
    if fits_bytes is not None:
        fits = {"gpu_mem_bytes": fits_bytes, "seq": seq, "source": source, "methods": compute_fits(fits_bytes, seq)}
    return {
        "cuda": [asdict(device) for device in devices],
        "nvml": nvml,
        "torch": torch_report,
        "mps": probe_mps(),
        "cpu": probe_cpu(),
        "bitsandbytes": probe_bitsandbytes(cuda_usable),
        "fits": fits,
        "recommendations": recommendations(bool(devices), fits),
    }
