"""A multi-turn conversation with images, streaming each reply.

    session = ChatSession(model, processor)
    for piece in session.reply("What is in this picture?", images=["cat.png"]):
        print(piece, end="")
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

from vlm_chat.errors import ContextOverflowError
from vlm_chat.generation import GenerationSettings, GenerationStats, TextStream
from vlm_chat.images import ImageInput, load_image
from vlm_chat.processor import Message

# Fewest new tokens worth generating; below this a reply is refused rather than cut.
MIN_NEW_TOKENS = 16


def user_message(text: str, images: Sequence[ImageInput] = ()) -> Message:
    parts = [{"type": "image", "image": image} for image in images]
    if text:
        parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


class ChatSession:
    def __init__(self, model, processor, settings: GenerationSettings | None = None, system_prompt: str | None = None):
        self.model = model
        self.processor = processor
        self.settings = settings or GenerationSettings()
        self.messages: list[Message] = []
        if system_prompt:
            self.messages.append({"role": "system", "content": system_prompt})
        self.last_stats: GenerationStats | None = None
        # Turns dropped from the front to fit the context in the last reply.
        self.trimmed_turns = 0

    def reset(self) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"]

    def reply(self, text: str = "", images: Sequence[ImageInput] = (), **overrides) -> Iterator[str]:
        """Add a user turn and stream the assistant's answer; the answer joins the history."""
        # Decode images now, so a bad file fails before it enters the history.
        loaded = [load_image(image) for image in images]
        self.messages.append(user_message(text, loaded))
        try:
            stream = self._start(overrides)
        except Exception:
            self.messages.pop()
            raise
        return self._collect(stream)

    def regenerate(self, **overrides) -> Iterator[str]:
        """Drop the last answer and answer the last user turn again."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if not self.messages or self.messages[-1]["role"] != "user":
            raise ContextOverflowError("there is no user message to answer yet")
        return self._collect(self._start(overrides))

    def _collect(self, stream: TextStream) -> Iterator[str]:
        pieces: list[str] = []
        try:
            for piece in stream:
                pieces.append(piece)
                yield piece
        finally:
            self.last_stats = stream.stats
            self.messages.append({"role": "assistant", "content": "".join(pieces)})

    def _start(self, overrides) -> TextStream:
        settings = dataclasses.replace(self.settings, **overrides)
        inputs, settings = self.fit(settings)
        return TextStream(self.model, self.processor, inputs, settings)

    def fit(self, settings: GenerationSettings):
        inputs, settings, self.trimmed_turns = fit_to_context(self.processor, self.messages, self.model.max_context, settings)
        return inputs, settings


def fit_to_context(processor, messages: list[Message], limit: int, settings: GenerationSettings):
    """Processor inputs for the part of a conversation that fits, oldest turns dropped first.

    System messages and the newest user turn are always kept; if even those do not fit
    with MIN_NEW_TOKENS of room, the turn is refused with a clear error. Returns the
    inputs, the settings (max_new_tokens lowered to the room left if needed) and the
    number of messages dropped.
    """
    system = [m for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    dropped = 0
    while True:
        inputs = processor(system + turns)
        prompt = inputs["input_ids"].shape[1]
        room = limit - prompt
        if room >= settings.max_new_tokens:
            return inputs, settings, dropped
        if len(turns) > 1:
            # Drop the oldest exchange (a user turn and the answer after it).
            drop = 2 if len(turns) > 2 and turns[1]["role"] == "assistant" else 1
            turns = turns[drop:]
            dropped += drop
            continue
        if room >= MIN_NEW_TOKENS:
            return inputs, dataclasses.replace(settings, max_new_tokens=room), dropped
        images = int(inputs["input_ids"].eq(processor.image_token_id).sum()) // processor.num_image_tokens
        image_tokens = images * len(processor.image_ids)  # with tiles, their names count too
        raise ContextOverflowError(
            f"the message needs {prompt} tokens ({image_tokens} of them for images) but the context holds "
            f"{limit}; send a shorter message or fewer images"
        )
