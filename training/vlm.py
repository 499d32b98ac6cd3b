"""Stages `align` and `instruct`: train a bundle on users' (image, question, answer) data.

  align     LLaVA stage 1: vision tower and LLM frozen, the projector learns (lr 1e-3)
  instruct  LLaVA stage 2: LoRA on the LLM's linear layers (lr 2e-4) and the projector
            at its own rate (2e-5, LLaVA's mm_projector_lr); `--qlora` loads the LLM in
            4-bit and trains LoRA on top.
Both run the shared loop (training/trainer.py); the output dir is a bundle that ask,
caption and serve load directly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from adapters.lora import LoraSettings
from training.data import ConversationDataset, DataError, Problem, check_samples, collate
from training.top_layers import cached_datasets, first_trained_layer, freeze_below
from training.trainable import TrainablePlan, apply_plan, trainable_summary
from training.trainer import TrainConfig, param_groups, train, train_config_from
from vlm_chat.errors import ConfigError

# Per-stage defaults; any of them can be overridden by flags or the YAML file.
STAGE_DEFAULTS = {
    "align": {"vision": "frozen", "projector": "full", "llm": "frozen", "lr": 1e-3, "warmup": 0.03},
    "instruct": {"vision": "frozen", "projector": "full", "llm": "lora", "lr": 2e-4, "projector_lr": 2e-5, "warmup": 0.03},
}
MAX_LISTED_PROBLEMS = 20
SCALE_IMAGES = 64  # training images that measure the image-token norm for --match-word-scale


@dataclass
class VLMStageConfig:
    stage: str
    model: str  # bundle dir to start from
    data: list[str]
    train: TrainConfig
    val: list[str] = field(default_factory=list)
    val_fraction: float = 0.02
    plan: TrainablePlan = field(default_factory=TrainablePlan)
    lora: LoraSettings = field(default_factory=LoraSettings)
    adapter_dropout: float | None = None  # --lora-dropout as given: it also replaces a continued adapter's
    projector_lr: float | None = None
    vision_lr: float | None = None
    qlora: bool = False
    position_embedding: bool = False  # add one to the projector if the bundle has none
    match_word_scale: bool = False  # rescale image tokens to the norm of the LLM's word embeddings
    skip_bad: bool = False
    device: str = "auto"
    top_layers: int = 0  # > 0: only the LoRA of the LLM's last N layers trains, on cached inputs (training/top_layers.py)


def config_from_settings(stage: str, settings: dict) -> VLMStageConfig:
    settings = {**STAGE_DEFAULTS[stage], **settings}
    train_config, rest = train_config_from(settings)
    for key in ("model", "data"):
        if not rest.get(key):
            raise ConfigError(f"stage {stage} needs --{key}")
    data = rest.pop("data")
    val = rest.pop("val", None) or []
    plan = TrainablePlan(*(rest.pop(part) for part in ("vision", "projector", "llm")))
    dropout = rest.pop("lora_dropout", None)
    lora = LoraSettings(
        r=rest.pop("lora_r", 16), alpha=rest.pop("lora_alpha", 32), dropout=0.05 if dropout is None else dropout,
        target_modules=rest.pop("lora_targets", None) or "all-linear",
    )
    config = VLMStageConfig(
        stage=stage, model=str(rest.pop("model")), data=[data] if isinstance(data, str) else list(data),
        train=train_config, val=[val] if isinstance(val, str) else list(val), plan=plan, lora=lora,
        adapter_dropout=dropout, val_fraction=rest.pop("val_fraction", 0.02), projector_lr=rest.pop("projector_lr", None),
        vision_lr=rest.pop("vision_lr", None), qlora=bool(rest.pop("qlora", False)),
        position_embedding=bool(rest.pop("position_embedding", False)),
        match_word_scale=bool(rest.pop("match_word_scale", False)),
        skip_bad=bool(rest.pop("skip_bad", False)), device=rest.pop("device", "auto"),
        top_layers=int(rest.pop("top_layers", 0) or 0),
    )
    if rest:
        raise ConfigError(f"settings not used by stage {stage}: {sorted(rest)}")
    plan.validate()
    lora.validate()
    return config


def _refuse_or_skip(problems: list[Problem], skip_bad: bool, what: str) -> None:
    if not problems:
        return
    rows = {(p.file, p.row) for p in problems}
    if skip_bad:
        print(f"skipping {len(rows)} bad row(s) in the {what} data (--skip-bad); first: {problems[0]}")
        return
    listed = "\n  ".join(str(p) for p in problems[:MAX_LISTED_PROBLEMS])
    more = f"\n  ... and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
    raise DataError(
        f"{len(rows)} bad row(s) in the {what} data:\n  {listed}{more}\n"
        "fix them (see `vlm-chat data check FILE --fix-out CLEAN.jsonl`) or pass --skip-bad to train on the rest"
    )


def prepare_samples(paths: list[str], processor, max_length: int, skip_bad: bool, what: str):
    samples, problems = check_samples(paths, processor, max_length)
    _refuse_or_skip(problems, skip_bad, what)
    return samples


def run(config: VLMStageConfig):
    from vlm_chat.defaults import resolve_model
    from vlm_chat.model import VisionLanguageModel

    quantization = "4bit" if config.qlora else "none"
    model, processor = VisionLanguageModel.from_pretrained(resolve_model(config.model), device=config.device, quantization=quantization)
    if config.position_embedding and config.plan.projector == "frozen":
        raise ConfigError("--position-embedding adds projector weights that must learn; use --projector full")
    if config.position_embedding and model.add_position_embedding():
        print(f"projector: added a learned position per image token ({model.projector_tokens} x "
              f"{model.projector.llm_dim}, zeros)")
    split = first_trained_layer(model, config.top_layers, config.plan) if config.top_layers else 0
    max_length = model.max_context
    samples = prepare_samples(config.data, processor, max_length, config.skip_bad, "training")
    if config.val:
        val_samples = prepare_samples(config.val, processor, max_length, config.skip_bad, "validation")
    else:
        # Hold out a seeded fraction of the training rows.
        order = list(range(len(samples)))
        random.Random(config.train.seed).shuffle(order)
        n_val = int(len(samples) * config.val_fraction) if len(samples) >= 20 else 0
        held = set(order[:n_val])
        val_samples = [samples[i] for i in sorted(held)]
        samples = [s for i, s in enumerate(samples) if i not in held]
    if not samples:
        raise DataError("no usable training rows left")
    if config.match_word_scale:
        with_images = [s for s in samples if s.images][:SCALE_IMAGES]
        if not with_images:
            raise DataError("--match-word-scale measures image tokens, but no training row has an image")
        pixels = torch.cat([processor.preprocess_images(s.images) for s in with_images])
        before, words = model.match_word_scale(pixels)
        print(f"projector: image tokens had mean norm {before:.2f} ({len(pixels)} training images), the LLM's "
              f"word embeddings {words:.2f}; output scale now {model.config.projector.output_scale:.5f}")

    torch.manual_seed(config.train.seed)  # LoRA's random init depends on the seed alone
    apply_plan(model, config.plan, config.lora, quantized_llm=config.qlora, adapter_dropout=config.adapter_dropout)
    if split:
        freeze_below(model, split)
    print(f"stage {config.stage}: {len(samples)} train / {len(val_samples)} val samples; {trainable_summary(model)}")
    wd = config.train.weight_decay
    groups = (
        param_groups(model.projector, config.projector_lr, wd)
        + param_groups(model.language_model, None, wd)
        + param_groups(model.vision_tower, config.vision_lr, wd)
    )
    model.train()
    # Frozen towers stay in eval mode (no dropout in what does not learn).
    if config.plan.vision == "frozen":
        model.vision_tower.eval()
    pad = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else 0
    train_set = ConversationDataset(samples, processor, max_length)
    eval_set = ConversationDataset(val_samples, processor, max_length) if val_samples else None
    collate_fn = partial(collate, pad_id=pad)
    if split:
        train_set, eval_set, collate_fn = cached_datasets(model, split, train_set, eval_set, collate_fn,
                                                          config.train.batch_size)
    result = train(
        model, lambda m, batch: m(**batch, loss_only=True).loss, groups, train_set, collate_fn, config.train,
        eval_dataset=eval_set,
    )
    model.eval()
    out = Path(config.train.output_dir)
    model.save_pretrained(out, processor, save_llm=config.plan.llm == "full", save_vision=config.plan.vision != "frozen")
    print(f"bundle written to {out}: use it with `vlm-chat ask --model {out} ...`")
    return result
