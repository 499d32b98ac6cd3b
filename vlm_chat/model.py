"""The composed model, in one forward pass:

    pixel_values (N, 3, S, S)
      -> vision_tower   -> image_features (N, P, D_v)        vlm_chat/vision.py
      -> projector      -> image_embeds   (N, P', D_lm)      adapters/projector.py
      -> masked_scatter into the token embeddings at image-token positions
      -> language_model (inputs_embeds (B, T, D_lm))         vlm_chat/language_model.py
      -> logits (B, T, V)

The model holds a vision model and a causal LM as attributes (composition, not
inheritance), so any Hugging Face CLIP-style tower and any causal LM fit.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast

from adapters.lora import is_lora, load_lora, merge_lora
from adapters.projector import Projector
from vlm_chat.config import LLMConfig, VLMConfig
from vlm_chat.devices import pick_device, pick_dtype
from vlm_chat.errors import ConfigError, ImageTokenMismatchError
from vlm_chat.images import make_image_processor
from vlm_chat.language_model import (
    fit_embeddings_to_tokenizer,
    llm_source_dir,
    load_language_model,
    load_tokenizer,
    resolve_local,
)
from vlm_chat.processor import VLMProcessor, tile_order
from vlm_chat.vision import VisionTower, image_normalisation, load_vision_tower

PROJECTOR_WEIGHTS = "projector.safetensors"
ADAPTER_DIR = "adapter"
LLM_DIR = "llm"
VISION_DIR = "vision"


class VisionLanguageModel(nn.Module):
    def __init__(
        self,
        config: VLMConfig,
        vision_tower: VisionTower,
        projector: Projector,
        language_model: nn.Module,
        image_token_id: int,
    ):
        super().__init__()
        self.config = config
        self.vision_tower = vision_tower
        self.projector = projector
        self.language_model = language_model
        self.image_token_id = image_token_id

    @property
    def device(self) -> torch.device:
        return self.language_model.get_input_embeddings().weight.device

    @property
    def max_context(self) -> int:
        llm_limit = getattr(self.language_model.config, "max_position_embeddings", None) or self.config.max_context
        return min(self.config.max_context, llm_limit)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> image embeddings (N, P', D_lm) in the LLM's input space."""
        features = self.vision_tower(pixel_values.to(self.device))  # (N, P, D_v)
        weight = self.projector.mlp.linear_1.weight
        return self.projector(features.to(weight.dtype))  # (N, P', D_lm)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image embeddings scattered into the image-token positions."""
        input_ids = input_ids.to(self.device)
        inputs_embeds = self.language_model.get_input_embeddings()(input_ids)  # (B, T, D_lm)
        image_mask = input_ids == self.image_token_id  # (B, T)
        slots = int(image_mask.sum())
        if pixel_values is None or pixel_values.shape[0] == 0:
            if slots:
                raise ImageTokenMismatchError(
                    f"the input has {slots} image-token positions but no images were given"
                )
            return inputs_embeds
        image_embeds = self.get_image_features(pixel_values)  # (N, P', D_lm)
        if self.config.image_tiles:  # the processor lays the slots out tile by tile
            image_embeds = image_embeds[:, tile_order(image_embeds.shape[1], self.config.image_tiles)]
        if slots != image_embeds.shape[0] * image_embeds.shape[1]:
            raise ImageTokenMismatchError(
                f"the input has {slots} image-token positions but {image_embeds.shape[0]} image(s) give "
                f"{image_embeds.shape[0]} x {image_embeds.shape[1]} embeddings; build inputs with the "
                "bundle's processor, which expands each placeholder to the right count"
            )
        return inputs_embeds.masked_scatter(
            image_mask.unsqueeze(-1), image_embeds.to(inputs_embeds.dtype)
        )

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_only: bool = False,
        layer_inputs: torch.Tensor | None = None,
        from_layer: int = 0,
        **kwargs,
    ):
        """The LLM's output (logits, loss when `labels` are given). With `loss_only` the
        result holds just the loss, computed by `_supervised_loss` (what training calls,
        through forward so multi-GPU wrappers see the call). `layer_inputs` (B, T, D_lm)
        stand for what decoder layer `from_layer` receives (from `llm_layers`, cached by
        `--top-layers` training): only the layers from there on run."""
        if loss_only and labels is None:
            raise ValueError("loss_only needs labels")
        if layer_inputs is not None:
            if not loss_only:
                raise ValueError("layer_inputs are for the training loss (loss_only=True)")
            hidden = layer_inputs.to(self.device)
        else:
            if from_layer:
                raise ValueError("from_layer needs layer_inputs")
            hidden = self.embed(input_ids, pixel_values)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        if labels is not None:
            labels = labels.to(self.device)
        if loss_only:
            return CausalLMOutputWithPast(loss=self._supervised_loss(hidden, attention_mask, labels, from_layer))
        return self.language_model(inputs_embeds=hidden, attention_mask=attention_mask, labels=labels, **kwargs)

    def causal_lm(self) -> nn.Module:
        """The LLM itself, under its LoRA wrapper when it has one."""
        return self.language_model.get_base_model() if is_lora(self.language_model) else self.language_model

    @property
    def llm_layer_count(self) -> int:
        return len(self.causal_lm().get_decoder().layers)

    def llm_layers(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, start: int, stop: int | None = None
    ) -> torch.Tensor:
        """Decoder layers [start, stop) on `hidden` (B, T, D_lm), set up as the decoder's own
        forward sets them up (positions 0..T-1, the causal mask over right padding), without
        the final norm. `llm_layers(embeds, mask, 0, k)` is what layer k receives."""
        decoder = self.causal_lm().get_decoder()
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(
            config=decoder.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None,
            position_ids=position_ids,
        )
        position_embeddings = decoder.rotary_emb(hidden, position_ids=position_ids)
        for layer in decoder.layers[start:stop]:
            hidden = layer(
                hidden, attention_mask=mask, position_embeddings=position_embeddings, position_ids=position_ids,
                use_cache=False,
            )
        return hidden

    def _supervised_loss(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor, from_layer: int = 0
    ) -> torch.Tensor:
        """Mean next-token cross-entropy over the supervised positions (labels != -100),
        the same number `forward(labels=...).loss` gives. `hidden` is the input embeddings,
        or what layer `from_layer` receives. The output head (49k x 576 on SmolLM2, a fifth
        of its weights) runs only where a label is, not on every image, prompt and template
        token, which makes a training step cheaper."""
        causal_lm = self.causal_lm()
        decoder = causal_lm.get_decoder()
        if from_layer:
            hidden = decoder.norm(self.llm_layers(hidden, attention_mask, from_layer))
        else:
            hidden = decoder(inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != -100
        logits = causal_lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
        return nn.functional.cross_entropy(logits, targets[keep])

    @property
    def adapter_merged(self) -> bool:
        """The bundle names an adapter but the LLM is no longer a LoRA model: it was folded
        into the weights at load (`from_pretrained(merge_adapter=True)`)."""
        return bool(self.config.adapter) and not is_lora(self.language_model)

    # -- files -----------------------------------------------------------------------

    def save_pretrained(
        self,
        directory: str | Path,
        processor: VLMProcessor | None = None,
        save_llm: bool = False,
        save_vision: bool = False,
    ) -> None:
        """Config JSON + projector safetensors (+ LoRA adapter, + processor files).

        The towers stay references unless they were trained: `save_llm` / `save_vision`
        copy them into the bundle as safetensors (LoRA on the vision tower is merged
        first; LoRA on the LLM is kept as an adapter unless `save_llm`).
        """
        if self.adapter_merged:
            raise ConfigError("this model was loaded with merge_adapter=True (inference only); load the bundle without it to save")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.projector.state_dict().items()}
        save_file(state, str(directory / PROJECTOR_WEIGHTS), metadata={"format": "pt"})
        if save_vision:
            self.vision_tower.model = merge_lora(self.vision_tower.model)
            self.vision_tower.model.save_pretrained(directory / VISION_DIR)
            # In memory refs stay absolute (as from_pretrained makes them); the file gets them relative.
            self.config.vision.name_or_path = str((directory / VISION_DIR).resolve())
        if save_llm:
            self.language_model = merge_lora(self.language_model)
            self.language_model.save_pretrained(directory / LLM_DIR)
            self.config.llm = LLMConfig(name_or_path=str((directory / LLM_DIR).resolve()), quantization=self.config.llm.quantization)
            self.config.adapter = None
        elif is_lora(self.language_model):
            # The embedding rows added for <image> are zeros recreated at load; not saved.
            self.language_model.save_pretrained(directory / ADAPTER_DIR, save_embedding_layers=False)
            self.config.adapter = ADAPTER_DIR
        portable = VLMConfig.from_dict(self.config.to_dict())
        portable.vision.name_or_path = _relative_if_inside(portable.vision.name_or_path, directory)
        if not portable.llm.package:
            portable.llm.name_or_path = _relative_if_inside(portable.llm.name_or_path, directory)
        portable.save(directory)
        if processor is not None:
            processor.save_pretrained(directory)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        device: str = "auto",
        dtype: str = "auto",
        quantization: str | None = None,
        merge_adapter: bool = False,
    ) -> tuple[VisionLanguageModel, VLMProcessor]:
        """Load a bundle: the model and its processor, exactly as saved.

        `merge_adapter` folds the bundle's LoRA into the LLM's weights in memory (same
        outputs, no per-layer LoRA matmuls: about 1.25x faster decoding on CPU). For
        inference only: such a model cannot be saved, and it is skipped for 4/8-bit LLMs.
        """
        directory = Path(directory)
        config = VLMConfig.load(directory)
        # Refs relative to the bundle become absolute, so a re-save elsewhere still finds them.
        config.vision.name_or_path = absolute_if_local(resolve_local(config.vision.name_or_path, directory))
        if not config.llm.package:
            config.llm.name_or_path = absolute_if_local(resolve_local(config.llm.name_or_path, directory))
        processor = VLMProcessor.from_pretrained(directory, config)
        model = cls.assemble(config, processor.tokenizer, device, dtype, quantization)
        weights = directory / PROJECTOR_WEIGHTS
        if not weights.is_file():
            raise ConfigError(f"{directory}: {PROJECTOR_WEIGHTS} is missing; the bundle is incomplete")
        missing, unexpected = model.projector.load_state_dict(load_file(str(weights)), strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"{weights}: weights do not fit projector {config.projector.type!r} "
                f"(missing {missing}, unexpected {unexpected})"
            )
        if config.adapter:
            model.language_model = load_lora(model.language_model, resolve_local(config.adapter, directory))
            model.language_model.eval()
            quantized = any(getattr(model.language_model, f"is_loaded_in_{b}bit", False) for b in (4, 8))
            if merge_adapter and not quantized:
                model.language_model = merge_lora(model.language_model)
        if model.projector_tokens != config.num_image_tokens:
            raise ConfigError(
                f"{directory}: config says {config.num_image_tokens} image tokens but the vision tower and "
                f"projector give {model.projector_tokens}; rebuild the bundle"
            )
        return model, processor

    @classmethod
    def assemble(
        cls,
        config: VLMConfig,
        tokenizer,
        device: str = "auto",
        dtype: str = "auto",
        quantization: str | None = None,
    ) -> VisionLanguageModel:
        """Load both towers and create the projector (randomly initialised)."""
        torch_device = pick_device(device)
        torch_dtype = pick_dtype(dtype, torch_device)
        vision = load_vision_tower(config.vision, config.vision.name_or_path, torch_dtype, torch_device)
        llm = load_language_model(
            llm_source_dir(config.llm),
            quantization or config.llm.quantization,
            torch_dtype,
            torch_device,
        )
        fit_embeddings_to_tokenizer(llm, len(tokenizer))
        # The projector trains in fp32 on CPU and in the compute dtype on GPU.
        projector = Projector(config.projector, vision.hidden_size, llm.config.hidden_size, vision.num_tokens)
        projector.to(device=torch_device, dtype=torch_dtype)
        model = cls(config, vision, projector, llm, tokenizer.convert_tokens_to_ids(config.image_token))
        model.eval()
        return model

    def add_position_embedding(self) -> bool:
        """Give the projector a (zero) learned position per image token; False if it has one."""
        if self.projector.position_embedding is not None:
            return False
        self.projector.add_position_embedding(self.vision_tower.num_tokens)  # also sets its config flag
        return True

    @torch.no_grad()
    def match_word_scale(self, pixel_values: torch.Tensor) -> tuple[float, float]:
        """Scale the projector's output so these images' tokens have, on average, the norm
        of the LLM's word embeddings. Returns (mean image-token norm before, word norm)."""
        words = self.language_model.get_input_embeddings().weight.float().norm(dim=-1).mean().item()
        images = self.get_image_features(pixel_values).float().norm(dim=-1).mean().item()
        self.projector.config.output_scale *= words / images
        return images, words

    @property
    def projector_tokens(self) -> int:
        return self.projector.num_output_tokens(self.vision_tower.num_tokens)


