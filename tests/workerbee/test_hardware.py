"""Hardware detection: psutil for real, NVML and OpenCL through small fakes of pynvml and pyopencl."""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from protocol import MAX_FRAME_BYTES, PROTOCOL_VERSION
from protocol.messages import GpuInfo, ModelInfo, Register
from workerbee.hardware import MIB, HardwareReport, detect_hardware, detect_nvidia, detect_opencl

GIB = 2**30


class FakeNVMLError(Exception):
    """Stands in for pynvml.NVMLError."""


@dataclass
class FakeGpu:
    """One GPU as the fake NVML knows it; sizes in bytes, like NVML."""

    name: str
    uuid: str
    total: int
    free: int
    broken: bool = False


class FakeNvml(types.ModuleType):
    """The part of pynvml that workerbee.hardware uses."""

    def __init__(
        self,
        gpus: list[FakeGpu],
        *,
        driver: str = "550.54.14",
        as_bytes: bool = False,
        cuda: int = 12040,
        init_error: Exception | None = None,
        driver_error: Exception | None = None,
        hang: threading.Event | None = None,
    ) -> None:
        super().__init__("pynvml")
        self.gpus = gpus
        self.driver = driver
        self.as_bytes = as_bytes
        self.cuda = cuda
        self.init_error = init_error
        self.driver_error = driver_error
        self.hang = hang
        self.inits = 0
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        if self.hang is not None:
            self.hang.wait()
        if self.init_error is not None:
            raise self.init_error
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self) -> str | bytes:
        if self.driver_error is not None:
            raise self.driver_error
        return self._text(self.driver)

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return self.cuda

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self.gpus[index]

    def nvmlDeviceGetName(self, handle: FakeGpu) -> str | bytes:
        if handle.broken:
            raise FakeNVMLError("GPU is lost")
        return self._text(handle.name)

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> str | bytes:
        return self._text(handle.uuid)

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu) -> types.SimpleNamespace:
        return types.SimpleNamespace(total=handle.total, free=handle.free, used=handle.total - handle.free)

    def _text(self, value: str) -> str | bytes:
        """Old pynvml releases answer bytes."""
        return value.encode() if self.as_bytes else value


class FakeDeviceType:
    """pyopencl.device_type: bit flags."""

    DEFAULT = 1
    CPU = 2
    GPU = 4
    ACCELERATOR = 8


@dataclass
class FakeClDevice:
    """One pyopencl.Device; global_mem_size in bytes."""

    name: str
    type: int
    global_mem_size: int
    driver_version: str


class BrokenClDevice:
    """A pyopencl.Device whose every query fails."""

    @property
    def type(self) -> int:
        raise RuntimeError("clGetDeviceInfo failed: INVALID_DEVICE")


@dataclass
class FakePlatform:
    """One pyopencl.Platform."""

    devices: list[Any]

    def get_devices(self) -> list[Any]:
        return self.devices


class FakeOpenCl(types.ModuleType):
    """The part of pyopencl that workerbee.hardware uses."""

    device_type = FakeDeviceType

    def __init__(
        self,
        platforms: list[FakePlatform],
        *,
        error: Exception | None = None,
        hang: threading.Event | None = None,
    ) -> None:
        super().__init__("pyopencl")
        self.platforms = platforms
        self.error = error
        self.hang = hang

    def get_platforms(self) -> list[FakePlatform]:
        if self.hang is not None:
            self.hang.wait()
        if self.error is not None:
            raise self.error
        return self.platforms


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """caplog, catching the workerbee.hardware logger at every level."""
    caplog.set_level(logging.DEBUG, logger="workerbee.hardware")
    return caplog


def _no_nvml() -> FakeNvml:
    return FakeNvml([], init_error=FakeNVMLError("NVML Shared Library Not Found"))


def _no_opencl() -> FakeOpenCl:
    return FakeOpenCl([], error=RuntimeError("clGetPlatformIDs failed: PLATFORM_NOT_FOUND_KHR"))


def _join_probe_threads() -> None:
    for thread in threading.enumerate():
        if thread.name.startswith("workerbee-") and thread.name.endswith("-probe"):
            thread.join(5)


def test_nvidia_one_gpu(logs: pytest.LogCaptureFixture) -> None:
    """One GPU: versions, MiB sizes, uuid and index are reported, NVML is shut down, nothing is logged."""
    nvml = FakeNvml([FakeGpu("NVIDIA GeForce RTX 3090", "GPU-abc", 24 * GIB, 20 * GIB + 5)])
    driver, cuda, gpus = detect_nvidia(nvml)
    assert (driver, cuda) == ("550.54.14", "12.4")
    assert gpus == [
        GpuInfo(name="NVIDIA GeForce RTX 3090", memory=24576, memory_free=20480, uuid="GPU-abc", index=0)
    ]
    assert (nvml.inits, nvml.shutdowns) == (1, 1)
    assert logs.records == []


