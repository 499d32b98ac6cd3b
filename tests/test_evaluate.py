"""`vlm-chat eval`: answer normalisation, POPE-style yes/no metrics, caption scores, the command."""

from __future__ import annotations

import json
from collections import Counter

from PIL import Image

from cli.main import main
from tests.conftest import build_tiny_bundle
from training.evaluate import VQAItem, caption_scores, comparison_table, normalize_answer, vqa_scores, yes_no_scores


def test_normalisation():
    assert normalize_answer("Two.") == "2" == normalize_answer("2")
    assert normalize_answer("A Red apple!") == "red apple"
    assert normalize_answer("The LEFT") == "left"
    assert normalize_answer("three cats") != normalize_answer("two cats")


def test_vqa_accuracy_by_type():
    items = [VQAItem("Two.", "2", "count"), VQAItem("3", "2", "count"), VQAItem("red", "Red", "color"),
             VQAItem("Yes", "yes", "yesno")]
    scores = vqa_scores(items)
    assert scores["accuracy"] == 0.75 and scores["n"] == 4
    assert scores["by_type"]["count"] == {"accuracy": 0.5, "n": 2}
    assert scores["by_type"]["color"]["accuracy"] == 1.0


def test_yes_no_metrics_count_a_yes_sayer():
    truth = ["yes", "yes", "no", "no", "no"]
    always_yes = yes_no_scores([VQAItem("Yes, there is.", t, "yesno") for t in truth])
    assert always_yes["yes_share"] == 1.0 and always_yes["true_yes_share"] == 0.4
    assert always_yes["recall"] == 1.0 and always_yes["precision"] == 0.4
    assert always_yes["accuracy"] == 0.4
    perfect = yes_no_scores([VQAItem(t, t, "yesno") for t in truth])
    assert perfect["f1"] == 1.0 and perfect["yes_share"] == perfect["true_yes_share"]


def test_caption_scores_rank_the_better_caption_higher():
    refs = {"a": ["a red circle on the left", "a red circle"], "b": ["two blue squares at the top"]}
    good = caption_scores({"a": "a red circle on the left", "b": "two blue squares at the top"}, refs)
    bad = caption_scores({"a": "a green dog", "b": "a cat"}, refs)
    assert good["bleu4"] > 0.9 and good["cider"] > bad["cider"] and bad["bleu4"] < 0.1


def test_comparison_table_marks_differences_over_two_standard_errors(tmp_path, capsys):
    import pytest

    def scores(accuracy, position, n_position, cider=None):
        out = {"accuracy": accuracy, "n": 3000, "by_type": {"position": {"accuracy": position, "n": n_position}}}
        if cider is not None:
            out["captions"] = {"n": 400, "bleu4": 0.3, "cider": cider}
        return out

    table = comparison_table({"base": scores(0.5, 0.30, 400, 2.5), "new": scores(0.51, 0.40, 400, 2.4),
                              "small": scores(0.5, 0.40, 40)})
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    # 0.30 -> 0.40 on 400 questions each: SE of the difference sqrt(.3*.7/400 + .4*.6/400) = 3.4 points.
    assert "| +10.0 (SE 3.4) * |" in rows["- position"]
    # The same gain on 40 questions is inside the noise (sqrt(.3*.7/400 + .4*.6/40) = 8.1): no mark.
    assert rows["- position"].endswith("| +10.0 (SE 8.1) |")
    assert "| +1.0 (SE 1.3) |" in rows["VQA accuracy"]  # 1 point on 3,000 questions: not marked
    assert "| 2.500 | 2.400 | - | -0.100 | - |" in rows["captions CIDEr"]  # a run without captions shows "-"
    with pytest.raises(ValueError):
        comparison_table({"alone": scores(0.5, 0.3, 400)})
    # With both runs' answers to the same questions the error is paired: only the questions
    # one got right and the other wrong count. Differences 0, 0, +1, 0: SE sqrt((.25 - .0625) / 4).
    def answers(right):
        return [{"file": "t.jsonl", "row": i, "question": f"q{i}", "type": "position", "correct": c} for i, c in enumerate(right)]

    four = {"base": scores(0.5, 0.5, 4), "new": scores(0.75, 0.75, 4)}
    paired = comparison_table(four, {"base": answers([1, 1, 0, 0]), "new": answers([1, 1, 1, 0])})
    assert "| - position | 50.0 % | 75.0 % | +25.0 (pSE 21.7) |" in paired
    unpaired = comparison_table(four, {"base": answers([1, 1, 0, 0])})  # one run's answers are not enough
    assert "+25.0 (SE 33.1)" in unpaired  # sqrt(.5 * .5 / 4 + .75 * .25 / 4)
    # The script reads eval folders, and says which one has no scores.
    from bench.compare_evals import main as compare

    for name, run in (("a", scores(0.5, 0.30, 400)), ("b", scores(0.5, 0.40, 400))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "scores.json").write_text(json.dumps(run))
    (tmp_path / "b" / "knowledge.json").write_text(json.dumps({"tuned_with_image": {"hits": 6, "n": 8}}))
    assert compare([str(tmp_path / "a"), str(tmp_path / "b"), "--names", "a", "b"]) == 0
    assert compare([str(tmp_path / "a"), str(tmp_path / "missing")]) == 2
    out, err = capsys.readouterr()
    assert "| measure | a | b | b - a |" in out and "| general questions, image attached | - | 6/8 |" in out
    assert "missing: no scores.json" in err


