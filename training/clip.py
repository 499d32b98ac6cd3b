"""Stage `clip`: contrastive pretraining of a standard `transformers.CLIPModel` from captions.

    captions_train.jsonl ({"image": "images/x.png", "caption": "..."})
      -> PIL image -> light augmentation (random resized crop, never a flip) -> CLIP image processor
           -> pixel_values (B, 3, S, S) -> vision tower + projection -> image_embeds (B, D)
      -> caption -> CLIP BPE tokenizer -> input_ids (B, T), EOS-terminated -> text tower -> text_embeds (B, D)
      -> logits = scale * text_embeds @ image_embeds.T  (B, B) -> symmetric InfoNCE or SigLIP sigmoid loss

The output dir is a plain `CLIPModel.save_pretrained` dir plus the processor files, so
`CLIPModel.from_pretrained(out)` and `AutoProcessor.from_pretrained(out)` load it like
`openai/clip-vit-base-patch32`. The SigLIP loss has an extra learnable bias that CLIPModel
has no slot for; it is saved beside the model as `logit_bias.safetensors` (only the loss
needs it: zero-shot ranking and softmax over classes are unchanged by a shared bias).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset, Subset

from training.trainer import TrainConfig, param_groups, train, train_config_from
from vlm_chat.errors import ConfigError, UserFacingError
from vlm_chat.images import load_image
from vlm_chat.zero_shot import image_embeddings, text_embeddings

LOSSES = ("infonce", "sigmoid")
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the temperature so logits stay <= 100


@dataclass
class ClipModelConfig:
    """Size of a CLIP trained from scratch (ignored with --init, which brings its own config)."""

    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 256
    vision_layers: int = 6
    vision_heads: int = 4
    text_width: int = 256
    text_layers: int = 4
    text_heads: int = 4
    projection_dim: int = 256
    vocab_size: int = 4096  # of the BPE tokenizer trained on the captions
    max_text_len: int = 32


@dataclass
class ClipDataConfig:
    train: str  # captions_train.jsonl
    val: str = ""  # default: captions_val.jsonl beside the train file, if present
    max_eval_samples: int = 1000
    augment: bool = True


@dataclass
class ClipStageConfig:
    data: ClipDataConfig
    train: TrainConfig
    model: ClipModelConfig = field(default_factory=ClipModelConfig)
    loss: str = "infonce"
    init: str = ""  # CLIP dir or hub id to continue from; "" = from scratch


def config_from_settings(settings: dict) -> ClipStageConfig:
    """Flat CLI/YAML settings -> ClipStageConfig; unknown keys are an error that lists the valid ones."""
    train_cfg, rest = train_config_from(settings)
    model_keys = {f.name for f in fields(ClipModelConfig)}
    data_keys = {"data": "train", "val": "val", "max_eval_samples": "max_eval_samples", "augment": "augment"}
    unknown = sorted(set(rest) - model_keys - set(data_keys) - {"loss", "init"})
    if unknown:
        valid = sorted(model_keys | set(data_keys) | {"loss", "init", "out"} | {f.name for f in fields(TrainConfig)})
        raise ConfigError(f"unknown setting(s) {unknown} for stage clip; valid keys: {valid}")
    if not rest.get("data"):
        raise ConfigError("stage clip needs --data captions_train.jsonl (or 'data:' in the --config file)")
    loss = rest.get("loss", "infonce")
    if loss not in LOSSES:
        raise ConfigError(f"loss={loss!r}; choose one of {LOSSES}")
    return ClipStageConfig(
        data=ClipDataConfig(**{field_name: rest[key] for key, field_name in data_keys.items() if key in rest}),
        train=train_cfg,
        model=ClipModelConfig(**{k: rest[k] for k in model_keys if k in rest}),
        loss=loss,
        init=rest.get("init", ""),
    )


# ---------------------------------------------------------------- data


def read_captions(path: str | Path) -> list[tuple[Path, str]]:
    """(absolute image path, caption) per JSONL line; image paths are relative to the JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise UserFacingError(f"caption file {path} not found; give a JSONL of {{'image': ..., 'caption': ...}} lines")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append((path.parent / row["image"], str(row["caption"])))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise UserFacingError(
                f"{path}:{number}: expected a JSON object with 'image' and 'caption' ({err}); fix or drop that line"
            ) from err
    if not rows:
        raise UserFacingError(f"{path} holds no captions")
    return rows


