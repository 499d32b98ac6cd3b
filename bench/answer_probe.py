"""Does the LLM still hold what a cell contains when it starts to answer? Linear probes on its states.

    python bench/answer_probe.py --corpus DIR [--model BUNDLE] [--train 1200] [--test 400] [--layers 0,6,12,18,24,30]

`bench/cell_probe.py` found that a linear head on a cell's own image tokens names a garment
far more often than the model does, and `bench/confusions.py --naming` that the model's
wrong garment answers are nearly all another garment. This asks where between the two
the name is lost. Every occupied non-emoji cell of the first `--train` training and
`--test` test scenes (cell_probe's cells) is asked "What is in the <cell>?" with its
scene, as the eval asks, and the LLM's hidden state at the last prompt token, where the
answer starts, is kept from each layer in `--layers` (0: that token's own embedding,
which knows nothing of the image: the floor). The answers read "a coat", so the name
itself starts one token later: `--first-answer` also keeps the states after the model's
own greedy first answer token. The same linear probe as cell_probe's then
learns the object's name from each, next to the probe on the vision tower's tokens of
the cell that the projector reads (the ceiling the LLM starts from).

A layer whose probe comes close to the tower's means the LLM has gathered the object by
then; if even the last layer's stays far below, the name is lost in reading the image
tokens, and a better output mapping alone would not find it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.cell_probe import labelled_cells, print_probe_table, scene_features_by_layer  # noqa: E402
from training.corpus.scenes import CELL_NAMES  # noqa: E402

QUESTION = "What is in the {}?"  # one of the corpus's object-question forms


def conversation(image: Path, cell: tuple[int, int]) -> list[dict]:
    """The one-turn question about a cell, as the eval sends it."""
    return [{"role": "user", "content": [{"type": "image", "image": str(image)},
                                         {"type": "text", "text": QUESTION.format(CELL_NAMES[cell])}]}]


LAST_PROMPT, FIRST_ANSWER = "last prompt token", "its own first answer token"


@torch.no_grad()
def answer_states(model, processor, items, layers: list[int], batch: int = 16,
                  first_answer: bool = False) -> dict[str, dict[int, torch.Tensor]]:
    """position -> layer -> (cells, hidden size): the LLM's hidden states at the last
    prompt token of each item's question (prompts are left-padded, so that is the last
    position) and, with `first_answer`, one step on: after the model's own greedy first
    answer token (mostly "a" or "an"), where the name itself starts."""
    positions = [LAST_PROMPT, FIRST_ANSWER] if first_answer else [LAST_PROMPT]
    parts: dict[str, dict[int, list[torch.Tensor]]] = {p: {layer: [] for layer in layers} for p in positions}

    def keep(position: str, hidden) -> None:
        for layer in layers:
            parts[position][layer].append(hidden[layer][:, -1].float().clone())  # not a view: the batch is let go

    llm = model.language_model
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        inputs = processor([conversation(path, cell) for path, cell, *_rest in chunk])
        mask = inputs["attention_mask"]
        out = llm(inputs_embeds=model.embed(inputs["input_ids"], inputs["pixel_values"]), attention_mask=mask,
                  use_cache=first_answer, output_hidden_states=True, logits_to_keep=1)
        keep(LAST_PROMPT, out.hidden_states)
        if first_answer:
            token = out.logits[:, -1].argmax(-1, keepdim=True)  # (n, 1), greedy
            mask = torch.cat([mask, mask.new_ones(len(chunk), 1)], dim=1)
            out = llm(input_ids=token, attention_mask=mask, cache=out.cache, use_cache=True,
                      output_hidden_states=True, logits_to_keep=1)
            keep(FIRST_ANSWER, out.hidden_states)
    return {p: {layer: torch.cat(chunks) for layer, chunks in by_layer.items()} for p, by_layer in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--model", default="default")
    parser.add_argument("--train", type=int, default=1200, help="training-split scenes")
    parser.add_argument("--test", type=int, default=400, help="test-split scenes")
    parser.add_argument("--layers", default="0,6,12,18,24,30", help="LLM hidden states (0: embeddings)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--first-answer", action="store_true",
                        help="also probe one token on, after the model's own first answer token")
    args = parser.parse_args()

    from vlm_chat.defaults import resolve_model
    from vlm_chat.model import VisionLanguageModel

    model, processor = VisionLanguageModel.from_pretrained(resolve_model(args.model), device="cpu", quantization="none")
    model.eval()
    layers = [int(layer) for layer in args.layers.split(",")]
    depth = model.language_model.config.num_hidden_layers
    if bad := [layer for layer in layers if not 0 <= layer <= depth]:
        parser.error(f"--layers {bad}: this LLM has hidden states 0 to {depth}")
    train, test, classes, train_y, test_y = labelled_cells(Path(args.corpus), args.train, args.test)
    start = time.perf_counter()
    tower = "vision tower: the cell's tokens the projector reads"
    spec = (model.vision_tower.feature_layer,) if isinstance(model.vision_tower.feature_layer, int) \
        else tuple(model.vision_tower.feature_layer)
    train_x = {tower: next(iter(scene_features_by_layer(model.vision_tower, processor, train, [spec]).values()))}
    test_x = {tower: next(iter(scene_features_by_layer(model.vision_tower, processor, test, [spec]).values()))}
    for split, items, out in (("train", train, train_x), ("test", test, test_x)):
        states = answer_states(model, processor, items, layers, first_answer=args.first_answer)
        out.update({f"LLM hidden state {layer}, {position}": by_layer[layer]
                    for position, by_layer in states.items() for layer in layers})
        print(f"{split}: {len(items)} questions in {time.perf_counter() - start:.0f} s", flush=True)
    print(f"{len(train)} / {len(test)} cells of {args.train} / {args.test} scenes, {classes} names; "
          "linear probe, test accuracy")
    print_probe_table(train_x, train_y, test_x, test_y, test, classes, args.steps)


if __name__ == "__main__":
    main()
