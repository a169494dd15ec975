"""Every frame exchanged between a queen and a worker, as frozen pydantic models.

The first frame on a connection is the worker's `Register`; the queen answers with `Welcome` or
closes the socket with a `ProtocolError` frame and a close reason. After that, every frame that
belongs to a request carries its `request_id`, so one connection carries many requests at once:

    queen -> worker:  Welcome, Job, Cancel, ProtocolError
    worker -> queen:  Register, Chunk, Delta, ResultPart, Result, JobError, Draining, CacheSummary,
                      ProtocolError, and Batch: several of those (not Register) in one websocket message

Frame limits are agreed, not assumed: the worker states the largest frame it accepts in `Register`, the
queen states its own in `Welcome`, and neither side sends a frame larger than the other accepts. A whole
answer too big for one frame travels as `ResultPart` frames (slices of the response's JSON text) before
its `Result`.

Text that ends up in logs or the usage ledger (ids, versions, payout addresses) may not contain control
characters, so a worker cannot forge a log line or a ledger row.

Units: memory and disk sizes are MiB (2**20 bytes) unless a field name ends in `_bytes`.

Version history: 1, the first version; 2, agreed frame limits (`max_frame_bytes`), a stable worker
`instance_id`, validated `ln_url`, token counts on chunks, usage on job errors, `ResultPart`, and typed
jobs: `Job.request` is one of the `JobRequest` kinds (chat, completion, embedding, count_tokens) holding
the validated request model, where version 1 sent a path (`openai_url`) and a dict (`openai_req`);
also in 2, resumable answers: the token ids behind every chunk (`Chunk.token_ids`), each model's content
hash (`ModelInfo.sha256`), and `resume` on chat and completion jobs, which continue an answer another
worker began from the token ids it relayed.
3 adds, without changing any frame of 2: worker verification (possession challenges and audit jobs
for auditors), cache summaries for cache-aware routing, and training jobs for fine-tuning.
4: the token ids behind a whole answer's choices (`Result.token_ids`, one list per choice of a chat or
text completion). A queen of 3 refuses the field, and a queen of 4 benches a worker whose whole answer
leaves it out (it could be neither counted by its ids nor audited), so 3 and 4 do not mix.
5: `Batch`, a worker's frames of one moment in one websocket message (a batching engine's step yields a
chunk for every stream at once): the queen's cost per message (websocket parsing, one validation call,
a wake-up) is shared by the chunks in it. A queen of 4 does not know the frame.
6: `Delta`, the commonest chunk (new text for one choice, nothing else) in a compact form that the queen
renders in its endpoint's shape without decoding a chunk object and encoding it again. A queen of 5
does not know the frame.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_serializer, model_validator

from protocol.errors import ErrorCode
from protocol.lnurl import check_ln_url
from protocol.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

PROTOCOL_VERSION = 6
"""Bumped on every incompatible change to the frames below."""

MIN_FRAME_BYTES = 64 * 2**10
"""The smallest frame limit either side may state (64 KiB): room for any control frame."""


PRINTABLE_PATTERN = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]*$"
"""No control characters and no line separators: checked by pydantic's own regex engine, not Python."""

PrintableStr = Annotated[str, Field(pattern=PRINTABLE_PATTERN)]
"""Text without control characters: safe to put in a log line or a ledger row."""

RequestId = Annotated[PrintableStr, Field(min_length=1, max_length=128)]
InstanceId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{8,64}$")]


