"""Contracts of the composed model on tiny random towers."""

from __future__ import annotations

import pytest
import torch

from adapters.projector import PROJECTORS, Projector
from tests.conftest import build_tiny_bundle
from vlm_chat.chat import user_message
from vlm_chat.config import ProjectorConfig, VLMConfig
from vlm_chat.errors import ConfigError, ImageTokenMismatchError
from vlm_chat.model import VisionLanguageModel


def ask(processor, text, images=()):
    return processor([user_message(text, images)])


def test_shapes_through_each_stage(tiny_bundle, images):
    _, model, processor = tiny_bundle
    inputs = ask(processor, "what is in this image ?", images[:1])
    pixel_values = inputs["pixel_values"]
    assert pixel_values.shape == (1, 3, 16, 16)
    features = model.vision_tower(pixel_values)
    assert features.shape == (1, 16, 32)  # 4x4 patches, CLS dropped, D_v = 32
    image_embeds = model.get_image_features(pixel_values)
    assert image_embeds.shape == (1, 16, 32)  # D_lm = 32
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 16
    logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))


def test_image_embeddings_land_at_image_positions(tiny_bundle, images):
    _, model, processor = tiny_bundle
    inputs = ask(processor, "what ?", images[:1])
    embeds = model.embed(inputs["input_ids"], inputs["pixel_values"])
    mask = inputs["input_ids"][0] == processor.image_token_id
    torch.testing.assert_close(embeds[0, mask], model.get_image_features(inputs["pixel_values"])[0])
    text_ids = inputs["input_ids"][0, ~mask]
    torch.testing.assert_close(embeds[0, ~mask], model.language_model.get_input_embeddings()(text_ids))


