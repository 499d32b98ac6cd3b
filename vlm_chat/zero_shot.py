"""Zero-shot classification with any CLIP model (a local dir or a hub id).

    images -> processor -> pixel_values (B, 3, H, W) -> get_image_features -> (B, D), L2-normalised
    labels x templates -> tokenizer -> get_text_features -> (C*T, D) -> mean over templates -> (C, D)
    logits = logit_scale * images @ classes.T  (B, C) -> softmax -> top-k

Template ensembling (CLIP paper, sec. 3.1.4): each class is the renormalised mean of its
prompt embeddings, so no single phrasing decides the answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from vlm_chat.errors import ConfigError, UserFacingError
from vlm_chat.images import load_image

# No trailing periods: this project's CLIP tokenizer learned from captions without them.
# "a {}" before a vowel becomes "an {}" (see with_article).
DEFAULT_TEMPLATES = (
    "a photo of a {}",
    "a picture of a {}",
    "an image of a {}",
    "a drawing of a {}",
    "a {}",
)
BUNDLED_CLIP = Path(__file__).parent / "assets" / "clip"


@dataclass
class Prediction:
    label: str
    probability: float


def default_clip() -> str:
    """The CLIP this project trained and ships (vlm_chat/assets/clip), used when --clip is not given."""
    if not (BUNDLED_CLIP / "config.json").exists():
        raise UserFacingError(
            f"no bundled CLIP at {BUNDLED_CLIP}; pass --clip DIR_OR_HUB_ID "
            "(e.g. openai/clip-vit-base-patch32) or train one with `vlm-chat train --stage clip`"
        )
    return str(BUNDLED_CLIP)


def load_clip(name_or_path: str | None = None, device: str = "cpu"):
    """(CLIPModel in eval mode, processor) from a save_pretrained dir or a hub id."""
    from transformers import AutoProcessor, CLIPModel

    name_or_path = name_or_path or default_clip()
    try:
        model = CLIPModel.from_pretrained(name_or_path).to(device).eval()
        processor = AutoProcessor.from_pretrained(name_or_path)
    except OSError as err:
        raise UserFacingError(
            f"could not load CLIP from {name_or_path!r} ({err}); give a dir written by save_pretrained or a hub id"
        ) from err
    return model, processor


def _features(output) -> torch.Tensor:
    # transformers >= 5 returns a ModelOutput whose pooler_output is the projected embedding
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def image_embeddings(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """pixel_values (B, 3, H, W) -> L2-normalised image embeddings (B, D)."""
    return F.normalize(_features(model.get_image_features(pixel_values=pixel_values)), dim=-1)


def text_embeddings(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """input_ids (B, T) -> L2-normalised text embeddings (B, D), pooled at each sequence's EOS."""
    return F.normalize(_features(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)), dim=-1)


@torch.no_grad()
def encode_images(model, processor, images: list[Image.Image], batch_size: int = 64) -> torch.Tensor:
    """PIL images -> (N, D) normalised embeddings, in batches."""
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(images), batch_size):
        pixel_values = processor(images=images[start : start + batch_size], return_tensors="pt")["pixel_values"]
        chunks.append(image_embeddings(model, pixel_values.to(device)).cpu())
    return torch.cat(chunks) if chunks else torch.empty(0, model.config.projection_dim)