def test_nvidia_two_unequal_gpus_vram(tmp_path: Path, logs: pytest.LogCaptureFixture) -> None:
    """Two different GPUs are both reported; vram is their sum, and OpenCL GPUs are not added to it."""
    nvml = FakeNvml(
        [FakeGpu("RTX 4090", "GPU-1", 24 * GIB, 23 * GIB), FakeGpu("RTX 3060", "GPU-2", 12 * GIB, 11 * GIB)]
    )
    opencl = FakeOpenCl([FakePlatform([FakeClDevice("RTX 4090", FakeDeviceType.GPU, 24 * GIB, "550.54")])])
    report = detect_hardware(tmp_path, nvml=nvml, opencl=opencl)
    assert [(g.name, g.memory, g.index) for g in report.nv_gpus] == [
        ("RTX 4090", 24576, 0),
        ("RTX 3060", 12288, 1),
    ]
    assert len(report.cl_gpus) == 1
    assert report.vram == 36 * 1024
    assert report.registration_fields()["nv_gpu_count"] == 2
    assert logs.records == []


def test_nvidia_old_pynvml_bytes_are_decoded() -> None:
    """Old pynvml releases return bytes; they come out as str."""
    nvml = FakeNvml([FakeGpu("Tesla P40", "GPU-p40", 24 * GIB, 24 * GIB)], driver="470.239.06", as_bytes=True)
    driver, _, gpus = detect_nvidia(nvml)
    assert driver == "470.239.06"
    assert (gpus[0].name, gpus[0].uuid) == ("Tesla P40", "GPU-p40")


@pytest.mark.parametrize(
    ("number", "text"), [(12040, "12.4"), (11080, "11.8"), (13000, "13.0"), (12020, "12.2")]
)
def test_nvidia_cuda_version_text(number: int, text: str) -> None:
    """NVML's CUDA version number becomes "major.minor"."""
    assert detect_nvidia(FakeNvml([], cuda=number))[1] == text


def test_nvidia_init_error(logs: pytest.LogCaptureFixture) -> None:
    """A driver that fails nvmlInit gives no GPUs and one log line; no shutdown without an init."""
    nvml = FakeNvml([FakeGpu("x", "GPU-x", GIB, GIB)], init_error=FakeNVMLError("Driver Not Loaded"))
    assert detect_nvidia(nvml) == (None, None, [])
    assert nvml.shutdowns == 0
    assert len(logs.records) == 1
    assert "Driver Not Loaded" in logs.records[0].getMessage()


def test_nvidia_error_after_init_still_shuts_down(logs: pytest.LogCaptureFixture) -> None:
    """An error from a system query after nvmlInit gives no GPUs, one log line, and still nvmlShutdown."""
    nvml = FakeNvml([FakeGpu("x", "GPU-x", GIB, GIB)], driver_error=FakeNVMLError("Unknown Error"))
    assert detect_nvidia(nvml) == (None, None, [])
    assert (nvml.inits, nvml.shutdowns) == (1, 1)
    assert len(logs.records) == 1
    assert logs.records[0].levelno == logging.WARNING


def test_nvidia_device_error_skips_only_that_gpu(logs: pytest.LogCaptureFixture) -> None:
    """A GPU whose query fails is left out with one log line; the others are still reported."""
    nvml = FakeNvml(
        [FakeGpu("lost", "GPU-0", 8 * GIB, 0, broken=True), FakeGpu("fine", "GPU-1", 16 * GIB, 16 * GIB)]
    )
    driver, _, gpus = detect_nvidia(nvml)
    assert driver == "550.54.14"
    assert [(g.name, g.index) for g in gpus] == [("fine", 1)]
    assert nvml.shutdowns == 1
    assert len(logs.records) == 1
    assert "GPU 0" in logs.records[0].getMessage()


def test_nvidia_no_device(logs: pytest.LogCaptureFixture) -> None:
    """A driver with no GPU gives its version, an empty list, a count of 0 and one log line."""
    driver, cuda, gpus = detect_nvidia(FakeNvml([]))
    assert (driver, cuda, gpus) == ("550.54.14", "12.4", [])
    report = HardwareReport(cpu_count=1, memory=1, memory_available=1, disk_space=1, nv_driver_version=driver)
    assert report.registration_fields()["nv_gpu_count"] == 0
    assert len(logs.records) == 1


