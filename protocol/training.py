"""What a training worker reports: progress events while it trains, and a report when it is done.

Events travel as the `chunk` of `Chunk` frames of a `TrainJob` (protocol 3), the report as the
`response` of its `Result`; the queen validates both with `TRAINING_EVENT` / `TRAINING_REPORT`.

Units: losses are mean cross-entropy per token, natural logs (nats).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, TypeAdapter

from protocol.messages import Frame, PrintableStr


class TrainingEvent(Frame):
    """One step's metrics (`metrics`) or a line about what the trainer does (`message`)."""

    type: Literal["metrics", "message"]
    message: PrintableStr = Field(default="", max_length=1024)
    step: int | None = Field(default=None, ge=1, description="Optimizer steps done, over all epochs.")
    total_steps: int | None = Field(default=None, ge=1)
    epoch: int | None = Field(default=None, ge=1)
    train_loss: float | None = Field(default=None, description="The step's training loss.")
    valid_loss: float | None = Field(
        default=None, description="The loss on the validation chats after the last finished epoch."
    )


class TrainingReport(Frame):
    """A finished training: what was trained and the file the worker now serves."""

    trained_tokens: int = Field(ge=0, description="Tokens trained on, over all epochs.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the fine-tuned GGUF.")
    size_bytes: int = Field(ge=0, description="Size of the fine-tuned GGUF, bytes.")


TRAINING_EVENT: TypeAdapter[TrainingEvent] = TypeAdapter(TrainingEvent)
TRAINING_REPORT: TypeAdapter[TrainingReport] = TypeAdapter(TrainingReport)
