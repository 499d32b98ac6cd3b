"""What does a vision tower's output know about a scene? Linear probes on its patch features.

    python bench/probe_vision.py --corpus DIR [--model BUNDLE] [--train 4000] [--test 1000]

For corpus scenes (layouts_*.jsonl hold the truth), the features the projector receives
(hidden state `feature_layer`, CLS dropped, shape (P, D)) are flattened, and linear
probes are trained on them for:
  cells   which of the 9 grid cells hold an object (per-cell accuracy, and all 9 right)
  count   how many objects in total (1-6, as a class)
Three towers are probed in the same run: the bundle's tower (default: the shipped
default model), the shipped CLIP it started from, and a randomly initialised tower of
the same shape (the baseline: what a linear probe gets from architecture alone).
If the trained towers sit far above the baseline but the VLM still fails these
questions, the language side is the bottleneck; if they sit near it, the vision side is.

A second table asks what the LLM can see of position: the flattened probes know each
feature's slot, but the LLM reads image tokens one at a time by content. So one probe
reads a single image embedding (the projector's output, what the LLM receives) and
guesses its token's row and column; the baseline is chance (1 / grid side). Next to it,
the mean length of those embeddings against the LLM's own word embeddings, and how far
the LLM's layers move each kind of token: the length of (hidden state before the last
layer - input embedding) over the input's length, for image tokens and for the text
tokens of a question about the scene. Near 0 means the layers barely change that token.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from training.corpus.scenes import CELL_NAMES

CELLS = [CELL_NAMES[cell] for cell in sorted(CELL_NAMES)]  # row-major


def scenes(corpus: Path, split: str, limit: int) -> tuple[list[Path], torch.Tensor, torch.Tensor]:
    paths, cells, counts = [], [], []
    with (corpus / f"layouts_{split}.jsonl").open() as f:
        for line in f:
            row = json.loads(line)
            occupied = {c for obj in row["objects"] for c in obj["cells"]}
            paths.append(corpus / row["image"])
            cells.append([float(c in occupied) for c in CELLS])
            counts.append(sum(obj["count"] for obj in row["objects"]))
            if len(paths) == limit:
                break
    return paths, torch.tensor(cells), torch.tensor(counts)


@torch.no_grad()
def encoded(encode, processor, paths: list[Path], batch: int = 64) -> torch.Tensor:
    """(N, P, D): `encode` (a tower, or the model's get_image_features) on every image, a batch at a time."""
    return torch.cat([encode(processor.preprocess_images(paths[s : s + batch])) for s in range(0, len(paths), batch)])


def features(tower, processor, paths: list[Path]) -> torch.Tensor:
    """(N, P * D): the patch features the projector receives, flattened per image."""
    return encoded(tower, processor, paths).flatten(1)


def token_embeddings(model, processor, paths: list[Path]) -> torch.Tensor:
    """(N, P', D_lm): the image embeddings the LLM receives, one per image token."""
    return encoded(model.get_image_features, processor, paths)


def random_tower(model):
    """A randomly initialised tower of the bundle's shape (seeded): the probes' baseline."""
    from transformers import CLIPVisionModel

    from vlm_chat.vision import VisionTower

    torch.manual_seed(0)
    return VisionTower(CLIPVisionModel(model.vision_tower.model.config).eval(), model.config.vision, True)


@torch.no_grad()
def layer_change(model, processor, paths: list[Path]) -> tuple[float, float, int]:
    """Median |h_(L-1) - h_0| / |h_0| over image tokens and over text tokens, and L (the median:
    an LLM's first token grows a huge hidden state, an attention sink, that would swamp a mean)."""
    from vlm_chat.chat import user_message

    image, text, layers = [], [], 0
    for path in paths:
        inputs = processor([user_message("Where is the red square?", [path])])
        hidden = model(**inputs, output_hidden_states=True).hidden_states
        layers = len(hidden) - 1
        change = ((hidden[-2] - hidden[0]).norm(dim=-1) / hidden[0].norm(dim=-1))[0]  # (T,); last is normed
        is_image = inputs["input_ids"][0].to(model.device) == model.image_token_id
        image.append(change[is_image])
        text.append(change[~is_image])
    return torch.cat(image).median().item(), torch.cat(text).median().item(), layers


def standardise(train_x: torch.Tensor, test_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both feature sets scaled by the training set's mean and spread per feature."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    return (train_x - mean) / std, (test_x - mean) / std


def probe(train_x, train_y, test_x, test_y, classes: int | None, steps: int = 300, predict: bool = False):
    """A linear probe fit full-batch on standardised features: test accuracy (with `classes`), or
    (per-label accuracy, all labels right) for multi-label targets; `predict` returns the test
    predictions instead."""
    train_x, test_x = standardise(train_x, test_x)
    torch.manual_seed(0)
    head = torch.nn.Linear(train_x.shape[1], classes or train_y.shape[1])
    optim = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-2)
    for _ in range(steps):
        logits = head(train_x)
        if classes:
            loss = torch.nn.functional.cross_entropy(logits, train_y)
        else:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, train_y)
        optim.zero_grad()
        loss.backward()
        optim.step()
    with torch.no_grad():
        logits = head(test_x)
    if classes:
        return logits.argmax(1) if predict else (logits.argmax(1) == test_y).float().mean().item()
    hits = (logits > 0).float() == test_y
    return hits.float().mean().item(), hits.all(1).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--model", default="default")
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--test", type=int, default=1000)
    args = parser.parse_args()

    import copy

    from vlm_chat.defaults import resolve_model
    from vlm_chat.model import VisionLanguageModel
    from vlm_chat.vision import load_vision_tower

    model, processor = VisionLanguageModel.from_pretrained(resolve_model(args.model), device="cpu", quantization="none")
    shipped_clip = Path(__file__).resolve().parents[1] / "vlm_chat" / "assets" / "clip"
    config = copy.deepcopy(model.config.vision)
    config.name_or_path = str(shipped_clip)
    towers = {
        "bundle's tower": model.vision_tower,
        "shipped CLIP": load_vision_tower(config, str(shipped_clip), torch.float32, torch.device("cpu")),
    }
    towers["random init (baseline)"] = random_tower(model)

    corpus = Path(args.corpus)
    train_paths, train_cells, train_counts = scenes(corpus, "train", args.train)
    test_paths, test_cells, test_counts = scenes(corpus, "test", args.test)
    rows = []
    for name, tower in towers.items():
        start = time.perf_counter()
        train_x, test_x = features(tower, processor, train_paths), features(tower, processor, test_paths)
        cell_acc, cell_all = probe(train_x, train_cells, test_x, test_cells, None)
        count_acc = probe(train_x, train_counts - 1, test_x, test_counts - 1, 6)
        rows.append((name, cell_acc, cell_all, count_acc, time.perf_counter() - start))
    print("| image embeddings of the bundle | token's column, from its content alone | token's row | chance |")
    print("|---|---|---|---|")
    train_t, test_t = token_embeddings(model, processor, train_paths[:600]), token_embeddings(model, processor, test_paths[:200])
    side = math.isqrt(train_t.shape[1])
    slot_train, slot_test = torch.arange(train_t.shape[1]).repeat(len(train_t)), torch.arange(test_t.shape[1]).repeat(len(test_t))
    flat_train, flat_test = train_t.flatten(0, 1), test_t.flatten(0, 1)
    column = probe(flat_train, slot_train % side, flat_test, slot_test % side, side)
    row = probe(flat_train, slot_train // side, flat_test, slot_test // side, side)
    print(f"| {side}x{side} tokens, {len(train_t)} / {len(test_t)} scenes | {100 * column:.1f} % | {100 * row:.1f} % | {100 / side:.1f} % |\n")
    # An image token far longer than a word embedding drowns small signals added to it.
    words = model.language_model.get_input_embeddings().weight.norm(dim=-1).mean().item()
    print(f"mean norm: image embeddings {test_t.norm(dim=-1).mean().item():.2f}, the LLM's word embeddings {words:.2f}")
    moved_image, moved_text, layers = layer_change(model, processor, test_paths[:50])
    print(f"how far {layers - 1} of the LLM's {layers} layers move a token, |h - h_0| / |h_0| (median, 50 test scenes): "
          f"image tokens {moved_image:.3f}, text tokens {moved_text:.3f}\n")
    base = rows[-1]
    print(f"{args.train} train / {args.test} test scenes; linear probes on flattened patch features")
    print("| tower | cell occupied, per cell | all 9 cells right | total count | count vs baseline |")
    print("|---|---|---|---|---|")
    for name, cell_acc, cell_all, count_acc, _ in rows:
        print(f"| {name} | {100 * cell_acc:.1f} % | {100 * cell_all:.1f} % | {100 * count_acc:.1f} % | {count_acc / base[3]:.2f}x |")


if __name__ == "__main__":
    main()