def test_count_mismatch_is_a_clear_error(tiny_bundle, images):
    _, model, processor = tiny_bundle
    with pytest.raises(ImageTokenMismatchError, match="2 <image> placeholder.*1 image"):
        processor([{"role": "user", "content": [
            {"type": "text", "text": "<image> compare"}, {"type": "image", "image": images[0]},
        ]}])
    inputs = ask(processor, "two ?", images)
    with pytest.raises(ImageTokenMismatchError, match="32 image-token positions but 1 image"):
        model(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"][:1])
    with pytest.raises(ImageTokenMismatchError, match="no images"):
        model(inputs["input_ids"], inputs["attention_mask"])


def test_several_images_in_one_conversation(tiny_bundle, images):
    _, model, processor = tiny_bundle
    conversation = [
        user_message("first ?", images[:1]),
        {"role": "assistant", "content": "a red one"},
        user_message("and this ?", images[1:]),
    ]
    inputs = processor(conversation)
    assert inputs["pixel_values"].shape[0] == 2
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 32
    # Swapping the images changes the answer's logits: each image reaches its own slots.
    swapped = processor([dict(conversation[0], content=user_message("first ?", images[1:])["content"]),
                         conversation[1], dict(conversation[2], content=user_message("and this ?", images[:1])["content"])])
    assert not torch.allclose(model(**inputs).logits[0, -1], model(**swapped).logits[0, -1])


def test_batch_left_padding_matches_single(tiny_bundle, images):
    _, model, processor = tiny_bundle
    short = [user_message("hi", images[:1])]
    long = [user_message("what is in this image ? describe the picture", images[1:])]
    batch = processor([short, long])
    assert batch["attention_mask"][0, 0] == 0  # left padded
    single = processor(short)
    batched_logits = model(**batch).logits[0, -1]
    torch.testing.assert_close(batched_logits, model(**single).logits[0, -1], atol=1e-4, rtol=1e-4)


def test_save_load_round_trip_gives_identical_logits(tiny_bundle, images, tmp_path):
    path, model, processor = tiny_bundle
    inputs = ask(processor, "what is in this image ?", images)
    loaded, loaded_processor = VisionLanguageModel.from_pretrained(path, device="cpu")
    again = loaded_processor([user_message("what is in this image ?", images)])
    assert torch.equal(inputs["input_ids"], again["input_ids"])
    assert torch.equal(model(**inputs).logits, loaded(**again).logits)
    # save -> load of the loaded model is stable too
    loaded.save_pretrained(tmp_path / "copy", loaded_processor)
    third, _ = VisionLanguageModel.from_pretrained(tmp_path / "copy", device="cpu")
    assert torch.equal(model(**inputs).logits, third(**inputs).logits)


def test_bundle_files_are_json_and_safetensors_only(tiny_bundle):
    path, _, _ = tiny_bundle
    suffixes = {p.suffix for p in path.rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".safetensors", ".jinja"}, suffixes


@pytest.mark.parametrize("reduction, width, tokens", [("avg_pool", 32, 4), ("pixel_shuffle", 128, 4), ("none", 32, 16)])
def test_token_reduction_sets_image_token_count(tiny_parts, tmp_path, images, reduction, width, tokens):
    model, processor = build_tiny_bundle(tiny_parts, tmp_path / "b", reduction=reduction)
    assert model.config.num_image_tokens == tokens == processor.num_image_tokens
    assert model.projector.mlp.linear_1.in_features == width
    inputs = ask(processor, "what ?", images[:1])
    assert model.get_image_features(inputs["pixel_values"]).shape == (1, tokens, 32)
    assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_projector_variants_and_unknown_key():
    for name in PROJECTORS:
        out = Projector(ProjectorConfig(type=name), 8, 12)(torch.randn(2, 4, 8))
        assert out.shape == (2, 4, 12)
    with pytest.raises(ConfigError, match="choose one of: linear, mlp2x_gelu"):
        Projector(ProjectorConfig(type="mlp3x"), 8, 12)
    with pytest.raises(ConfigError, match="avg_pool, pixel_shuffle"):
        Projector(ProjectorConfig(token_reduction="pool9"), 8, 12)
    with pytest.raises(ConfigError, match="does not divide"):
        Projector(ProjectorConfig(token_reduction="avg_pool", reduction_factor=3), 8, 12)(torch.randn(1, 16, 8))


def test_feature_layer_and_cls_choice(tiny_parts, tmp_path, images):
    model, processor = build_tiny_bundle(tiny_parts, tmp_path / "b", feature_layer=-1, select_strategy="full")
    assert processor.num_image_tokens == 17  # 16 patches + CLS
    pixel_values = ask(processor, "x", images[:1])["pixel_values"]
    out = model.vision_tower.model(pixel_values, output_hidden_states=True)
    torch.testing.assert_close(model.vision_tower(pixel_values), out.hidden_states[-1])


def test_full_clip_model_dir_loads_its_vision_half(tiny_parts, tmp_path, images):
    parts = dict(tiny_parts, vision=tiny_parts["clip_full"])
    model, processor = build_tiny_bundle(parts, tmp_path / "b")
    assert type(model.vision_tower.model).__name__ == "CLIPVisionModel"
    from transformers import CLIPModel

    full = CLIPModel.from_pretrained(tiny_parts["clip_full"])
    pixel_values = ask(processor, "x", images[:1])["pixel_values"]
    expected = full.vision_model(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(model.vision_tower(pixel_values), expected)


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="unknown field.*'colour'"):
        VLMConfig.from_dict({"vision": {"name_or_path": "x"}, "llm": {"name_or_path": "y"}, "colour": 1})
    with pytest.raises(ConfigError, match="vision: unknown field.*'layer'"):
        VLMConfig.from_dict({"vision": {"name_or_path": "x", "layer": 1}, "llm": {"name_or_path": "y"}})
    with pytest.raises(ConfigError, match="not a vlm-chat bundle"):
        VLMConfig.load(tmp_path)


def test_llama_style_chat_template(tiny_parts, tmp_path, images):
    parts = dict(tiny_parts, llm=tiny_parts["llm_llama2"])
    model, processor = build_tiny_bundle(parts, tmp_path / "b")
    text, found = processor.render([user_message("what ?", images[:1])])
    assert text.startswith("<s>[INST] <image>\nwhat ? [/INST]")
    inputs = processor([user_message("what ?", images[:1])])
    assert inputs["input_ids"][0, 0] == processor.tokenizer.bos_token_id
    assert (inputs["input_ids"][0] == processor.tokenizer.bos_token_id).sum() == 1  # no double BOS
    assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_siglip_tower_keeps_every_token(tiny_parts, tmp_path, images):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         image_size=16, patch_size=4)).save_pretrained(tmp_path / "siglip")
    parts = dict(tiny_parts, vision=tmp_path / "siglip")
    with pytest.raises(ConfigError, match="SigLIP.*has none; use select_strategy 'full'"):
        build_tiny_bundle(parts, tmp_path / "refused")
    model, processor = build_tiny_bundle(parts, tmp_path / "b", select_strategy="full")
    assert processor.num_image_tokens == 16  # no CLS token to add or drop
    inputs = ask(processor, "what ?", images[:1])
    assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_match_word_scale_brings_image_tokens_to_word_norm_and_is_saved(tiny_parts, tmp_path, images):
    model, processor = build_tiny_bundle(tiny_parts, tmp_path / "b")
    pixel_values = ask(processor, "x", images)["pixel_values"]
    before = model.get_image_features(pixel_values)
    words = model.language_model.get_input_embeddings().weight.norm(dim=-1).mean().item()
    measured, word_norm = model.match_word_scale(pixel_values)
    assert measured == pytest.approx(before.norm(dim=-1).mean().item(), rel=1e-5)
    assert word_norm == pytest.approx(words, rel=1e-5)
    after = model.get_image_features(pixel_values)
    assert after.norm(dim=-1).mean().item() == pytest.approx(words, rel=1e-4)
    torch.testing.assert_close(after, before * (words / measured))  # one factor: directions unchanged
    model.save_pretrained(tmp_path / "scaled", processor)
    loaded, _ = VisionLanguageModel.from_pretrained(tmp_path / "scaled", device="cpu")
    assert loaded.config.projector.output_scale == pytest.approx(words / measured)
    torch.testing.assert_close(loaded.get_image_features(pixel_values), after)


