"""What this machine has to offer a queen: CPUs, memory, disk, NVIDIA and OpenCL GPUs.

Every size here is an integer number of MiB (``bytes // 2**20``), the unit of `protocol.messages.Register`.

CPU count, memory and disk come from psutil, which the worker always has. The GPU sources are optional:

* NVIDIA GPUs through NVML (the ``nvidia-ml-py`` package, imported as ``pynvml``);
* OpenCL GPUs through ``pyopencl`` (the ``opencl`` extra), CPU and accelerator devices left out.

A GPU source that is not installed, has no driver or device, raises, or does not answer within a deadline
yields an empty list and exactly one log line on the ``workerbee.hardware`` logger; it never raises and never
blocks past its deadline. A single GPU whose query fails is left out with one log line of its own.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import TypedDict, TypeVar

import psutil

from protocol.messages import GpuInfo

__all__ = ["MIB", "HardwareReport", "RegistrationFields", "detect_hardware", "detect_nvidia", "detect_opencl"]

logger = logging.getLogger(__name__)

MIB = 2**20
"""Bytes in a MiB, the unit of every size in this module."""

DEFAULT_TIMEOUT = 5.0
"""Seconds a GPU probe may take before it is given up on."""

_T = TypeVar("_T")


class RegistrationFields(TypedDict):
    """The hardware fields of `protocol.messages.Register`, sizes in MiB.

    A TypedDict rather than ``dict[str, object]`` so that ``Register(**fields, ...)`` type-checks.
    """

    cpu_count: int
    memory: int
    disk_space: int
    vram: int
    nv_gpu_count: int | None
    nv_driver_version: str | None
    nv_cuda_version: str | None
    nv_gpus: list[GpuInfo]
    cl_driver_version: str | None
    cl_gpus: list[GpuInfo]


@dataclass(frozen=True)
class HardwareReport:
    """A snapshot of the machine's resources. Every size is MiB.

    `nv_gpus` and `cl_gpus` are tuples so that the report stays immutable (and hashable).
    `nv_driver_version` is None exactly when NVML could not be used.
    """

    cpu_count: int
    """Logical CPUs."""
    memory: int
    """Total system memory, MiB."""
    memory_available: int
    """System memory available to new processes without swapping, MiB."""
    disk_space: int
    """Free disk at the model cache directory (or its nearest existing parent), MiB."""
    nv_driver_version: str | None = None
    """NVIDIA driver version, e.g. "550.54.14"; None when NVML is unavailable."""
    nv_cuda_version: str | None = None
    """Newest CUDA version the NVIDIA driver supports, e.g. "12.4"."""
    nv_gpus: tuple[GpuInfo, ...] = ()
    """NVIDIA GPUs, in NVML index order."""
    cl_driver_version: str | None = None
    """OpenCL driver version of the GPU devices (distinct versions joined by ", "); None without any."""
    cl_gpus: tuple[GpuInfo, ...] = ()
    """OpenCL GPU devices, in platform then device order."""

    @property
    def vram(self) -> int:
        """Total memory of the GPUs reported, MiB: the NVIDIA GPUs if there are any, else the OpenCL ones.

        NVIDIA cards usually show up through OpenCL as well, so the two lists are never added together.
        """
        return sum(gpu.memory for gpu in (self.nv_gpus or self.cl_gpus))

    @property
    def nv_gpu_count(self) -> int | None:
        """NVIDIA GPUs seen by NVML, or None when NVML is unavailable (as opposed to 0 GPUs)."""
        if self.nv_driver_version is None and not self.nv_gpus:
            return None
        return len(self.nv_gpus)

    def registration_fields(self) -> RegistrationFields:
        """The hardware fields of `protocol.messages.Register`, by their names there (sizes in MiB)."""
        return {
            "cpu_count": self.cpu_count,
            "memory": self.memory,
            "disk_space": self.disk_space,
            "vram": self.vram,
            "nv_gpu_count": self.nv_gpu_count,
            "nv_driver_version": self.nv_driver_version,
            "nv_cuda_version": self.nv_cuda_version,
            "nv_gpus": list(self.nv_gpus),
            "cl_driver_version": self.cl_driver_version,
            "cl_gpus": list(self.cl_gpus),
        }


class _Unavailable(Exception):
    """The source is simply absent here (no driver, no platform): expected, so it is logged at INFO."""


@dataclass(frozen=True)
class _NvmlFindings:
    """What the NVML probe found; `notes` are per-GPU problems for the calling thread to log."""

    driver: str
    cuda: str | None
    gpus: list[GpuInfo]
    notes: list[str]


@dataclass(frozen=True)
class _ClFindings:
    """What the OpenCL probe found; `notes` are per-device problems for the calling thread to log."""

    driver: str | None
    gpus: list[GpuInfo]
    notes: list[str]
    platforms: int


def detect_nvidia(
    nvml: ModuleType | None = None, *, timeout: float = DEFAULT_TIMEOUT
) -> tuple[str | None, str | None, list[GpuInfo]]:
    """Ask NVML for the NVIDIA driver version, the CUDA version it supports, and the GPUs.

    Returns ``(driver_version, cuda_version, gpus)``; each `GpuInfo` has its memory and free memory in MiB,
    its NVML uuid and index. `nvml` is the ``pynvml`` module, imported here when None (tests pass a fake).
    The probe runs in a daemon thread given `timeout` seconds. On any failure (module missing, no driver,
    driver error, timeout) the result is ``(None, None, [])`` and one line is logged.
    """
    if nvml is None:
        try:
            nvml = importlib.import_module("pynvml")
        except Exception as exc:  # not just ImportError: a broken install can fail in other ways
            logger.info("No NVIDIA GPUs: nvidia-ml-py is not importable (%s)", _describe(exc))
            return None, None, []
    result = _run_with_deadline(partial(_probe_nvml, nvml), timeout, "workerbee-nvml-probe")
    if result is None:
        logger.warning("No NVIDIA GPUs: NVML did not answer within %.1f s (driver hung?)", timeout)
        return None, None, []
    if isinstance(result, _Unavailable):
        logger.info("No NVIDIA GPUs: NVML is unavailable (%s)", result)
        return None, None, []
    if isinstance(result, BaseException):
        logger.warning("No NVIDIA GPUs: NVML query failed (%s)", _describe(result))
        return None, None, []
    for note in result.notes:
        logger.warning("%s", note)
    if not result.gpus and not result.notes:
        logger.info("No NVIDIA GPUs: NVML (driver %s) sees no device", result.driver)
    return result.driver, result.cuda, result.gpus


def detect_opencl(
    cl: ModuleType | None = None, *, timeout: float = DEFAULT_TIMEOUT
) -> tuple[str | None, list[GpuInfo]]:
    """Ask OpenCL for its GPU devices and their driver version.

    Returns ``(driver_version, gpus)``; each `GpuInfo` has its global memory in MiB, and no free memory,
    uuid or index (OpenCL has no portable notion of these). Devices that are not of GPU type (CPUs,
    accelerators) are left out. `driver_version` joins the distinct versions of the GPU devices with ", ".
    `cl` is the ``pyopencl`` module, imported here when None. The probe runs in a daemon thread given
    `timeout` seconds. On any failure the result is ``(None, [])`` and one line is logged.
    """
    if cl is None:
        try:
            cl = importlib.import_module("pyopencl")
        except Exception as exc:  # not just ImportError: a broken install can fail in other ways
            logger.info("No OpenCL GPUs: pyopencl is not importable (%s)", _describe(exc))
            return None, []
    result = _run_with_deadline(partial(_probe_opencl, cl), timeout, "workerbee-opencl-probe")
    if result is None:
        logger.warning("No OpenCL GPUs: OpenCL did not answer within %.1f s (driver hung?)", timeout)
        return None, []
    if isinstance(result, _Unavailable):
        logger.info("No OpenCL GPUs: OpenCL is unavailable (%s)", result)
        return None, []
    if isinstance(result, BaseException):
        logger.warning("No OpenCL GPUs: OpenCL query failed (%s)", _describe(result))
        return None, []
    for note in result.notes:
        logger.warning("%s", note)
    if not result.gpus and not result.notes:
        logger.info("No OpenCL GPUs: none among the devices of %d platform(s)", result.platforms)
    return result.driver, result.gpus


def detect_hardware(
    cache_dir: Path,
    *,
    nvml: ModuleType | None = None,
    opencl: ModuleType | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> HardwareReport:
    """Take a `HardwareReport` of this machine; sizes in MiB.

    `disk_space` is measured where models are cached: `cache_dir`, or its nearest existing parent when it
    has not been created yet. `nvml` and `opencl` replace the ``pynvml`` and ``pyopencl`` modules (for
    tests). Each GPU probe gets `timeout` seconds, so a hung driver costs at most twice that.
    """
    memory = psutil.virtual_memory()
    nv_driver, nv_cuda, nv_gpus = detect_nvidia(nvml, timeout=timeout)
    cl_driver, cl_gpus = detect_opencl(opencl, timeout=timeout)
    return HardwareReport(
        # psutil answers None where it cannot tell; a running machine has at least one CPU
        cpu_count=psutil.cpu_count(logical=True) or os.cpu_count() or 1,
        memory=memory.total // MIB,
        memory_available=memory.available // MIB,
        disk_space=psutil.disk_usage(str(_nearest_existing(cache_dir))).free // MIB,
        nv_driver_version=nv_driver,
        nv_cuda_version=nv_cuda,
        nv_gpus=tuple(nv_gpus),
        cl_driver_version=cl_driver,
        cl_gpus=tuple(cl_gpus),
    )


def _probe_nvml(nvml: ModuleType) -> _NvmlFindings:
    """Query NVML; runs in the probe thread, so it reports per-GPU problems as notes instead of logging."""
    try:
        nvml.nvmlInit()
    except Exception as exc:
        raise _Unavailable(_describe(exc)) from exc
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        notes: list[str] = []
        try:
            cuda: str | None = _cuda_version(int(nvml.nvmlSystemGetCudaDriverVersion()))
        except Exception as exc:  # the GPUs are still usable without knowing this
            cuda = None
            notes.append(f"NVML: CUDA version unknown ({_describe(exc)})")
        gpus: list[GpuInfo] = []
        for index in range(int(nvml.nvmlDeviceGetCount())):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                gpus.append(
                    GpuInfo(
                        name=_text(nvml.nvmlDeviceGetName(handle)),
                        memory=int(memory.total) // MIB,
                        memory_free=int(memory.free) // MIB,
                        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                        index=index,
                    )
                )
            except Exception as exc:  # a lost or half-broken GPU should not hide the healthy ones
                notes.append(f"NVML: leaving out GPU {index} ({_describe(exc)})")
        return _NvmlFindings(driver=driver, cuda=cuda, gpus=gpus, notes=notes)
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception as exc:  # what was read is still right; nothing for the operator to do
            logger.debug("nvmlShutdown failed: %s", _describe(exc))


def _probe_opencl(cl: ModuleType) -> _ClFindings:
    """Query OpenCL; runs in the probe thread, so it reports per-device problems as notes."""
    try:
        platforms = list(cl.get_platforms())
    except Exception as exc:  # pyopencl raises here when no ICD (driver) is installed
        raise _Unavailable(_describe(exc)) from exc
    # device.type is a bit field (a GPU may also be the DEFAULT device), so test the bit
    gpu_bit = int(cl.device_type.GPU)
    gpus: list[GpuInfo] = []
    drivers: list[str] = []
    notes: list[str] = []
    for p, platform in enumerate(platforms):
        try:
            devices = list(platform.get_devices())
        except Exception as exc:
            notes.append(f"OpenCL: leaving out platform {p} ({_describe(exc)})")
            continue
        for d, device in enumerate(devices):
            try:
                if not int(device.type) & gpu_bit:
                    continue
                gpu = GpuInfo(name=_text(device.name).strip(), memory=int(device.global_mem_size) // MIB)
                driver = _text(device.driver_version).strip()
            except Exception as exc:
                notes.append(f"OpenCL: leaving out device {d} of platform {p} ({_describe(exc)})")
                continue
            gpus.append(gpu)
            if driver and driver not in drivers:
                drivers.append(driver)
    return _ClFindings(driver=", ".join(drivers) or None, gpus=gpus, notes=notes, platforms=len(platforms))


def _run_with_deadline(probe: Callable[[], _T], timeout: float, name: str) -> _T | BaseException | None:
    """Run `probe` in a thread for at most `timeout` seconds.

    Returns its value, the exception it raised, or None when it is still running; a probe left running is
    abandoned, and whatever it finds later is dropped, so it cannot log after its caller gave up.
    """
    outcome: list[_T | BaseException] = []

    def target() -> None:
        try:
            outcome.append(probe())
        except BaseException as exc:  # the caller turns any failure into "no GPUs"; nothing may escape
            outcome.append(exc)

    # A daemon thread, not a ThreadPoolExecutor: executor threads are joined at interpreter exit, so a
    # driver stuck in a system call would keep the worker from ever exiting.
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive() or not outcome:
        return None
    return outcome[0]


def _cuda_version(version: int) -> str:
    """NVML's CUDA version number (1000 * major + 10 * minor, e.g. 12040) as text ("12.4")."""
    return f"{version // 1000}.{version % 1000 // 10}"


def _text(value: object) -> str:
    """A string from NVML or OpenCL; older pynvml releases return bytes."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _describe(exc: BaseException) -> str:
    """An exception as one log-friendly phrase, with its type, since NVML messages alone are terse."""
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _nearest_existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists; the cache directory may not have been created yet."""
    path = Path(os.path.abspath(path.expanduser()))
    # os.path.exists rather than Path.exists: it answers False instead of raising on a permission error
    while not os.path.exists(path) and path.parent != path:
        path = path.parent
    return path
