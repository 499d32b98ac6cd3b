"""CLIP stage + zero-shot + search, on tiny CLIPs (hidden 32, 2 layers, 16-pixel images)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image, ImageDraw

from training.clip import (
    ClipModelConfig,
    ClipWithLoss,
    build_clip,
    build_processor,
    config_from_settings,
    contrastive_loss,
    positive_pairs,
    run,
    train_tokenizer,
)
from vlm_chat.errors import ConfigError
from vlm_chat.search import build_index, search
from vlm_chat.zero_shot import classify, encode_images, encode_texts, load_clip

TINY = dict(image_size=16, patch_size=8, vision_width=32, vision_layers=2, vision_heads=4, text_width=32,
            text_layers=2, text_heads=4, projection_dim=16, vocab_size=300, max_text_len=16)
CAPTIONS = {"red": "a red square", "blue": "a blue circle"}


def draw(kind: str, size: int = 16, jitter: int = 0) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    pen = ImageDraw.Draw(image)
    box = [2 + jitter, 2 + jitter, 12 + jitter, 12 + jitter]
    if kind == "red":
        pen.rectangle(box, fill=(220, 20, 20))
    else:
        pen.ellipse(box, fill=(20, 40, 220))
    return image


@pytest.fixture(scope="module")
def trained_clip(tmp_path_factory):
    """A tiny CLIP trained for a few seconds on red squares vs blue circles, via the real stage entry."""
    root = tmp_path_factory.mktemp("clipdata")
    (root / "images").mkdir()
    rows = []
    for i in range(16):
        kind = "red" if i % 2 else "blue"
        draw(kind, jitter=i % 3).save(root / "images" / f"{i}.png")
        rows.append({"image": f"images/{i}.png", "caption": CAPTIONS[kind]})
    (root / "captions_train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:12]))
    (root / "captions_val.jsonl").write_text("\n".join(json.dumps(r) for r in rows[12:]))
    settings = dict(data=str(root / "captions_train.jsonl"), out=str(root / "run"), max_steps=40,
                    batch_size=6, lr=3e-3, warmup=5, log_every=5, seed=0, augment=False, **TINY)
    final = run(config_from_settings(settings))
    return final, root


def tiny_module(loss: str = "infonce") -> ClipWithLoss:
    torch.manual_seed(0)
    tokenizer = train_tokenizer(list(CAPTIONS.values()) * 4, 300, 16)
    return ClipWithLoss(build_clip(ClipModelConfig(**TINY), tokenizer, loss), loss), build_processor(tokenizer, 16)


@pytest.mark.parametrize("kind", ["infonce", "sigmoid"])
def test_loss_is_symmetric_and_prefers_matched_pairs(kind):
    torch.manual_seed(0)
    embeds = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)  # (B, D): text i == image i
    bias = torch.tensor(-2.0)
    logits = 10 * embeds @ embeds.T  # (B_text, B_image)
    swapped = contrastive_loss(logits.T, kind, bias)  # images as queries, texts as keys
    torch.testing.assert_close(contrastive_loss(logits, kind, bias), swapped)
    shuffled = 10 * embeds @ embeds[torch.tensor([1, 2, 3, 4, 5, 0])].T
    assert contrastive_loss(logits, kind, bias) < contrastive_loss(shuffled, kind, bias)


def test_repeated_captions_are_positives():
    positives = positive_pairs(["a cat", "a dog", "a cat"], ["1.png", "2.png", "3.png"])
    assert positives.tolist() == [[True, False, True], [False, True, False], [True, False, True]]


def test_tokenizer_ends_with_eos_and_pooling_reads_it():
    module, processor = tiny_module()
    tokens = processor(text=["a red square", "a blue"], padding=True, return_tensors="pt")
    eos = processor.tokenizer.eos_token_id
    assert module.clip.config.text_config.eos_token_id == eos != 2  # 2 would switch CLIP to legacy argmax pooling
    assert (tokens["input_ids"][:, 0] == processor.tokenizer.bos_token_id).all()
    lengths = tokens["attention_mask"].sum(dim=1)  # (B,)
    assert tokens["input_ids"][torch.arange(2), lengths - 1].tolist() == [eos, eos]
    out = module.clip.text_model(**tokens)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[torch.arange(2), lengths - 1])


def test_training_lowers_loss_and_save_reloads_identically(trained_clip):
    final, root = trained_clip
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0]
    from transformers import AutoProcessor, CLIPModel

    model, processor = CLIPModel.from_pretrained(final).eval(), AutoProcessor.from_pretrained(final)
    again, _ = load_clip(str(final))
    images = [draw("red"), draw("blue")]
    torch.testing.assert_close(encode_images(model, processor, images), encode_images(again, processor, images))
    torch.testing.assert_close(encode_texts(model, processor, ["a red square"]), encode_texts(again, processor, ["a red square"]))


def test_classify_and_search_find_the_right_answer(trained_clip, tmp_path):
    final, _ = trained_clip
    model, processor = load_clip(str(final))
    predictions = classify(model, processor, [draw("red"), draw("blue")], ["blue circle", "red square"], templates=("a {}",), top_k=2)
    assert [p[0].label for p in predictions] == ["red square", "blue circle"]
    assert abs(sum(p.probability for p in predictions[0]) - 1) < 1e-5

    folder = tmp_path / "photos"
    folder.mkdir()
    draw("red", jitter=1).save(folder / "r.png")
    draw("blue", jitter=1).save(folder / "b.png")
    stats = build_index(folder, tmp_path / "index", model, processor, str(final))
    assert (stats.embedded, stats.reused) == (2, 0)
    assert search(tmp_path / "index", model, processor, text="a red square", k=2)[0].path.endswith("r.png")
    assert search(tmp_path / "index", model, processor, image=folder / "b.png", k=1)[0].path.endswith("b.png")
    draw("blue", jitter=2).save(folder / "b2.png")  # incremental: only the new file is embedded
    stats = build_index(folder, tmp_path / "index", model, processor, str(final))
    assert (stats.embedded, stats.reused) == (1, 2)


def test_unknown_settings_are_reported():
    with pytest.raises(ConfigError, match="valid keys"):
        config_from_settings({"out": "x", "data": "y", "learning_rate": 1})
    with pytest.raises(ConfigError, match="infonce"):
        config_from_settings({"out": "x", "data": "y", "loss": "triplet"})


def test_stage_resumes_and_exports(trained_clip, tmp_path):
    from training.clip import export_checkpoint

    _, root = trained_clip
    settings = dict(data=str(root / "captions_train.jsonl"), out=str(tmp_path / "run"), max_steps=2, batch_size=6,
                    log_every=1, **TINY)
    run(config_from_settings(settings))
    exported = export_checkpoint(tmp_path / "run", tmp_path / "exported")
    a, processor = load_clip(str(tmp_path / "run" / "final"))
    b, _ = load_clip(str(exported))
    torch.testing.assert_close(encode_images(a, processor, [draw("red")]), encode_images(b, processor, [draw("red")]))
    run(config_from_settings({**settings, "max_steps": 4, "resume": "latest"}))  # rebuilt from the saved config
    saved = json.loads((tmp_path / "run" / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert saved["step"] == 4


def test_cli_train_reads_yaml_and_flags_override(trained_clip, tmp_path):
    import yaml

    from cli.main import main

    _, root = trained_clip
    config = {"stage": "clip", "data": str(root / "captions_train.jsonl"), "out": str(tmp_path / "run"),
              "max_steps": 50, "batch_size": 6, **TINY}
    (tmp_path / "clip.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(tmp_path / "clip.yaml"), "--max-steps", "2"]) == 0
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert state["config"]["max_steps"] == 2
    assert main(["train", "--stage", "nope", "--out", str(tmp_path / "x")]) == 2  # lists the stages