def random_resized_crop(image: Image.Image, scale: tuple[float, float] = (0.7, 1.0), ratio: tuple[float, float] = (0.85, 1.18)) -> Image.Image:
    """Crop a random box covering `scale` of the area; no flips (captions may say left/right)."""
    width, height = image.size
    area = width * height * random.uniform(*scale)
    aspect = math.exp(random.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w = min(width, max(1, round(math.sqrt(area * aspect))))
    h = min(height, max(1, round(math.sqrt(area / aspect))))
    left, top = random.randint(0, width - w), random.randint(0, height - h)
    return image.crop((left, top, left + w, top + h))


class CaptionDataset(Dataset):
    """(PIL image, caption) pairs; augmentation draws from python `random`, which checkpoints restore."""

    def __init__(self, rows: list[tuple[Path, str]], augment: bool):
        self.rows, self.augment = rows, augment

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[Image.Image, str, str]:
        path, caption = self.rows[index]
        image = load_image(path)
        return (random_resized_crop(image) if self.augment else image), caption, str(path)


def positive_pairs(captions: list[str], image_keys: list[str]) -> torch.Tensor:
    """(B, B) bool: pair (i, j) is a match if i and j share the caption text or the image file.

    Class-style captions repeat a lot ("a photo of a sneaker"), so several columns of a row
    are true matches; counting them as negatives would push same-class images apart.
    """
    def same(values: list[str]) -> torch.Tensor:
        ids = torch.tensor([{v: i for i, v in enumerate(values)}[v] for v in values])  # (B,) first index of each value
        return ids[:, None] == ids[None, :]

    return same(captions) | same(image_keys)


class ClipCollate:
    """(image, caption, image key) items -> pixel_values (B, 3, S, S), input_ids / attention_mask (B, T), positives (B, B)."""

    def __init__(self, processor, max_text_len: int):
        self.processor, self.max_text_len = processor, max_text_len

    def __call__(self, items: list[tuple[Image.Image, str, str]]) -> dict[str, torch.Tensor]:
        images, captions, keys = zip(*items)
        batch = self.processor(
            images=list(images), text=list(captions), padding=True, truncation=True,
            max_length=self.max_text_len, return_tensors="pt",
        )
        batch = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
        batch["positives"] = positive_pairs(list(captions), list(keys))
        return batch


# ---------------------------------------------------------------- model + loss


def contrastive_loss(
    logits: torch.Tensor, kind: str, bias: torch.Tensor | None = None, positives: torch.Tensor | None = None
) -> torch.Tensor:
    """logits (B_text, B_image) -> scalar loss; matches are the diagonal, or the symmetric bool `positives` (B, B).

    infonce: mean of text->image and image->text cross-entropy (CLIP); with several matches in a
             row the target spreads evenly over them. Symmetric by construction.
    sigmoid: every pair is an independent binary decision (SigLIP), summed per row, averaged over rows.
    """
    if positives is None:
        positives = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    positives = positives.to(logits.dtype)
    if kind == "infonce":
        targets = positives / positives.sum(dim=1, keepdim=True)  # (B, B), rows sum to 1
        return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets.T))
    signs = 2 * positives - 1  # +1 matched, -1 others
    return -F.logsigmoid(signs * (logits + bias)).sum() / logits.shape[0]


class ClipWithLoss(nn.Module):
    """A CLIPModel plus what its training loss needs (SigLIP's bias); forward returns the loss."""

    def __init__(self, clip: nn.Module, loss: str):
        super().__init__()
        if loss not in LOSSES:
            raise ConfigError(f"--loss {loss!r}; choose one of {LOSSES}")
        self.clip, self.loss = clip, loss
        # SigLIP init: t = 10, b = -10 so the many negatives start near probability 0
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if loss == "sigmoid" else None

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        positives: torch.Tensor | None = None,
    ) -> torch.Tensor:
        image_embeds = image_embeddings(self.clip, pixel_values)  # (B, D), unit norm
        text_embeds = text_embeddings(self.clip, input_ids, attention_mask)  # (B, D), unit norm
        scale = self.clip.logit_scale.clamp(0, MAX_LOGIT_SCALE).exp()  # CLIP's clamped learnable temperature
        logits = scale * text_embeds @ image_embeds.T  # (B_text, B_image)
        return contrastive_loss(logits, self.loss, self.logit_bias, positives)


def train_tokenizer(captions: list[str], vocab_size: int, max_text_len: int):
    """A CLIP BPE tokenizer (lowercase, </w> suffix, <|startoftext|> ... <|endoftext|>) trained on the captions."""
    from transformers import CLIPTokenizer

    base = CLIPTokenizer()  # CLIP's pipeline with an empty vocab: only the specials
    tokenizer = base.train_new_from_iterator(captions, vocab_size=vocab_size)
    tokenizer.model_max_length = max_text_len
    return tokenizer


