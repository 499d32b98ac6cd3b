"""Export a bundle as a stock transformers `LlavaForConditionalGeneration` checkpoint.

The result loads with `LlavaForConditionalGeneration.from_pretrained` and
`AutoProcessor.from_pretrained` and no code of ours, which is the format vLLM and
other serving engines read. Llava's projector is Linear -> act -> Linear:
`mlp2x_gelu` maps one to one, and `linear` maps exactly as W, identity activation,
identity matrix. Token reduction has no Llava equivalent and is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from adapters.lora import merge_lora
from vlm_chat.errors import ConfigError

# Rewrites list-of-parts content into the string form the LLM's own chat template
# expects: parts joined by newlines, image parts as the placeholder (as
# vlm_chat/processor.py does). Prepended to that template verbatim.
_CONTENT_PREFIX = (
    "{%- set ns = namespace(msgs=[], parts=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set ns.parts = [message['content']] -%}"
    "{%- else -%}{%- set ns.parts = [] -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set ns.parts = ns.parts + [IMAGE_TOKEN] -%}"
    "{%- elif part['type'] == 'text' -%}{%- set ns.parts = ns.parts + [part['text']] -%}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- set ns.msgs = ns.msgs + [{'role': message['role'], 'content': ns.parts | join('\\n')}] -%}"
    "{%- endfor -%}"
    "SYSTEM_BLOCK"
    "{%- set messages = ns.msgs %}"
)
_SYSTEM_BLOCK = (
    "{%- if ns.msgs | length == 0 or ns.msgs[0]['role'] != 'system' -%}"
    "{%- set ns.msgs = [{'role': 'system', 'content': SYSTEM_PROMPT}] + ns.msgs -%}{%- endif -%}"
)


def processor_chat_template(tokenizer_template: str, image_token: str, system_prompt: str | None) -> str:
    system = _SYSTEM_BLOCK.replace("SYSTEM_PROMPT", json.dumps(system_prompt)) if system_prompt else ""
    prefix = _CONTENT_PREFIX.replace("IMAGE_TOKEN", json.dumps(image_token)).replace("SYSTEM_BLOCK", system)
    return prefix + tokenizer_template


def check_exportable(model) -> None:
    config = model.config
    if config.projector.token_reduction != "none":
        raise ConfigError(
            f"projector.token_reduction {config.projector.token_reduction!r} has no equivalent in "
            "transformers' Llava; only bundles without token reduction export to hf-llava"
        )
    if config.projector.position_embedding:
        raise ConfigError(
            "projector.position_embedding (a learned vector per image token) has no equivalent in "
            "transformers' Llava; only bundles without it export to hf-llava"
        )
    if config.image_tiles:
        raise ConfigError(
            f"image_tiles={config.image_tiles} (image tokens in tiles, each after its name) has no equivalent in "
            "transformers' Llava, which takes one run of image tokens; only bundles with image_tiles 0 export to hf-llava"
        )
    if config.projector.type not in ("linear", "mlp2x_gelu"):
        raise ConfigError(f"projector {config.projector.type!r} has no Llava equivalent; use linear or mlp2x_gelu")
    if getattr(model.language_model, "is_quantized", False):
        raise ConfigError("the LLM is loaded quantized; load the bundle with quantization 'none' to export")


@torch.no_grad()
def export_hf_llava(model, processor, out: str | Path) -> Path:
    check_exportable(model)
    model.language_model = merge_lora(model.language_model)  # Llava has no adapter slot
    out = Path(out)
    vision = model.vision_tower
    llm = model.language_model
    dtype = next(llm.parameters()).dtype
    llm_dim = llm.config.hidden_size
    config = LlavaConfig(
        vision_config=vision.model.config.to_dict(),
        text_config=llm.config.to_dict(),
        image_token_index=model.image_token_id,
        image_seq_length=model.config.num_image_tokens,
        projector_hidden_act="gelu" if model.config.projector.type == "mlp2x_gelu" else "linear",
        vision_feature_select_strategy=model.config.vision.select_strategy,
        vision_feature_layer=model.config.vision.feature_layer,
        multimodal_projector_bias=True,
    )
    llava = LlavaForConditionalGeneration(config).to(dtype)
    llava.model.vision_tower.load_state_dict(vision.model.state_dict())
    llava.model.language_model.load_state_dict(llm.base_model.state_dict())
    llava.lm_head.load_state_dict(llm.get_output_embeddings().state_dict())
    mlp = model.projector.mlp
    target = llava.model.multi_modal_projector
    target.linear_1.load_state_dict(mlp.linear_1.state_dict())
    if model.config.projector.type == "mlp2x_gelu":
        target.linear_2.load_state_dict(mlp.linear_2.state_dict())
    else:
        target.linear_2.weight.copy_(torch.eye(llm_dim, dtype=dtype))
        target.linear_2.bias.zero_()
    target.linear_2.weight.mul_(model.config.projector.output_scale)  # Llava has no output scale:
    target.linear_2.bias.mul_(model.config.projector.output_scale)  # fold it into the last layer
    llava.generation_config = llm.generation_config
    llava.save_pretrained(out)

    tokenizer = processor.tokenizer
    has_cls = vision.num_tokens != vision.grid_size**2 or vision.drop_cls
    llava_processor = LlavaProcessor(
        image_processor=processor.image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=model.config.vision.select_strategy,
        num_additional_image_tokens=1 if has_cls else 0,
        image_token=model.config.image_token,
        chat_template=processor_chat_template(
            tokenizer.chat_template, model.config.image_token, model.config.system_prompt
        ),
    )
    llava_processor.save_pretrained(out)
    return out
