"""``ftkit probe``: the hardware report, its light imports, and what fits by the estimator."""

from __future__ import annotations

import json
import os
import shutil
import sys
from importlib.metadata import version

import pytest

from ftkit.errors import UsageError
from ftkit.probe import GIB, parse_meminfo, parse_memory_size
from tests.conftest import heavy_imports_after, run_ftkit

# Independent of the code under test: the NVIDIA driver ships nvidia-smi next to NVML.
HAS_NVIDIA = shutil.which("nvidia-smi") is not None
TOP_KEYS = {"cuda", "nvml", "torch", "mps", "cpu", "bitsandbytes", "fits", "recommendations"}

MEMINFO = """\
MemTotal:       24684092 kB
MemFree:         1203400 kB
MemAvailable:   20260812 kB
Buffers:          312000 kB
Cached:         17000000 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
"""
MEMINFO_OLD_KERNEL = """\
MemTotal:        8000000 kB
MemFree:         1000000 kB
Buffers:          200000 kB
Cached:          3000000 kB
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [("24", 24 * GIB), ("24GB", 24 * GIB), ("24GiB", 24 * GIB), ("80G", 80 * GIB), ("24gb", 24 * GIB),
     (" 7.5 GB ", int(7.5 * GIB)), ("0.5", GIB // 2), ("512MB", 512 * 1024**2), ("1TiB", 1024 * GIB)],
)
def test_memory_sizes_parse_with_plain_numbers_and_gb_read_as_gib(text, expected):
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize("text", ["abc", "", "0", "-4", "24XB", "24 GB GB", "GB", "1e9"])
def test_bad_memory_sizes_name_the_option_and_what_to_type(text):
    with pytest.raises(UsageError) as raised:
        parse_memory_size(text, "--gpu-mem")
    message = str(raised.value)
    assert message.startswith(f"--gpu-mem {text!r}: expected a memory size such as 24, 24GB")
    assert "\n" not in message


def test_meminfo_parsing_reads_total_and_available():
    assert parse_meminfo(MEMINFO) == (24684092 * 1024, 20260812 * 1024)
    # Kernels before 3.14 have no MemAvailable: free + buffers + page cache instead.
    assert parse_meminfo(MEMINFO_OLD_KERNEL) == (8000000 * 1024, (1000000 + 200000 + 3000000) * 1024)
    assert parse_meminfo("") == (None, None)


def test_probe_json_reports_this_machine():
    result = run_ftkit("probe", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == TOP_KEYS
    cpu = report["cpu"]
    assert cpu["logical_cores"] == os.cpu_count()
    assert 1 <= cpu["usable_cores"] <= cpu["logical_cores"]
    assert cpu["ram_total_bytes"] > 0
    assert 0 < cpu["ram_available_bytes"] <= cpu["ram_total_bytes"]
    assert report["bitsandbytes"]["version"] == version("bitsandbytes")
    assert report["mps"]["likely_available"] is (sys.platform == "darwin" and os.uname().machine == "arm64")
    assert all(set(step) == {"command", "why"} for step in report["recommendations"])
    assert bool(report["cuda"]) is HAS_NVIDIA
    if HAS_NVIDIA:
        assert report["torch"] is not None
        assert report["fits"]["source"] == "probed"
        assert report["fits"]["gpu_mem_bytes"] == max(d["total_bytes"] for d in report["cuda"])
    else:
        assert report["nvml"]["available"] is False
        assert report["nvml"]["error"]  # says why, e.g. no NVIDIA driver
        assert report["torch"] is None  # never imported
        assert report["fits"] is None
        assert report["bitsandbytes"]["four_bit_cuda_ok"] is None
        commands = [step["command"] for step in report["recommendations"]]
        assert "ftkit run recipes/quickstart.toml" in commands
        assert "ftkit probe --gpu-mem 24GB" in commands


@pytest.mark.skipif(HAS_NVIDIA, reason="with an NVIDIA GPU the probe shows the GPU instead")
def test_probe_without_cuda_says_so_and_what_to_do_instead():
    result = run_ftkit("probe")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "no CUDA GPU: no NVIDIA driver here" in out
    assert "no GPU memory to fit models into" in out
    assert "$ ftkit run recipes/quickstart.toml" in out
    assert "$ ftkit estimate --model 1.5B --gpu-mem 24GB" in out
    assert f"{os.cpu_count()} cores" in out
    assert f"{version('bitsandbytes')}: 4-bit not tested (no usable CUDA GPU)" in out


@pytest.mark.parametrize("args", [["probe"], ["probe", "--json"], ["probe", "--gpu-mem", "24GB"]])
def test_probe_without_cuda_imports_no_heavy_package(args):
    if HAS_NVIDIA:
        pytest.skip("with an NVIDIA GPU the probe imports torch and bitsandbytes by design")
    assert heavy_imports_after(args) == []


def test_bad_gpu_mem_is_one_line_and_exit_2():
    result = run_ftkit("probe", "--gpu-mem", "abc")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "Error: --gpu-mem 'abc': expected a memory size such as 24, 24GB, 24GiB or 80G (plain number = GiB)\n"
    )


def test_help_teaches_with_examples_and_json_keys():
    result = run_ftkit("probe", "--help")
    assert result.returncode == 0
    for expected in ("$ ftkit probe --gpu-mem 24GB", "--seq", "largest_model", "largest_batch", "four_bit_cuda_ok",
                     "recommendations", "plain number is GiB"):
        assert expected in result.stdout
    assert "probe" in run_ftkit("--help").stdout


def _size_rank(size: str | None) -> int:
    from ftkit.model_configs import SIZES

    return -1 if size is None else SIZES.index(size)


def test_gpu_mem_24gb_fits_all_three_methods_by_the_estimator():
    from ftkit.estimator import Settings, estimate, largest_batch
    from ftkit.model_configs import SIZES, resolve_shape

    result = run_ftkit("probe", "--gpu-mem", "24GB", "--json")
    assert result.returncode == 0, result.stderr
    fits = json.loads(result.stdout)["fits"]
    assert (fits["gpu_mem_bytes"], fits["seq"], fits["source"]) == (24 * GIB, 512, "--gpu-mem")
    methods = fits["methods"]
    assert set(methods) == {"full", "lora", "qlora"}
    assert methods["qlora"]["largest_model"] is not None
    assert _size_rank(methods["qlora"]["largest_model"]) >= _size_rank(methods["lora"]["largest_model"])
    assert _size_rank(methods["lora"]["largest_model"]) >= _size_rank(methods["full"]["largest_model"])
    for method, fit in methods.items():
        settings = Settings(seq=512, batch=1, method=method)
        if fit["largest_model"] is None:
            assert estimate(resolve_shape(SIZES[0]), settings).total > 24 * GIB
            continue
        shape = resolve_shape(fit["largest_model"])
        assert fit["batch1_bytes"] == estimate(shape, settings).total <= 24 * GIB
        assert fit["largest_batch"] == largest_batch(shape, settings, 24 * GIB) >= 1
        bigger = SIZES.index(fit["largest_model"]) + 1
        if bigger < len(SIZES):  # the next size up does not fit: the answer is the largest
            assert estimate(resolve_shape(SIZES[bigger]), settings).total > 24 * GIB


def test_fits_table_is_printed_and_longer_sequences_fit_smaller_batches():
    table = run_ftkit("probe", "--gpu-mem", "24GB")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    start = lines.index("What fits in 24.0 GiB (given by --gpu-mem) at --seq 512")
    assert lines[start + 1].split() == ["METHOD", "LARGEST", "MODEL", "LARGEST", "BATCH", "BATCH", "1", "NEEDS"]
    assert [line.split()[0] for line in lines[start + 2:start + 5]] == ["full", "lora", "qlora"]

    short = json.loads(run_ftkit("probe", "--gpu-mem", "80G", "--json").stdout)["fits"]["methods"]
    long = json.loads(run_ftkit("probe", "--gpu-mem", "80G", "--seq", "4096", "--json").stdout)["fits"]["methods"]
    for method in ("full", "lora", "qlora"):
        assert _size_rank(long[method]["largest_model"]) <= _size_rank(short[method]["largest_model"])
        if long[method]["largest_model"] == short[method]["largest_model"]:
            assert long[method]["largest_batch"] <= short[method]["largest_batch"]