def build_bundle(
    config: VLMConfig,
    out: str | Path,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
) -> tuple[VisionLanguageModel, VLMProcessor]:
    """Assemble an untrained bundle (random projector) from a vision tower and an LLM."""
    out = Path(out)
    source = llm_source_dir(config.llm)
    tokenizer = load_tokenizer(source)
    if config.image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [config.image_token]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(seed)
    model = VisionLanguageModel.assemble(config, tokenizer, device, dtype, quantization="none")
    config.num_image_tokens = model.projector_tokens
    norm = image_normalisation(config.vision.name_or_path, model.vision_tower.model)
    image_processor = make_image_processor(norm.image_size, norm.image_mean, norm.image_std, config.image)
    processor = VLMProcessor(tokenizer, image_processor, config.num_image_tokens, config.image_token, config.system_prompt,
                             config.image_tiles)
    model.save_pretrained(out, processor)
    return model, processor


def _relative_if_inside(name_or_path: str, directory: Path) -> str:
    """A ref inside the bundle is written relative to it, so the bundle can move."""
    if os.path.isabs(name_or_path):
        path = Path(name_or_path).resolve()
        root = Path(directory).resolve()
        if path == root or root in path.parents:
            return str(path.relative_to(root))
    return name_or_path


def absolute_if_local(name_or_path: str) -> str:
    """Local paths become absolute so a bundle works from any working directory;
    anything that is not an existing path is kept as a hub id."""
    return os.path.abspath(name_or_path) if os.path.exists(name_or_path) else name_or_path