@pytest.mark.timeout(30)
def test_nvidia_hang_times_out(logs: pytest.LogCaptureFixture) -> None:
    """An nvmlInit that never returns is given up on at the deadline, and its late answer is ignored."""
    release = threading.Event()
    nvml = FakeNvml([FakeGpu("x", "GPU-x", GIB, GIB)], hang=release)
    try:
        assert detect_nvidia(nvml, timeout=0.2) == (None, None, [])
    finally:
        release.set()
    _join_probe_threads()
    assert nvml.shutdowns == 1
    assert len(logs.records) == 1
    assert "did not answer" in logs.records[0].getMessage()


def test_nvidia_library_missing(monkeypatch: pytest.MonkeyPatch, logs: pytest.LogCaptureFixture) -> None:
    """Without pynvml there are no NVIDIA GPUs, one log line, and no exception."""
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert detect_nvidia() == (None, None, [])
    assert len(logs.records) == 1
    assert "nvidia-ml-py" in logs.records[0].getMessage()


def test_opencl_cpu_device_filtered(logs: pytest.LogCaptureFixture) -> None:
    """CPU-type OpenCL devices are not GPUs; a GPU that is also the default device is one."""
    opencl = FakeOpenCl(
        [
            FakePlatform([FakeClDevice("pthread-Intel(R) Core(TM) i7", FakeDeviceType.CPU, 32 * GIB, "6.0")]),
            FakePlatform(
                [
                    FakeClDevice(
                        "gfx1030 ",
                        FakeDeviceType.GPU | FakeDeviceType.DEFAULT,
                        16 * GIB,
                        "3614.0 (HSA1.1,LC)",
                    ),
                    FakeClDevice("gfx90c", FakeDeviceType.GPU, 2 * GIB, "3614.0 (HSA1.1,LC)"),
                ]
            ),
        ]
    )
    driver, gpus = detect_opencl(opencl)
    assert driver == "3614.0 (HSA1.1,LC)"
    assert gpus == [GpuInfo(name="gfx1030", memory=16384), GpuInfo(name="gfx90c", memory=2048)]
    assert logs.records == []


def test_opencl_only_gpus_give_vram(tmp_path: Path) -> None:
    """Without NVML, vram is the OpenCL GPUs' memory and nv_gpu_count is None."""
    opencl = FakeOpenCl(
        [FakePlatform([FakeClDevice("Intel Arc A770", FakeDeviceType.GPU, 16 * GIB, "23.52")])]
    )
    report = detect_hardware(tmp_path, nvml=_no_nvml(), opencl=opencl)
    assert report.vram == 16384
    assert report.cl_driver_version == "23.52"
    fields = report.registration_fields()
    assert fields["nv_gpu_count"] is None
    assert fields["vram"] == 16384


def test_opencl_no_platform(logs: pytest.LogCaptureFixture) -> None:
    """No OpenCL driver (get_platforms raising) gives no GPUs and one log line."""
    assert detect_opencl(_no_opencl()) == (None, [])
    assert len(logs.records) == 1
    assert "PLATFORM_NOT_FOUND_KHR" in logs.records[0].getMessage()


def test_opencl_only_cpu_devices(logs: pytest.LogCaptureFixture) -> None:
    """A platform with only a CPU device gives no GPUs, no driver version and one log line."""
    opencl = FakeOpenCl([FakePlatform([FakeClDevice("cpu", FakeDeviceType.CPU, GIB, "1.0")])])
    assert detect_opencl(opencl) == (None, [])
    assert len(logs.records) == 1


def test_opencl_device_error_skips_only_that_device(logs: pytest.LogCaptureFixture) -> None:
    """A device whose query fails is left out with one log line; the others are still reported."""
    opencl = FakeOpenCl(
        [FakePlatform([BrokenClDevice(), FakeClDevice("gfx1100", FakeDeviceType.GPU, 24 * GIB, "3.0")])]
    )
    _, gpus = detect_opencl(opencl)
    assert [g.name for g in gpus] == ["gfx1100"]
    assert len(logs.records) == 1
    assert "device 0 of platform 0" in logs.records[0].getMessage()


@pytest.mark.timeout(30)
def test_opencl_hang_times_out(logs: pytest.LogCaptureFixture) -> None:
    """A get_platforms that never returns is given up on at the deadline with one log line."""
    release = threading.Event()
    opencl = FakeOpenCl([FakePlatform([FakeClDevice("x", FakeDeviceType.GPU, GIB, "1")])], hang=release)
    try:
        assert detect_opencl(opencl, timeout=0.2) == (None, [])
    finally:
        release.set()
    _join_probe_threads()
    assert len(logs.records) == 1


