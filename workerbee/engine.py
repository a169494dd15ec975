"""The engine: owns the llama.cpp models and runs requests on them, never on the event loop.

Each model has one thread of its own: llama.cpp contexts are not thread-safe, so requests for a model
run one after the other on that thread while the event loop stays free to talk to the queen.

A request becomes a prompt (the chat template, or the text completion's prompt), its parameters become
a `Sampling`, and decoding.py's token loop generates each of its n choices; choices.py shapes them into
OpenAI's objects. With --embeddings, a second llama.cpp context on the same file serves embeddings.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from protocol import ErrorCode, ModelInfo, Usage
from protocol.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from workerbee import grammars, tool_calls
from workerbee.choices import ChatChoice, CompletionChoice
from workerbee.decoding import (
    Cancelled,
    Generation,
    Sampling,
    choice_seeds,
    end_of_generation_tokens,
    generate,
)

if TYPE_CHECKING:
    from workerbee.batching import BatchedModel

__all__ = [
    "Cancelled",
    "ChunkSink",
    "Engine",
    "EngineError",
    "LoadedModel",
    "ModelConfig",
    "ModelLoadError",
    "chat_sampling",
    "load_model",
]

log = logging.getLogger("workerbee.engine")

ChunkSink = Callable[[dict[str, Any], int], Awaitable[None]]
"""Takes a streamed chunk and the number of generated tokens whose text it carries (0: role, finish)."""
Emit = Callable[[dict[str, Any], int], None]
T = TypeVar("T")

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)
"""The chat template for GGUF files that carry none."""


class EngineError(Exception):
    """A request the engine cannot run; `code` says whose fault it is."""

    def __init__(self, code: ErrorCode, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


class ModelLoadError(Exception):
    """A model file that cannot be loaded; the message is one line for the user."""


@dataclass(frozen=True)
class ModelConfig:
    """How to load one model."""

    id: str
    path: Path
    n_ctx: int = 4096
    n_gpu_layers: int = 0
    tensor_split: tuple[float, ...] | None = None
    main_gpu: int = 0
    embeddings: bool = False
    size_bytes: int | None = None


def _sampling(
    request: ChatCompletionRequest | CompletionRequest, *, top_logprobs: int | None, grammar: str | None
) -> Sampling:
    """The request's sampling parameters, with OpenAI's defaults where the client sent nothing."""
    stop = request.stop
    return Sampling(
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        # OpenAI has no top_k or min_p: off unless the client asks for llama.cpp's extensions.
        top_k=request.top_k or 0,
        min_p=request.min_p or 0.0,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        repeat_penalty=1.0 if request.repeat_penalty is None else request.repeat_penalty,
        logit_bias={int(token): bias for token, bias in (request.logit_bias or {}).items()},
        seed=request.seed,
        max_tokens=request.token_limit,
        stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
        ignore_eos=request.ignore_eos,
        top_logprobs=top_logprobs,
        grammar=grammar,
    )


def chat_sampling(chat: ChatCompletionRequest, grammar: str | None = None) -> Sampling:
    """How a chat request samples (its grammar comes from response_format or tools, see LoadedModel)."""
    return _sampling(chat, top_logprobs=(chat.top_logprobs or 0) if chat.logprobs else None, grammar=grammar)


def _token_limit_param(request: ChatCompletionRequest | CompletionRequest) -> str:
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
        return "max_completion_tokens"
    return "max_tokens"


def _fingerprint(config: ModelConfig) -> str:
    """OpenAI's system_fingerprint: changes whenever what could change answers to a seeded request does."""
    try:
        llama_version = version("llama_cpp_python")
    except PackageNotFoundError:
        llama_version = "unknown"
    identity = f"{config.id}|{config.size_bytes}|{config.n_ctx}|{config.n_gpu_layers}|{llama_version}"
    return "fp_" + hashlib.sha256(identity.encode()).hexdigest()[:10]