def test_eval_command(tiny_parts, tmp_path, capsys):
    build_tiny_bundle(tiny_parts, tmp_path / "bundle")
    Image.new("RGB", (16, 16), (220, 30, 30)).save(tmp_path / "red.png")
    rows = [{"image": "red.png", "question": "what colour is this ?", "answer": "red", "type": "color"},
            {"image": "red.png", "question": "is there a dog ?", "answer": "no", "type": "yesno"},
            {"image": "red.png", "caption": "a red square"}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["eval", "--model", str(tmp_path / "bundle"), "--data", str(tmp_path / "test.jsonl"), "--json",
                 "--out", str(tmp_path / "eval"), "--max-new-tokens", "4", "--batch-size", "2"])
    assert code == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["n"] == 2 and set(scores["by_type"]) == {"color", "yesno"}
    assert scores["yes_no"]["n"] == 1 and scores["captions"]["n"] == 1
    assert (tmp_path / "eval" / "by_type.png").is_file() and (tmp_path / "eval" / "scores.json").is_file()
    # Every answer is kept next to its question, expected answer and source row, and agrees with the scores.
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    questions = [p for p in predictions if "question" in p]
    assert [(p["question"], p["answer"], p["row"]) for p in questions] == [
        ("what colour is this ?", "red", 1), ("is there a dog ?", "no", 2)]
    assert all(p["image"].endswith("red.png") and p["file"].endswith("test.jsonl") for p in questions)
    assert sum(p["correct"] for p in questions) / 2 == scores["accuracy"]
    [caption] = [p for p in predictions if "references" in p]
    assert caption["references"] == ["a red square"] and isinstance(caption["prediction"], str)
    assert main(["eval", "--model", str(tmp_path / "bundle"), "--data", str(tmp_path / "missing.jsonl")]) == 2


