"""Contracts of the bench probes that decide where the model card says a skill is lost."""

from __future__ import annotations

import json
import random

import pytest
import torch

from bench.find_probe import CELLS, fit_and_test, objects

COLOURS, KINDS = ["red", "green", "blue", "pink", "-"], ["star", "circle", "bug"]


def _scenes(n: int, seed: int) -> tuple[torch.Tensor, list[tuple]]:
    """Nine tokens, one per grid cell; a token holds its object's colour and kind one-hot."""
    rng = random.Random(seed)
    tokens = torch.randn(n, len(CELLS), len(COLOURS) + len(KINDS)) * 0.1
    items = []
    for scene in range(n):
        cells = rng.sample(range(len(CELLS)), rng.randint(2, 4))
        pairs = rng.sample([(c, k) for c in COLOURS for k in KINDS], len(cells))
        for cell, (colour, kind) in zip(cells, pairs):
            tokens[scene, cell, COLOURS.index(colour)] += 1
            tokens[scene, cell, len(COLOURS) + KINDS.index(kind)] += 1
            items.append((scene, colour, kind, cell, len(cells)))
    return tokens, items


def test_find_readout_finds_objects_only_through_the_query():
    train_x, train_items = _scenes(600, 0)
    test_x, test_items = _scenes(150, 1)
    vocab = ({c: n + 1 for n, c in enumerate(COLOURS)}, {k: n + 1 for n, k in enumerate(KINDS)})
    found = fit_and_test(train_x, train_items, test_x, test_items, vocab, steps=150, use_query=True)
    blind = fit_and_test(train_x, train_items, test_x, test_items, vocab, steps=150, use_query=False)
    assert found["n"] == len(test_items) and set(found["by_objects"]) == {2, 3, 4}
    assert found["all"] > 0.9  # the named object's cell, read off where the attention lands
    assert blind["all"] < 0.55  # without a query it can only guess one of 2-4 objects


