"""Build llama.cpp's own `llama-server` from the llama.cpp that llama-cpp-python's sdist vendors.

The reference is the same llama.cpp version as the worker's engine: the sdist of the pinned
llama-cpp-python is fetched with pip (`--no-binary :all: --no-deps`), its `vendor/llama.cpp` built with
CMake for the `llama-server` target only (CPU, Release). Benchmark-only: the test suite never builds it.

    python -m bench.llama_server [--dir .bench-cache/llama-server] [--jobs N]

prints the path of the binary; a second call finds it built and returns at once.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
from importlib.metadata import version
from pathlib import Path

DEFAULT_DIR = Path(__file__).resolve().parent.parent / ".bench-cache" / "llama-server"


def pinned_version() -> str:
    """The llama-cpp-python version installed (the one pyproject.toml pins)."""
    return version("llama_cpp_python")


def build(directory: Path = DEFAULT_DIR, *, jobs: int | None = None) -> Path:
    """The path of a built llama-server for the pinned llama-cpp-python, building it if needed (slow)."""
    release = pinned_version()
    root = directory / release
    binary = root / "build" / "bin" / "llama-server"
    if binary.is_file():
        return binary
    root.mkdir(parents=True, exist_ok=True)
    sdist = root / f"llama_cpp_python-{release}.tar.gz"
    if not sdist.is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-binary",
                ":all:",
                "--no-deps",
                "-d",
                str(root),
                f"llama-cpp-python=={release}",
            ],
            check=True,
        )
    source = root / f"llama_cpp_python-{release}" / "vendor" / "llama.cpp"
    if not source.is_dir():
        with tarfile.open(sdist) as archive:
            archive.extractall(root, filter="data")
    build_dir = root / "build"
    subprocess.run(
        [
            "cmake",
            "-S",
            str(source),
            "-B",
            str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            "-DLLAMA_CURL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_SERVER=ON",
            "-DGGML_NATIVE=ON",
        ],
        check=True,
    )
    subprocess.run(
        [
            "cmake",
            "--build",
            str(build_dir),
            "--target",
            "llama-server",
            "-j",
            str(jobs or os.cpu_count() or 1),
        ],
        check=True,
    )
    return binary


def main() -> None:
    """Build (or find) llama-server and print its path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args()
    print(build(args.dir, jobs=args.jobs))


if __name__ == "__main__":
    main()
