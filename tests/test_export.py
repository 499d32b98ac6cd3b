"""The hf-llava export loads in stock transformers and matches our logits and inputs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from tests.conftest import build_tiny_bundle
from vlm_chat.chat import user_message
from vlm_chat.errors import ConfigError
from vlm_chat.export import export_hf_llava
from vlm_chat.generation import GenerationSettings, stream_generate


@pytest.mark.parametrize("projector,scale", [("mlp2x_gelu", 1.0), ("linear", 0.25), ("mlp2x_gelu", 0.02)])
def test_export_matches_stock_llava(tiny_parts, tmp_path, images, projector, scale):
    model, processor = build_tiny_bundle(tiny_parts, tmp_path / "bundle", projector=projector)
    model.config.projector.output_scale = scale  # folded into Llava's last projector layer
    export_hf_llava(model, processor, tmp_path / "llava")
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava")
    stock = AutoProcessor.from_pretrained(tmp_path / "llava")
    conversation = [
        user_message("what is in this image ?", images[:1]),
        {"role": "assistant", "content": "a red one"},
        user_message("and this ?", images[1:]),
    ]
    ours = processor(conversation)
    text = stock.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    theirs = stock(text=text, images=list(images), return_tensors="pt")
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"])
    with torch.no_grad():
        torch.testing.assert_close(model(**ours).logits, llava(**theirs).logits, atol=1e-5, rtol=1e-5)
        # Stock greedy generate gives our tokens too.
        generated = llava.generate(
            **theirs, max_new_tokens=8, do_sample=False, suppress_tokens=[model.image_token_id],
            eos_token_id=processor.tokenizer.eos_token_id, pad_token_id=processor.tokenizer.pad_token_id,
        )
    stream = stream_generate(model, processor, ours, GenerationSettings(max_new_tokens=8))
    stream.text()
    assert generated[0, theirs["input_ids"].shape[1]:].tolist() == stream.tokens


def test_export_refuses_token_reduction(tiny_parts, tmp_path):
    model, processor = build_tiny_bundle(tiny_parts, tmp_path / "bundle", reduction="avg_pool")
    with pytest.raises(ConfigError, match="token_reduction 'avg_pool' has no equivalent"):
        export_hf_llava(model, processor, tmp_path / "llava")


def test_export_refuses_image_tiles(tiny_parts, tmp_path):
    model, processor = build_tiny_bundle(tiny_parts, tmp_path / "bundle", image_tiles=2)
    with pytest.raises(ConfigError, match="image_tiles=2 .* no equivalent in transformers' Llava"):
        export_hf_llava(model, processor, tmp_path / "llava")