def test_position_embedding_starts_as_a_no_op_and_marks_each_slot(tiny_parts, tmp_path, images):
    model, processor = build_tiny_bundle(tiny_parts, tmp_path / "b")
    pixel_values = ask(processor, "x", images[:1])["pixel_values"]
    before = model.get_image_features(pixel_values)
    assert model.add_position_embedding() and not model.add_position_embedding()  # added once
    assert model.projector.position_embedding.shape == (processor.num_image_tokens, 32)
    assert model.config.projector.position_embedding
    torch.testing.assert_close(model.get_image_features(pixel_values), before)  # zeros: nothing changes yet
    with torch.no_grad():
        model.projector.position_embedding.copy_(torch.randn_like(model.projector.position_embedding))
    after = model.get_image_features(pixel_values)
    torch.testing.assert_close(after - before, model.projector.position_embedding.unsqueeze(0).expand_as(after))
    # Saved in the projector's safetensors and switched on by the config; reloads as saved.
    model.save_pretrained(tmp_path / "with_pos", processor)
    loaded, _ = VisionLanguageModel.from_pretrained(tmp_path / "with_pos", device="cpu")
    torch.testing.assert_close(loaded.get_image_features(pixel_values), after)
    with pytest.raises(ConfigError, match="position_embedding"):
        Projector(ProjectorConfig(position_embedding=True), 8, 12)  # needs the token count