class LoadedModel:
    """One llama.cpp model and the single thread that may touch it (and its embeddings context, if any)."""

    def __init__(self, config: ModelConfig, llama: Any, embedder: Any = None) -> None:
        self.config = config
        self.llama = llama
        self.embedder = embedder
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{config.id[:16]}")
        self.template: str = llama.metadata.get("tokenizer.chat_template") or CHATML_TEMPLATE
        self.native_tools = tool_calls.template_knows_tools(self.template)
        self.fingerprint = _fingerprint(config)
        self.eog_tokens = end_of_generation_tokens(llama)
        self._formatter = self._chat_formatter()

    def _chat_formatter(self) -> Any:
        from llama_cpp import llama_chat_format

        vocab = self.llama._model
        eos = self.llama.token_eos()
        bos = self.llama.token_bos()
        return llama_chat_format.Jinja2ChatFormatter(
            template=self.template,
            eos_token=vocab.token_get_text(eos) if eos != -1 else "",
            bos_token=vocab.token_get_text(bos) if bos != -1 else "",
            stop_token_ids=[eos],
        )

    def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """The prompt tokens the chat template makes of `messages` (already in the template's terms)."""
        import jinja2

        try:
            result = self._formatter(messages=messages, tools=tools)
        except (ValueError, TypeError, jinja2.TemplateError) as exc:
            # Templates refuse conversations they cannot express (roles out of order, for one).
            raise EngineError(
                ErrorCode.INVALID_REQUEST,
                f"the model's chat template refused the messages: {exc}",
                "messages",
            ) from None
        tokens: list[int] = self.llama.tokenize(
            result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True
        )
        return tokens

    def count_prompt_tokens(self, messages: list[dict[str, Any]]) -> int | None:
        """Tokens the chat template makes of `messages`."""
        return len(self.render_chat(messages))

    def chat_prompt(self, chat: ChatCompletionRequest) -> list[int]:
        """The prompt tokens of a chat request, tools included."""
        mode = chat.tool_mode
        messages = tool_calls.llama_messages(
            chat.messages, tools=chat.tools, mode=mode, native_tools=self.native_tools
        )
        tools = None
        if self.native_tools and mode != "none" and chat.tools:
            tools = [tool.model_dump(exclude_none=True) for tool in chat.tools]
        return self.render_chat(messages, tools)

    def info(self) -> ModelInfo:
        """How the model is advertised to the queen."""
        return ModelInfo(
            id=self.config.id,
            n_ctx=self.config.n_ctx,
            size_bytes=self.config.size_bytes,
            n_gpu_layers=self.config.n_gpu_layers,
            embeddings=self.embedder is not None,
        )

    def _check_fits(
        self, prompt_tokens: int, request: ChatCompletionRequest | CompletionRequest, param: str
    ) -> None:
        n_ctx = self.llama.n_ctx()
        what = "messages" if param == "messages" else "prompt"
        if prompt_tokens >= n_ctx:
            raise EngineError(
                ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                f"This model's maximum context length is {n_ctx} tokens, "
                f"but the {what} {'take' if what == 'messages' else 'takes'} {prompt_tokens} tokens.",
                param,
            )
        limit = request.token_limit
        if limit is not None and prompt_tokens + limit > n_ctx:
            raise EngineError(
                ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                f"This model's maximum context length is {n_ctx} tokens. However, you requested "
                f"{prompt_tokens + limit} tokens ({prompt_tokens} in the {what}, {limit} in the "
                "completion).",
                _token_limit_param(request),
            )

    def _check_token_ids(self, tokens: list[int], param: str) -> None:
        n_vocab = self.llama.n_vocab()
        bad = next((token for token in tokens if token >= n_vocab), None)
        if bad is not None:
            raise EngineError(
                ErrorCode.INVALID_REQUEST,
                f"token id {bad} is out of range: the vocabulary has {n_vocab}",
                param,
            )

    def _chat_grammar(self, chat: ChatCompletionRequest) -> str | None:
        mode = chat.tool_mode
        if mode != "none" and chat.tools:
            for index, tool in enumerate(chat.tools):
                try:
                    grammars.json_schema_grammar(grammars.parameters_schema(tool))
                except grammars.GrammarError as exc:
                    raise EngineError(
                        ErrorCode.INVALID_REQUEST, str(exc), f"tools[{index}].function.parameters"
                    ) from None
            return grammars.tool_grammar(chat.tools, mode)
        try:
            return grammars.response_format_grammar(chat.response_format)
        except grammars.GrammarError as exc:
            raise EngineError(
                ErrorCode.INVALID_REQUEST, str(exc), "response_format.json_schema.schema"
            ) from None

    def run_chat(
        self,
        chat: ChatCompletionRequest,
        cancel: threading.Event,
        emit: Emit,
    ) -> tuple[Usage, dict[str, Any] | None]:
        """Generate an answer (blocking; runs on the model's thread). Streams through `emit` if asked.

        Everything that can be refused (context length, token ids, schemas, the template) is checked
        before the first token is generated.
        """
        if cancel.is_set():
            raise Cancelled
        prompt = self.chat_prompt(chat)
        self._check_fits(len(prompt), chat, "messages")
        self._check_token_ids([int(token) for token in chat.logit_bias or ()], "logit_bias")
        sampling = chat_sampling(chat, self._chat_grammar(chat))
        choices: list[dict[str, Any]] = []
        completion_tokens = 0
        for index, seed in enumerate(choice_seeds(chat.seed, chat.n or 1)):
            choice = ChatChoice(
                index=index,
                tool_mode=chat.tool_mode,
                logprobs=bool(chat.logprobs),
                fingerprint=self.fingerprint,
                emit=emit if chat.stream else None,
            )
            try:
                generation = self._generate(prompt, sampling, seed, cancel, choice.on_piece)
            except Cancelled as exc:
                raise _cancelled(len(prompt), completion_tokens + exc.generated) from None
            choices.append(choice.finish(generation))
            completion_tokens += generation.completion_tokens
        usage = Usage(
            prompt_tokens=len(prompt),
            completion_tokens=completion_tokens,
            total_tokens=len(prompt) + completion_tokens,
        )
        if chat.stream:
            return usage, None
        return usage, {
            "object": "chat.completion",
            "choices": choices,
            "system_fingerprint": self.fingerprint,
        }

    def run_completion(
        self, request: CompletionRequest, cancel: threading.Event, emit: Emit
    ) -> tuple[Usage, dict[str, Any] | None]:
        """Complete each prompt n times (blocking; runs on the model's thread). Streams if asked."""
        if cancel.is_set():
            raise Cancelled
        add_bos = bool(self.llama._model.add_bos_token())
        prompts: list[tuple[list[int], str]] = []
        for text_or_tokens in request.prompts:
            if isinstance(text_or_tokens, str):
                tokens = self.llama.tokenize(text_or_tokens.encode("utf-8"), add_bos=add_bos, special=True)
                text = text_or_tokens
            else:
                tokens = text_or_tokens
                self._check_token_ids(tokens, "prompt")
                text = self.llama.detokenize(tokens).decode("utf-8", errors="replace")
            self._check_fits(len(tokens), request, "prompt")
            prompts.append((tokens, text))
        self._check_token_ids([int(token) for token in request.logit_bias or ()], "logit_bias")
        sampling = _sampling(request, top_logprobs=request.logprobs, grammar=None)
        n = request.n or 1
        choices: list[dict[str, Any]] = []
        prompt_tokens = sum(len(tokens) for tokens, _ in prompts)
        completion_tokens = 0
        for prompt_index, (tokens, text) in enumerate(prompts):
            for offset, seed in enumerate(choice_seeds(request.seed, n)):
                choice = CompletionChoice(
                    index=prompt_index * n + offset,
                    logprobs=request.logprobs is not None,
                    fingerprint=self.fingerprint,
                    prompt=text,
                    echo=request.echo,
                    emit=emit if request.stream else None,
                )
                try:
                    generation = self._generate(tokens, sampling, seed, cancel, choice.on_piece)
                except Cancelled as exc:
                    raise _cancelled(prompt_tokens, completion_tokens + exc.generated) from None
                choices.append(choice.finish(generation))
                completion_tokens += generation.completion_tokens
        usage = Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )
        if request.stream:
            return usage, None
        return usage, {
            "object": "text_completion",
            "choices": choices,
            "system_fingerprint": self.fingerprint,
        }

    def _generate(
        self,
        prompt: list[int],
        sampling: Sampling,
        seed: int,
        cancel: threading.Event,
        on_piece: Callable[[Any], None],
    ) -> Generation:
        if cancel.is_set():
            raise Cancelled
        return generate(
            self.llama, prompt, replace(sampling, seed=seed), cancel, on_piece, eog_tokens=self.eog_tokens
        )

    def run_embedding(
        self, request: EmbeddingRequest, cancel: threading.Event
    ) -> tuple[Usage, dict[str, Any]]:
        """Embed every input (blocking; runs on the model's thread): mean-pooled, unit length."""
        llama = self.embedder
        if llama is None:
            raise EngineError(
                ErrorCode.INVALID_REQUEST,
                f"this worker does not serve embeddings for '{self.config.id}' (start it with --embeddings)",
                "model",
            )
        n_embd = llama.n_embd()
        if request.dimensions is not None and request.dimensions != n_embd:
            raise EngineError(
                ErrorCode.INVALID_REQUEST,
                f"this model's embeddings have {n_embd} dimensions; other sizes are not supported",
                "dimensions",
            )
        inputs: list[list[int]] = []
        for item in request.inputs:
            tokens = llama.tokenize(item.encode("utf-8"), add_bos=True) if isinstance(item, str) else item
            self._check_token_ids(tokens, "input")
            if len(tokens) > llama.n_ctx():
                raise EngineError(
                    ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                    f"This model's maximum context length is {llama.n_ctx()} tokens, but an input has "
                    f"{len(tokens)} tokens.",
                    "input",
                )
            inputs.append(tokens)
        data: list[dict[str, Any]] = []
        for index, tokens in enumerate(inputs):
            if cancel.is_set():
                raise Cancelled
            vector = _embed(llama, tokens)
            embedding: list[float] | str = (
                base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
                if request.encoding_format == "base64"
                else vector.tolist()
            )
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        total = sum(len(tokens) for tokens in inputs)
        return Usage(prompt_tokens=total, completion_tokens=0, total_tokens=total), {
            "object": "list",
            "data": data,
        }

    def close(self) -> None:
        """Free the model and its thread."""
        self.executor.shutdown(wait=True)
        self.llama.close()
        if self.embedder is not None:
            self.embedder.close()


