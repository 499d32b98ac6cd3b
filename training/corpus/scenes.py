"""Scene layouts on a 3x3 grid and the captions and questions they imply.

Pure data, no pixels: `sample_scene` picks what goes where, `describe_scene`
turns the layout into captions and (question, answer, type) triples, so every
answer is true of the layout by construction. One object per grid cell keeps
position words ("top left", "left of") unambiguous.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from training.corpus.drawing import COLORS, SHAPES, WORDS
from training.corpus.templates import (
    QUESTIONS, SCENE_CAPTIONS, SCENE_WORD, article, counted, join_list, plural,
)

GRID = 3
CELL_NAMES = {
    (0, 0): "top left", (0, 1): "top middle", (0, 2): "top right",
    (1, 0): "middle left", (1, 1): "center", (1, 2): "middle right",
    (2, 0): "bottom left", (2, 1): "bottom middle", (2, 2): "bottom right",
}
MAX_OBJECTS = 6
MAX_GROUPS = 3
WORD_SCENE_SHARE = 0.25
# Source of the non-shape objects of a scene: one per scene, so that a clip-art
# "bird" never sits next to an "eagle" emoji and makes "how many birds?" moot.
SCENE_SOURCES = ("shape", "emoji", "clipart", "fashion")
_STOP = {"a", "an", "of", "with", "and", "the", "in", "on", "for", "pair", "piece"} | set(COLORS)


@dataclass(frozen=True)
class Item:
    """One kind of object: `ref` points at the asset, `key` is what counts hold out."""

    kind: str  # "shape" | "emoji" | "clipart" | "fashion"
    ref: str  # "circle/red", an emoji codepoint, a clip-art index or a fashion index
    name: str  # "red circle", "dog face", "sneaker"
    color: str | None = None  # only shapes have a colour we can name for sure
    key: str = ""  # shape name or class name, for (object, count) hold-outs

    def words(self) -> set[str]:
        return set(self.name.replace("-", " ").split()) - _STOP


@dataclass(frozen=True)
class Placement:
    row: int
    col: int
    size: int  # pixels
    dx: int  # offset inside the cell, pixels
    dy: int


@dataclass(frozen=True)
class Group:
    item: Item
    placements: tuple[Placement, ...]

    @property
    def count(self) -> int:
        return len(self.placements)


@dataclass(frozen=True)
class Scene:
    groups: tuple[Group, ...]
    word: str | None = None
    word_color: str | None = None
    word_row: int | None = None


@dataclass(frozen=True)
class Vocabulary:
    """Items scenes may use, per source (all from the training split of each source)."""

    by_source: dict[str, tuple[Item, ...]]


@dataclass(frozen=True)
class Holdouts:
    """Combinations kept out of train and val entirely; only test shows them."""

    shape_colors: tuple[tuple[str, str], ...]
    counts: tuple[tuple[str, int], ...]  # (shape name or fashion class, count)

    def blocks(self, item: Item, count: int) -> bool:
        return self.holds_pair(item) or (item.key, count) in self.counts

    def holds_pair(self, item: Item) -> bool:
        """Whether `item` is a shape in a held-out colour (test only, whatever the count)."""
        return item.kind == "shape" and (item.key, item.color) in self.shape_colors


def choose_holdouts(rng: random.Random, fashion_classes: tuple[str, ...]) -> Holdouts:
    """One colour per shape for 6 of the 8 shapes (each colour at most once, so every
    shape and colour still appears in training), and one count in 2..6 per shape and
    per Fashion-MNIST class."""
    colors = list(COLORS)
    rng.shuffle(colors)
    shapes = list(SHAPES)
    rng.shuffle(shapes)
    pairs = tuple(sorted(zip(shapes[:6], colors[:6])))
    keys = list(SHAPES) + list(fashion_classes)
    counts = tuple(sorted((key, rng.randint(2, MAX_OBJECTS)) for key in keys))
    return Holdouts(shape_colors=pairs, counts=counts)


def shape_item(shape: str, color: str) -> Item:
    return Item("shape", f"{shape}/{color}", f"{color} {shape}", color, shape)


def _composition(rng: random.Random, total: int, parts: int) -> list[int]:
    """`total` split into `parts` positive counts, uniformly over cut points."""
    cuts = sorted(rng.sample(range(1, total), parts - 1))
    bounds = [0] + cuts + [total]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def _random_item(rng: random.Random, vocab: Vocabulary, source: str) -> Item:
    if source == "shape" or rng.random() < 0.4:
        return shape_item(rng.choice(SHAPES), rng.choice(COLORS))
    return rng.choice(vocab.by_source[source])


def _fits(item: Item, chosen: list[Item]) -> bool:
    """No two groups share a name, a shape, or a content word ('cat' vs 'cat face')."""
    for other in chosen:
        if item.name == other.name or (item.kind == other.kind == "shape" and item.key == other.key):
            return False
        if item.words() & other.words():
            return False
    return True


def sample_scene(rng: random.Random, vocab: Vocabulary, holdouts: Holdouts, split: str,
                 canvas: int, forced: tuple[Item, int] | None = None) -> Scene:
    """A random layout; train/val never show a held-out combination; `forced` puts
    one (item, count) group first (used to make test show the held-out ones)."""
    word_row = rng.randrange(GRID) if rng.random() < WORD_SCENE_SHARE else None
    cells = [(r, c) for r in range(GRID) for c in range(GRID) if r != word_row]
    rng.shuffle(cells)
    source = rng.choice(SCENE_SOURCES)
    items: list[Item] = []
    if forced:
        total = rng.randint(forced[1], min(MAX_OBJECTS, len(cells)))
        rest = total - forced[1]
        extra = _composition(rng, rest, rng.randint(1, min(MAX_GROUPS - 1, rest))) if rest else []
        counts = [forced[1]] + extra
        items.append(forced[0])
    else:
        total = rng.randint(1, min(MAX_OBJECTS, len(cells)))
        counts = _composition(rng, total, rng.randint(1, min(MAX_GROUPS, total)))
    for count in counts[len(items):]:
        for _ in range(100):
            item = _random_item(rng, vocab, source)
            if _fits(item, items) and not (split != "test" and holdouts.blocks(item, count)):
                items.append(item)
                break
    counts = counts[: len(items)]
    cell = canvas // GRID
    groups, used = [], 0
    for item, count in zip(items, counts):
        placements = []
        for row, col in cells[used: used + count]:
            size = rng.randint(int(cell * 0.7), cell - 2)
            placements.append(Placement(row, col, size, rng.randint(0, cell - size), rng.randint(0, cell - size)))
        used += count
        groups.append(Group(item, tuple(placements)))
    if word_row is None:
        return Scene(tuple(groups))
    return Scene(tuple(groups), rng.choice(WORDS), rng.choice(COLORS), word_row)


def scene_from_layout(layout: dict) -> Scene:
    """The scene a corpus layout row (layouts_<split>.jsonl) records: what is in which cell.
    Sizes, offsets and asset references are not recorded, and no question depends on them."""
    cell_of = {name: rc for rc, name in CELL_NAMES.items()}
    groups = tuple(
        Group(Item(obj["kind"], "", obj["name"], obj["color"], obj["key"]),
              tuple(Placement(*cell_of[cell], size=0, dx=0, dy=0) for cell in obj["cells"]))
        for obj in layout["objects"]
    )
    return Scene(groups, layout.get("word"), layout.get("word_color"))


def vocabulary_of(layouts: list[dict]) -> Vocabulary:
    """The non-shape items `layouts` show, per source: what absent-item questions may name."""
    by_source: dict[str, dict[str, Item]] = {}
    for layout in layouts:
        for obj in layout["objects"]:
            if obj["kind"] != "shape":
                by_source.setdefault(obj["kind"], {})[obj["name"]] = Item(obj["kind"], "", obj["name"], None, obj["key"])
    return Vocabulary({source: tuple(items[name] for name in sorted(items)) for source, items in by_source.items()})


def _absent_items(rng: random.Random, scene: Scene, vocab: Vocabulary, n: int,
                  holdouts: Holdouts | None = None) -> list[Item]:
    """Items surely not in the scene: other shapes/colours, or same-source items
    sharing no content word with anything present (no 'dog' when 'dog face' is there);
    with `holdouts`, never a held-out shape and colour pair."""
    present = [g.item for g in scene.groups]
    sources = sorted({i.kind for i in present if i.kind != "shape"}) or ["emoji", "clipart", "fashion"]
    found: list[Item] = []
    for _ in range(50 * n):
        if len(found) == n:
            break
        if rng.random() < 0.5:
            candidate = shape_item(rng.choice(SHAPES), rng.choice(COLORS))
        else:
            candidate = rng.choice(vocab.by_source[rng.choice(sources)])
        clash = any(
            candidate.name == p.name or (candidate.kind != "shape" or p.kind != "shape") and candidate.words() & p.words()
            for p in present + found
        )
        if not clash and not (holdouts is not None and holdouts.holds_pair(candidate)):
            found.append(candidate)
    return found


def ask(rng: random.Random, key: str, **fields: str) -> str:
    return rng.choice(QUESTIONS[key]).format(**fields)


def describe_scene(rng: random.Random, scene: Scene, vocab: Vocabulary, n_captions: int) -> tuple[list[str], list[dict]]:
    """Captions and question triples that are true of `scene`."""
    groups = scene.groups
    listed = join_list([counted(g.item.name, g.count) for g in groups])
    placed = join_list([
        f"{counted(g.item.name, 1)} in the {CELL_NAMES[(g.placements[0].row, g.placements[0].col)]}"
        if g.count == 1 else counted(g.item.name, g.count)
        for g in groups
    ])
    word_part = ""
    if scene.word:
        word_part = rng.choice(SCENE_WORD).format(word=scene.word, color=scene.word_color)
    templates = rng.sample(SCENE_CAPTIONS, k=min(n_captions, len(SCENE_CAPTIONS)))
    captions = [t.format(list=listed if i % 2 == 0 else placed) + word_part for i, t in enumerate(templates)]

    qa = scene_questions(rng, scene, vocab)
    yes, no = qa.pop("yes"), qa.pop("no")
    # Equal yes and no, so a model that always says "yes" scores 50%.
    n = min(len(yes), len(no), 2)
    qa["yesno"] = rng.sample(yes, n) + rng.sample(no, n)

    per_type = {"count": 2, "color": 1, "position": 2, "relation": 2, "yesno": 4, "object": 1, "read": 1}
    triples = []
    for kind, limit in per_type.items():
        pool = qa[kind]
        for question, answer in rng.sample(pool, min(limit, len(pool))):
            triples.append({"question": question, "answer": answer, "type": kind})
    return captions, triples


def scene_questions(rng: random.Random, scene: Scene, vocab: Vocabulary,
                    holdouts: Holdouts | None = None) -> dict[str, list[tuple[str, str]]]:
    """Every (question, answer) the layout of `scene` supports, by type ("count", "color",
    "position", "relation", "object", "read"), with the presence questions split into
    "yes" (what is there) and "no" (as many absent items, which never name a held-out
    shape and colour pair of `holdouts` when given). The corpus samples a few of each
    type per scene; the default model's survey stage asks them all."""
    groups = scene.groups
    qa: dict[str, list[tuple[str, str]]] = {t: [] for t in ("count", "color", "position", "relation", "object", "read")}
    total = sum(g.count for g in groups)
    for g in groups:
        name = g.item.name
        qa["count"].append((ask(rng, "count", plural=plural(name)), str(g.count)))
        if g.item.color:
            if g.count == 1:
                qa["color"].append((ask(rng, "color", name=g.item.key), g.item.color))
            else:
                qa["color"].append((ask(rng, "color_many", plural=plural(g.item.key)), g.item.color))
        if g.count == 1:
            p = g.placements[0]
            qa["position"].append((ask(rng, "where", name=name), CELL_NAMES[(p.row, p.col)]))
            if p.col != 1:
                qa["position"].append((ask(rng, "left_right", name=name), "left" if p.col == 0 else "right"))
            if p.row != 1:
                qa["position"].append((ask(rng, "top_bottom", name=name), "top" if p.row == 0 else "bottom"))
        for p in g.placements:
            qa["object"].append((ask(rng, "at", cell=CELL_NAMES[(p.row, p.col)]), article(name)))
    qa["count"].append((ask(rng, "count_total"), str(total)))
    if len(groups) == 1:
        qa["object"].append((ask(rng, "only"), counted(groups[0].item.name, groups[0].count)))

    singles = [g for g in groups if g.count == 1]
    for a in singles:
        for b in singles:
            if a is b:
                continue
            pa, pb = a.placements[0], b.placements[0]
            names = {"a": a.item.name, "b": b.item.name}
            if pa.col != pb.col:
                key = rng.choice(("left_of", "right_of"))
                truth = (pa.col < pb.col) == (key == "left_of")
                qa["relation"].append((ask(rng, key, **names), "yes" if truth else "no"))
            if pa.row != pb.row:
                key = rng.choice(("above", "below"))
                truth = (pa.row < pb.row) == (key == "above")
                qa["relation"].append((ask(rng, key, **names), "yes" if truth else "no"))
    others = [(g, p) for g in groups for p in g.placements]
    for a in singles:
        pa = a.placements[0]
        dists = sorted((math.dist((pa.row, pa.col), (p.row, p.col)), g.item.name) for g, p in others if g is not a)
        # Only ask when every object at the smallest distance has the same name,
        # so the answer is unique.
        if dists and len({name for d, name in dists if d == dists[0][0]}) == 1:
            qa["relation"].append((ask(rng, "nearest", name=a.item.name), article(dists[0][1])))

    absent = _absent_items(rng, scene, vocab, n=len(groups), holdouts=holdouts)
    yes = [(ask(rng, "present", a_name=article(g.item.name)), "yes") for g in groups]
    no = [(ask(rng, "present", a_name=article(i.name)), "no") for i in absent]
    if scene.word:
        yes.append((ask(rng, "text_present"), "yes"))
        qa["read"].append((ask(rng, "read"), scene.word))
        qa["color"].append((ask(rng, "color_word"), scene.word_color))
    else:
        no.append((ask(rng, "text_present"), "no"))
    if absent and rng.random() < 0.3:
        qa["count"].append((ask(rng, "count", plural=plural(absent[0].name)), "0"))
    return {**qa, "yes": yes, "no": no}
