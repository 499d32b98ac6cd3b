"""Streaming generation: inputs -> `inputs_embeds` -> `language_model.generate` -> text pieces.

transformers' `generate` does the decoding (KV cache, sampling, repetition penalty,
stop strings); it runs in a worker thread and hands tokens to a streamer that this
module turns into text pieces, holding back any tail that may be the start of a
stop string so a stop string is never shown.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from vlm_chat.errors import ConfigError


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k filter
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def validate(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
            (self.temperature >= 0, "temperature must be >= 0 (0 is greedy)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (0 turns it off)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    time_to_first_token: float | None = None
    seconds: float = 0.0
    finish_reason: str | None = None  # "stop", "length" or "cancelled"

    @property
    def tokens_per_second(self) -> float:
        decode_time = self.seconds - (self.time_to_first_token or 0.0)
        return (self.completion_tokens - 1) / decode_time if self.completion_tokens > 1 and decode_time > 0 else 0.0


class _CancelCriteria(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _CountingStreamer(TextIteratorStreamer):
    """TextIteratorStreamer that also counts tokens and times the first one."""

    def __init__(self, tokenizer, start: float, **kwargs):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True, **kwargs)
        self.tokens: list[int] = []
        self.start = start
        self.first_token_time: float | None = None

    def put(self, value):
        if not (self.skip_prompt and self.next_tokens_are_prompt):
            if self.first_token_time is None:
                self.first_token_time = time.perf_counter() - self.start
            self.tokens.extend(value.reshape(-1).tolist())
        super().put(value)


def _end_token_ids(model, tokenizer) -> list[int]:
    ids = set()
    for source in (model.language_model.generation_config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return sorted(ids)


def generation_config(model, tokenizer, settings: GenerationSettings) -> GenerationConfig:
    settings.validate()
    sample = settings.temperature > 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=sample,
        temperature=settings.temperature if sample else None,
        top_p=settings.top_p if sample else None,
        top_k=settings.top_k if sample else None,
        repetition_penalty=settings.repetition_penalty,
        stop_strings=settings.stop or None,
        eos_token_id=_end_token_ids(model, tokenizer),
        pad_token_id=pad,
        # The image token's output row is an untrained zero row; never emit it.
        suppress_tokens=[model.image_token_id],
        use_cache=True,
    )


class TextStream:
    """Iterator over text pieces of one generation; `stats` fills in as it runs.

    Closing it early (or `cancel()`) stops the generation thread at the next token.
    """

    def __init__(self, model, processor, inputs, settings: GenerationSettings, cancel: threading.Event | None = None):
        self.settings = settings
        self.cancel_event = cancel or threading.Event()
        self.stats = GenerationStats(prompt_tokens=int(inputs["attention_mask"].sum()))
        self._start = time.perf_counter()
        config = generation_config(model, processor.tokenizer, settings)
        self._end_ids = set(config.eos_token_id)
        self._streamer = _CountingStreamer(processor.tokenizer, self._start)
        self._error: BaseException | None = None
        with torch.inference_mode():
            inputs_embeds = model.embed(inputs["input_ids"], inputs.get("pixel_values"))
        kwargs = dict(
            inputs_embeds=inputs_embeds,
            attention_mask=inputs["attention_mask"].to(model.device),
            generation_config=config,
            streamer=self._streamer,
            stopping_criteria=StoppingCriteriaList([_CancelCriteria(self.cancel_event)]),
            tokenizer=processor.tokenizer,
        )
        self._thread = threading.Thread(target=self._run, args=(model, kwargs), daemon=True)
        self._thread.start()

    def _run(self, model, kwargs) -> None:
        try:
            if self.settings.seed is not None:
                torch.manual_seed(self.settings.seed)
            with torch.inference_mode():
                model.language_model.generate(**kwargs)
        except BaseException as err:  # handed to the consuming thread
            self._error = err
            self._streamer.end()

    def cancel(self) -> None:
        self.cancel_event.set()

    def join(self) -> None:
        """Wait for the worker thread (after `cancel`, it ends at the next token)."""
        self._thread.join()

    def __iter__(self):
        stops = self.settings.stop
        pending = ""
        finished_by_stop = False
        try:
            for piece in self._streamer:
                pending += piece
                cut = _find_stop(pending, stops)
                if cut is not None:
                    pending = pending[:cut]
                    finished_by_stop = True
                    self.cancel_event.set()
                    break
                # Emit everything except a tail that could still grow into a stop string.
                safe = len(pending) - _stop_prefix_overlap(pending, stops)
                if safe > 0:
                    yield pending[:safe]
                    pending = pending[safe:]
            if pending:
                yield pending
        finally:
            # Early close (consumer gone) or a stop string: stop the worker at the next token.
            if self._thread.is_alive():
                self.cancel_event.set()
            self._thread.join()
            self._finish(finished_by_stop)
        if self._error is not None:
            raise self._error

    def _finish(self, finished_by_stop: bool) -> None:
        stats = self.stats
        stats.seconds = time.perf_counter() - self._start
        stats.time_to_first_token = self._streamer.first_token_time
        tokens = self._streamer.tokens
        stats.completion_tokens = len(tokens)
        if finished_by_stop or (tokens and tokens[-1] in self._end_ids):
            stats.finish_reason = "stop"
        elif self.cancel_event.is_set() and len(tokens) < self.settings.max_new_tokens:
            stats.finish_reason = "cancelled"
        else:
            stats.finish_reason = "length" if len(tokens) >= self.settings.max_new_tokens else "stop"

    def text(self) -> str:
        return "".join(self)


def _find_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s in text]
    return min(hits) if hits else None


def _stop_prefix_overlap(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


def stream_generate(model, processor, inputs, settings: GenerationSettings | None = None, cancel=None) -> TextStream:
    return TextStream(model, processor, inputs, settings or GenerationSettings(), cancel)


def generate_batch(model, processor, conversations, settings: GenerationSettings | None = None) -> list[str]:
    """Answers for a batch of conversations at once (left-padded, no streaming)."""
    settings = settings or GenerationSettings()
    inputs = processor(conversations)
    config = generation_config(model, processor.tokenizer, settings)
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    with torch.inference_mode():
        inputs_embeds = model.embed(inputs["input_ids"], inputs.get("pixel_values"))
        output = model.language_model.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=inputs["attention_mask"].to(model.device),
            generation_config=config,
            tokenizer=processor.tokenizer,
        )
    # With inputs_embeds only, generate returns just the new tokens: (B, T_new).
    texts = processor.tokenizer.batch_decode(output, skip_special_tokens=True)
    return [_cut_at_stop(text, settings.stop) for text in texts]


def _cut_at_stop(text: str, stops: list[str]) -> str:
    cut = _find_stop(text, stops)
    return text if cut is None else text[:cut]