def _observe(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _cancelled(prompt_tokens: int, completion_tokens: int) -> Cancelled:
    """Cancelled, with what the request used until then."""
    usage = Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )
    return Cancelled(completion_tokens, usage)


def _embed(llama: Any, tokens: list[int]) -> np.ndarray[Any, np.dtype[np.float32]]:
    """The pooled, normalized embedding of one token sequence.

    Llama.embed takes only text; token arrays (an OpenAI input form) need the same steps by hand: one
    sequence per batch, every token an output, the context's pooled vector for sequence 0.
    """
    import llama_cpp

    llama._batch.reset()
    llama._batch.add_sequence(tokens, 0, True)
    llama._ctx.kv_cache_clear()
    llama._ctx.decode(llama._batch)
    pooled = llama_cpp.llama_get_embeddings_seq(llama._ctx.ctx, 0)
    vector = np.array(pooled[: llama.n_embd()], dtype=np.float32)
    llama._batch.reset()
    llama._ctx.kv_cache_clear()
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def _llama_kwargs(config: ModelConfig, threads: int) -> dict[str, Any]:
    return {
        "model_path": str(config.path),
        "n_ctx": config.n_ctx,
        "n_threads": threads,
        "n_threads_batch": threads,
        "n_gpu_layers": config.n_gpu_layers,
        "tensor_split": list(config.tensor_split) if config.tensor_split else None,
        "main_gpu": config.main_gpu,
        "verbose": False,
    }