def build_clip(cfg: ClipModelConfig, tokenizer, loss: str):
    """A randomly initialised standard CLIPModel sized by `cfg`, its token ids matching `tokenizer`."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
            num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
            max_position_embeddings=cfg.max_text_len, projection_dim=cfg.projection_dim,
            # pooling takes the first position holding eos_token_id (padding also uses it, after the EOS)
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=cfg.vision_width, intermediate_size=4 * cfg.vision_width, num_hidden_layers=cfg.vision_layers,
            num_attention_heads=cfg.vision_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
            projection_dim=cfg.projection_dim,
        ),
        projection_dim=cfg.projection_dim,
        logit_scale_init_value=math.log(10.0) if loss == "sigmoid" else math.log(1 / 0.07),
    )
    if tokenizer.eos_token_id == 2:
        raise ConfigError("tokenizer EOS id is 2, which CLIPTextModel treats as the legacy argmax pooling; retrain it")
    return CLIPModel(config)


def build_processor(tokenizer, image_size: int):
    from transformers import CLIPImageProcessor, CLIPProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def load_or_build(cfg: ClipStageConfig, captions: list[str]):
    """(CLIPModel, processor): continued from cfg.init, or new with a tokenizer trained on `captions`."""
    if cfg.init:
        from vlm_chat.zero_shot import load_clip

        model, processor = load_clip(cfg.init)
        return model.train(), processor
    tokenizer = train_tokenizer(captions, cfg.model.vocab_size, cfg.model.max_text_len)
    return build_clip(cfg.model, tokenizer, cfg.loss), build_processor(tokenizer, cfg.model.image_size)


def save_clip(module: ClipWithLoss, processor, out: Path) -> None:
    """save_pretrained dir (safetensors) + processor files (+ logit_bias.safetensors for SigLIP)."""
    from safetensors.torch import save_file

    with torch.no_grad():
        module.clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    module.clip.save_pretrained(out)
    processor.save_pretrained(out)
    if module.logit_bias is not None:
        save_file({"logit_bias": module.logit_bias.detach().reshape(1)}, out / "logit_bias.safetensors")


def run(cfg: ClipStageConfig) -> Path:
    """Train, then write the final CLIP to cfg.train.output_dir/final. Returns that dir."""
    rows = read_captions(cfg.data.train)
    val_path = Path(cfg.data.val) if cfg.data.val else Path(cfg.data.train).with_name("captions_val.jsonl")
    if cfg.data.val and not val_path.is_file():
        raise UserFacingError(f"--val {val_path} not found")
    out = Path(cfg.train.output_dir)
    final, base = out / "final", out / "processor"
    torch.manual_seed(cfg.train.seed)  # the from-scratch init is part of the run
    if cfg.train.resume and base.is_dir():
        # Rebuild the exact tokenizer and architecture the checkpoints were trained with;
        # every CLIP weight is trainable, so the checkpoint then restores all of them.
        from transformers import AutoProcessor, CLIPConfig, CLIPModel

        processor = AutoProcessor.from_pretrained(base)
        clip = CLIPModel(CLIPConfig.from_pretrained(base))
    else:
        clip, processor = load_or_build(cfg, [caption for _, caption in rows])
        processor.save_pretrained(base)
        clip.config.save_pretrained(base)
    module = ClipWithLoss(clip, cfg.loss)
    max_text_len = clip.config.text_config.max_position_embeddings
    train_set = CaptionDataset(rows, augment=cfg.data.augment)
    eval_set = None
    if val_path.is_file():
        eval_rows = read_captions(val_path)
        # a fixed random sample: the file is grouped by source, its head would be one kind of image
        picked = sorted(random.Random(0).sample(range(len(eval_rows)), min(cfg.data.max_eval_samples, len(eval_rows))))
        eval_set = Subset(CaptionDataset(eval_rows, augment=False), picked)
    n_params = sum(p.numel() for p in clip.parameters())
    print(f"CLIP: {n_params / 1e6:.1f}M params, image {clip.config.vision_config.image_size}px "
          f"patch {clip.config.vision_config.patch_size}, {len(train_set)} train pairs, loss {cfg.loss}")
    groups = param_groups(module, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    result = train(module, lambda m, batch: m(**batch), groups, train_set, ClipCollate(processor, max_text_len),
                   cfg.train, eval_dataset=eval_set)
    save_clip(module, processor, final)
    print(f"saved CLIP to {final} (step {result.step}, eval loss {result.eval_loss})")
    return final


def export_checkpoint(run_dir: str | Path, out: str | Path, checkpoint: str | Path | None = None) -> Path:
    """Write a loadable CLIP dir from a run's checkpoint (default: the latest), e.g. to evaluate mid-run."""
    from safetensors.torch import load_file
    from transformers import AutoProcessor, CLIPConfig, CLIPModel

    from training.trainer import list_checkpoints

    run_dir, out = Path(run_dir), Path(out)
    base = run_dir / "processor"
    if not (base / "config.json").exists():
        raise UserFacingError(f"{base} lacks config.json; export needs a run started by this version of the clip stage")
    checkpoints = list_checkpoints(run_dir)
    if checkpoint is None and not checkpoints:
        raise UserFacingError(f"no checkpoint in {run_dir}/checkpoints yet")
    checkpoint = Path(checkpoint) if checkpoint else checkpoints[-1]
    weights = load_file(checkpoint / "trainable.safetensors")
    module = ClipWithLoss(CLIPModel(CLIPConfig.from_pretrained(base)), "sigmoid" if "logit_bias" in weights else "infonce")
    module.load_state_dict(weights)
    save_clip(module, AutoProcessor.from_pretrained(base), out)
    return out
