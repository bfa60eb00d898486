"""Where benchmark numbers come from: CPU model, GPU, driver, CUDA runtime and cuDNN versions, package versions,
load average; and the device slug that names result files, so that results of different devices never mix.

GPU facts are read through the CUDA driver and runtime libraries with ctypes (no CUDA Python package needed);
dlopen by soname returns the copies onnxruntime already loaded, so the versions reported are those that ran.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import platform
import re
from collections.abc import Sequence
from importlib import metadata

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi import build_and_package_info as ort_build

from cnnc.threads import cpu_model


def _load_library(names: Sequence[str]):
    # dlopen by soname returns the copy onnxruntime already loaded, so the versions are those that ran.
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def _version_from_int(value: int, cudnn: bool = False) -> str:
    if cudnn:  # cuDNN 9 encodes major*10000 + minor*100 + patch, cuDNN 8 major*1000 + minor*100 + patch
        major, rest = (value // 10000, value % 10000) if value >= 90000 else (value // 1000, value % 1000)
        return f"{major}.{rest // 100}.{rest % 100}"
    return f"{value // 1000}.{(value % 1000) // 10}"  # CUDA: major*1000 + minor*10


def cuda_environment() -> dict:
    """GPU name, driver and runtime CUDA versions and cuDNN version, each None where it cannot be read."""
    found: dict = {"gpu": None, "cuda_driver": None, "cuda_runtime": None, "cudnn": None}
    driver = _load_library(["libcuda.so.1", "libcuda.so"])
    if driver is not None:
        device, version, name = ctypes.c_int(), ctypes.c_int(), ctypes.create_string_buffer(256)
        if (driver.cuInit(0) == 0 and driver.cuDeviceGet(ctypes.byref(device), 0) == 0
                and driver.cuDeviceGetName(name, 256, device) == 0):
            found["gpu"] = name.value.decode(errors="replace")
        if driver.cuDriverGetVersion(ctypes.byref(version)) == 0:
            found["cuda_driver"] = _version_from_int(version.value)
    runtime = _load_library(["libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so"])
    if runtime is not None:
        version = ctypes.c_int()
        if runtime.cudaRuntimeGetVersion(ctypes.byref(version)) == 0:
            found["cuda_runtime"] = _version_from_int(version.value)
    cudnn = _load_library(["libcudnn.so.9", "libcudnn.so.8", "libcudnn.so"])
    if cudnn is not None:
        cudnn.cudnnGetVersion.restype = ctypes.c_size_t
        found["cudnn"] = _version_from_int(int(cudnn.cudnnGetVersion()), cudnn=True)
    return found


def environment(device_kind: str) -> dict:
    """Where the numbers come from. `device_kind` is "cpu" or "cuda" (then the GPU and CUDA versions are read)."""
    ort_package, ort_cuda = ort_build.package_name, getattr(ort_build, "cuda_version", None)
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        affinity = os.cpu_count()
    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "loadavg_1_5_15": [round(v, 2) for v in os.getloadavg()],
        "onnxruntime": ort.__version__,
        "onnxruntime_package": ort_package,
        "onnxruntime_built_for_cuda": ort_cuda,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        env["cnnc"] = metadata.version("cnnc")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a checkout that was never installed
        env["cnnc"] = None
    if device_kind == "cuda":
        env.update(cuda_environment())
    env["device"] = (env.get("gpu") or "CUDA device") if device_kind == "cuda" else env["cpu"]
    return env


def device_slug(report: dict) -> str:
    """`cpu-amd-epyc-2t` or `cuda-nvidia-h100-80gb-hbm3`: names result files so that devices never mix."""
    env, settings = report["environment"], report["settings"]
    slug = re.sub(r"[^a-z0-9]+", "-", str(env.get("device", "unknown")).lower()).strip("-")
    if "cuda" in settings.get("devices_used", [settings["device_kind"]]):
        return f"cuda-{slug}"
    threads = settings.get("threads") or env.get("cpus_usable")
    return f"cpu-{slug}-{threads}t"
