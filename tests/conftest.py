"""Tiny random towers (hidden 32, 2 layers, 16-pixel images) saved as real checkpoint
dirs, so every test goes through the same from_pretrained paths users take."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-2 style: [INST] ... [/INST] answer</s>, BOS written by the template.
LLAMA2 = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'system' %}{{ '<<SYS>>\n' + message['content'] + '\n<</SYS>>\n\n' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)

TEXT = (
    "what is in this image ? describe the picture . a red circle on the left , a blue square at the top . "
    "how many dogs are there ? two cats and one apple . yes no the answer is paris , the capital of france . "
    "colour colors left right above below corner word written read emoji drawing photo of a the and "
    "0 1 2 3 4 5 6 7 8 9 hello world chat assistant user system"
)


def make_tokenizer(template: str = CHATML, style: str = "chatml"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if style == "chatml" else ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TEXT] * 4, trainer)
    if style == "chatml":
        kwargs = dict(bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    else:
        kwargs = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    fast.chat_template = template
    return fast


def make_llm_dir(path: Path, tokenizer, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        # Wider init than the 0.02 default: with tied embeddings of norm ~0.1 a 32-wide
        # model cannot put one logit far above the rest, so it could never overfit.
        initializer_range=0.2,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_vision_dir(path: Path, seed: int = 0, full_clip: bool = False) -> Path:
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4)
    if full_clip:
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=99, max_position_embeddings=16)
        CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    else:
        CLIPVisionModel(CLIPVisionConfig(**vision)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_parts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parts")
    tokenizer = make_tokenizer()
    return {
        "vision": make_vision_dir(root / "clip-vision"),
        "clip_full": make_vision_dir(root / "clip-full", full_clip=True),
        "llm": make_llm_dir(root / "llama", tokenizer),
        "llm_llama2": make_llm_dir(root / "llama2-template", make_tokenizer(LLAMA2, style="llama2")),
    }


def build_tiny_bundle(parts, out: Path, projector: str = "mlp2x_gelu", reduction: str = "none", image_tiles: int = 0,
                      **vision_kwargs):
    from vlm_chat.config import LLMConfig, ProjectorConfig, VisionConfig, VLMConfig
    from vlm_chat.model import build_bundle

    config = VLMConfig(
        vision=VisionConfig(name_or_path=str(parts["vision"]), **vision_kwargs),
        llm=LLMConfig(name_or_path=str(parts["llm"])),
        projector=ProjectorConfig(type=projector, token_reduction=reduction),
        image_tiles=image_tiles,
        max_context=256,
    )
    return build_bundle(config, out, device="cpu")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_parts, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle")
    model, processor = build_tiny_bundle(tiny_parts, out)
    return out, model, processor


@pytest.fixture()
def images():
    red = Image.new("RGB", (20, 12), (220, 30, 30))
    blue = Image.new("RGB", (16, 16), (20, 40, 220))
    return red, blue


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    os.environ.setdefault("VLM_CHAT_CACHE", str(tmp_path_factory.mktemp("cache")))