class Frame(BaseModel):
    """Base of every frame: immutable, and strict about unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class GpuInfo(Frame):
    """One GPU as the worker sees it."""

    name: str = Field(description="Device name as reported by the driver.")
    memory: int = Field(ge=0, description="Total device memory, MiB.")
    memory_free: int | None = Field(
        default=None, ge=0, description="Free device memory when the report was made, MiB."
    )
    uuid: str | None = Field(default=None, description="Stable device id (NVML uuid), if known.")
    index: int | None = Field(default=None, ge=0, description="Device index as the driver numbers it.")


class TrainingCapability(Frame):
    """What fine-tuning a worker started with --train takes on."""

    methods: list[Literal["full"]] = Field(
        min_length=1, max_length=4, description="Fine-tuning methods: `full` (every F32 weight, on CPU)."
    )
    max_parameters: int = Field(ge=0, description="The largest model it trains, parameters.")
    memory_free: int = Field(ge=0, description="Memory free for training when it registered, MiB.")


class ModelInfo(Frame):
    """A model a worker serves."""

    id: PrintableStr = Field(min_length=1, max_length=256, description="The name clients send as `model`.")
    n_ctx: int = Field(ge=1, description="Context length the model is loaded with, tokens.")
    size_bytes: int | None = Field(default=None, ge=0, description="Size of the GGUF file(s), bytes.")
    n_gpu_layers: int = Field(default=0, ge=0, description="Layers offloaded to GPUs.")
    embeddings: bool = Field(default=False, description="Whether /v1/embeddings is served.")
    sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 of the GGUF file(s), lowercase hex: an answer resumes only onto the same file.",
    )


class Register(Frame):
    """The worker's first frame: who it is, what it has, what it serves.

    The hardware fields keep the names of the original workerbee design; their units are fixed here.
    """

    type: Literal["register"] = "register"
    protocol_version: int = Field(description="The PROTOCOL_VERSION the worker speaks.")
    worker_version: PrintableStr = Field(max_length=64, description="The workerbee package version.")
    instance_id: InstanceId = Field(
        description="A random id the worker keeps across restarts and reconnections: who it is, to the "
        "queen's retries and health records, whichever connection it comes back on."
    )
    max_frame_bytes: int = Field(
        ge=MIN_FRAME_BYTES, description="Largest frame the worker accepts, bytes: no job may be bigger."
    )
    ln_url: Annotated[str, AfterValidator(check_ln_url)] = Field(
        default="",
        max_length=2048,
        description="Where payouts go: a Lightning address (user@domain) or a bech32 LNURL; empty for none.",
    )
    auth_key: str = Field(default="", max_length=1024, description="Worker token the queen may require.")
    auditor_token: str = Field(
        default="",
        max_length=1024,
        description="The queen's auditor token, from a worker its operator trusts: it is sent audit jobs.",
    )
    cpu_count: int = Field(ge=0, description="Logical CPUs.")
    memory: int = Field(default=0, ge=0, description="Total system memory, MiB.")
    disk_space: int = Field(ge=0, description="Free disk where models are cached, MiB.")
    vram: int = Field(ge=0, description="Total memory of the GPUs reported (NVIDIA, else OpenCL), MiB.")
    nv_gpu_count: int | None = Field(default=None, ge=0, description="NVIDIA GPUs seen by NVML.")
    nv_driver_version: str | None = Field(default=None, description="NVIDIA driver version.")
    nv_cuda_version: str | None = Field(default=None, description="CUDA version the driver supports.")
    nv_gpus: list[GpuInfo] = Field(default_factory=list, description="One entry per NVIDIA GPU.")
    cl_driver_version: str | None = Field(default=None, description="OpenCL driver version.")
    cl_gpus: list[GpuInfo] = Field(default_factory=list, description="One entry per OpenCL GPU device.")
    models: list[ModelInfo] = Field(min_length=1, max_length=64, description="Models this worker serves.")
    parallel: int = Field(default=1, ge=1, le=256, description="Requests the worker runs at once.")
    training: TrainingCapability | None = Field(
        default=None, description="Set by a worker started with --train: it takes fine-tuning jobs."
    )


class Welcome(Frame):
    """The queen accepted the registration."""

    type: Literal["welcome"] = "welcome"
    protocol_version: int = PROTOCOL_VERSION
    worker_id: str = Field(description="The id the queen knows this connection by.")
    max_frame_bytes: int = Field(
        ge=MIN_FRAME_BYTES,
        description="Largest frame the queen accepts, bytes: the worker splits or refuses anything bigger.",
    )
    refused_models: dict[str, PrintableStr] = Field(
        default_factory=dict,
        max_length=64,
        description="Models of the registration the queen will not route to, with why (a pinned id whose "
        "file hash differs): the worker serves the others.",
    )


class _JobKind(Frame):
    """Base of the job kinds: the request travels as its client sent it, fields left unset stay unset."""

    @field_serializer("body", check_fields=False)
    def _body(self, body: BaseModel) -> dict[str, Any]:
        return body.model_dump(mode="json", exclude_unset=True, by_alias=True)


class ResumedChoice(Frame):
    """One choice of an answer another worker began: the tokens whose text the client already has.

    The worker renders the prompt, appends `token_ids`, advances the choice's sampler and grammar over
    them as if it had generated them, and streams only what follows. Text the first worker held back
    (a possible stop sequence, part of a character) is not behind these ids: it is generated again.
    """

    index: int = Field(ge=0, le=127, description="The choice's index in the answer.")
    token_ids: list[int] = Field(max_length=2**20, description="Generated tokens already relayed, in order.")
    budget: int | None = Field(
        default=None,
        ge=0,
        description="Completion tokens the choice may still generate (the request's limit less the "
        "relayed ones); None: up to the context length.",
    )


class Resume(Frame):
    """Where a resumed answer stands: its unfinished choices; finished ones are not run again."""

    choices: list[ResumedChoice] = Field(min_length=1, max_length=128)


class ChatJob(_JobKind):
    """A chat completion (also what the Responses and Messages APIs become)."""

    kind: Literal["chat"] = "chat"
    body: ChatCompletionRequest
    resume: Resume | None = Field(default=None, description="Set when continuing another worker's answer.")


class CompletionJob(_JobKind):
    """A legacy text completion."""

    kind: Literal["completion"] = "completion"
    body: CompletionRequest
    resume: Resume | None = Field(default=None, description="Set when continuing another worker's answer.")


class EmbeddingJob(_JobKind):
    """Embeddings of every input; only for workers that serve the model with embeddings."""

    kind: Literal["embedding"] = "embedding"
    body: EmbeddingRequest


class TokenCountJob(_JobKind):
    """Count the prompt tokens the model's chat template makes of a chat request; nothing is generated.

    Answered by a `Result` whose response is `{"input_tokens": n}` and whose usage is zero.
    """

    kind: Literal["count_tokens"] = "count_tokens"
    body: ChatCompletionRequest


class AuditedChoice(Frame):
    """One choice of a delivered answer, as the worker returned it: what an auditor scores."""

    index: int = Field(ge=0, le=127, description="The choice's index in the answer.")
    token_ids: list[int] = Field(max_length=2**16, description="The completion's token ids, in order.")
    finished: bool = Field(
        description="Whether the worker ended the choice itself (end of generation or a stop sequence), "
        "rather than at the token limit: an ended choice must be one the model would end there."
    )


class AuditJob(Frame):
    """For auditors only: score a delivered answer with one teacher-forced prefill on a trusted copy.

    The auditor renders the prompt of `chat` or `completion` itself (its own prompt count), appends
    each choice's ids and reads the logits at every completion position (a fixed batch size, no prompt
    cache). Answered by a `Result` whose response is a `protocol.verification.AuditReport`.
    """

    kind: Literal["audit"] = "audit"
    model: PrintableStr = Field(min_length=1, max_length=256, description="The model id to score with.")
    chat: ChatCompletionRequest | None = Field(default=None, description="The request, if a chat.")
    completion: CompletionRequest | None = Field(default=None, description="The request, if a completion.")
    choices: list[AuditedChoice] = Field(min_length=1, max_length=128)

    @field_serializer("chat", "completion")
    def _body(self, body: BaseModel | None) -> dict[str, Any] | None:
        return None if body is None else body.model_dump(mode="json", exclude_unset=True, by_alias=True)

    @model_validator(mode="after")
    def _one_request(self) -> AuditJob:
        if (self.chat is None) == (self.completion is None):
            raise ValueError("an audit carries exactly one of chat and completion")
        return self


class ChallengeJob(Frame):
    """A possession challenge: the SHA-256 of `length` bytes of the model's GGUF from `offset` on.

    For a split GGUF the range is over its parts in order. Answered by a `Result` whose response is a
    `protocol.verification.ChallengeReport`; a worker without the bytes cannot answer it.
    """

    kind: Literal["challenge"] = "challenge"
    model: PrintableStr = Field(min_length=1, max_length=256)
    offset: int = Field(ge=0)
    length: int = Field(ge=1, le=2**24, description="Bytes to hash, at most 16 MiB.")


class TrainJob(Frame):
    """Fine-tune one of the worker's models on chats (protocol 3; only for workers that registered
    `training`).

    Progress comes back as `Chunk` frames whose `chunk` is a `protocol.training.TrainingEvent`; a
    success ends with a `Result` whose response is a `protocol.training.TrainingReport` and whose
    usage counts the trained tokens as prompt tokens. From then on the worker serves the result as
    `output_model`. Cancelling it kills the training process.
    """

    kind: Literal["train"] = "train"
    model: PrintableStr = Field(min_length=1, max_length=256, description="The base model's id.")
    model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="The base model's file hash.")
    output_model: PrintableStr = Field(
        min_length=1, max_length=256, description="The id the fine-tuned model is served as."
    )
    training: list[list[dict[str, Any]]] = Field(
        min_length=1, max_length=100_000, description="Chats to train on, each a list of messages."
    )
    validation: list[list[dict[str, Any]]] = Field(
        default_factory=list, max_length=100_000, description="Chats the validation loss is taken on."
    )
    n_epochs: int = Field(ge=1, le=50)
    learning_rate: float = Field(gt=0, le=1)
    seed: int = Field(ge=0, lt=2**31)
    n_ctx: int = Field(ge=256, le=8192, multiple_of=256, description="Tokens per training window.")


class LoadModelJob(Frame):
    """Fetch a fine-tuned model from the queen and serve it (protocol 3; for workers with `training`).

    The worker downloads `GET /worker/models/{sha256}` from the queen, checks the content's SHA-256,
    serves it as `model` and registers again with it. Answered by a `Result` whose response is
    `{"model": model}` and whose usage is zero.
    """

    kind: Literal["load_model"] = "load_model"
    model: PrintableStr = Field(min_length=1, max_length=256, description="The id to serve it as.")
    base: PrintableStr = Field(min_length=1, max_length=256, description="The model it was trained from.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the GGUF the queen keeps.")


JobRequest = Annotated[
    ChatJob
    | CompletionJob
    | EmbeddingJob
    | TokenCountJob
    | AuditJob
    | ChallengeJob
    | TrainJob
    | LoadModelJob,
    Field(discriminator="kind"),
]
"""What a job asks the worker to do, tagged by `kind`."""


class Job(Frame):
    """One request for the worker to run."""

    type: Literal["job"] = "job"
    request_id: RequestId
    request: JobRequest

    @property
    def stream(self) -> bool:
        """Whether the answer is to be streamed as chunks."""
        request = self.request
        return isinstance(request, ChatJob | CompletionJob) and request.body.stream


class Cancel(Frame):
    """The client went away: stop generating and free the slot."""

    type: Literal["cancel"] = "cancel"
    request_id: RequestId


class PromptTokensDetails(Frame):
    """What of the prompt the worker did not compute again (OpenAI's `prompt_tokens_details`)."""

    cached_tokens: int = Field(
        default=0, ge=0, description="Prompt tokens taken from a cache (a slot's or host RAM's), not decoded."
    )


class Usage(Frame):
    """Token counts of one request."""

    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)
    prompt_tokens_details: PromptTokensDetails | None = None

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens the worker reused (0 when it did not say)."""
        return self.prompt_tokens_details.cached_tokens if self.prompt_tokens_details is not None else 0


class Chunk(Frame):
    """One streamed piece of an answer: an OpenAI `chat.completion.chunk` object's `choices` and extras.

    The queen owns `id`, `created` and `model`; it overwrites them before relaying.
    """

    type: Literal["chunk"] = "chunk"
    request_id: RequestId
    chunk: dict[str, Any]
    tokens: int = Field(
        default=0, ge=0, description="Generated tokens whose text this chunk carries (0 if it carries none)."
    )
    token_ids: list[int] | None = Field(
        default=None,
        max_length=2**16,
        description="The ids of those tokens, in order, for the chunk's one choice: what a resume continues "
        "from. None from a worker that does not send them (its answers cannot be resumed).",
    )


class Delta(Frame):
    """New text for one choice of a stream and nothing else: the compact form of the commonest chunk.

    It stands for the Chunk whose only choice is `index` with the text (a chat chunk's `delta.content`,
    a completion chunk's `text`), `logprobs` and `finish_reason` null, and the `system_fingerprint` of
    the stream's earlier chunks. The queen writes it out in its endpoint's shape. A chunk with anything
    more (a role, tool calls, log probabilities, a finish) travels as a Chunk.
    """

    type: Literal["delta"] = "delta"
    request_id: RequestId
    index: int = Field(default=0, ge=0, le=2**16, description="The choice the text belongs to.")
    text: str
    tokens: int = Field(default=0, ge=0, description="Generated tokens whose text this is.")
    token_ids: list[int] | None = Field(
        default=None, max_length=2**16, description="The ids of those tokens, in order (as Chunk.token_ids)."
    )


class ResultPart(Frame):
    """A slice of the JSON text of a whole response too big for one frame; a `Result` with `parts` ends it."""

    type: Literal["result_part"] = "result_part"
    request_id: RequestId
    data: str


class Result(Frame):
    """The end of a request that succeeded.

    `response` is the whole OpenAI response object for requests that were not streamed; for streams it
    is None, since the content already went out as chunks.
    """

    type: Literal["result"] = "result"
    request_id: RequestId
    usage: Usage
    response: dict[str, Any] | None = None
    parts: int = Field(
        default=0, ge=0, description="ResultPart frames sent before this one that hold the response instead."
    )
    token_ids: list[Annotated[list[int], Field(max_length=2**16)]] | None = Field(
        default=None,
        max_length=128,
        # Left out when unset: the results of other jobs (embeddings, audits, training) have none.
        exclude_if=lambda ids: ids is None,
        description="For a whole chat or text completion, required: the ids of each choice's generated "
        "tokens, one list per choice in the order of the response's choices, what the queen counts and "
        "audits (a worker that leaves them out is benched). None for the results of other jobs.",
    )


class JobError(Frame):
    """The end of a request that failed on the worker."""

    type: Literal["job_error"] = "job_error"
    request_id: RequestId
    code: ErrorCode
    message: str = Field(max_length=4096)
    param: str | None = Field(default=None, max_length=256)
    usage: Usage | None = Field(
        default=None, description="What the request used before it ended (a cancelled stream's tokens)."
    )


PrefixHash = Annotated[int, Field(ge=0, lt=2**63)]
"""A chained prefix hash (protocol/prefix.py)."""

MAX_CACHED_PREFIXES = 2048
"""Prefixes one CacheSummary may list: a summary stays within the smallest frame limit (64 KiB)."""


class CacheSummary(Frame):
    """The prefixes a worker's caches hold for one model, replacing the summary it sent before.

    Each entry is a prefix hash (protocol/prefix.py) and the prompt tokens that prefix covers in the
    worker's cache (its slots and, with --cache-ram, host RAM). Sent whenever what is cached changes,
    before the Result of the request that changed it.
    """

    type: Literal["cache_summary"] = "cache_summary"
    model: PrintableStr = Field(min_length=1, max_length=256)
    prefixes: list[tuple[PrefixHash, Annotated[int, Field(ge=1, le=2**31 - 1)]]] = Field(
        default_factory=list,
        max_length=MAX_CACHED_PREFIXES,
        description="(prefix hash, prompt tokens it covers) pairs, longest first.",
    )


class Draining(Frame):
    """The worker is shutting down: it finishes what it runs but takes no new jobs."""

    type: Literal["draining"] = "draining"


class ProtocolError(Frame):
    """A frame could not be understood; sent before closing, or for a frame that was dropped."""

    type: Literal["protocol_error"] = "protocol_error"
    code: ErrorCode
    message: str = Field(max_length=4096)


BatchedFrame = Annotated[
    Chunk | Delta | ResultPart | Result | JobError | Draining | CacheSummary | ProtocolError,
    Field(discriminator="type"),
]
"""A frame a worker may send inside a Batch: any but Register and Batch itself."""

MAX_BATCH_FRAMES = 4096
"""Frames one Batch may hold (the frame limit bounds its bytes as well)."""


class Batch(Frame):
    """Several frames of a worker in one message, handled by the queen in order as if sent one by one.

    A worker sends one when it has more than one frame ready at once (one step of a batching engine
    yields a chunk for every stream); the whole message stays within the queen's frame limit.
    """

    type: Literal["batch"] = "batch"
    frames: list[BatchedFrame] = Field(min_length=1, max_length=MAX_BATCH_FRAMES)


WorkerFrame = Annotated[
    Register
    | Chunk
    | Delta
    | ResultPart
    | Result
    | JobError
    | Draining
    | CacheSummary
    | ProtocolError
    | Batch,
    Field(discriminator="type"),
]
"""Any frame a worker sends."""

QueenFrame = Annotated[Welcome | Job | Cancel | ProtocolError, Field(discriminator="type")]
"""Any frame a queen sends."""
