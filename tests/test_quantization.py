"""bitsandbytes flags reach the loaded LLM (CPU here; the same code path on CUDA)."""

from __future__ import annotations

import pytest
import torch

from vlm_chat.chat import user_message
from vlm_chat.errors import ConfigError
from vlm_chat.language_model import quantization_config
from vlm_chat.model import VisionLanguageModel

bnb = pytest.importorskip("bitsandbytes")


def test_4bit_layers_are_nf4_with_double_quant(tiny_bundle, images):
    path, _, processor = tiny_bundle
    model, _ = VisionLanguageModel.from_pretrained(path, device="cpu", quantization="4bit")
    layers = [m for m in model.language_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    assert all(layer.weight.quant_type == "nf4" for layer in layers)
    assert all(layer.weight.quant_state.nested for layer in layers)  # double quantization
    assert model.language_model.is_quantized
    # The vision tower and projector stay in full precision.
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.vision_tower.modules())
    logits = model(**processor([user_message("what ?", images[:1])])).logits
    assert torch.isfinite(logits).all()


def test_8bit_layers(tiny_bundle):
    path, _, _ = tiny_bundle
    model, _ = VisionLanguageModel.from_pretrained(path, device="cpu", quantization="8bit")
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.language_model.modules())


def test_auto_means_4bit_on_cuda_and_none_on_cpu():
    assert quantization_config("auto", torch.device("cpu"), torch.float32) is None
    cuda = quantization_config("auto", torch.device("cuda"), torch.bfloat16)
    assert cuda.load_in_4bit and cuda.bnb_4bit_compute_dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="choose one of"):
        quantization_config("3bit", torch.device("cpu"), torch.float32)
