"""The sharpen stage: a vision tower taught what each cell of an image holds (training/sharpen.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import build_tiny_bundle

COLOURS = {"red": (220, 30, 30), "blue": (30, 40, 220), "green": (30, 180, 60)}


@pytest.fixture(scope="module")
def cell_bundle(tiny_parts, tmp_path_factory):
    """A tiny bundle whose tower reads 12 px images in 4 px patches: a 3x3 patch grid, one patch a cell."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    root = tmp_path_factory.mktemp("cells")
    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=12, patch_size=4)
    CLIPVisionModel(CLIPVisionConfig(**vision)).save_pretrained(root / "tower")
    build_tiny_bundle({**tiny_parts, "vision": root / "tower"}, root / "bundle")
    return root / "bundle"


def _labelled_images(folder: Path, count: int, seed: int) -> Path:
    """Scenes of coloured squares in random cells; cells.jsonl says which cell holds which."""
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in range(count):
        image = Image.new("RGB", (12, 12), (255, 255, 255))
        objects, colours = ["empty"] * 9, [None] * 9
        for cell in rng.sample(range(9), rng.randint(1, 4)):
            colour = rng.choice(sorted(COLOURS))
            image.paste(COLOURS[colour], (4 * (cell % 3), 4 * (cell // 3), 4 * (cell % 3) + 4, 4 * (cell // 3) + 4))
            objects[cell], colours[cell] = "shape:square", colour
        image.save(folder / f"{n}.png")
        rows.append({"image": f"{n}.png", "labels": {"object": objects, "colour": colours}})
    (folder / "cells.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "cells.jsonl"


def _tower(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_sharpen_trains_the_tower_alone_and_the_anchor_holds_its_features(cell_bundle, tmp_path):
    from training.sharpen import cell_patches, sharpen
    from vlm_chat.model import VisionLanguageModel

    data, val = _labelled_images(tmp_path / "train", 48, 0), _labelled_images(tmp_path / "val", 16, 1)
    free = sharpen(cell_bundle, data, val, tmp_path / "free", max_steps=40, batch_size=16, lr=3e-3, head_lr=3e-2, anchor=0.0)
    held = sharpen(cell_bundle, data, val, tmp_path / "held", max_steps=40, batch_size=16, lr=3e-3, head_lr=3e-2, anchor=1e4)
    assert free["moved"] > 3 * held["moved"]  # the anchor is what keeps the old features
    # what each cell holds: the baseline heads and the trained ones are scored the same way
    report = json.loads((tmp_path / "free" / "cells.json").read_text())
    assert set(report["before"]) == set(report["after"]) == {"object", "colour"}
    assert report["labels"] == {"object": ["empty", "shape:square"], "colour": ["blue", "green", "red"]}
    assert free["after"]["colour"]["all"] >= free["before"]["colour"]["all"]
    # only the tower changed; the bundle loads and answers
    before, after = _tower(cell_bundle.parent / "tower"), _tower(tmp_path / "free" / "vision")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # the source bundle named a tower outside it; the new one holds its own
    assert json.loads((tmp_path / "free" / "vlm_config.json").read_text())["vision"]["name_or_path"] == "vision"
    assert (tmp_path / "free" / "projector.safetensors").read_bytes() == (cell_bundle / "projector.safetensors").read_bytes()
    model, processor = VisionLanguageModel.from_pretrained(tmp_path / "free", device="cpu")
    assert model.vision_tower(processor.preprocess_images([tmp_path / "val" / "0.png"])).shape == (1, 9, 32)
    assert cell_patches(6, 1, 2) == [16, 17, 22, 23] and cell_patches(3, 2, 1) == [7]


def test_sharpen_refuses_bad_rows_by_file_and_row_and_a_grid_the_patches_do_not_fit(cell_bundle, tmp_path):
    from training.sharpen import cell_patches, read_cell_labels
    from vlm_chat.errors import UserFacingError

    good = {"image": "a.png", "labels": {"object": ["empty"] * 9}}
    cases = [
        ({"image": "a.png"}, "row 2: expected"),
        ({"image": "a.png", "labels": {"colour": ["red"] * 9}}, r"row 2: heads \['colour'\], earlier rows \['object'\]"),
        ({"image": "a.png", "labels": {"object": ["empty"] * 4}}, "row 2, head 'object': 4 cells, earlier 9"),
        ({"image": "a.png", "labels": {"object": [1] * 9}}, "row 2, head 'object': a list of labels"),
    ]
    for bad, message in cases:
        path = tmp_path / "cells.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(UserFacingError, match=message):
            read_cell_labels(path)
    path.write_text(json.dumps({"image": "a.png", "labels": {"object": ["empty"] * 6}}) + "\n")
    with pytest.raises(UserFacingError, match="6 cells are no square grid"):
        read_cell_labels(path)
    with pytest.raises(ValueError, match="8x8 patch grid does not split into 3x3"):
        cell_patches(8, 0, 0)


def test_train_stage_sharpen_takes_its_own_flags_only(cell_bundle, tmp_path):
    from cli.main import main

    data = _labelled_images(tmp_path / "train", 8, 0)
    code = main(["train", "--stage", "sharpen", "--model", str(cell_bundle), "--data", str(data), "--val", str(data),
                 "--out", str(tmp_path / "out"), "--epochs", "2"])
    assert code != 0 and not (tmp_path / "out").exists()
    assert main(["train", "--stage", "sharpen", "--model", str(cell_bundle), "--data", str(data), "--val", str(data),
                 "--out", str(tmp_path / "out"), "--max-steps", "2", "--batch-size", "4", "--anchor", "0.5"]) == 0
    assert json.loads((tmp_path / "out" / "cells.json").read_text())["steps"] == 2


def test_recoloured_shuffles_each_images_colour_channels_and_keeps_its_shapes():
    from training.sharpen import recoloured

    mean, std = torch.tensor([0.48, 0.46, 0.41]), torch.tensor([0.27, 0.26, 0.28])
    raw = torch.ones(40, 3, 6, 6)
    raw[:, 0, 2:4, 2:4], raw[:, 1, 2:4, 2:4], raw[:, 2, 2:4, 2:4] = 0.9, 0.1, 0.1  # a red square on white
    out = recoloured((raw - mean[:, None, None]) / std[:, None, None], mean, std, torch.Generator().manual_seed(0))
    back = out * std[:, None, None] + mean[:, None, None]
    assert torch.allclose(back[:, :, 0, 0], torch.ones(40, 3), atol=1e-5)  # white stays white
    square = back[:, :, 2, 2]
    assert torch.allclose(square.sort(1).values, torch.tensor([0.1, 0.1, 0.9]).expand(40, 3), atol=1e-5)
    assert {int(square[i].argmax()) for i in range(40)} == {0, 1, 2}  # red, green and blue squares


def test_sharpen_recolour_names_a_head_of_the_data(cell_bundle, tmp_path):
    from training.sharpen import sharpen
    from vlm_chat.errors import UserFacingError

    data = _labelled_images(tmp_path / "train", 8, 0)
    with pytest.raises(UserFacingError, match="--recolour shape: .* has no such head"):
        sharpen(cell_bundle, data, data, tmp_path / "out", max_steps=2, batch_size=4, recolour="shape")
    assert sharpen(cell_bundle, data, data, tmp_path / "out", max_steps=2, batch_size=4, recolour="object")["recolour"] == "object"