def test_find_probe_takes_objects_that_appear_once_in_scenes_of_two_or_more(tmp_path):
    rows = [
        {"image": "a.png", "objects": [{"color": "red", "key": "star", "count": 1, "cells": ["top left"]}]},
        {"image": "b.png", "objects": [{"color": "red", "key": "star", "count": 1, "cells": ["center"]},
                                       {"color": None, "key": "bug", "count": 2, "cells": ["top right", "bottom left"]}]},
        {"image": "c.png", "objects": [{"color": "blue", "key": "circle", "count": 1, "cells": ["bottom right"]},
                                       {"color": None, "key": "bug", "count": 1, "cells": ["top middle"]}]},
    ]
    (tmp_path / "layouts_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths, items = objects(tmp_path, "test", limit=10)
    assert [p.name for p in paths] == ["b.png", "c.png"]  # a lone object needs no finding
    assert items == [(0, "red", "star", CELLS.index("center"), 3),
                     (1, "blue", "circle", CELLS.index("bottom right"), 2), (1, "-", "bug", CELLS.index("top middle"), 2)]


def test_cell_probe_takes_each_cell_of_every_non_emoji_object_and_its_patches(tmp_path):
    from bench.cell_probe import cell_patches, cells

    rows = [
        {"image": "a.png", "objects": [
            {"kind": "shape", "key": "star", "cells": ["top left"]},
            {"kind": "emoji", "key": "frog face", "cells": ["center"]},  # a thousand names, a few pictures each
            {"kind": "fashion", "key": "sandal", "cells": ["bottom right", "middle left"]}]},
        {"image": "b.png", "objects": [{"kind": "clipart", "key": "arrow", "cells": ["top right"]}]},
    ]
    (tmp_path / "layouts_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cells(tmp_path, "train", limit=1) == [
        (tmp_path / "a.png", (0, 0), "shape", "shape:star"),
        (tmp_path / "a.png", (2, 2), "fashion", "fashion:sandal"),
        (tmp_path / "a.png", (1, 0), "fashion", "fashion:sandal")]
    assert cells(tmp_path, "train", limit=5)[-1] == (tmp_path / "b.png", (0, 2), "clipart", "clipart:arrow")
    # 96 px in 16 px patches: a 6x6 grid, each cell 2x2 patches, raster order
    assert cell_patches(6, 0, 0) == [0, 1, 6, 7]
    assert cell_patches(6, 1, 2) == [16, 17, 22, 23]
    assert sorted(i for r in range(3) for c in range(3) for i in cell_patches(6, r, c)) == list(range(36))
    assert cell_patches(3, 2, 1) == [7]
    with pytest.raises(ValueError, match="8x8 patch grid"):
        cell_patches(8, 0, 0)


def test_cell_pixels_are_the_one_cell_of_the_scene():
    from PIL import Image, ImageDraw

    from bench.cell_probe import cell_pixels

    image = Image.new("RGB", (96, 96), "white")
    ImageDraw.Draw(image).rectangle((64, 32, 95, 63), fill=(255, 0, 0))  # the middle right cell
    red = cell_pixels(image, (1, 2))
    assert red.shape == (32 * 32 * 3,)
    assert red.view(32, 32, 3)[..., 0].eq(1).all() and red.view(32, 32, 3)[..., 1:].eq(0).all()
    assert cell_pixels(image, (1, 1)).eq(1).all()  # its white neighbour
    assert cell_pixels(image.convert("L"), (1, 2)).shape == (32 * 32 * 3,)  # grey scenes as RGB


def test_scene_features_by_layer_are_each_hidden_states_own_cell_tokens(tmp_path, tiny_parts):
    from PIL import Image
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from bench.cell_probe import layer_specs, scene_features_by_layer
    from tests.conftest import build_tiny_bundle
    from training.sharpen import cell_patches
    from vlm_chat.images import load_image

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=24, patch_size=4)).save_pretrained(tmp_path / "clip")  # a 6x6 grid
    model, processor = build_tiny_bundle({**tiny_parts, "vision": tmp_path / "clip"}, tmp_path / "bundle")
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for seed, path in enumerate(paths):
        Image.fromarray((torch.rand(24, 24, 3, generator=torch.Generator().manual_seed(seed)) * 255).byte().numpy()).save(path)
    items = [(paths[0], (1, 2), "shape", "shape:star"), (paths[1], (0, 0), "fashion", "fashion:sandal")]
    tower = model.vision_tower
    kept = tower.feature_layer
    assert layer_specs("0,2,2+0") == [(0,), (2,), (2, 0)]
    out = scene_features_by_layer(tower, processor, items, layer_specs("0,2,2+0"), batch=1)
    assert tower.feature_layer == kept
    assert list(out) == [f"in the scene, hidden state {spec}" for spec in ("0", "2", "2+0")]
    for k, (path, cell, *_rest) in enumerate(items):
        with torch.no_grad():
            hidden = tower.model(processor.preprocess_images([load_image(path)]), output_hidden_states=True).hidden_states
        for layer in (0, 2):
            expected = hidden[layer][0, 1:][cell_patches(6, *cell)].flatten()  # CLS dropped, as the tower does
            assert torch.allclose(out[f"in the scene, hidden state {layer}"][k], expected, atol=1e-5)
        both = torch.cat([hidden[2][0, 1:], hidden[0][0, 1:]], dim=-1)[cell_patches(6, *cell)].flatten()
        assert torch.allclose(out["in the scene, hidden state 2+0"][k], both, atol=1e-5)
    assert not torch.allclose(out["in the scene, hidden state 0"], out["in the scene, hidden state 2"])


