"""Corpus builder: determinism, splits, hold-outs, file integrity, answer truth."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from PIL import Image

from training.corpus import CorpusConfig, build_corpus
from training.corpus.sources import SourceMissingError, SourcePaths
from vlm_chat.errors import UserFacingError

PATHS = SourcePaths()
MISSING = [p for p in (PATHS.fashion_dir, PATHS.emoji_font, PATHS.clipart_dir, PATHS.word_font) if not p.exists()]
needs_sources = pytest.mark.skipif(
    bool(MISSING),
    reason=f"corpus sources not installed ({', '.join(map(str, MISSING))}); "
    "apt-get install -y dataset-fashion-mnist fonts-noto-color-emoji openclipart-png fonts-dejavu-core",
)
SPLITS = ("train", "val", "test")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    build_corpus(CorpusConfig.small(out, seed=7))
    return out


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@needs_sources
def test_same_seed_gives_identical_files(corpus, tmp_path):
    # workers=2 also checks that parallel rendering does not change the bytes.
    build_corpus(CorpusConfig.small(tmp_path, seed=7, workers=2))
    assert _snapshot(tmp_path) == _snapshot(corpus)


@needs_sources
def test_other_seed_differs(corpus, tmp_path):
    build_corpus(CorpusConfig.small(tmp_path, seed=8))
    assert (tmp_path / "captions_train.jsonl").read_bytes() != (corpus / "captions_train.jsonl").read_bytes()


@needs_sources
def test_splits_are_disjoint_by_image(corpus):
    images = {s: {r["image"] for r in _rows(corpus / f"captions_{s}.jsonl")} for s in SPLITS}
    assert images["train"] and images["val"] and images["test"]
    assert not images["train"] & images["val"]
    assert not images["train"] & images["test"]
    assert not images["val"] & images["test"]


@needs_sources
def test_every_row_points_at_an_image_that_opens(corpus):
    for path in sorted(corpus.glob("*.jsonl")):
        for row in _rows(path):
            with Image.open(corpus / row["image"]) as image:
                image.verify()


@needs_sources
def test_holdouts_never_in_train_or_val(corpus):
    manifest = json.loads((corpus / "manifest.json").read_text())
    pairs = {tuple(p) for p in manifest["holdouts"]["shape_colors"]}
    counts = {tuple(p) for p in manifest["holdouts"]["object_counts"]}
    seen_in_test = False
    for split in SPLITS:
        for row in _rows(corpus / f"layouts_{split}.jsonl"):
            for obj in row["objects"]:
                held = (obj["key"], obj["color"]) in pairs or (obj["key"], obj["count"]) in counts
                assert not (held and split != "test"), (split, row)
                seen_in_test |= held and split == "test"
    assert seen_in_test, "test scenes should show held-out combinations"
    train_shapes = {c["caption"] for c in _rows(corpus / "captions_train.jsonl") if "/shape/" in c["image"]}
    for shape, color in pairs:
        assert not any(f"{color} {shape}" in caption for caption in train_shapes)


@needs_sources
def test_answers_match_layout(corpus):
    for split in SPLITS:
        layouts = {r["image"]: r for r in _rows(corpus / f"layouts_{split}.jsonl")}
        for t in _rows(corpus / f"triples_{split}.jsonl"):
            layout = layouts[t["image"]]
            objects = layout["objects"]
            if t["question"] in ("How many objects are there in total?", "How many things are in the picture?"):
                assert t["answer"] == str(sum(o["count"] for o in objects))
            elif t["type"] == "count" and t["answer"] != "0":
                assert int(t["answer"]) in {o["count"] for o in objects}
            if t["type"] == "read":
                assert t["answer"] == layout["word"]
            if t["type"] == "color" and "word" not in t["question"] and "text" not in t["question"]:
                assert t["answer"] in {o["color"] for o in objects}
            if t["question"].startswith("Where is the "):
                name = t["question"][len("Where is the "):].split("?")[0].removesuffix(" in the image")
                assert [t["answer"]] == [c for o in objects if o["name"] == name for c in o["cells"]]


@needs_sources
def test_yes_no_is_balanced_and_label_files_exist(corpus):
    triples = _rows(corpus / "triples_train.jsonl")
    yesno = [t["answer"] for t in triples if t["type"] == "yesno"]
    assert yesno.count("yes") == yesno.count("no") > 0
    for name in ("fashion_mnist", "emoji", "clipart"):
        classes = json.loads((corpus / f"classes_{name}.json").read_text())
        labels = _rows(corpus / f"labels_{name}_test.jsonl")
        assert labels and all(row["label"] in classes for row in labels)


def test_missing_source_names_the_debian_package(tmp_path):
    paths = dataclasses.replace(PATHS, clipart_dir=tmp_path / "no-clipart")
    with pytest.raises(SourceMissingError, match=r"apt-get install -y openclipart-png"):
        build_corpus(dataclasses.replace(CorpusConfig.small(tmp_path / "out"), paths=paths))
    assert issubclass(SourceMissingError, UserFacingError)


def test_cli_registers_corpus_build():
    from cli.main import build_parser

    args = build_parser().parse_args(["corpus", "build", "--out", "x", "--small", "--seed", "3"])
    assert args.seed == 3 and args.small and callable(args.func)


def test_a_layout_row_gives_back_every_question_its_scene_supports():
    import random

    from training.corpus.build import _layout_row
    from training.corpus.scenes import (
        Holdouts, Item, Vocabulary, sample_scene, scene_from_layout, scene_questions, vocabulary_of,
    )

    vocab = Vocabulary({
        "emoji": (Item("emoji", "1", "dog face", None, "dog face"), Item("emoji", "2", "red apple", None, "red apple")),
        "clipart": (Item("clipart", "3", "bug", None, "bug"), Item("clipart", "4", "house", None, "house")),
        "fashion": (Item("fashion", "5", "sneaker", None, "sneaker"), Item("fashion", "6", "coat", None, "coat")),
    })
    holdouts = Holdouts(shape_colors=(("circle", "red"),), counts=(("star", 3),))
    for seed in range(40):
        scene = sample_scene(random.Random(seed), vocab, holdouts, "train", canvas=96)
        row = _layout_row(f"scene/{seed}.png", scene)
        rebuilt = scene_from_layout(json.loads(json.dumps(row)))  # as read back from layouts_*.jsonl
        # Sizes and offsets are not recorded; no question depends on them.
        assert scene_questions(random.Random(seed), rebuilt, vocab) == scene_questions(random.Random(seed), scene, vocab)
    rows = [_layout_row("a.png", sample_scene(random.Random(s), vocab, holdouts, "train", canvas=96)) for s in range(40)]
    shown = vocabulary_of(rows)
    assert "shape" not in shown.by_source  # shapes are named from the shape list, not from what scenes showed
    assert {i.name for items in shown.by_source.values() for i in items} <= {i.name for items in vocab.by_source.values() for i in items}
