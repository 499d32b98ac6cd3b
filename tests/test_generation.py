"""Streaming generation, stop strings, cancellation, seeds and context limits."""

from __future__ import annotations

import pytest
import torch

from vlm_chat.chat import ChatSession, user_message
from vlm_chat.errors import ConfigError, ContextOverflowError
from vlm_chat.generation import (
    GenerationSettings,
    _stop_prefix_overlap,
    generate_batch,
    stream_generate,
)


def greedy_uncached(model, inputs, steps: int, end_ids: set[int]) -> list[int]:
    """Reference decoder: a full forward over the whole sequence for every new token."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids, mask, inputs.get("pixel_values"), use_cache=False).logits[0, -1]
            logits[model.image_token_id] = float("-inf")  # suppressed, as in generation
            token = int(logits.argmax())
            out.append(token)
            if token in end_ids:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
    return out


def test_cached_streaming_matches_uncached_greedy(tiny_bundle, images):
    _, model, processor = tiny_bundle
    inputs = processor([user_message("what is in this image ?", images)])
    stream = stream_generate(model, processor, inputs, GenerationSettings(max_new_tokens=12))
    text = stream.text()
    tokens = stream.tokens
    assert tokens == greedy_uncached(model, inputs, 12, stream._end_ids)
    assert text == processor.tokenizer.decode(tokens, skip_special_tokens=True)
    assert stream.stats.completion_tokens == len(tokens)
    assert stream.stats.prompt_tokens == inputs["input_ids"].shape[1]
    assert stream.stats.finish_reason in ("stop", "length")


def test_streaming_equals_batch_generation(tiny_bundle, images):
    _, model, processor = tiny_bundle
    conversations = [[user_message("what ?", images[:1])], [user_message("describe the picture", images[1:])]]
    batch = generate_batch(model, processor, conversations, GenerationSettings(max_new_tokens=10))
    for conversation, expected in zip(conversations, batch):
        streamed = stream_generate(model, processor, processor(conversation), GenerationSettings(max_new_tokens=10)).text()
        assert streamed == expected


def test_stop_string_is_cut_and_never_shown(tiny_bundle, images):
    _, model, processor = tiny_bundle
    inputs = processor([user_message("what is in this image ?", images[:1])])
    full = stream_generate(model, processor, inputs, GenerationSettings(max_new_tokens=30)).text()
    assert len(full) > 8, full
    stop = full[4:7]
    stream = stream_generate(model, processor, inputs, GenerationSettings(max_new_tokens=30, stop=[stop]))
    pieces = list(stream)
    assert "".join(pieces) == full[: full.find(stop)]
    assert stream.stats.finish_reason == "stop"


def test_stop_prefix_overlap():
    assert _stop_prefix_overlap("hello wor", ["world"]) == 3
    assert _stop_prefix_overlap("hello", ["xyz"]) == 0
    assert _stop_prefix_overlap("ab", ["abc", "b"]) == 2


def test_cancel_stops_generation(tiny_bundle, images):
    _, model, processor = tiny_bundle
    inputs = processor([user_message("what ?", images[:1])])
    stream = stream_generate(model, processor, inputs, GenerationSettings(max_new_tokens=200))
    stream.cancel()
    list(stream)
    assert stream.stats.finish_reason == "cancelled"
    assert stream.stats.completion_tokens < 200


def test_seed_makes_sampling_repeatable(tiny_bundle, images):
    _, model, processor = tiny_bundle
    inputs = processor([user_message("what ?", images[:1])])

    def sample(seed):
        settings = GenerationSettings(max_new_tokens=15, temperature=1.5, top_p=0.95, top_k=50, seed=seed)
        return stream_generate(model, processor, inputs, settings).text()

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in range(4)}) > 1


def test_bad_settings_are_refused(tiny_bundle, images):
    _, model, processor = tiny_bundle
    inputs = processor([user_message("what ?")])
    for bad in (dict(temperature=-1), dict(top_p=0), dict(max_new_tokens=0), dict(stop=[""])):
        with pytest.raises(ConfigError):
            stream_generate(model, processor, inputs, GenerationSettings(**bad))


def test_chat_session_keeps_history_and_regenerates(tiny_bundle, images):
    _, model, processor = tiny_bundle
    session = ChatSession(model, processor, GenerationSettings(max_new_tokens=5))
    first = "".join(session.reply("what is this ?", images=[images[0]]))
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    assert session.messages[-1]["content"] == first
    "".join(session.reply("and the colour ?"))
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    again = "".join(session.regenerate())
    assert len(session.messages) == 4 and session.messages[-1]["content"] == again
    session.reset()
    assert session.messages == []


def test_context_overflow_trims_old_turns_then_refuses(tiny_bundle, images):
    _, model, processor = tiny_bundle  # max_context 256
    session = ChatSession(model, processor, GenerationSettings(max_new_tokens=20))
    long_text = "what is in this image ? " * 8
    for _ in range(6):
        "".join(session.reply(long_text, images=[images[0]]))
    assert session.trimmed_turns > 0
    assert session.last_stats.prompt_tokens + 20 <= 256
    with pytest.raises(ContextOverflowError, match="context holds 256"):
        session.reply("what " * 400)
    # The refused turn is not left in the history.
    assert session.messages[-1]["role"] == "assistant"


def test_overflow_message_counts_tile_names_as_image_tokens(tiny_parts, tmp_path, images):
    from tests.conftest import build_tiny_bundle

    model, processor = build_tiny_bundle(tiny_parts, tmp_path / "tiles", image_tiles=2)
    per_image = len(processor.image_ids)
    assert per_image > processor.num_image_tokens  # 16 image tokens plus the four names
    session = ChatSession(model, processor, GenerationSettings(max_new_tokens=20))
    with pytest.raises(ContextOverflowError, match=rf"\({2 * per_image} of them for images\) but the context holds 256"):
        session.reply("what " * 400, images=list(images))
    assert session.messages == []


def test_bad_image_does_not_enter_history(tiny_bundle, tmp_path):
    from vlm_chat.errors import ImageError

    _, model, processor = tiny_bundle
    session = ChatSession(model, processor)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ImageError, match="broken.png: not a readable image"):
        session.reply("what ?", images=[broken])
    assert session.messages == []


def test_text_held_back_at_a_word_is_flushed_when_an_end_token_stops(tiny_bundle, images):
    _, model, processor = tiny_bundle
    inputs = processor([user_message("what is in this image ?", images[:1])])
    full = stream_generate(model, processor, inputs, GenerationSettings(max_new_tokens=20))
    full.text()
    tokens = full.tokens
    # Pretend the 6th token is the model's end token: the answer is then the first 5 tokens.
    end = next(i for i in range(5, len(tokens)) if tokens[i] not in tokens[:i])
    stream = stream_generate(model, processor, inputs, GenerationSettings(max_new_tokens=20))
    stream._end_ids = {tokens[end]}
    assert stream.text() == processor.tokenizer.decode(tokens[:end], skip_special_tokens=True)
    assert stream.stats.finish_reason == "stop"
