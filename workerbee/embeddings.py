"""The embeddings thread of one model: inputs of every waiting request, packed into pooled decodes.

A request's inputs are queued; each step takes queued inputs, in order and from any requests, while
they fit one decode (the context's cells and sequences), embeds them together (llama_context.py's
EmbeddingContext) and hands each request its vectors once all of its inputs are done.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from protocol import ErrorCode
from workerbee.errors import Cancelled, EngineError
from workerbee.llama_context import DecodeError, EmbeddingContext

log = logging.getLogger("workerbee.embeddings")

Vector = npt.NDArray[np.float32]


@dataclass
class EmbeddingJob:
    """One request's inputs (token lists, each at most n_ctx long); `done` gets the vectors or an error."""

    inputs: list[list[int]]
    cancel: threading.Event
    done: Callable[[list[Vector] | Exception], None]
    vectors: dict[int, Vector] = field(default_factory=dict)
    ended: bool = False

    def end(self, result: list[Vector] | Exception) -> None:
        """Hand the request its result, once."""
        if not self.ended:
            self.ended = True
            self.done(result)


class Embedder:
    """A pooled context and the thread that alone uses it."""

    def __init__(self, context: EmbeddingContext, *, name: str) -> None:
        self.context = context
        self.decodes = 0
        """Decode calls made (for tests: inputs of several requests share one)."""
        self._queue: deque[tuple[EmbeddingJob, int]] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"embed-{name[:16]}", daemon=True)
        self._thread.start()

    def submit(self, job: EmbeddingJob) -> None:
        """Queue every input of a request."""
        with self._wake:
            if self._closing:
                job.done(EngineError(ErrorCode.OVERLOADED, "the model is shutting down"))
                return
            self._queue.extend((job, index) for index in range(len(job.inputs)))
            self._wake.notify()

    def close(self) -> None:
        """Stop the thread (queued requests end as cancelled) and free the context."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()
        self.context.close()

    def _take(self) -> list[tuple[EmbeddingJob, int]] | None:
        with self._wake:
            while not (self._closing or self._queue):
                self._wake.wait()
            if self._closing:
                return None
            taken: list[tuple[EmbeddingJob, int]] = []
            cells = 0
            while self._queue and len(taken) < self.context.n_seq:
                job, index = self._queue[0]
                if job.cancel.is_set() or job.ended:
                    self._queue.popleft()
                    job.end(Cancelled())
                    continue
                size = len(job.inputs[index])
                if taken and cells + size > self.context.n_ctx:
                    break
                self._queue.popleft()
                taken.append((job, index))
                cells += size
            return taken

    def _run(self) -> None:
        while (taken := self._take()) is not None:
            for job, _ in taken:
                if job.cancel.is_set():
                    job.end(Cancelled())
            taken = [(job, index) for job, index in taken if not job.ended]
            if not taken:
                continue
            try:
                vectors = self.context.embed([job.inputs[index] for job, index in taken])
            except DecodeError as exc:
                log.error("embedding %d inputs failed: %s", len(taken), exc)
                for job, _ in taken:
                    job.end(EngineError(ErrorCode.INTERNAL_ERROR, f"llama.cpp: {exc}"))
                continue
            self.decodes += 1
            for (job, index), vector in zip(taken, vectors, strict=True):
                job.vectors[index] = vector
                if len(job.vectors) == len(job.inputs):
                    job.end([job.vectors[i] for i in range(len(job.inputs))])
        with self._wake:
            pending = [job for job, _ in self._queue]
            self._queue.clear()
        for job in pending:
            job.end(Cancelled())
