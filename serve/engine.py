"""One model instance shared by the UI and the API, generating one request at a time.

On a CPU two generations at once only split the same cores, so requests queue for a
single generation slot and wait at most `queue_timeout` seconds for it. Every decoding
step runs on one dedicated model thread (`Engine.executor`): torch's OpenMP pool is
fast for the thread that owns it and about 40 % slower when several threads take
turns, so the model is also loaded on that thread (`load_on_model_thread`). LoRA
adapters found under `--adapters` are loaded once into the same peft model and
switched per request; the base model is served with adapters disabled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from vlm_chat.chat import fit_to_context
from vlm_chat.errors import ConfigError, ContextOverflowError, UserFacingError
from vlm_chat.generation import GenerationSettings, TextStream

BASE = "base"


class BusyError(UserFacingError):
    """The generation slot did not free up in time."""


class UnknownModelError(UserFacingError):
    pass


@dataclass
class EngineLimits:
    queue_timeout: float = 120.0  # seconds a request may wait for the generation slot
    request_timeout: float = 300.0  # seconds one generation may run before it is stopped


def model_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlm-chat-model")


def load_on_model_thread(load, *args, **kwargs) -> Engine:
    """Run `load(*args, executor=..., **kwargs)` (which builds the Engine) on a new model thread."""
    executor = model_thread()
    return executor.submit(load, *args, executor=executor, **kwargs).result()


def find_adapters(root: str | Path | None) -> dict[str, Path]:
    """name -> adapter folder for every peft adapter (or trained bundle's adapter) under `root`."""
    if not root:
        return {}
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"--adapters {root}: not a folder")
    found = {}
    for config in sorted(root.rglob("adapter_config.json")):
        folder = config.parent
        # A trained bundle keeps its adapter in BUNDLE/adapter: name it after the bundle.
        name = folder.parent.name if folder.name == "adapter" else folder.name
        found.setdefault(name, folder)
    return found


class Engine:
    def __init__(self, model, processor, name: str, adapters: dict[str, Path] | None = None,
                 limits: EngineLimits | None = None, executor: ThreadPoolExecutor | None = None):
        from adapters.lora import ADAPTER_NAME, load_lora

        self.executor = executor or model_thread()
        self.model = model
        self.processor = processor
        self.name = name
        self.limits = limits or EngineLimits()
        self._slot = threading.Lock()
        self.last_stats = None  # of the most recent generation (for logs and tests)
        # A trained bundle's own adapter is peft's "default" and is part of the base model
        # (unless it was merged into the weights at load, see VisionLanguageModel.from_pretrained).
        self._own_adapter = ADAPTER_NAME if model.config.adapter and not model.adapter_merged else None
        self.adapters: list[str] = []
        for adapter_name, folder in (adapters or {}).items():
            if adapter_name in (BASE, name, ADAPTER_NAME):
                raise ConfigError(f"adapter folder {folder} is named {adapter_name!r}, which is reserved; rename the folder")
            model.language_model = load_lora(model.language_model, folder, adapter_name=adapter_name)
            self.adapters.append(adapter_name)
        model.language_model.eval()

    @property
    def model_names(self) -> list[str]:
        return [self.name, *self.adapters]

    def check_model(self, requested: str | None) -> str:
        if requested in (None, "", self.name, BASE):
            return self.name
        if requested in self.adapters:
            return requested
        raise UnknownModelError(f"model {requested!r} does not exist; available: {', '.join(self.model_names)}")

    def prepare(self, messages, settings: GenerationSettings, trim: bool = False):
        """Processor inputs for a request.

        trim=False (the API, like OpenAI's): a prompt over the context is an error, and
        max_new_tokens is lowered to the room left. trim=True (the chat UI): the oldest
        turns are dropped until the conversation fits, as in a ChatSession.
        """
        settings.validate()
        if trim:
            inputs, settings, _ = fit_to_context(self.processor, messages, self.model.max_context, settings)
            return inputs, settings
        inputs = self.processor(messages)
        prompt = inputs["input_ids"].shape[1]
        room = self.model.max_context - prompt
        if room < 1:
            raise ContextOverflowError(
                f"the prompt has {prompt} tokens but the context holds {self.model.max_context}; "
                "send fewer or shorter messages, or fewer images"
            )
        return inputs, dataclasses.replace(settings, max_new_tokens=min(settings.max_new_tokens, room))

    def _acquire(self) -> None:
        if not self._slot.acquire(timeout=self.limits.queue_timeout):
            raise self._busy()

    async def acquire_async(self) -> None:
        """Wait for the slot without holding a thread (asyncio callers share a small pool)."""
        import asyncio

        deadline = time.monotonic() + self.limits.queue_timeout
        while not self._slot.acquire(blocking=False):
            if time.monotonic() > deadline:
                raise self._busy()
            await asyncio.sleep(0.005)

    def _busy(self) -> BusyError:
        return BusyError(f"the server is busy: no generation slot freed up within {self.limits.queue_timeout:.0f} s; retry later")

    def start(self, name: str, inputs, settings: GenerationSettings) -> Generation:
        """Begin generating; the caller holds the slot, and `Generation.close()` releases it."""
        try:
            self._enter_adapter(name)
            stream = TextStream(self.model, self.processor, inputs, settings)
        except BaseException:
            self._slot.release()
            raise
        return Generation(self, stream)

    def _enter_adapter(self, name: str) -> None:
        llm = self.model.language_model
        if name != self.name:
            llm.set_adapter(name)
        elif self._own_adapter:
            llm.set_adapter(self._own_adapter)
        elif self.adapters:
            # peft's disable_adapter is a context manager; hold it open for this generation.
            self._disabled = llm.disable_adapter()
            self._disabled.__enter__()

    def _exit_adapter(self) -> None:
        disabled, self._disabled = getattr(self, "_disabled", None), None
        if disabled is not None:
            disabled.__exit__(None, None, None)

    @contextlib.contextmanager
    def generate(self, messages, settings: GenerationSettings, model_name: str | None = None, trim: bool = True):
        """Blocking form for threads (the UI): wait for the slot, yield a TextStream, release."""
        name = self.check_model(model_name)
        inputs, settings = self.prepare(messages, settings, trim)
        self._acquire()
        generation = self.start(name, inputs, settings)
        try:
            yield generation.stream
        finally:
            generation.close()

    def next_piece(self, pieces) -> Future:
        """The next text piece of an iterator (None at its end), computed on the model thread."""
        return self.executor.submit(next, pieces, None)


class Generation:
    """A running generation that holds the engine's slot until `close()`."""

    def __init__(self, engine: Engine, stream: TextStream):
        self.engine = engine
        self.stream = stream
        self._closed = False
        self._close_lock = threading.Lock()
        # No request holds the slot forever: the generation is stopped at the deadline.
        self._timer = threading.Timer(engine.limits.request_timeout, stream.cancel)
        self._timer.daemon = True
        self._timer.start()

    def close(self) -> None:
        """Stop the generation (if still running), wait for it, release the slot; idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._timer.cancel()
        self.stream.cancel()
        # Closing runs on the model thread, after any step still in flight there.
        self.engine.executor.submit(self.stream.close).result()
        self.engine.last_stats = self.stream.stats
        self.engine._exit_adapter()
        self.engine._slot.release()
