"""`--top-layers K`: train the LoRA of the LLM's last K decoder layers only, on cached inputs.

With the vision tower, the projector and the lower decoder layers frozen, what the lowest
trained layer receives for a sample never changes during training. It is computed once per
sample (`cache_layer_inputs`: image -> pixels -> tower -> projector -> embeddings -> the
frozen layers), kept in memory, and every step runs only the K trained layers, the final
norm and the output head. An epoch then costs about K / L of a full one (L layers), after
one forward pass over the data. The cache holds T x D_lm floats per sample (a 400-token
sample on SmolLM2: 0.9 MB).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.utils.data import Dataset

from training.data import padded_labels
from vlm_chat.errors import ConfigError

LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
CHECK_TOLERANCE = 1e-3  # largest |difference| allowed between the split forward and the decoder's own


def first_trained_layer(model, top_layers: int, plan) -> int:
    """The index of the lowest decoder layer that trains; refuses plans a cache cannot serve."""
    layers = model.llm_layer_count
    if not 0 < top_layers < layers:
        raise ConfigError(f"--top-layers {top_layers}: the LLM has {layers} decoder layers; give 1 to {layers - 1} "
                          "(leave it out to train them all)")
    moving = [part for part in ("vision", "projector") if getattr(plan, part) != "frozen"]
    if moving or plan.llm != "lora":
        raise ConfigError("--top-layers caches what the frozen lower layers compute, so it needs --vision frozen "
                          f"--projector frozen --llm lora (got vision {plan.vision}, projector {plan.projector}, "
                          f"llm {plan.llm})")
    return layers - top_layers


def freeze_below(model, split: int) -> None:
    """Stop the LoRA weights of decoder layers below `split` from training."""
    for name, param in model.language_model.named_parameters():
        found = LAYER_INDEX.search(name)
        if param.requires_grad and found and int(found.group(1)) < split:
            param.requires_grad_(False)


class LayerInputs(Dataset):
    """Cached (layer input, labels) pairs, one per training sample."""

    def __init__(self, inputs: list[torch.Tensor], labels: list[list[int]]):
        self.inputs = inputs
        self.labels = labels

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"layer_inputs": self.inputs[index], "labels": self.labels[index]}

    def lengths(self) -> list[int]:
        return [len(x) for x in self.labels]

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in self.inputs)


def collate_layer_inputs(batch: list[dict[str, Any]], from_layer: int) -> dict[str, Any]:
    """Right-pad cached inputs (zeros, masked out), labels and mask as `collate` pads a batch."""
    out = padded_labels(batch)
    first = batch[0]["layer_inputs"]
    inputs = torch.zeros((*out["labels"].shape, first.shape[-1]), dtype=first.dtype)
    for row, item in enumerate(batch):
        inputs[row, : len(item["layer_inputs"])] = item["layer_inputs"]
    return {"layer_inputs": inputs, **out, "from_layer": from_layer}


@torch.no_grad()
def cache_layer_inputs(model, dataset: Dataset, collate_fn: Callable[[list], dict], split: int,
                       batch_size: int, what: str = "training") -> LayerInputs:
    """What decoder layer `split` receives for every sample of `dataset` (ConversationDataset
    items), in eval mode (no dropout in what does not train). Batches are formed from samples
    of similar length; right padding does not change a causal model's states at real tokens.
    The first batch is also run through the LLM's own decoder, and the cache is refused if
    the split forward does not give the same final states (a decoder built differently)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    lengths = dataset.lengths() if callable(getattr(dataset, "lengths", None)) else None
    order = sorted(range(len(dataset)), key=lengths.__getitem__) if lengths is not None else list(range(len(dataset)))
    inputs: list[torch.Tensor | None] = [None] * len(dataset)
    labels: list[list[int] | None] = [None] * len(dataset)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for number, indices in enumerate(tqdm(batches, desc=f"caching layer {split} inputs ({what})", dynamic_ncols=True)):
        items = [dataset[i] for i in indices]
        batch = collate_fn(items)
        mask = batch["attention_mask"].to(model.device)
        embeds = model.embed(batch["input_ids"], batch.get("pixel_values"))
        hidden = model.llm_layers(embeds, mask, 0, split)
        if number == 0:
            check_split_forward(model, embeds, mask, hidden, split)
        for row, (index, item) in enumerate(zip(indices, items)):
            n = len(item["input_ids"])
            inputs[index] = hidden[row, :n].cpu().clone()  # the dtype the layers gave, as the top layers take it
            labels[index] = list(item["labels"])
    model.train(was_training)
    return LayerInputs(inputs, labels)


def check_split_forward(model, embeds: torch.Tensor, mask: torch.Tensor, hidden: torch.Tensor, split: int) -> None:
    decoder = model.causal_lm().get_decoder()
    whole = decoder(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
    parts = decoder.norm(model.llm_layers(hidden, mask, split))
    real = mask.bool()
    gap = (whole[real] - parts[real]).abs().max().item()
    if not math.isfinite(gap) or gap > CHECK_TOLERANCE:
        raise ConfigError(f"--top-layers: running this LLM's decoder layers one by one does not reproduce its own "
                          f"forward (largest difference {gap:.2e}); train without --top-layers")


def cached_datasets(model, split: int, train_set: Dataset, eval_set: Dataset | None, collate_fn: Callable[[list], dict],
                    batch_size: int) -> tuple[LayerInputs, LayerInputs | None, Callable[[list], dict]]:
    """The training and held-out sets as cached inputs of layer `split`, and their collate fn."""
    start = time.perf_counter()
    train_cached = cache_layer_inputs(model, train_set, collate_fn, split, batch_size)
    eval_cached = cache_layer_inputs(model, eval_set, collate_fn, split, batch_size, "validation") if eval_set else None
    held = eval_cached.nbytes() if eval_cached else 0
    print(f"top layers: the inputs of layer {split} for {len(train_cached)} + {len(eval_cached or [])} samples, "
          f"{(train_cached.nbytes() + held) / 2**30:.2f} GiB, cached in {time.perf_counter() - start:.0f} s; "
          f"each step runs layers {split}-{model.llm_layer_count - 1}")
    return train_cached, eval_cached, partial(collate_layer_inputs, from_layer=split)