def test_lora_add_and_load_print_no_library_deprecation_warning(tiny_bundle, tmp_path):
    """peft reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a
    model; `vlm-chat ask` printed that FutureWarning on every run."""
    import warnings

    from adapters.lora import LoraSettings, add_lora, load_lora
    from vlm_chat.model import VisionLanguageModel

    bundle, _, _ = tiny_bundle
    model, _ = VisionLanguageModel.from_pretrained(bundle, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        add_lora(model.language_model, LoraSettings(r=2, alpha=4)).save_pretrained(tmp_path / "adapter")
        fresh, _ = VisionLanguageModel.from_pretrained(bundle, device="cpu")
        assert load_lora(fresh.language_model, tmp_path / "adapter") is not None


def test_tile_order_and_names_follow_the_corpus_grid():
    from training.corpus.scenes import CELL_NAMES
    from vlm_chat.processor import tile_names, tile_order

    assert tile_order(16, 2) == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    assert sorted(tile_order(36, 3)) == list(range(36))
    assert tile_order(36, 3)[4:8] == [2, 3, 8, 9]  # the second tile: columns 2-3 of rows 0-1
    assert tile_names(3) == [CELL_NAMES[(r, c)] for r in range(3) for c in range(3)]
    assert tile_names(4)[5] == "row 2 column 2"


def test_image_tiles_put_each_tile_after_its_name(tiny_parts, tmp_path, images):
    model, processor = build_tiny_bundle(tiny_parts, tmp_path / "tiles", image_tiles=2)
    inputs = ask(processor, "what ?", images[:1])
    ids = inputs["input_ids"][0]
    mask = ids == processor.image_token_id
    assert int(mask.sum()) == 16
    shown = processor.tokenizer.decode(ids).replace("<image>", "#")
    assert "\ntop left:####\ntop right:####\nbottom left:####\nbottom right:####" in shown
    # Tile by tile: the first slots hold raster tokens 0, 1, 4, 5 (the top-left 2x2 of the 4x4 grid).
    embeds = model.embed(inputs["input_ids"], inputs["pixel_values"])
    features = model.get_image_features(inputs["pixel_values"])[0]  # raster order
    torch.testing.assert_close(embeds[0, mask][:4], features[[0, 1, 4, 5]])
    torch.testing.assert_close(embeds[0, mask][4:8], features[[2, 3, 6, 7]])
    assert model(**inputs).logits.shape[1] == ids.shape[0]
    # Training labels: the names are part of the image, never supervised.
    from training.data import IGNORE_INDEX, encode_for_training

    messages = [user_message("what ?", images[:1]), {"role": "assistant", "content": "two"}]
    train_ids, labels = encode_for_training(processor, messages)
    start = train_ids.index(processor.image_token_id) - len(processor.tokenizer("\ntop left:")["input_ids"])
    assert train_ids[start:start + len(processor.image_ids)] == processor.image_ids
    assert set(labels[start:start + len(processor.image_ids)]) == {IGNORE_INDEX}
    # The layout is saved with the bundle.
    model.save_pretrained(tmp_path / "saved", processor)
    loaded, loaded_processor = VisionLanguageModel.from_pretrained(tmp_path / "saved", device="cpu")
    assert loaded.config.image_tiles == 2 and loaded_processor.image_ids == processor.image_ids


def test_pixel_shuffle_with_tiles_gives_each_tile_one_token_of_its_own_patches(tiny_parts, tmp_path, images):
    # The "cells" recipe: a 2x2 pixel shuffle whose blocks are the tiles, so each tile's name is
    # followed by one token, projected from that tile's patches alone (stacked, not averaged).
    model, processor = build_tiny_bundle(tiny_parts, tmp_path / "cells", reduction="pixel_shuffle", image_tiles=2)
    inputs = ask(processor, "what ?", images[:1])
    ids = inputs["input_ids"][0]
    mask = ids == processor.image_token_id
    assert int(mask.sum()) == 4
    assert "\ntop left:#\ntop right:#\nbottom left:#\nbottom right:#" in processor.tokenizer.decode(ids).replace("<image>", "#")
    patches = model.vision_tower(inputs["pixel_values"])[0]  # (16, D): the 4x4 patch grid, raster order
    embeds = model.embed(inputs["input_ids"], inputs["pixel_values"])[0, mask]
    for tile, block in enumerate(([0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15])):
        stacked = patches[block].T.reshape(1, -1)  # pixel_unshuffle's channel order: feature-major, then the 2x2
        torch.testing.assert_close(embeds[tile], model.projector.mlp(stacked)[0])


def test_image_tiles_must_divide_the_token_grid(tiny_parts, tmp_path):
    with pytest.raises(ConfigError, match="image_tiles=3 needs a square grid .* 16 tokens per image"):
        build_tiny_bundle(tiny_parts, tmp_path / "bad", image_tiles=3)