def load_model(config: ModelConfig, *, threads: int) -> LoadedModel:
    """Load a GGUF with llama.cpp (blocking). Raises ModelLoadError with one clear line.

    With `config.embeddings`, a second context on the same file serves embeddings: a context made for
    embeddings pools every position's output and cannot sample, so it cannot be the one that generates.
    The weights are memory-mapped once and shared by both.
    """
    import llama_cpp
    from llama_cpp import Llama

    if not config.path.is_file():
        raise ModelLoadError(f"model file not found: {config.path}")
    kwargs = _llama_kwargs(config, threads)
    try:
        llama = Llama(**kwargs)
        embedder = None
        if config.embeddings:
            arch = llama.metadata.get("general.architecture", "")
            # Decoder models declare no pooling; mean pooling is the usual choice for them.
            declared = f"{arch}.pooling_type" in llama.metadata
            embedder = Llama(
                **kwargs,
                embedding=True,
                # A whole input must fit one batch for its pooled vector.
                n_batch=config.n_ctx,
                n_ubatch=config.n_ctx,
                pooling_type=(
                    llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED
                    if declared
                    else llama_cpp.LLAMA_POOLING_TYPE_MEAN
                ),
            )
    except (ValueError, RuntimeError, OSError) as exc:
        raise ModelLoadError(f"could not load {config.path}: {exc}") from None
    return LoadedModel(config, llama, embedder)