def test_markdown_output(tiny_parts, tmp_path, capsys):
    build_tiny_bundle(tiny_parts, tmp_path / "bundle")
    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    (tmp_path / "t.jsonl").write_text(json.dumps({"image": "x.png", "question": "what ?", "answer": "oops", "type": "object"}) + "\n")
    assert main(["eval", "--model", str(tmp_path / "bundle"), "--data", str(tmp_path / "t.jsonl"), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "| VQA accuracy |" in out and "| - object |" in out


def test_accuracy_by_objects_in_the_scene_matches_predictions_to_layouts():
    from bench.confusions import by_objects

    layouts = {"images/test/scene/000001.png": {"objects": [{"count": 1}]},
               "images/test/scene/000002.png": {"objects": [{"count": 2}, {"count": 1}]}}
    rows = [
        {"image": "/data/corpus/images/test/scene/000001.png", "question": "q", "type": "position", "correct": True},
        {"image": "/data/corpus/images/test/scene/000001.png", "question": "q", "type": "position", "correct": False},
        {"image": "/data/corpus/images/test/scene/000002.png", "question": "q", "type": "position", "correct": True},
        {"image": "/data/corpus/images/test/scene/000002.png", "question": "q", "type": "count", "correct": False},
        {"image": "/data/corpus/images/test/fashion/000003.png", "question": "q", "type": "object", "correct": True},
        {"image": "/x.png", "caption": "c"},  # caption rows are not questions
    ]
    assert by_objects(rows, layouts) == {"position": {1: (1, 2), 3: (1, 1)}, "count": {3: (0, 1)}}


def test_accuracy_by_the_kind_of_object_a_question_names():
    from bench.confusions import by_named_kind

    layouts = {"images/test/scene/000001.png": {"objects": [
        {"name": "red star", "kind": "shape", "count": 1}, {"name": "pair of trousers", "kind": "fashion", "count": 2},
        {"name": "cat", "kind": "emoji", "count": 1}]}}
    image = "/c/images/test/scene/000001.png"
    rows = [
        {"image": image, "question": "Where is the red star?", "type": "position", "correct": True},
        {"image": image, "question": "How many pairs of trousers are there?", "type": "count", "correct": False},
        {"image": image, "question": "Is the cat left of the red star?", "type": "relation", "correct": True},
        {"image": image, "question": "Is there a coat?", "type": "yesno", "correct": False},  # nothing the scene holds
        {"image": image, "question": "Is there a catapult?", "type": "yesno", "correct": True},  # not "cat": whole words
    ]
    assert by_named_kind(rows, layouts) == {
        "position": {"shape": (1, 1)}, "count": {"fashion": (0, 1)}, "relation": {"emoji+shape": (1, 1)},
        "yesno": {"none of the scene's": (1, 2)}}


def test_naming_errors_tell_a_wrong_cell_from_a_wrong_shape():
    from bench.confusions import naming_errors

    scene = {"objects": [
        {"name": "red circle", "kind": "shape", "color": "red", "key": "circle", "count": 1, "cells": ["top left"]},
        {"name": "blue star", "kind": "shape", "color": "blue", "key": "star", "count": 1, "cells": ["center"]},
        {"name": "t-shirt", "kind": "fashion", "color": None, "key": "T-shirt/top", "count": 1, "cells": ["bottom right"]}]}
    other = {"objects": [{"name": "coat", "kind": "fashion", "color": None, "key": "Coat", "count": 1, "cells": ["center"]}]}
    layouts = {"images/test/scene/000001.png": scene, "images/test/scene/000002.png": other}

    def asked(cell: str, prediction: str, correct: bool = False) -> dict:
        return {"image": "/c/images/test/scene/000001.png", "question": f"What is in the {cell}?",
                "prediction": prediction, "correct": correct, "type": "object"}

    rows = [asked("top left", "a red circle", True), asked("top left", "a blue star"), asked("top left", "a red square"),
            asked("center", "a green star"), asked("center", "an orange cross"), asked("bottom right", "A T-shirt."),
            asked("bottom right", "a coat"), asked("bottom right", "a sandal"), asked("bottom right", "a blue star"),
            {"image": "/c/images/test/scene/000001.png", "question": "What is shown in the image?",  # no cell: left out
             "prediction": "x", "correct": False, "type": "object"},
            asked("center", "2") | {"type": "count"}]
    swaps = Counter()
    assert naming_errors(rows, layouts, swaps) == {
        "shape": {"right": 1, "another object of the scene": 1, "right colour, wrong shape": 1,
                  "right shape, wrong colour": 1, "not in the scene": 1},
        "fashion": {"another object of the scene": 2, "another of its kind": 1, "not in the scene": 1}}
    assert swaps == {("fashion", "t shirt", "coat"): 1}


def test_counting_errors_tell_counting_the_scene_from_finding_one_kind_in_it():
    from bench.confusions import counting_errors

    scene = {"objects": [
        {"name": "red circle", "kind": "shape", "count": 3, "cells": ["top left", "top middle", "top right"]},
        {"name": "pair of trousers", "kind": "fashion", "count": 1, "cells": ["center"]},
        {"name": "t-shirt", "kind": "fashion", "count": 1, "cells": ["bottom left"]},
        {"name": "shirt", "kind": "clipart", "count": 1, "cells": ["bottom right"]}]}  # a name inside another's
    layouts = {"images/test/scene/000001.png": scene}

    def asked(question: str, prediction: str, correct: bool) -> dict:
        return {"image": "/c/images/test/scene/000001.png", "question": question, "prediction": prediction,
                "correct": correct, "type": "count"}

    rows = [asked("<image>\nHow many objects are there in total?", "6", True),
            asked("How many things are in the picture?", "4", False),
            asked("How many red circles are there?", "3", True),
            asked("Count the red circles.", "six", False),  # the scene's total, in words
            asked("How many pairs of trousers can you see?", "1", True),
            asked("What is the number of shirts in the image?", "6", False),  # the total, but it was the clip art
            asked("How many t-shirts are there?", "2", False),
            asked("How many blue stars are there?", "6", False),
            asked("Where is the red circle?", "top", False) | {"type": "position"}]
    assert counting_errors(rows, layouts) == {
        "in all": {"asked": 2, "right": 1, "said the total": 0},
        "shape": {"asked": 2, "right": 1, "said the total": 1},
        "fashion": {"asked": 2, "right": 1, "said the total": 0},
        "clipart": {"asked": 1, "right": 0, "said the total": 1},
        "absent": {"asked": 1, "right": 0, "said the total": 1}}


def test_clip_shapes_reads_colour_and_shape_off_single_shape_captions(tmp_path):
    from bench.clip_shapes import shape_images

    rows = [{"image": "images/test/shape/000000.png", "caption": "a flat orange hexagon icon"},
            {"image": "images/test/shape/000000.png", "caption": "a drawing of an orange hexagon"},  # same image
            {"image": "images/test/scene/000001.png", "caption": "a red circle and a blue star"},  # not a shape image
            {"image": "images/test/shape/000002.png", "caption": "a shape"},  # names neither
            {"image": "images/test/shape/000003.png", "caption": "a photo of a brown square"}]
    (tmp_path / "captions_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert shape_images(tmp_path, "test", 10) == [(tmp_path / "images/test/shape/000000.png", "orange", "hexagon"),
                                                  (tmp_path / "images/test/shape/000003.png", "brown", "square")]
    assert len(shape_images(tmp_path, "test", 1)) == 1


def test_shape_probe_finds_a_separable_class_and_not_a_random_one():
    import torch

    from bench.clip_shapes import linear_probe

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (400,), generator=generator)
    centres = torch.randn(4, 16, generator=generator) * 3
    features = centres[labels] + torch.randn(400, 16, generator=generator)
    _, separable = linear_probe(features[:300], labels[:300], features[300:], labels[300:], classes=4)
    assert separable > 0.95
    noise = torch.randn(400, 16, generator=generator)
    _, random = linear_probe(noise[:300], labels[:300], noise[300:], labels[300:], classes=4)
    assert random < 0.45
