"""Streaming generation: inputs -> `inputs_embeds` -> tokens (KV cache) -> text pieces.

`decode_tokens` is the decoding loop (transformers' logits processors for the
repetition penalty, temperature, top-k and top-p; the model's KV cache); `TextStream`
turns its tokens into text pieces with transformers' TextStreamer logic, holding back
any tail that may be the start of a stop string so a stop string is never shown.
`generate_batch` answers several conversations at once through `generate`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig, TextStreamer
from transformers.generation import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

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


class _PieceCollector(TextStreamer):
    """transformers' TextStreamer word-boundary logic, collecting pieces instead of printing."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_prompt=False, skip_special_tokens=True)
        self.pieces: list[str] = []

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.pieces.append(text)

    def drain(self) -> str:
        text, self.pieces = "".join(self.pieces), []
        return text


def _end_token_ids(model, tokenizer) -> list[int]:
    ids = set()
    for source in (model.language_model.generation_config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return sorted(ids)


def generation_config(model, tokenizer, settings: GenerationSettings) -> GenerationConfig:
    """The same settings as a transformers GenerationConfig (batched, non-streaming path)."""
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


def logits_processors(settings: GenerationSettings, suppress: list[int], device) -> LogitsProcessorList:
    """transformers' own processors, in the order `generate` applies them."""
    processors = LogitsProcessorList()
    if settings.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    processors.append(SuppressTokensLogitsProcessor(suppress, device=device))
    if settings.temperature > 0:
        processors.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k:
            processors.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            processors.append(TopPLogitsWarper(settings.top_p))
    return processors


def decode_tokens(llm, inputs_embeds, attention_mask, settings: GenerationSettings, suppress: list[int]) -> Iterator[int]:
    """Token ids one at a time, with the KV cache, in the calling thread.

    A plain loop rather than `generate` on a worker thread: on a CPU, OpenMP work on a
    second thread runs about 40 % slower once the main thread has used OpenMP (the two
    thread pools oversubscribe the cores), and a loop lets the consumer stop at any token.
    """
    device = inputs_embeds.device
    processors = logits_processors(settings, suppress, device)
    rng = torch.Generator(device=device).manual_seed(settings.seed) if settings.seed is not None else None
    generated = torch.empty((1, 0), dtype=torch.long, device=device)
    with torch.inference_mode():
        # Prefill; only the last position's logits are needed (as in `generate`).
        out = llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=True, logits_to_keep=1)
    for step in range(settings.max_new_tokens):
        with torch.inference_mode():
            scores = processors(generated, out.logits[:, -1, :].float())  # (1, V)
            if settings.temperature > 0:
                token = torch.multinomial(scores.softmax(dim=-1), 1, generator=rng)  # (1, 1)
            else:
                token = scores.argmax(dim=-1, keepdim=True)  # (1, 1)
        yield int(token)
        if step + 1 == settings.max_new_tokens:
            return
        with torch.inference_mode():
            generated = torch.cat([generated, token], dim=1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(1, 1)], dim=1)
            out = llm(input_ids=token, attention_mask=attention_mask, cache=out.cache, use_cache=True, logits_to_keep=1)


class TextStream:
    """Iterator over the text pieces of one reply; `stats` is complete once it ends.

    Decoding happens as the caller iterates, in the caller's thread. `cancel()` (from
    any thread) stops it at the next token; `close()` ends it early.
    """

    def __init__(self, model, processor, inputs, settings: GenerationSettings, cancel: threading.Event | None = None):
        settings.validate()
        if inputs["input_ids"].shape[0] != 1:
            raise ConfigError("a TextStream answers one conversation; use generate_batch for several")
        self.settings = settings
        self.cancel_event = cancel or threading.Event()
        self.stats = GenerationStats(prompt_tokens=int(inputs["attention_mask"].sum()))
        self.tokens: list[int] = []
        self._end_ids = set(_end_token_ids(model, processor.tokenizer))
        self._pieces = self._run(model, processor, inputs)

    def __iter__(self):
        return self._pieces

    def cancel(self) -> None:
        self.cancel_event.set()

    def close(self) -> None:
        self._pieces.close()

    def text(self) -> str:
        return "".join(self)

    def _run(self, model, processor, inputs) -> Iterator[str]:
        start = time.perf_counter()
        stops = self.settings.stop
        collector = _PieceCollector(processor.tokenizer)
        pending, reason = "", "length"
        cut_at_stop_string = False
        try:
            with torch.inference_mode():
                inputs_embeds = model.embed(inputs["input_ids"], inputs.get("pixel_values"))  # (1, T, D_lm)
            mask = inputs["attention_mask"].to(model.device)
            for token in decode_tokens(model.language_model, inputs_embeds, mask, self.settings, [model.image_token_id]):
                if not self.tokens:
                    self.stats.time_to_first_token = time.perf_counter() - start
                self.tokens.append(token)
                if token in self._end_ids:
                    reason = "stop"
                    break
                collector.put(torch.tensor([token]))
                pending += collector.drain()
                cut = _find_stop(pending, stops)
                if cut is not None:
                    pending, reason, cut_at_stop_string = pending[:cut], "stop", True
                    break
                # Emit everything except a tail that could still grow into a stop string.
                safe = len(pending) - _stop_prefix_overlap(pending, stops)
                if safe > 0:
                    yield pending[:safe]
                    pending = pending[safe:]
                if self.cancel_event.is_set():
                    reason = "cancelled"
                    break
            if not cut_at_stop_string:
                # The collector holds back the last word until a space; flush it (also after
                # an end token). Text after a stop string is dropped, so it is not flushed.
                collector.end()
                pending += collector.drain()
                cut = _find_stop(pending, stops)
                if cut is not None:
                    pending, reason = pending[:cut], "stop"
            if pending:
                yield pending
        except GeneratorExit:
            reason = "cancelled"
            raise
        finally:
            self.stats.completion_tokens = len(self.tokens)
            self.stats.seconds = time.perf_counter() - start
            self.stats.finish_reason = reason


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