class Engine:
    """Every model this worker serves, and the way requests reach them."""

    def __init__(
        self, models: dict[str, LoadedModel], batched: dict[str, BatchedModel] | None = None
    ) -> None:
        self.models = models
        self.batched = batched or {}
        """Per model, the continuous-batching backend that runs plain chat requests (batching.py)."""

    @classmethod
    async def load(
        cls, configs: list[ModelConfig], *, threads: int | None = None, parallel: int = 1
    ) -> Engine:
        """Load every model off the event loop, each with a batching backend for `parallel` requests.

        `threads` None: each model measures the fastest thread count once loaded (threads.py).
        """
        from workerbee.batching import BatchedModel

        models: dict[str, LoadedModel] = {}
        batched: dict[str, BatchedModel] = {}
        for config in configs:
            log.info("loading model %s from %s", config.id, config.path)
            model = models[config.id] = await asyncio.to_thread(load_model, config, threads=threads or 1)
            batched[config.id] = await asyncio.to_thread(
                BatchedModel.create, model, parallel=parallel, threads=threads
            )
        return cls(models, batched)

    def model_infos(self) -> list[ModelInfo]:
        """What the worker advertises."""
        return [model.info() for model in self.models.values()]

    def model(self, model_id: str) -> LoadedModel:
        """The loaded model clients call `model_id`; EngineError if this worker does not serve it."""
        model = self.models.get(model_id)
        if model is None:
            raise EngineError(ErrorCode.MODEL_NOT_FOUND, f"this worker does not serve '{model_id}'", "model")
        return model

    async def chat(
        self, chat: ChatCompletionRequest, cancel: threading.Event, on_chunk: ChunkSink
    ) -> tuple[Usage, dict[str, Any] | None]:
        """Run a chat completion; streamed chunks go to `on_chunk` as they are produced.

        If this coroutine is cancelled, generation stops at the next token.
        """
        model = self.model(chat.model)
        batched = self.batched.get(chat.model)
        if batched is not None and batched.supports(chat):
            return await batched.chat(chat, cancel, on_chunk)
        return await self._on_model_thread(
            model, lambda emit: model.run_chat(chat, cancel, emit), cancel, on_chunk
        )

    async def complete(
        self, request: CompletionRequest, cancel: threading.Event, on_chunk: ChunkSink
    ) -> tuple[Usage, dict[str, Any] | None]:
        """Run a text completion; streamed chunks go to `on_chunk` as they are produced."""
        model = self.model(request.model)
        return await self._on_model_thread(
            model, lambda emit: model.run_completion(request, cancel, emit), cancel, on_chunk
        )

    async def embed(self, request: EmbeddingRequest, cancel: threading.Event) -> tuple[Usage, dict[str, Any]]:
        """Compute embeddings for every input of the request."""
        model = self.model(request.model)

        async def no_chunks(chunk: dict[str, Any], tokens: int) -> None:
            raise AssertionError("embeddings are never streamed")

        return await self._on_model_thread(
            model, lambda emit: model.run_embedding(request, cancel), cancel, no_chunks
        )

    @staticmethod
    async def _on_model_thread(
        model: LoadedModel, work: Callable[[Emit], T], cancel: threading.Event, on_chunk: ChunkSink
    ) -> T:
        """Run `work` on the model's thread, relaying what it emits to `on_chunk` in order.

        If this coroutine is cancelled, the cancel flag stops generation at the next token.
        """
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[tuple[dict[str, Any], int] | None] = asyncio.Queue()

        def emit(chunk: dict[str, Any], tokens: int) -> None:
            loop.call_soon_threadsafe(chunks.put_nowait, (chunk, tokens))

        def run() -> T:
            try:
                return work(emit)
            finally:
                loop.call_soon_threadsafe(chunks.put_nowait, None)

        future = loop.run_in_executor(model.executor, run)
        try:
            while (item := await chunks.get()) is not None:
                await on_chunk(*item)
            return await future
        finally:
            if not future.done():
                cancel.set()
                # Nobody awaits it any more: observe how it ends (Cancelled, as a rule) so it is not logged.
                future.add_done_callback(_observe)

    def close(self) -> None:
        """Free every model (batching contexts first: they use the models' weights)."""
        for batched in self.batched.values():
            batched.close()
        for model in self.models.values():
            model.close()