def test_opencl_library_missing(monkeypatch: pytest.MonkeyPatch, logs: pytest.LogCaptureFixture) -> None:
    """Without pyopencl there are no OpenCL GPUs, one log line, and no exception."""
    monkeypatch.setitem(sys.modules, "pyopencl", None)
    assert detect_opencl() == (None, [])
    assert len(logs.records) == 1
    assert "pyopencl" in logs.records[0].getMessage()


def test_psutil_path_on_this_machine(tmp_path: Path, logs: pytest.LogCaptureFixture) -> None:
    """The real psutil numbers are sane, and with both GPU sources absent there are no GPUs."""
    report = detect_hardware(tmp_path, nvml=_no_nvml(), opencl=_no_opencl())
    assert report.cpu_count >= 1
    assert report.memory > 0
    assert 0 <= report.memory_available <= report.memory
    assert report.disk_space > 0
    assert (report.nv_gpus, report.cl_gpus, report.vram) == ((), (), 0)
    assert (report.nv_driver_version, report.nv_cuda_version, report.cl_driver_version) == (None, None, None)
    assert len(logs.records) == 2


def test_real_libraries_never_crash(tmp_path: Path) -> None:
    """With whatever pynvml/pyopencl this machine has, detection returns a report the queen accepts."""
    report = detect_hardware(tmp_path)
    assert report.vram == sum(g.memory for g in (report.nv_gpus or report.cl_gpus))
    assert report.nv_driver_version is not None or report.nv_gpus == ()
    Register(
        protocol_version=PROTOCOL_VERSION,
        instance_id="hardware-test",
        max_frame_bytes=MAX_FRAME_BYTES,
        worker_version="0",
        models=[ModelInfo(id="m", n_ctx=8)],
        **report.registration_fields(),
    )


def test_disk_space_at_nearest_existing_parent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache directory that does not exist yet is measured at its nearest existing parent, in MiB."""
    asked: list[str] = []

    def disk_usage(path: str) -> Any:
        asked.append(path)
        return types.SimpleNamespace(total=100 * GIB, used=90 * GIB, free=10 * GIB + MIB - 1, percent=90.0)

    monkeypatch.setattr(psutil, "disk_usage", disk_usage)
    report = detect_hardware(tmp_path / "not" / "yet", nvml=_no_nvml(), opencl=_no_opencl())
    assert asked == [str(tmp_path)]
    assert report.disk_space == 10240


def test_registration_fields_make_a_valid_register() -> None:
    """registration_fields() has exactly the Register hardware fields and validates as one."""
    gpu = GpuInfo(name="RTX 3090", memory=24576, memory_free=20000, uuid="GPU-abc", index=0)
    report = HardwareReport(
        cpu_count=16,
        memory=65536,
        memory_available=60000,
        disk_space=500_000,
        nv_driver_version="550.54.14",
        nv_cuda_version="12.4",
        nv_gpus=(gpu,),
        cl_driver_version="3.0",
        cl_gpus=(GpuInfo(name="gfx1030", memory=16384),),
    )
    fields = report.registration_fields()
    assert set(fields) == {
        "cpu_count",
        "memory",
        "disk_space",
        "vram",
        "nv_gpu_count",
        "nv_driver_version",
        "nv_cuda_version",
        "nv_gpus",
        "cl_driver_version",
        "cl_gpus",
    }
    register = Register(
        protocol_version=PROTOCOL_VERSION,
        instance_id="hardware-test",
        max_frame_bytes=MAX_FRAME_BYTES,
        worker_version="0",
        models=[ModelInfo(id="m", n_ctx=8)],
        **fields,
    )
    assert register.model_dump(include=set(fields)) == {
        **fields,
        "nv_gpus": [gpu.model_dump()],
        "cl_gpus": [{"name": "gfx1030", "memory": 16384, "memory_free": None, "uuid": None, "index": None}],
    }
    assert (register.vram, register.nv_gpu_count) == (24576, 1)


def test_report_is_frozen() -> None:
    """A report cannot be changed after the fact."""
    report = HardwareReport(cpu_count=1, memory=1, memory_available=1, disk_space=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.memory = 2  # type: ignore[misc]
    assert hash(report) == hash(HardwareReport(cpu_count=1, memory=1, memory_available=1, disk_space=1))