@torch.no_grad()
def encode_texts(model, processor, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Strings -> (N, D) normalised embeddings, in batches (truncated to the model's context)."""
    device = next(model.parameters()).device
    max_length = model.config.text_config.max_position_embeddings
    chunks = []
    for start in range(0, len(texts), batch_size):
        tokens = processor(
            text=texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        chunks.append(text_embeddings(model, tokens["input_ids"].to(device), tokens["attention_mask"].to(device)).cpu())
    return torch.cat(chunks) if chunks else torch.empty(0, model.config.projection_dim)


def class_embeddings(model, processor, labels: list[str], templates: tuple[str, ...] = DEFAULT_TEMPLATES) -> torch.Tensor:
    """(C, D): per class, the renormalised mean of its normalised prompt embeddings."""
    if not labels:
        raise ConfigError("no labels given; pass --labels 'cat,dog' or --labels-file with one label per line")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ConfigError(f"prompt templates {bad} lack the '{{}}' placeholder for the label")
    prompts = [with_article(template.format(label)) for label in labels for template in templates]
    embeds = encode_texts(model, processor, prompts).view(len(labels), len(templates), -1)  # (C, T, D)
    return F.normalize(embeds.mean(dim=1), dim=-1)  # (C, D)


def with_article(prompt: str) -> str:
    """'a photo of a ankle boot' -> 'a photo of an ankle boot' (by spelling; good enough for prompts)."""
    return re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", prompt)


def logit_scale(model) -> float:
    return float(model.logit_scale.detach().exp().clamp(max=100.0))


def classify(
    model,
    processor,
    images: list[Image.Image],
    labels: list[str],
    templates: tuple[str, ...] = DEFAULT_TEMPLATES,
    top_k: int = 5,
) -> list[list[Prediction]]:
    """For each image, its top_k labels with softmax probabilities over all labels."""
    classes = class_embeddings(model, processor, labels, templates)  # (C, D)
    probs = (logit_scale(model) * encode_images(model, processor, images) @ classes.T).softmax(dim=-1)  # (B, C)
    top = probs.topk(min(top_k, len(labels)), dim=-1)
    return [
        [Prediction(labels[i], p) for p, i in zip(values.tolist(), indices.tolist())]
        for values, indices in zip(top.values, top.indices)
    ]


# ---------------------------------------------------------------- evaluation


def _read_jsonl(path: Path, keys: tuple[str, ...]) -> list[dict]:
    import json

    if not path.is_file():
        raise UserFacingError(f"{path} not found; point --corpus at a corpus dir")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            row = json.loads(line)
            if any(key not in row for key in keys):
                raise UserFacingError(f"{path}:{number}: expected keys {keys}, got {sorted(row)}")
            rows.append(row)
    return rows


def _encode_image_files(model, processor, paths: list[Path], batch_size: int = 256) -> torch.Tensor:
    from tqdm.auto import tqdm

    chunks = []
    for start in tqdm(range(0, len(paths), batch_size), desc="images", unit="batch", leave=False):
        chunks.append(encode_images(model, processor, [load_image(p) for p in paths[start : start + batch_size]], batch_size))
    return torch.cat(chunks)  # (N, D)


def zero_shot_accuracy(model, processor, labels_file: Path, classes_file: Path, templates: tuple[str, ...] = DEFAULT_TEMPLATES) -> float:
    """Top-1 accuracy on a {"image", "label"} JSONL, choosing among the classes in classes_file (a JSON list)."""
    import json

    rows = _read_jsonl(labels_file, ("image", "label"))
    classes = json.loads(classes_file.read_text())
    unknown = sorted({r["label"] for r in rows} - set(classes))
    if unknown:
        raise UserFacingError(f"{labels_file}: labels {unknown[:5]} are not in {classes_file}")
    targets = torch.tensor([classes.index(r["label"]) for r in rows])  # (N,)
    image_embeds = _encode_image_files(model, processor, [labels_file.parent / r["image"] for r in rows])
    predicted = (image_embeds @ class_embeddings(model, processor, classes, templates).T).argmax(dim=-1)  # (N,)
    return (predicted == targets).float().mean().item()


def retrieval_recall(model, processor, captions_file: Path, pairs: int = 1000, seed: int = 0) -> dict[str, float]:
    """Text->image and image->text recall@1/@5 on `pairs` (image, caption) pairs with distinct images.

    A hit is any retrieved item whose caption text equals the query's caption: identical
    captions ("a photo of a sneaker") describe their images equally well.
    """
    import random

    rows = _read_jsonl(captions_file, ("image", "caption"))
    random.Random(seed).shuffle(rows)
    chosen, seen = [], set()
    for row in rows:
        if row["image"] not in seen:
            seen.add(row["image"])
            chosen.append(row)
        if len(chosen) == pairs:
            break
    captions = [r["caption"] for r in chosen]
    image_embeds = _encode_image_files(model, processor, [captions_file.parent / r["image"] for r in chosen])
    text_embeds = encode_texts(model, processor, captions)
    sims = text_embeds @ image_embeds.T  # (P_text, P_image)
    ids = torch.tensor([{c: i for i, c in enumerate(captions)}[c] for c in captions])  # equal captions share an id
    same = ids[:, None] == ids[None, :]  # (P, P) caption text i == caption text j
    results: dict[str, float] = {"retrieval_pairs": float(len(chosen))}
    for direction, scores in (("text_to_image", sims), ("image_to_text", sims.T)):
        for k in (1, 5):
            top = scores.topk(min(k, len(chosen)), dim=-1).indices  # (P, k)
            results[f"{direction}_recall@{k}"] = same.gather(1, top).any(dim=-1).float().mean().item()
    return results
