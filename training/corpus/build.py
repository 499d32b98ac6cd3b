"""Build the corpus: pick assets and splits, lay out scenes, render, write files.

Every random choice comes from `random.Random` seeded by strings derived from
the seed (string seeds are hashed with SHA-512, not Python's salted `hash`), and
listings are sorted, so one seed gives byte-identical files on any machine.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from tqdm import tqdm

from training.corpus import render, sources
from training.corpus.drawing import COLORS, SHAPES, WORDS
from training.corpus.scenes import (
    CELL_NAMES, Holdouts, Item, Scene, Vocabulary, choose_holdouts, sample_scene, shape_item,
)
from vlm_chat.errors import UserFacingError

SPLITS = ("train", "val", "test")
# Files this builder owns in --out; a rebuild replaces exactly these.
OUTPUT_GLOBS = ("images", "captions_*.jsonl", "triples_*.jsonl", "layouts_*.jsonl",
                "labels_*_test.jsonl", "classes_*.json", "manifest.json")


@dataclass(frozen=True)
class CorpusConfig:
    out: Path
    seed: int = 0
    scenes: int = 60000  # over all splits, 80/10/10
    canvas: int = 96  # side of scene and single-object images (Fashion-MNIST stays 28)
    captions_per_image: int = 2
    max_per_source: int = 0  # cap on Fashion-MNIST images / emoji glyphs / clip-art files; 0 = all
    max_per_clipart_class: int = 150  # keeps the 1.3k "stars" from swamping the rest
    shape_singles: int = 8000
    word_singles: int = 3000
    emoji_variants: int = 3  # training renders per glyph (size and place differ)
    test_holdout_share: float = 0.3  # test scenes/shapes made to show a held-out combination
    workers: int = 2
    paths: sources.SourcePaths = field(default_factory=sources.SourcePaths)

    @classmethod
    def small(cls, out: Path, **overrides) -> "CorpusConfig":
        """Seconds-sized corpus for tests."""
        sizes = dict(scenes=60, max_per_source=40, max_per_clipart_class=3, shape_singles=30,
                     word_singles=10, emoji_variants=1, workers=1)
        return cls(out=out, **{**sizes, **overrides})


def _three_way(items: list, val: float = 0.1, test: float = 0.1) -> dict[str, list]:
    n = len(items)
    n_test = max(1, round(n * test)) if n >= 3 else 0
    n_val = max(1, round(n * val)) if n >= 3 else 0
    return {"test": items[:n_test], "val": items[n_test:n_test + n_val], "train": items[n_test + n_val:]}


def _split_counts(total: int) -> dict[str, int]:
    val = test = max(1, round(total * 0.1))
    return {"train": max(0, total - val - test), "val": val, "test": test}


def _prepare_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / "manifest.json").exists():
        raise UserFacingError(
            f"output directory {out} is not empty and holds no corpus (no manifest.json); "
            "pass an empty or new directory to --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    for pattern in OUTPUT_GLOBS:
        for path in sorted(out.glob(pattern)):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _forced_items(holdouts: Holdouts, fashion_by_class: dict[str, list[Item]]
                  ) -> list[tuple[Item, int]]:
    """Every held-out (item, count) combination, as items test scenes can show."""
    forced = [(shape_item(shape, color), 1) for shape, color in holdouts.shape_colors]
    for key, count in holdouts.counts:
        if key in SHAPES:
            forced.append((shape_item(key, COLORS[SHAPES.index(key) % len(COLORS)]), count))
        elif fashion_by_class.get(key):
            forced.append((fashion_by_class[key][0], count))
    return forced


def _plan(cfg: CorpusConfig, rng: random.Random) -> tuple[list[render.Job], render.Assets, dict]:
    paths = cfg.paths
    cap = cfg.max_per_source or None

    fashion = {split: sources.load_fashion(paths.fashion_dir, split)[0] for split in ("train", "test")}
    labels = {split: sources.load_fashion(paths.fashion_dir, split)[1] for split in ("train", "test")}
    order = list(range(len(labels["train"])))
    rng.shuffle(order)
    order = order[:cap]
    n_val = max(1, len(order) // 12)  # 5,000 of the official 60,000
    fashion_split = {"train": sorted(order[n_val:]), "val": sorted(order[:n_val]),
                     "test": list(range(len(labels["test"])))[:cap]}

    def fashion_item(split: str, index: int) -> Item:
        official = "test" if split == "test" else "train"
        name = sources.FASHION_CLASSES[labels[official][index]]
        return Item("fashion", f"{official}:{index}", name, None, name)

    emoji = sources.list_emoji(paths.emoji_font)
    rng.shuffle(emoji)
    emoji_split = _three_way(emoji[:cap])

    clipart_files = sources.list_clipart(paths.clipart_dir)
    by_label: dict[str, list[str]] = defaultdict(list)
    for rel, label in clipart_files:
        by_label[label].append(rel)
    clipart_split: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for label in sorted(by_label):
        files = by_label[label]
        rng.shuffle(files)
        for split, chosen in _three_way(files[: cfg.max_per_clipart_class]).items():
            clipart_split[split] += [(rel, label) for rel in chosen]
    if cap:
        clipart_split = {s: v[:cap] for s, v in clipart_split.items()}
    clipart_list = [entry for split in SPLITS for entry in clipart_split[split]]
    clipart_index = {rel: i for i, (rel, _) in enumerate(clipart_list)}

    holdouts = choose_holdouts(random.Random(f"{cfg.seed}:holdouts"), sources.FASHION_CLASSES)
    fashion_train_items = [fashion_item("train", i) for i in fashion_split["train"]]
    fashion_by_class: dict[str, list[Item]] = defaultdict(list)
    for item in fashion_train_items:
        fashion_by_class[item.name].append(item)
    # Scenes in every split are built from training-split assets only, so the
    # held-out emoji glyphs, clip-art files and Fashion-MNIST test images stay
    # unseen; what test scenes test is new combinations (the hold-outs).
    vocab = Vocabulary({
        "emoji": tuple(Item("emoji", str(cp), name, None, name) for cp, name in emoji_split["train"]),
        "clipart": tuple(Item("clipart", str(clipart_index[rel]), label, None, label)
                         for rel, label in clipart_split["train"]),
        "fashion": tuple(fashion_train_items),
    })

    jobs: list[render.Job] = []

    counters: Counter = Counter()

    def job(split: str, kind: str, **kw) -> None:
        index = counters[(split, kind)]
        counters[(split, kind)] += 1
        jobs.append(render.Job(split, f"images/{split}/{kind}/{index:06d}.png", kind,
                               f"{cfg.seed}:{split}:{kind}:{index}", **kw))

    for split in SPLITS:
        for index in fashion_split[split]:
            job(split, "fashion", item=fashion_item(split, index))
        for _ in range(cfg.emoji_variants if split == "train" else 1):
            for cp, name in emoji_split[split]:
                job(split, "emoji", item=Item("emoji", str(cp), name, None, name))
        for rel, label in clipart_split[split]:
            job(split, "clipart", item=Item("clipart", str(clipart_index[rel]), label, None, label))
        n_shapes = _split_counts(cfg.shape_singles)[split]
        for i in range(n_shapes):
            if split == "test" and i < n_shapes * cfg.test_holdout_share:
                shape, color = rng.choice(holdouts.shape_colors)
            else:
                while True:
                    shape, color = rng.choice(SHAPES), rng.choice(COLORS)
                    if split == "test" or (shape, color) not in holdouts.shape_colors:
                        break
            job(split, "shape", item=shape_item(shape, color))
        for _ in range(_split_counts(cfg.word_singles)[split]):
            job(split, "word", word=rng.choice(WORDS))

    forced = _forced_items(holdouts, fashion_by_class)
    for split in SPLITS:
        n_scenes = _split_counts(cfg.scenes)[split]
        for i in range(n_scenes):
            scene_rng = random.Random(f"{cfg.seed}:layout:{split}:{i}")
            force = forced[i % len(forced)] if split == "test" and i < n_scenes * cfg.test_holdout_share else None
            scene = sample_scene(scene_rng, vocab, holdouts, split, cfg.canvas, force)
            job(split, "scene", scene=scene)

    clipart_tiles = _load_clipart(cfg, [paths.clipart_dir / rel for rel, _ in clipart_list])
    assets = render.Assets(cfg.out, cfg.canvas, cfg.captions_per_image, fashion, clipart_tiles,
                           paths.emoji_font, paths.word_font, vocab)
    facts = {
        "holdouts": {"shape_colors": [list(p) for p in holdouts.shape_colors],
                     "object_counts": [list(p) for p in holdouts.counts]},
        "assets": {
            "fashion_mnist": {s: len(fashion_split[s]) for s in SPLITS},
            "emoji_glyphs": {s: len(emoji_split[s]) for s in SPLITS},
            "clipart_files": {s: len(clipart_split[s]) for s in SPLITS},
        },
        "classes": {
            "fashion_mnist": list(sources.FASHION_CLASSES),
            "emoji": sorted({name for _, name in emoji_split["test"]}),
            "clipart": sorted({label for _, label in clipart_split["test"]}),
        },
    }
    return jobs, assets, facts


def _load_clipart(cfg: CorpusConfig, files: list[Path]) -> tuple:
    load = partial(sources.load_clipart, size=cfg.canvas)
    if cfg.workers <= 1:
        return tuple(load(f) for f in tqdm(files, desc="clip art", unit="file"))
    with multiprocessing.get_context("fork").Pool(cfg.workers) as pool:
        return tuple(tqdm(pool.imap(load, files, chunksize=16), total=len(files), desc="clip art", unit="file"))


def _layout_row(path: str, scene: Scene) -> dict:
    objects = [{"name": g.item.name, "kind": g.item.kind, "color": g.item.color, "key": g.item.key,
                "count": g.count, "cells": [CELL_NAMES[(p.row, p.col)] for p in g.placements]}
               for g in scene.groups]
    return {"image": path, "objects": objects, "word": scene.word, "word_color": scene.word_color}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def build_corpus(cfg: CorpusConfig) -> dict:
    """Write the corpus into `cfg.out`; return the manifest."""
    cfg.paths.check()
    _prepare_out(cfg.out)
    started = time.perf_counter()
    jobs, assets, facts = _plan(cfg, random.Random(f"{cfg.seed}:plan"))
    render.install(assets)  # before the fork: workers inherit the assets

    captions = {s: [] for s in SPLITS}
    triples = {s: [] for s in SPLITS}
    layouts = {s: [] for s in SPLITS}
    labels: dict[str, list[dict]] = {"fashion_mnist": [], "emoji": [], "clipart": []}
    images = Counter()
    if cfg.workers <= 1:
        results = map(render.render_job, jobs)
        pool = None
    else:
        pool = multiprocessing.get_context("fork").Pool(cfg.workers)
        # imap keeps job order, so the rows come back in the same order every run.
        results = pool.imap(render.render_job, jobs, chunksize=64)
    try:
        for j, (caption_rows, triple_rows, label) in zip(jobs, tqdm(results, total=len(jobs), desc="images", unit="img")):
            captions[j.split] += caption_rows
            triples[j.split] += triple_rows
            images[(j.split, j.kind)] += 1
            if j.scene is not None:
                layouts[j.split].append(_layout_row(j.path, j.scene))
            if label and j.split == "test":
                labels["fashion_mnist" if j.kind == "fashion" else j.kind].append(label)
    finally:
        if pool is not None:
            pool.close()
            pool.join()

    for split in SPLITS:
        _write_jsonl(cfg.out / f"captions_{split}.jsonl", captions[split])
        _write_jsonl(cfg.out / f"triples_{split}.jsonl", triples[split])
        _write_jsonl(cfg.out / f"layouts_{split}.jsonl", layouts[split])
    for name, rows in labels.items():
        _write_jsonl(cfg.out / f"labels_{name}_test.jsonl", rows)
        (cfg.out / f"classes_{name}.json").write_text(json.dumps(facts["classes"][name], indent=1) + "\n")

    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k not in ("out", "workers")}
    params["paths"] = {k: str(v) for k, v in asdict(cfg.paths).items()}
    manifest = {
        "seed": cfg.seed,
        "image_size": {"scenes_and_singles": cfg.canvas, "fashion_mnist": 28},
        "params": params,
        "images": {s: {k: images[(s, k)] for k in sorted({k for (sp, k) in images if sp == s})} for s in SPLITS},
        "captions": {s: len(captions[s]) for s in SPLITS},
        "triples": {s: dict(sorted(Counter(t["type"] for t in triples[s]).items())) for s in SPLITS},
        "yes_no_answers": {s: dict(sorted(Counter(t["answer"] for t in triples[s] if t["answer"] in ("yes", "no")).items()))
                           for s in SPLITS},
        "labels_test": {name: len(rows) for name, rows in labels.items()},
        **facts,
    }
    (cfg.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    manifest["build_seconds"] = round(time.perf_counter() - started, 1)  # reported, not written: files stay seed-determined
    return manifest