def test_minibatch_probe_learns_in_passes_and_scores_by_kind():
    from bench.cell_probe import by_kind, minibatch_probe

    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=generator) * 3
    y = torch.arange(300) % 3
    x = centres[y] + torch.randn(300, 16, generator=generator)
    on_train, on_test = minibatch_probe(x[:240], y[:240], x[240:], 3, epochs=20)
    assert on_train.shape == (240,) and on_test.shape == (60,)
    assert (on_test == y[240:]).float().mean() > 0.95 and (on_train == y[:240]).float().mean() > 0.95
    # random labels on more dimensions than rows: only many passes memorise them
    noise, labels = torch.randn(90, 200, generator=generator), torch.randint(0, 3, (90,), generator=generator)
    once, _ = minibatch_probe(noise, labels, noise[:5], 3, epochs=1)
    often, _ = minibatch_probe(noise, labels, noise[:5], 3, epochs=100)
    assert (often == labels).all() and (once == labels).float().mean() < 0.9
    items = [(None, None, "shape"), (None, None, "clipart"), (None, None, "shape"), (None, None, "shape")]
    assert by_kind(torch.tensor([True, False, False, True]), items, ["clipart", "shape"]) == pytest.approx([0.0, 2 / 3])


def test_held_pairs_split_each_type_by_whether_a_held_out_pair_is_named(tmp_path):
    from bench.held_pairs import by_type, held_pairs

    manifest = {"holdouts": {"shape_colors": [["circle", "red"], ["diamond", "green"]]}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    pairs = held_pairs(tmp_path)
    assert pairs == ["red circle", "green diamond"]
    rows = [
        {"type": "object", "question": "What is in the top left?", "answer": "a red circle", "correct": False},
        {"type": "object", "question": "What is in the center?", "answer": "a red square", "correct": True},
        {"type": "count", "question": "How many green diamonds are there?", "answer": "2", "correct": True},
        {"type": "count", "question": "How many circles are there?", "answer": "1", "correct": False},
        {"image": "x.png", "reference": "a caption", "prediction": "a caption"},  # a caption row: no type
    ]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert by_type(tmp_path / "predictions.jsonl", pairs) == {
        "count": {True: (1, 1), False: (0, 1)}, "object": {True: (0, 1), False: (1, 1)}}


def _soup_bundle(root, seed: int, target_modules=("q_proj", "v_proj"), version="5.25.0"):
    """The files bench/soup.py averages and checks, with random tensors."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    (root / "vision").mkdir(parents=True)
    (root / "adapter").mkdir()
    save_file({"encoder.weight": torch.randn(4, 3)}, str(root / "vision" / "model.safetensors"))
    save_file({"linear_1.weight": torch.randn(5, 4), "linear_1.bias": torch.randn(5)}, str(root / "projector.safetensors"))
    save_file({"layer.lora_A.weight": torch.randn(2, 6), "layer.lora_B.weight": torch.randn(6, 2)},
              str(root / "adapter" / "adapter_model.safetensors"))
    (root / "vlm_config.json").write_text(json.dumps({"image_tiles": 3}))
    (root / "vision" / "config.json").write_text(json.dumps({"hidden_size": 4, "transformers_version": version}))
    (root / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"r": 2, "target_modules": list(target_modules), "base_model_name_or_path": str(root)}))
    (root / "scores.json").write_text("{}")
    return root


def test_soup_writes_the_weighted_mean_of_every_trained_tensor(tmp_path):
    from safetensors.torch import load_file

    from bench.soup import WEIGHT_FILES, soup

    # the same architecture though peft listed its modules in another order and another release saved the tower
    a = _soup_bundle(tmp_path / "a", 0)
    b = _soup_bundle(tmp_path / "b", 1, target_modules=("v_proj", "q_proj"), version="5.24.0")
    distances = soup([a, b], [3, 1], tmp_path / "soup")
    for name in WEIGHT_FILES:
        mixed, first, second = (load_file(str(root / name)) for root in (tmp_path / "soup", a, b))
        assert set(mixed) == set(first)
        for key in first:
            assert torch.allclose(mixed[key], 0.75 * first[key] + 0.25 * second[key])
        assert distances[name] > 0
    assert not (tmp_path / "soup" / "scores.json").exists()  # the first bundle's scores are not the soup's
    assert json.loads((tmp_path / "soup" / "soup.json").read_text())["weights"] == [0.75, 0.25]


def test_soup_refuses_bundles_it_cannot_average(tmp_path):
    from bench.soup import soup

    a = _soup_bundle(tmp_path / "a", 0)
    other = _soup_bundle(tmp_path / "other", 1, target_modules=("q_proj", "o_proj"))
    with pytest.raises(SystemExit, match="adapter_config.json differs"):
        soup([a, other], [1, 1], tmp_path / "x")
    with pytest.raises(SystemExit, match="2 bundles"):
        soup([a, a], [1], tmp_path / "x")
    with pytest.raises(SystemExit, match="already exists"):
        soup([a, a], [1, 1], a)
    from safetensors.torch import save_file

    grown = _soup_bundle(tmp_path / "grown", 2)  # a projector with a learned position per token, say
    save_file({"linear_1.weight": torch.randn(5, 4), "linear_1.bias": torch.randn(5), "position": torch.zeros(9, 5)},
              str(grown / "projector.safetensors"))
    with pytest.raises(SystemExit, match="its tensors are not those"):
        soup([a, grown], [1, 1], tmp_path / "z")
    assert not (tmp_path / "z").exists()  # checked before anything is written
    (a / "projector.safetensors").unlink()
    with pytest.raises(SystemExit, match="projector.safetensors: missing"):
        soup([a, a], [1, 1], tmp_path / "y")


def _tiny_base():
    """The same small module every call (seeded), for a LoRA to sit on."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU(), torch.nn.Linear(5, 4))


def _tiny_lora_bundle(root, use_rslora: bool = False):
    """A bundle dir whose adapter/ is a real peft LoRA (rank 2, B not zero) on `_tiny_base()`."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_base(), LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], use_rslora=use_rslora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    model.save_pretrained(str(root / "adapter"))
    (root / "vlm_config.json").write_text("{}")
    return root, model.eval()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_widen_lora_keeps_what_the_model_computes(tmp_path, use_rslora):
    from peft import PeftModel
    from safetensors.torch import load_file

    from bench.widen_lora import ADAPTER_WEIGHTS, widen

    bundle, model = _tiny_lora_bundle(tmp_path / "b", use_rslora)
    assert widen(bundle, 8, tmp_path / "w") == (2, 4)
    config = json.loads((tmp_path / "w" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == (8.0 if use_rslora else 16.0)
    weights = load_file(str(tmp_path / "w" / ADAPTER_WEIGHTS))
    assert {tuple(t.shape) for k, t in weights.items() if "lora_A" in k} == {(8, 6), (8, 5)}
    assert all(t[:, 2:].abs().sum() == 0 for k, t in weights.items() if "lora_B" in k)
    assert all(t[2:].abs().sum() > 0 for k, t in weights.items() if "lora_A" in k)  # free to train
    wide = PeftModel.from_pretrained(_tiny_base(), str(tmp_path / "w" / "adapter")).eval()
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert torch.allclose(wide(x), model(x), atol=1e-6)
        with wide.disable_adapter():
            assert not torch.allclose(wide(x), model(x))  # the adapter does change the output


def test_widen_lora_refuses_what_it_cannot_widen(tmp_path):
    from bench.widen_lora import ADAPTER_CONFIG, widen

    bundle, _ = _tiny_lora_bundle(tmp_path / "b")
    with pytest.raises(SystemExit, match="already has rank 2"):
        widen(bundle, 2, tmp_path / "w")
    with pytest.raises(SystemExit, match="already exists"):
        widen(bundle, 4, bundle)
    config = json.loads((bundle / ADAPTER_CONFIG).read_text())
    (bundle / ADAPTER_CONFIG).write_text(json.dumps({**config, "rank_pattern": {"0": 4}}))
    with pytest.raises(SystemExit, match="rank_pattern"):
        widen(bundle, 4, tmp_path / "w")
    assert not (tmp_path / "w").exists()  # refused before anything is written
    (bundle / ADAPTER_CONFIG).unlink()
    with pytest.raises(SystemExit, match="adapter_config.json: missing"):
        widen(bundle, 4, tmp_path / "w")


def test_yes_no_margin_scores_thresholds_as_the_eval_scores_answers(tmp_path):
    from bench.yes_no_margin import best_threshold, f1_at, roc_auc, yes_no_rows
    from training.evaluate import VQAItem, yes_no_scores

    rows = [{"image": "a.png", "question": f"q{i}", "answer": a, "type": "yesno"}
            for i, a in enumerate(["yes", "no", "Yes", "3", "no", "yes"])]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept = yes_no_rows(tmp_path / "t.jsonl")
    assert [r["question"] for r in kept] == ["q0", "q1", "q2", "q4", "q5"]  # "3" is no yes/no question
    assert len(yes_no_rows(tmp_path / "t.jsonl", limit=2, seed=1)) == 2

    scores = [2.0, 0.5, -1.0, -2.0, 1.5]
    truth = [True, False, True, False, True]
    # at 0, what greedy decoding answers; the eval's own F1 and "yes" share of those answers
    items = [VQAItem("yes" if s > 0 else "no", "yes" if t else "no", "yesno") for s, t in zip(scores, truth)]
    expected = yes_no_scores(items)
    f1, share = f1_at(scores, truth, 0.0)
    assert f1 == pytest.approx(expected["f1"]) and share == pytest.approx(expected["yes_share"])
    threshold, best = best_threshold(scores, truth)
    assert best == pytest.approx(f1_at(scores, truth, threshold)[0]) and best >= f1
    assert -2.0 < threshold < -1.0 and best == pytest.approx(6 / 7)  # "yes" above -2: tp 3, fp 1, fn 0
    assert roc_auc(scores, truth) == pytest.approx(5 / 6)  # of 6 (yes, no) pairs, (-1.0, 0.5) is the one misordered
    assert roc_auc([1.0, 1.0], [True, False]) == 0.5


def test_answer_states_are_each_questions_own_last_token_state_despite_padding(tmp_path, tiny_bundle, images):
    from bench.answer_probe import answer_states, conversation

    _, model, processor = tiny_bundle
    model.eval()
    path = tmp_path / "scene.png"
    images[0].save(path)
    items = [(path, (0, 0), "shape", "shape:star"), (path, (1, 1), "fashion", "fashion:coat")]  # "top left", "center"
    assert conversation(path, (1, 1))[0]["content"][1]["text"] == "What is in the center?"
    states = answer_states(model, processor, items, [0, 2], batch=2, first_answer=True)
    assert set(states) == {"last prompt token", "its own first answer token"}
    assert set(states["last prompt token"]) == {0, 2}
    assert states["last prompt token"][2].shape == (2, model.language_model.config.hidden_size)
    for k, (image, cell, *_rest) in enumerate(items):
        alone = answer_states(model, processor, [(image, cell)], [0, 2], batch=1)  # no padding
        assert set(alone) == {"last prompt token"}
        for layer in (0, 2):
            assert torch.allclose(states["last prompt token"][layer][k], alone["last prompt token"][layer][0], atol=1e-4)
        # one step on is the prompt with the model's own first answer token appended, run whole
        inputs = processor(conversation(image, cell))
        with torch.no_grad():
            first = model(**inputs).logits[0, -1].argmax()
            longer = torch.cat([inputs["input_ids"], first.view(1, 1)], dim=1)
            hidden = model(input_ids=longer, attention_mask=torch.ones_like(longer), pixel_values=inputs["pixel_values"],
                           output_hidden_states=True).hidden_states
        assert torch.allclose(states["its own first answer token"][2][k], hidden[2][0, -1], atol=1e-4)
    assert not torch.allclose(states["last prompt token"][2][0], states["last prompt token"][2][1])  # the questions differ
