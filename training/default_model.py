"""`vlm-chat default build`: the recipe of the offline default model, from nothing.

  corpus    render the image-text corpus (training/corpus)                      ~1.5 min
  clip      pretrain the small CLIP on its captions, or take the shipped one     ~60 min
  bundle    CLIP + SmolLM2-135M-Instruct (GGUF) + a random pixel-shuffle projector
  mix       write the align and instruct data files from the corpus (seeded)
  distill   the base LLM answers general text prompts; its answers become the
            text-only turns that keep it able to chat (self-distillation)
  align     projector only, on captions
  instruct  LoRA on the LLM, projector and vision tower, on multi-turn questions
            about scenes, captions as "Describe this image." and the text turns
  drill     more of instruct on scenes it has not seen, mostly questions (6-10
            per conversation), higher projector learning rate, bf16 autocast
  review    scenes neither stage used, with all their questions, plus single-image
            captions and the text turns again (the drill had no singles and its
            captions suffered); the projector gains a learned position per image
            token; fp32
  lone      position alone, on scenes of one object: every position question of
            1,600 such scenes (mixed recipes never taught position: the model
            learns it here, 43 -> 98 % on such test questions, and forgets the rest)
  consolidate  everything again on fresh scenes with all their questions, position
            questions about scenes of 2-6 objects, a replay of the lone scenes,
            single-image captions and the text turns; batches grouped by length
  crowd     position among others, at scale: every position question of 12,000
            fresh scenes of 2-6 objects (~23k answers, 1,470 steps; finding the
            named object needs examples by the tens of thousands), which again
            crowds out every other skill
  recall    everything again as in consolidate, with a replay of the crowd scenes
  tally     counting at scale, the same way: every count question of 12,000 fresh
            scenes of 1-6 objects (24k answers)
  recount   everything again, with replays of the tally and crowd scenes
  tint      colour at scale, the same way: the colour question of 6,000 training
            scenes of 2-6 objects, drawn from all of them (fewer than 3,500 are
            fresh by now: earlier mixes used them for other questions)
  retint    everything again, with replays of the tint, tally and crowd scenes
  discern   naming: every object of 2,400 training scenes by its cell, "is there
            ...?" about the shapes and garments of more scenes and about look-alikes
            they lack, with replays of tint, tally and crowd
  survey    every skill at once, densely: each of a few thousand training scenes is
            one conversation asking everything its layout supports (every count,
            colour and position, balanced yes/no, a few relations and names), where
            the corpus asks at most 13; single-image captions and the text turns
  resurvey  the same on as many other training scenes, asking half again as many
            "is there ...?" about absent things as about present ones
  census    the same again on training scenes neither survey used, most of them
            crowded (4-6 objects, where counting and placing fail most), with every
            object named by its cell and more relations
  naming    every object of 3,000 fresh training scenes named by its cell, with their
            colour questions and balanced "is there ...?", plus 400 scenes asked
            everything the census way, at 0.4 times census's learning rates (naming
            was the weakest skill after census; at full rates it unteaches the others)
  sharpen   (recipe `sharpen` only) the vision tower alone (`vlm-chat train --stage
            sharpen`): linear heads on each grid cell's own patch features learn what
            the cell holds (empty, the shape, garment or clip-art label, or "emoji")
            and a shape's colour, on every training scene, while an anchor keeps the
            features near the old ones (the tower's tokens of a cell told a garment in
            57 % of validation cells and clip art in 31 %)
  rename    (recipe `sharpen` only) the naming mix again, on 1,500 + 200 other fresh
            scenes, so the LLM learns to read the sharpened tower; measured, the pair
            lost 0.8 points overall against naming's model, so the shipped recipe
            leaves both out
  eval      `vlm-chat eval` on a seeded sample of the test split + knowledge check
  ship      copy the trained bundle (LLM by reference) to vlm_chat/assets/default

Every stage records its wall time in WORK/state.json (summed over interrupted
runs) and the machine it ran on (each of them, when a run moved); a stage that finished
is skipped when the command runs again, and a training stage that was killed resumes
from its last checkpoint. When the recipe changes, the first stage whose settings
changed and every stage after it run again (their old outputs are deleted); the
stages before it are kept. A setting that an older state.json lacks counts as its
default, and a stage added to the build since runs with every stage after it.
"""

from __future__ import annotations

import json
import random
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from training.corpus.drawing import SHAPES
from training.corpus.scenes import CELL_NAMES, Holdouts, Item, ask, scene_from_layout, scene_questions, vocabulary_of
from training.corpus.scenes import GRID as CELLS_PER_SIDE
from training.corpus.templates import article, counted
from training.data import IMAGE
from vlm_chat.devices import machine
from vlm_chat.errors import UserFacingError

STAGES = ("corpus", "clip", "bundle", "mix", "distill", "align", "instruct", "drill", "review", "lone", "consolidate",
          "crowd", "recall", "tally", "recount", "tint", "retint", "discern", "survey", "resurvey",
          "census", "naming", "sharpen", "rename", "eval", "ship")
SHIPPED_CLIP = Path(__file__).resolve().parent.parent / "vlm_chat" / "assets" / "clip"


# The training settings of consolidate and of every stage after it: LoRA at 5e-4,
# projector 1e-3, vision tower 3e-5, batches of 8 grouped by length.
EVERY_SKILL_SETTINGS = {
    "batch_size": 8, "lr": 5e-4, "projector_lr": 1e-3, "vision": "full", "vision_lr": 3e-5,
    "warmup": 0.03, "epochs": 1, "log_every": 10, "save_every_minutes": 5, "eval_every": 0,
    "eval_max_batches": 10, "val_fraction": 0.01, "group_by_length": True,
}


# The naming stage's settings (and rename's): census's at 0.4 times its learning rates, in fp32.
NAMING_SETTINGS = {**EVERY_SKILL_SETTINGS, "lr": 2e-4, "projector_lr": 4e-4, "vision_lr": 1.2e-5, "val_fraction": 0.02,
                   "mixed_precision": "no"}


@dataclass
class Recipe:
    """Everything that decides the default model; written next to it as recipe.json."""

    seed: int = 0
    clip_steps: int = 2200  # with --clip train: contrastive steps of 128 captions (docs/clip.md)
    # With --clip train, the CLIP's input: 64 px in 8 px patches is the shipped CLIP's; 96 px
    # in 16 px patches puts each cell of a scene's 3x3 grid on exactly 2x2 patches.
    clip_image_size: int = 64
    clip_patch_size: int = 8
    clip_shape_copies: int = 0  # more copies of each single-shape caption in the CLIP's data
    clip_augment: bool = True  # random resized crops (they move the cells the captions name)
    llm: str = "smollm2-135m-instruct"
    # The training stages' precision where their settings name none: "auto" is bf16 autocast
    # on hardware that does bf16 natively (a GPU with it, or a CPU with AVX512-BF16 or AMX),
    # fp32 elsewhere. census trained both ways from the same bundle answered alike (+0.3
    # points overall, every type within its paired standard error; MODEL_CARD.md, "Rebuild
    # it from nothing"), so the value decides how a stage computes, not what it learns, and
    # a build from before the field counts as "auto".
    mixed_precision: str = "auto"
    projector: str = "mlp2x_gelu"
    token_reduction: str = "pixel_shuffle"  # 8x8 CLIP patches -> 16 tokens, no information dropped
    image_tiles: int = 0  # k > 0: image tokens in k x k tiles, each after its name ("top left:")
    # True: align trains the projector on one run of image tokens (image_tiles 0), and the
    # tiles are laid out from instruct on (how the shipped tiles model was trained)
    tiles_after_align: bool = False
    reduction_factor: int = 2
    align_images: int = 6000
    align: dict = field(default_factory=lambda: {
        "batch_size": 16, "lr": 1e-3, "warmup": 0.03, "epochs": 1, "log_every": 10,
        "save_every_minutes": 5, "eval_every": 0, "eval_max_batches": 8, "val_fraction": 0.01,
    })
    instruct_conversations: int = 5000  # multi-turn conversations about scene images
    turns_per_conversation: tuple[int, int] = (3, 6)
    describe_share: float = 0.25  # conversations that open with "Describe this image."
    caption_singles: int = 1200  # describe turns on Fashion-MNIST, emoji, clip art and word images
    text_copies: int = 2  # each distilled text turn: once without and once with an unrelated image
    instruct: dict = field(default_factory=lambda: {
        "batch_size": 8, "lr": 3e-4, "projector_lr": 1e-4, "vision": "full", "vision_lr": 3e-5,
        "warmup": 0.03, "epochs": 1, "log_every": 10, "save_every_minutes": 5, "eval_every": 0,
        "eval_max_batches": 10, "val_fraction": 0.01,
    })
    drill_conversations: int = 6000  # on training scenes that instruct did not use
    drill_turns: tuple[int, int] = (6, 10)
    drill_describe_share: float = 0.1
    drill: dict = field(default_factory=lambda: {
        "batch_size": 8, "lr": 1e-3, "projector_lr": 1e-3, "vision": "full", "vision_lr": 3e-5,
        "warmup": 0.03, "epochs": 1, "log_every": 10, "save_every_minutes": 5, "eval_every": 0,
        "eval_max_batches": 10, "val_fraction": 0.01, "mixed_precision": "bf16",
    })
    review_conversations: int = 1200  # on training scenes neither instruct nor drill used
    review_turns: tuple[int, int] = (8, 13)  # a scene has at most 13 questions: all of them, mostly
    review_describe_share: float = 0.1
    review_caption_singles: int = 330  # single-image describe turns, as instruct had
    # The drill left the model at chance on left/right, though a linear probe reads a
    # token's column off its projected features 84 % of the time: the review gives the
    # projector a learned position per image token (zeros at first) to make it plain.
    review: dict = field(default_factory=lambda: {
        "batch_size": 8, "lr": 5e-4, "projector_lr": 1e-3, "position_embedding": True, "vision": "full", "vision_lr": 3e-5,
        "warmup": 0.03, "epochs": 1, "log_every": 10, "save_every_minutes": 5, "eval_every": 0,
        "eval_max_batches": 10, "val_fraction": 0.01,
    })
    # Skills one at a time, simplest scenes first: position alone on one-object scenes
    # (the review's learning rates), then all skills again with position kept in view.
    lone_scenes: int = 1600
    lone: dict = field(default_factory=lambda: {
        "batch_size": 8, "lr": 5e-4, "projector_lr": 1e-3, "vision": "full", "vision_lr": 3e-5,
        "warmup": 0.03, "epochs": 1, "log_every": 10, "save_every_minutes": 5, "eval_every": 0,
        "eval_max_batches": 10, "val_fraction": 0.01,
    })
    consolidate_conversations: int = 1200  # fresh scenes, (nearly) all their questions
    consolidate_turns: tuple[int, int] = (8, 13)
    consolidate_describe_share: float = 0.1
    consolidate_position_scenes: int = 600  # fresh scenes of 2-6 objects, their position questions only
    consolidate_lone_replay: int = 400  # conversations of the lone mix again
    consolidate_caption_singles: int = 330
    consolidate: dict = field(default_factory=lambda: dict(EVERY_SKILL_SETTINGS))
    # Finding the named object among others needs tens of thousands of examples
    # (bench/find_probe.py); the mixes above hold ~8k position answers about crowded scenes.
    # The crowd stage gives it every position question of this many fresh scenes of 2-6
    # objects (~23k answers), with the settings of `bench/skill_alone.py`'s runs.
    crowd_scenes: int = 12000
    crowd: dict = field(default_factory=lambda: {**EVERY_SKILL_SETTINGS, "val_fraction": 0.02})
    # Trained alone for that long, position crowds out every other skill (overall 18.8 %):
    # recall brings them back as consolidate did after lone, the crowd's scenes replayed.
    recall_conversations: int = 1200  # fresh scenes, (nearly) all their questions
    recall_turns: tuple[int, int] = (8, 13)
    recall_describe_share: float = 0.1
    recall_crowd_replay: int = 600  # conversations of the crowd mix again
    recall_caption_singles: int = 330
    recall: dict = field(default_factory=lambda: dict(EVERY_SKILL_SETTINGS))
    # Counting, the same way: taught alone for 196 steps it hardly moved (46.5 -> 51.0 %),
    # as position had not; at scale, every count question of this many fresh scenes of 1-6
    # objects (two per scene), then every skill again with both skill-at-scale mixes replayed.
    tally_scenes: int = 12000
    tally: dict = field(default_factory=lambda: {**EVERY_SKILL_SETTINGS, "val_fraction": 0.02})
    recount_conversations: int = 1200  # fresh scenes, (nearly) all their questions
    recount_turns: tuple[int, int] = (8, 13)
    recount_describe_share: float = 0.1
    recount_tally_replay: int = 600  # conversations of the tally mix again
    recount_crowd_replay: int = 600  # and of the crowd mix, so position is kept too
    recount_caption_singles: int = 330
    recount: dict = field(default_factory=lambda: dict(EVERY_SKILL_SETTINGS))
    # Colour, the same way: after recount it is at 75.7 % (63 % in five-object scenes),
    # where naming an object's colour first means finding it among the others. Too few
    # scenes are left unused, so tint draws from every training scene of 2-6 objects: a
    # scene another mix asked about is new to a colour question all the same.
    tint_scenes: int = 6000
    tint: dict = field(default_factory=lambda: {**EVERY_SKILL_SETTINGS, "val_fraction": 0.02})
    retint_conversations: int = 1200  # fresh scenes, (nearly) all their questions
    retint_turns: tuple[int, int] = (8, 13)
    retint_describe_share: float = 0.1
    retint_tint_replay: int = 600  # conversations of the tint mix again
    retint_tally_replay: int = 400  # and of the tally and crowd mixes, so counting and position are kept
    retint_crowd_replay: int = 400
    retint_caption_singles: int = 330
    retint: dict = field(default_factory=lambda: dict(EVERY_SKILL_SETTINGS))
    # After retint the model finds an object's cell but not what it is: asked what is in a
    # cell that holds a shape, it gave the right colour and the wrong shape 61 % of the
    # time, and 18 % right (`bench/confusions.py --naming`). Naming took 1 question of 13
    # in the every-skill mixes. (It did not help: the CLIP cannot tell the shapes apart,
    # `bench/clip_shapes.py`; see docs/experiments.md.)
    # discern teaches it in one stage, the other skills kept in view: every object of a
    # scene named by its cell, "is there ...?" about each shape or garment and about a
    # look-alike the scene lacks (same colour, other shape; another garment), with a few
    # fresh every-skill scenes and the tint, tally and crowd mixes replayed.
    discern_naming_scenes: int = 2400  # drawn from all training scenes, as tint's were
    discern_lookalike_scenes: int = 1200  # other scenes than the naming ones
    discern_conversations: int = 400  # fresh scenes, (nearly) all their questions
    discern_turns: tuple[int, int] = (8, 13)
    discern_describe_share: float = 0.1
    discern_tint_replay: int = 400
    discern_tally_replay: int = 600
    discern_crowd_replay: int = 400
    discern_caption_singles: int = 200
    discern: dict = field(default_factory=lambda: {**EVERY_SKILL_SETTINGS, "val_fraction": 0.02})
    # The skill stages taught one skill at a time and each cost the others a little; the
    # every-skill mixes asked at most 13 sampled questions per scene. survey asks each
    # scene everything its layout supports, all skills interleaved in one conversation
    # (13 answers per image on average, most of them about counts, colours and places,
    # where a third of the corpus's sample is yes/no: every object of a scene has to be
    # told apart from the others to answer them all).
    survey_scenes: int = 4500  # drawn from all training scenes, as tint's were
    survey_caption_singles: int = 200
    survey: dict = field(default_factory=lambda: {**EVERY_SKILL_SETTINGS, "val_fraction": 0.02})
    # survey gained on every skill from 4,500 scenes, of 48,000 (docs/experiments.md); resurvey
    # asks other scenes the same way. After survey the model said "yes" to 58 % of the
    # yes/no questions, where 50 % are yes (precision 77 %, recall 89 %), so resurvey asks
    # up to 1.5 absent-thing questions per present one (the layouts hold 2.5 against 2.0).
    resurvey_scenes: int = 4000  # training scenes survey did not use
    resurvey_no_per_yes: float = 1.5
    resurvey_caption_singles: int = 200
    resurvey: dict = field(default_factory=lambda: {**EVERY_SKILL_SETTINGS, "val_fraction": 0.02})
    # After resurvey (docs/experiments.md) counting was 84-91 % on scenes of 1-3 objects but
    # 59-63 % on 4-6, objects were named by their cell 44 % of the time and relations were
    # 40 %; the "yes" share had fallen to 45.7 % (true 50.3 %). census asks fresh scenes
    # the survey way, `census_crowded_share` of them with 4 or more objects, every object
    # by its cell and up to 6 relations (CENSUS_LIMITS), with 1.2 absent things per present one.
    census_scenes: int = 2400  # training scenes neither survey nor resurvey asked about
    census_crowded_share: float = 0.6
    census_no_per_yes: float = 1.2
    census_caption_singles: int = 200
    census: dict = field(default_factory=lambda: {**EVERY_SKILL_SETTINGS, "val_fraction": 0.02})
    # After census (docs/experiments.md) an object was named by its cell 44 % of the time. naming
    # asks it of every object of `naming_scenes` fresh training scenes, with each scene's
    # colour questions (colour misses were the wrong shape's colour) and up to
    # `naming_presence` "is there ...?" about present things and as many about absent ones
    # (emoji and clip art included: without them the answers leaned to "no"), yes/no about
    # look-alikes in `naming_lookalike_share` of them, and `naming_every_skill` scenes asked
    # everything the census way. At census's rates the same kind of mix lost 2.3 points
    # overall (counting, position, reading), at 0.4 times them it kept the other skills.
    naming_scenes: int = 3000  # training scenes no stage that trained asked about
    naming_every_skill: int = 400
    naming_lookalike_share: float = 0.2
    naming_colour: bool = True
    naming_presence: int = 2
    naming_caption_singles: int = 150
    naming: dict = field(default_factory=lambda: dict(NAMING_SETTINGS))
    # A linear probe on a cell's own tokens told a garment in 57 % of validation cells and
    # clip art in 31 %: the tower limits naming, not only the LLM. sharpen trains the tower
    # alone on what every cell of the training scenes holds (training/sharpen.py), scored on
    # `sharpen_val_scenes` validation scenes; then rename trains the LLM side on a smaller
    # naming mix of other fresh scenes (the naming stage's kinds of question, seed + 32)
    # with naming's settings, so it reads the new features.
    # Off in every recipe but `sharpen`: measured, the pair lost 0.8 points overall against
    # naming alone (docs/experiments.md). Off, the two stages neither write data nor train.
    sharpen_tower: bool = False
    sharpen_val_scenes: int = 2000
    sharpen: dict = field(default_factory=lambda: {"max_steps": 1500, "batch_size": 64, "lr": 1e-4, "head_lr": 1e-3,
                                                   "anchor": 1.0})
    rename_scenes: int = 1500
    rename_every_skill: int = 200
    rename_caption_singles: int = 75
    rename: dict = field(default_factory=lambda: dict(NAMING_SETTINGS))
    # Later stages that write their mix but do not train: the next stage goes on from the
    # last one that did. Every mix is still written, so each stage's data stay those of the
    # full chain (the `tiles` recipe of RECIPES runs instruct, drill, survey, resurvey, census and naming).
    skip: tuple[str, ...] = ()
    eval_questions: int = 3000
    eval_caption_images: int = 400
    eval_batch_size: int = 32


# The recipe fields each stage reads; a change to one reruns that stage and all after it.
STAGE_FIELDS = {
    "corpus": ("seed",),
    "clip": ("seed", "clip_steps", "clip_image_size", "clip_patch_size", "clip_shape_copies", "clip_augment"),
    "bundle": ("seed", "llm", "projector", "token_reduction", "reduction_factor", "image_tiles", "tiles_after_align"),
    "mix": ("seed", "align_images", "instruct_conversations", "turns_per_conversation", "describe_share",
            "caption_singles", "eval_questions", "eval_caption_images"),
    "distill": ("seed", "text_copies"),
    "align": ("seed", "align", "mixed_precision"),
    "instruct": ("seed", "instruct"),
    "drill": ("seed", "drill_conversations", "drill_turns", "drill_describe_share", "drill", "skip"),
    "review": ("seed", "review_conversations", "review_turns", "review_describe_share", "review_caption_singles", "review"),
    "lone": ("seed", "lone_scenes", "lone"),
    "consolidate": ("seed", "consolidate_conversations", "consolidate_turns", "consolidate_describe_share",
                    "consolidate_position_scenes", "consolidate_lone_replay", "consolidate_caption_singles", "consolidate"),
    "crowd": ("seed", "crowd_scenes", "crowd"),
    "recall": ("seed", "recall_conversations", "recall_turns", "recall_describe_share", "recall_crowd_replay",
               "recall_caption_singles", "recall"),
    "tally": ("seed", "tally_scenes", "tally"),
    "recount": ("seed", "recount_conversations", "recount_turns", "recount_describe_share", "recount_tally_replay",
                "recount_crowd_replay", "recount_caption_singles", "recount"),
    "tint": ("seed", "tint_scenes", "tint"),
    "retint": ("seed", "retint_conversations", "retint_turns", "retint_describe_share", "retint_tint_replay",
               "retint_tally_replay", "retint_crowd_replay", "retint_caption_singles", "retint"),
    "discern": ("seed", "discern_naming_scenes", "discern_lookalike_scenes", "discern_conversations", "discern_turns",
                "discern_describe_share", "discern_tint_replay", "discern_tally_replay", "discern_crowd_replay",
                "discern_caption_singles", "discern"),
    "survey": ("seed", "survey_scenes", "survey_caption_singles", "survey"),
    "resurvey": ("seed", "resurvey_scenes", "resurvey_no_per_yes", "resurvey_caption_singles", "resurvey"),
    "census": ("seed", "census_scenes", "census_crowded_share", "census_no_per_yes", "census_caption_singles", "census"),
    "naming": ("seed", "skip", "naming_scenes", "naming_every_skill", "naming_lookalike_share", "naming_colour",
               "naming_presence", "naming_caption_singles", "naming"),
    "sharpen": ("seed", "sharpen_tower", "sharpen_val_scenes", "sharpen"),
    "rename": ("seed", "sharpen_tower", "rename_scenes", "rename_every_skill", "naming_lookalike_share", "naming_colour",
               "naming_presence", "rename_caption_singles", "rename"),
    "eval": ("eval_batch_size",),
    "ship": (),
}


# -- general text prompts the base LLM answers for itself (self-distillation) ---------------

_COUNTRIES = (
    "Spain", "Portugal", "Japan", "China", "India", "Canada", "Mexico", "Brazil", "Argentina", "Egypt",
    "Kenya", "Australia", "Russia", "Greece", "Sweden", "Norway", "Poland", "Turkey", "Peru", "Chile",
    "Ireland", "Austria", "Belgium", "Netherlands", "Denmark", "Finland", "Thailand", "Vietnam",
)
# Held out of training: the knowledge check asks these with an image attached.
KNOWLEDGE_CHECK = (
    ("What is the capital of France?", "paris"),
    ("What is the capital of Italy?", "rome"),
    ("What is the capital of Germany?", "berlin"),
    ("What is the capital of the United Kingdom?", "london"),
    ("What is 2 plus 3?", "5"),
    ("What color is the sky on a clear day?", "blue"),
    ("How many days are there in a week?", "7"),
    ("What is the opposite of hot?", "cold"),
)
_TOPICS = (
    "photosynthesis", "gravity", "the water cycle", "a computer", "the internet", "democracy", "music",
    "the moon", "volcanoes", "rainbows", "electricity", "the human heart", "friendship", "exercise",
    "coffee", "the ocean", "bees", "recycling", "a library", "chess", "the sun", "clouds", "bread",
    "trains", "dinosaurs", "the seasons", "sleep", "vaccines", "money", "maps",
)
_TEMPLATES = (
    "What is {}?", "Explain {} in simple terms.", "Give me three facts about {}.", "Write a short poem about {}.",
    "Why is {} important?",
)
_OTHER = (
    "Hello!", "Hi, how are you?", "Who are you?", "What can you do?", "Thank you!", "Tell me a joke.",
    "Give me a tip for studying.", "How do I make a cup of tea?", "What should I cook for dinner?",
    "Write a haiku about autumn.", "Suggest a name for a cat.", "How can I sleep better?",
    "What is 10 minus 4?", "What is 6 times 7?", "What is 12 divided by 3?", "Spell the word 'apple'.",
    "What is the largest planet in the solar system?", "How many legs does a spider have?",
    "What do bees make?", "What is the boiling point of water?", "Name three primary colors.",
    "Translate 'thank you' into Spanish.", "What is a synonym for happy?", "Say goodbye politely.",
)


def distill_prompts() -> list[str]:
    prompts = [f"What is the capital of {c}?" for c in _COUNTRIES]
    prompts += [t.format(topic) for topic in _TOPICS for t in _TEMPLATES]
    prompts += list(_OTHER)
    held = {q for q, _ in KNOWLEDGE_CHECK}
    return [p for p in prompts if p not in held]


# -- data mixes -------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)


def _questions(rows: list[dict]) -> int:
    """How many question-answer turns `rows` hold."""
    return sum(len(r["conversations"]) // 2 for r in rows)


def _group(rows: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        grouped[row["image"]].append(row)
    return grouped


def write_mixes(corpus: Path, work: Path, recipe: Recipe) -> dict:
    """align.jsonl (captions), instruct.jsonl (LLaVA conversations, text turns added by
    `distill`), eval_triples.jsonl and eval_captions.jsonl; images stay in the corpus and
    rows name them by absolute path."""
    rng = random.Random(recipe.seed)
    captions = _group(_read_jsonl(corpus / "captions_train.jsonl"))
    triples = _group(_read_jsonl(corpus / "triples_train.jsonl"))

    def image(name: str) -> str:
        return str((corpus / name).resolve())

    # align: one caption per image, images drawn from every source.
    names = sorted(captions)
    align = [
        {"image": image(n), "caption": rng.choice(captions[n])["caption"]}
        for n in rng.sample(names, min(recipe.align_images, len(names)))
    ]

    # instruct: several questions about one scene per conversation, so one image's
    # vision and projector cost is shared by 3-6 supervised answers.
    instruct = _scene_conversations(
        rng, "scene", sorted(triples), triples, captions, image,
        recipe.instruct_conversations, recipe.turns_per_conversation, recipe.describe_share,
    )
    instruct += _single_captions(rng, captions, image, recipe.caption_singles)

    # eval: a seeded sample of the test split (the file is ordered by image).
    test_triples = _read_jsonl(corpus / "triples_test.jsonl")
    eval_triples = [
        {**row, "image": image(row["image"])}
        for row in rng.sample(test_triples, min(recipe.eval_questions, len(test_triples)))
    ]
    test_captions = _group(_read_jsonl(corpus / "captions_test.jsonl"))
    picked = rng.sample(sorted(test_captions), min(recipe.eval_caption_images, len(test_captions)))
    eval_captions = [{**row, "image": image(row["image"])} for n in picked for row in test_captions[n]]

    work.mkdir(parents=True, exist_ok=True)
    _write_jsonl(work / "align.jsonl", align)
    _write_jsonl(work / "instruct_images.jsonl", instruct)
    _write_jsonl(work / "eval_triples.jsonl", eval_triples)
    _write_jsonl(work / "eval_captions.jsonl", eval_captions)
    return {"align": len(align), "instruct_image_conversations": len(instruct),
            "eval_questions": len(eval_triples), "eval_caption_images": len(picked)}


def _single_captions(rng: random.Random, captions: dict[str, list[dict]], image, count: int) -> list[dict]:
    """`count` non-scene images (emoji, clip art, Fashion-MNIST, shapes, words), each one
    "Describe this image." turn answered with one of its captions."""
    singles = sorted(n for n in captions if "/scene/" not in n)
    return [
        _conversation(f"describe:{n}", image(n), [(rng.choice(_DESCRIBE), rng.choice(captions[n])["caption"])])
        for n in rng.sample(singles, min(count, len(singles)))
    ]


def _scene_conversations(
    rng: random.Random, prefix: str, scenes: list[str], triples: dict[str, list[dict]],
    captions: dict[str, list[dict]], image, count: int, turns_range: tuple[int, int], describe_share: float,
) -> list[dict]:
    """`count` scenes drawn from `scenes`, each one conversation of several of its questions
    (so one image's vision and projector cost is shared by all of them), some opening
    with a caption as "Describe this image."."""
    low, high = turns_range
    rows = []
    for n in rng.sample(scenes, min(count, len(scenes))):
        chosen = rng.sample(triples[n], min(rng.randint(low, high), len(triples[n])))
        turns = [(t["question"], t["answer"]) for t in chosen]
        if captions.get(n) and rng.random() < describe_share:
            turns.insert(0, (rng.choice(_DESCRIBE), rng.choice(captions[n])["caption"]))
        rows.append(_conversation(f"{prefix}:{n}", image(n), turns))
    return rows


def _write_with_text_turns(work: Path, name: str, rng: random.Random, rows: list[dict]) -> int:
    """WORK/<name>.jsonl: `rows` and the distilled text turns (WORK/text_turns.jsonl), shuffled;
    returns how many text turns went in."""
    text = _read_jsonl(work / "text_turns.jsonl")
    mixed = rows + text
    rng.shuffle(mixed)
    _write_jsonl(work / f"{name}.jsonl", mixed)
    return len(text)


def _used_scenes(work: Path, mixes: tuple[tuple[str, str], ...]) -> set[str]:
    """Corpus names of the scenes earlier mixes (file, id prefix) already talked about."""
    return {row["id"].removeprefix(prefix) for file, prefix in mixes for row in _read_jsonl(work / file)
            if row["id"].startswith(prefix)}


def _write_fresh_scene_mix(
    corpus: Path, work: Path, name: str, rng: random.Random, used: set[str], conversations: int,
    turns: tuple[int, int], describe_share: float, caption_singles: int = 0,
) -> dict:
    """WORK/<name>.jsonl: conversations about training scenes no earlier mix used, optional
    describe turns on single (non-scene) images, and the distilled text turns, shuffled."""
    triples = _group(_read_jsonl(corpus / "triples_train.jsonl"))
    captions = _group(_read_jsonl(corpus / "captions_train.jsonl"))

    def image(n: str) -> str:
        return str((corpus / n).resolve())

    fresh = sorted(n for n in triples if n not in used)
    rows = _scene_conversations(rng, name, fresh, triples, captions, image, conversations, turns, describe_share)
    scenes = len(rows)
    rows += _single_captions(rng, captions, image, caption_singles)
    text = _write_with_text_turns(work, name, rng, rows)
    return {"scene_conversations": scenes, "questions": sum(len(r["conversations"]) // 2 for r in rows[:scenes]),
            "caption_singles": len(rows) - scenes, "text_turns": text, "fresh_scenes": len(fresh)}


def _mixes_before(name: str) -> tuple[tuple[str, str], ...]:
    """The entries of SCENE_MIXES written before WORK/<name>.jsonl."""
    files = [f for f, _ in SCENE_MIXES]
    return SCENE_MIXES[:files.index(f"{name}.jsonl")]


def write_drill(corpus: Path, work: Path, recipe: Recipe) -> dict:
    """drill.jsonl: long question conversations about training scenes the instruct mix
    did not use, a few opening with a caption, plus the distilled text turns again."""
    used = _used_scenes(work, _mixes_before("drill"))
    return _write_fresh_scene_mix(corpus, work, "drill", random.Random(recipe.seed + 3), used,
                                  recipe.drill_conversations, recipe.drill_turns, recipe.drill_describe_share)


def write_review(corpus: Path, work: Path, recipe: Recipe) -> dict:
    """review.jsonl: scenes neither instruct nor drill used, with (nearly) all their
    questions, single-image captions as in instruct, and the text turns."""
    used = _used_scenes(work, _mixes_before("review"))
    return _write_fresh_scene_mix(corpus, work, "review", random.Random(recipe.seed + 4), used,
                                  recipe.review_conversations, recipe.review_turns, recipe.review_describe_share,
                                  recipe.review_caption_singles)


def objects_in(layout: dict) -> int:
    """How many objects a scene's layout places (copies count: three circles are 3)."""
    return sum(obj["count"] for obj in layout["objects"])


def scenes_of(corpus: Path, split: str, objects: range) -> set[str]:
    """Names of the `split` scenes holding a number of objects in `objects`."""
    return {row["image"] for row in _read_jsonl(corpus / f"layouts_{split}.jsonl") if objects_in(row) in objects}


def questions_of(corpus: Path, split: str, kind: str, scenes: set[str]) -> dict[str, list[dict]]:
    """The triples of type `kind` in `split` about `scenes`, grouped by image in file order."""
    return _group([t for t in _read_jsonl(corpus / f"triples_{split}.jsonl")
                   if t["type"] == kind and t["image"] in scenes])


def one_skill_conversations(rng: random.Random, prefix: str, questions: dict[str, list[dict]], count: int,
                            image) -> list[dict]:
    """`count` scenes drawn from `questions`, each one conversation of all its questions there."""
    return [
        _conversation(f"{prefix}:{n}", image(n), [(t["question"], t["answer"]) for t in questions[n]])
        for n in rng.sample(sorted(questions), min(count, len(questions)))
    ]


def _write_one_skill_mix(corpus: Path, work: Path, name: str, kind: str, scenes: set[str], count: int, seed: int,
                         pool: str) -> dict:
    """WORK/<name>.jsonl: every `kind` question of `count` of the training `scenes`, one
    conversation per scene with the id "<name>:<scene>"; counts, with the scenes to draw
    from under `pool`."""
    root = corpus.resolve()
    questions = questions_of(corpus, "train", kind, scenes)
    rows = one_skill_conversations(random.Random(seed), name, questions, count, lambda n: str(root / n))
    work.mkdir(parents=True, exist_ok=True)
    _write_jsonl(work / f"{name}.jsonl", rows)
    return {"scenes": len(rows), "questions": _questions(rows), pool: len(questions)}


def write_lone(corpus: Path, work: Path, recipe: Recipe) -> dict:
    """lone.jsonl: every position question of `lone_scenes` one-object training scenes,
    one conversation per scene (the same scenes as `bench/lone_objects.py --seed 11` for seed 0)."""
    return _write_one_skill_mix(corpus, work, "lone", "position", scenes_of(corpus, "train", range(1, 2)),
                                recipe.lone_scenes, recipe.seed + 11, pool="one_object_scenes")


def _write_every_skill_mix(corpus: Path, work: Path, name: str, rng: random.Random, used: set[str], conversations: int,
                           turns: tuple[int, int], describe_share: float, replays: tuple[tuple[str, int], ...],
                           caption_singles: int, more=None) -> dict:
    """WORK/<name>.jsonl: `conversations` scenes outside `used` with (nearly) all their
    questions, the rows of `more(rng, taken, image)` (which returns them with their
    counts) if given, for each (mix, n) of `replays` n rows of WORK/<mix>.jsonl again
    (of the questions about scenes it holds), single-image captions and the text turns,
    shuffled; returns the counts."""
    root = corpus.resolve()

    def image(n: str) -> str:
        return str(root / n)

    triples = _group(_read_jsonl(corpus / "triples_train.jsonl"))
    captions = _group(_read_jsonl(corpus / "captions_train.jsonl"))
    fresh = sorted(n for n in triples if n not in used)
    rows = _scene_conversations(rng, name, fresh, triples, captions, image, conversations, turns, describe_share)
    extra, extra_counts = more(rng, used | {r["id"].removeprefix(f"{name}:") for r in rows}, image) if more else ([], {})
    again: dict[str, list[dict]] = {}
    present = {r["id"] for r in rows + extra}
    for mix, n in replays:  # not the text turns or captions a mix shares, nor a row twice (a mix replayed in another)
        earlier = [r for r in _read_jsonl(work / f"{mix}.jsonl")
                   if r["id"].split(":")[0] not in ("text", "describe") and r["id"] not in present]
        again[mix] = rng.sample(earlier, min(n, len(earlier)))
        present |= {r["id"] for r in again[mix]}
    singles = _single_captions(rng, captions, image, caption_singles)
    text = _write_with_text_turns(work, name, rng, rows + extra + [r for part in again.values() for r in part] + singles)
    return {"scene_conversations": len(rows), "scene_questions": _questions(rows),
            **{f"{mix}_replay": len(part) for mix, part in again.items()},
            "caption_singles": len(singles), "text_turns": text, "fresh_scenes": len(fresh),
            **extra_counts}


def write_consolidate(corpus: Path, work: Path, recipe: Recipe) -> dict:
    """consolidate.jsonl: scenes no earlier mix used with (nearly) all their questions, the
    position questions of other such scenes of 2-6 objects, a replay of the lone mix,
    single-image captions and the text turns, shuffled."""

    def placing(rng: random.Random, taken: set[str], image) -> tuple[list[dict], dict]:
        crowded = scenes_of(corpus, "train", range(2, 100)) - taken
        rows = one_skill_conversations(rng, "place", questions_of(corpus, "train", "position", crowded),
                                       recipe.consolidate_position_scenes, image)
        return rows, {"position_scenes": len(rows), "position_questions": _questions(rows)}

    return _write_every_skill_mix(
        corpus, work, "consolidate", random.Random(recipe.seed + 5), _used_scenes(work, _mixes_before("consolidate")),
        recipe.consolidate_conversations, recipe.consolidate_turns, recipe.consolidate_describe_share,
        (("lone", recipe.consolidate_lone_replay),), recipe.consolidate_caption_singles, more=placing)


def write_crowd(corpus: Path, work: Path, recipe: Recipe) -> dict:
    """crowd.jsonl: every position question of `crowd_scenes` training scenes of 2 or more
    objects that no earlier mix used, one conversation per scene (for seed 0 the scenes of
    `bench/skill_alone.py --type position --min-objects 2 --scenes 12000 --seed 21`)."""
    fresh = scenes_of(corpus, "train", range(2, 100)) - _used_scenes(work, _mixes_before("crowd"))
    return _write_one_skill_mix(corpus, work, "crowd", "position", fresh, recipe.crowd_scenes, recipe.seed + 21,
                                pool="fresh_crowded_scenes")


def write_recall(corpus: Path, work: Path, recipe: Recipe) -> dict:
    """recall.jsonl: every skill again after the crowd stage: scenes no earlier mix used
    with (nearly) all their questions, a replay of the crowd mix, single-image captions
    and the text turns, shuffled."""
    return _write_every_skill_mix(
        corpus, work, "recall", random.Random(recipe.seed + 31), _used_scenes(work, _mixes_before("recall")),
        recipe.recall_conversations, recipe.recall_turns, recipe.recall_describe_share,
        (("crowd", recipe.recall_crowd_replay),), recipe.recall_caption_singles)


def write_tally(corpus: Path, work: Path, recipe: Recipe) -> dict:
    """tally.jsonl: every count question of `tally_scenes` training scenes that no earlier
    mix used, one conversation per scene (for seed 0 the scenes of `bench/skill_alone.py
    --type count --scenes 12000 --seed 21` run after the recall stage)."""
    fresh = scenes_of(corpus, "train", range(1, 100)) - _used_scenes(work, _mixes_before("tally"))
    return _write_one_skill_mix(corpus, work, "tally", "count", fresh, recipe.tally_scenes, recipe.seed + 21,
                                pool="fresh_scenes")


def write_recount(corpus: Path, work: Path, recipe: Recipe) -> dict:
    """recount.jsonl: every skill again after the tally stage: scenes no earlier mix used
    with (nearly) all their questions, replays of the tally and crowd mixes, single-image
    captions and the text turns, shuffled."""
    return _write_every_skill_mix(
        corpus, work, "recount", random.Random(recipe.seed + 41), _used_scenes(work, _mixes_before("recount")),
        recipe.recount_conversations, recipe.recount_turns, recipe.recount_describe_share,
        (("tally", recipe.recount_tally_replay), ("crowd", recipe.recount_crowd_replay)),
        recipe.recount_caption_singles)


def write_tint(corpus: Path, work: Path, recipe: Recipe) -> dict:
    """tint.jsonl: the colour questions of `tint_scenes` training scenes of 2 or more
    objects, one conversation per scene, drawn from all of them whether an earlier mix
    used the scene or not: few fresh ones are left (for seed 0, 5,362 of the 6,000 drawn
    had been in an earlier mix, some with this same question among the others)."""
    crowded = scenes_of(corpus, "train", range(2, 100))
    return _write_one_skill_mix(corpus, work, "tint", "color", crowded, recipe.tint_scenes, recipe.seed + 51,
                                pool="crowded_scenes")


def write_retint(corpus: Path, work: Path, recipe: Recipe) -> dict:
    """retint.jsonl: every skill again after the tint stage: scenes no earlier mix used
    with (nearly) all their questions, replays of the tint, tally and crowd mixes,
    single-image captions and the text turns, shuffled."""
    return _write_every_skill_mix(
        corpus, work, "retint", random.Random(recipe.seed + 61), _used_scenes(work, _mixes_before("retint")),
        recipe.retint_conversations, recipe.retint_turns, recipe.retint_describe_share,
        (("tint", recipe.retint_tint_replay), ("tally", recipe.retint_tally_replay),
         ("crowd", recipe.retint_crowd_replay)), recipe.retint_caption_singles)


def layouts_of(corpus: Path, split: str) -> dict[str, dict]:
    """The `split` scene layouts (what is in which cell), by corpus image name."""
    return {row["image"]: row for row in _read_jsonl(corpus / f"layouts_{split}.jsonl")}


def naming_turns(rng: random.Random, layout: dict) -> list[tuple[str, str]]:
    """"What is in the <cell>?" for every object of the scene, in random order, and "What is
    shown in the image?" last when it holds one kind of object (the corpus's own wording
    and answers, so the eval's object questions are these)."""
    placed = [(cell, obj["name"]) for obj in layout["objects"] for cell in obj["cells"]]
    rng.shuffle(placed)
    turns = [(ask(rng, "at", cell=cell), article(name)) for cell, name in placed]
    if len(layout["objects"]) == 1:
        only = layout["objects"][0]
        turns.append((ask(rng, "only"), counted(only["name"], only["count"])))
    return turns


def lookalike_turns(rng: random.Random, layout: dict, known: dict[str, str]) -> list[tuple[str, str]]:
    """For each shape and garment of the scene, "Is there <it>?" (yes) and the same about a
    look-alike the scene lacks (no): its colour in another shape, or another garment that
    shares no word with anything present, as the corpus's own "no" questions avoid "shirt"
    next to a "t-shirt". `known` maps the names training scenes show to their kind, so a
    held-out shape and colour pair is never named. Random order, as many yes as no."""
    present = [obj["name"] for obj in layout["objects"]]
    taken = set().union(*(Item("", "", name).words() for name in present))
    garments = sorted(name for name, kind in known.items() if kind == "fashion")
    turns = []
    for obj in layout["objects"]:
        if obj["kind"] == "shape":
            alike = [f'{obj["color"]} {shape}' for shape in SHAPES if shape != obj["key"]]
        elif obj["kind"] == "fashion":
            alike = [name for name in garments if not Item("", "", name).words() & taken]
        else:
            continue
        alike = [name for name in alike if name in known and name not in present]
        if alike:
            turns += [(ask(rng, "present", a_name=article(obj["name"])), "yes"),
                      (ask(rng, "present", a_name=article(rng.choice(alike))), "no")]
    rng.shuffle(turns)
    return turns


def _write_telling_mix(corpus: Path, work: Path, name: str, seed: int, used: set[str], naming_scenes: int,
                       lookalike_scenes: int, conversations: int, turns: tuple[int, int], describe_share: float,
                       replays: tuple[tuple[str, int], ...], caption_singles: int, ids: str = "") -> dict:
    """WORK/<name>.jsonl: what each object is, kept apart from what it looks like. Every
    object of `naming_scenes` training scenes named by its cell, yes/no questions about
    the shapes and garments of `lookalike_scenes` other ones and about look-alikes they
    lack (both drawn from every training scene, used before or not, as tint's were), scenes
    outside `used` with (nearly) all their questions, the `replays`, single-image captions
    and the text turns, shuffled. The naming and look-alike rows' ids start with `ids`, which keeps
    them apart from an earlier telling mix's rows replayed here about the same scene."""
    layouts = layouts_of(corpus, "train")
    known = {obj["name"]: obj["kind"] for row in layouts.values() for obj in row["objects"]}

    def telling(rng: random.Random, taken: set[str], image) -> tuple[list[dict], dict]:
        drawn = rng.sample(sorted(layouts), min(naming_scenes + lookalike_scenes, len(layouts)))
        naming = [_conversation(f"{ids}name:{n}", image(n), naming_turns(rng, layouts[n])) for n in drawn[:naming_scenes]]
        lookalike = [_conversation(f"{ids}alike:{n}", image(n), asked) for n in drawn[naming_scenes:]
                     if (asked := lookalike_turns(rng, layouts[n], known))]
        return naming + lookalike, {"naming_scenes": len(naming), "naming_questions": _questions(naming),
                                    "lookalike_scenes": len(lookalike), "lookalike_questions": _questions(lookalike)}

    return _write_every_skill_mix(corpus, work, name, random.Random(seed), used, conversations, turns, describe_share,
                                  replays, caption_singles, more=telling)


def write_discern(corpus: Path, work: Path, recipe: Recipe) -> dict:
    """discern.jsonl: the telling mix after retint, with the tint, tally and crowd mixes replayed."""
    return _write_telling_mix(
        corpus, work, "discern", recipe.seed + 71, _used_scenes(work, _mixes_before("discern")),
        recipe.discern_naming_scenes, recipe.discern_lookalike_scenes, recipe.discern_conversations, recipe.discern_turns, recipe.discern_describe_share,
        (("tint", recipe.discern_tint_replay), ("tally", recipe.discern_tally_replay),
         ("crowd", recipe.discern_crowd_replay)), recipe.discern_caption_singles)


# How many questions of each type a survey conversation asks at most (None: all of
# them); the presence questions are all the "yes" ones and as many "no" ones.
SURVEY_LIMITS = {"count": None, "color": None, "position": None, "relation": 4, "object": 2, "read": 1}
# census's: every object named by its cell, and more relations.
CENSUS_LIMITS = {**SURVEY_LIMITS, "relation": 6, "object": None}


def holdouts_of(corpus: Path) -> Holdouts:
    """The combinations the corpus kept out of training (its manifest.json)."""
    held = json.loads((corpus / "manifest.json").read_text())["holdouts"]
    return Holdouts(tuple(tuple(p) for p in held["shape_colors"]), tuple(tuple(p) for p in held["object_counts"]))


def survey_turns(rng: random.Random, layout: dict, vocabulary, holdouts: Holdouts,
                 no_per_yes: float = 1.0, limits: dict[str, int | None] = SURVEY_LIMITS) -> list[tuple[str, str]]:
    """Every question the scene's layout supports (`scene_questions`, up to `limits`
    per type; "is there ...?" about as many present things as absent ones, and up to
    `no_per_yes` absent ones per present one, never naming a held-out pair), in random
    order: all skills interleaved about one image."""
    pools = scene_questions(rng, scene_from_layout(layout), vocabulary, holdouts)
    yes, no = pools.pop("yes"), pools.pop("no")
    n = min(len(yes), len(no))
    turns = rng.sample(yes, n) + rng.sample(no, min(len(no), round(n * no_per_yes)))
    for kind, limit in limits.items():
        pool = pools[kind]
        turns += rng.sample(pool, len(pool) if limit is None else min(limit, len(pool)))
    rng.shuffle(turns)
    return turns


def _write_survey_mix(corpus: Path, work: Path, name: str, rng: random.Random, scenes: int, used: set[str],
                      no_per_yes: float, caption_singles: int, crowded_share: float | None = None,
                      limits: dict[str, int | None] = SURVEY_LIMITS) -> dict:
    """WORK/<name>.jsonl: `scenes` training scenes outside `used`, each one conversation
    of `survey_turns`, with single-image captions and the text turns, shuffled. With
    `crowded_share`, that share of the scenes holds CROWDED or more objects."""
    root = corpus.resolve()

    def image(n: str) -> str:
        return str(root / n)

    layouts = layouts_of(corpus, "train")
    vocabulary = vocabulary_of(list(layouts.values()))
    holdouts = holdouts_of(corpus)
    pool = sorted(set(layouts) - used)
    if crowded_share is None:
        drawn = rng.sample(pool, min(scenes, len(pool)))
    else:
        crowded = [n for n in pool if objects_in(layouts[n]) >= CROWDED]
        sparse = sorted(set(pool) - set(crowded))
        many = min(round(scenes * crowded_share), len(crowded))
        drawn = rng.sample(crowded, many) + rng.sample(sparse, min(scenes - many, len(sparse)))
    rows = [_conversation(f"{name}:{n}", image(n),
                          survey_turns(rng, layouts[n], vocabulary, holdouts, no_per_yes, limits)) for n in drawn]
    singles = _single_captions(rng, _group(_read_jsonl(corpus / "captions_train.jsonl")), image, caption_singles)
    text = _write_with_text_turns(work, name, rng, rows + singles)
    counts = {"scenes": len(rows), "questions": _questions(rows), "caption_singles": len(singles), "text_turns": text}
    if crowded_share is not None:
        counts["crowded_scenes"] = many
    return counts


def write_survey(corpus: Path, work: Path, recipe: Recipe) -> dict:
    """survey.jsonl: `survey_scenes` training scenes drawn from all of them, yes/no balanced."""
    return _write_survey_mix(corpus, work, "survey", random.Random(recipe.seed + 81), recipe.survey_scenes, set(),
                             1.0, recipe.survey_caption_singles)


def write_resurvey(corpus: Path, work: Path, recipe: Recipe) -> dict:
    """resurvey.jsonl: `resurvey_scenes` training scenes that survey.jsonl did not ask about,
    up to `resurvey_no_per_yes` absent-thing questions per present one."""
    return _write_survey_mix(corpus, work, "resurvey", random.Random(recipe.seed + 91), recipe.resurvey_scenes,
                             _used_scenes(work, (("survey.jsonl", "survey:"),)), recipe.resurvey_no_per_yes,
                             recipe.resurvey_caption_singles)


CROWDED = 4  # objects in a scene from which counting fell below 65 % after resurvey


def write_census(corpus: Path, work: Path, recipe: Recipe) -> dict:
    """census.jsonl: `census_scenes` training scenes neither survey.jsonl nor resurvey.jsonl
    asked about, `census_crowded_share` of them crowded, each asked the survey way with
    CENSUS_LIMITS and up to `census_no_per_yes` absent-thing questions per present one."""
    return _write_survey_mix(corpus, work, "census", random.Random(recipe.seed + 101), recipe.census_scenes,
                             _used_scenes(work, (("survey.jsonl", "survey:"), ("resurvey.jsonl", "resurvey:"))),
                             recipe.census_no_per_yes, recipe.census_caption_singles, recipe.census_crowded_share,
                             CENSUS_LIMITS)


def naming_rows(corpus: Path, rng: random.Random, used: set[str], text: list[dict], scenes: int, every_skill: int,
                captions: int, lookalike_share: float, colour: bool, presence: int) -> tuple[list[dict], dict]:
    """The naming mix, shuffled, and its counts: `scenes` training scenes outside `used`
    each one conversation asking what is in the cell of every object it holds (and "What
    is shown in the image?" when it holds one kind), `lookalike_share` of them also
    `lookalike_turns`; with `colour` every colour question the scene supports, and up to
    `presence` "is there ...?" about what it holds and as many about what it lacks, any
    kind of object; then `every_skill` more scenes asked everything the census way,
    `captions` single-image captions and the `text` turns."""
    root = corpus.resolve()

    def image(n: str) -> str:
        return str(root / n)

    layouts = layouts_of(corpus, "train")
    known = {obj["name"]: obj["kind"] for row in layouts.values() for obj in row["objects"]}
    fresh = sorted(set(layouts) - used)
    if len(fresh) < scenes + every_skill:
        raise UserFacingError(f"only {len(fresh)} training scenes are fresh; ask for fewer than {scenes} + {every_skill}")
    drawn = rng.sample(fresh, scenes + every_skill)
    vocabulary, holdouts = vocabulary_of(list(layouts.values())), holdouts_of(corpus)
    naming = []
    for n in drawn[:scenes]:
        turns = naming_turns(rng, layouts[n])
        if rng.random() < lookalike_share:
            turns += lookalike_turns(rng, layouts[n], known)
        if colour or presence:
            pools = scene_questions(rng, scene_from_layout(layouts[n]), vocabulary, holdouts)
            if colour:
                turns += pools["color"]
            k = min(presence, len(pools["yes"]), len(pools["no"]))
            turns += rng.sample(pools["yes"], k) + rng.sample(pools["no"], k)
        rng.shuffle(turns)
        naming.append(_conversation(f"name:{n}", image(n), turns))
    every = [_conversation(f"every:{n}", image(n), survey_turns(rng, layouts[n], vocabulary, holdouts,
                                                                 Recipe().census_no_per_yes, CENSUS_LIMITS))
             for n in drawn[scenes:]]
    singles = _single_captions(rng, _group(_read_jsonl(corpus / "captions_train.jsonl")), image, captions)
    rows = naming + every + singles + text
    rng.shuffle(rows)
    answers = [t["value"] for r in naming for t in r["conversations"][1::2]]
    return rows, {"fresh_scenes": len(fresh), "naming_scenes": len(naming), "naming_questions": _questions(naming),
                  "yes_no_questions": sum(a in ("yes", "no") for a in answers),
                  "yes_answers": sum(a == "yes" for a in answers),
                  "every_skill_scenes": len(every), "every_skill_questions": _questions(every),
                  "caption_singles": len(singles), "text_turns": len(text)}


def trained_mixes(skip: tuple[str, ...], mixes: tuple[tuple[str, str], ...] | None = None) -> tuple[tuple[str, str], ...]:
    """The entries of `mixes` (default SCENE_MIXES) of stages that trained: a stage the
    recipe skips wrote its mix, but no model saw those scenes."""
    return tuple((f, prefix) for f, prefix in (SCENE_MIXES if mixes is None else mixes)
                 if f.removesuffix(".jsonl") not in skip)


def _write_naming_mix(corpus: Path, work: Path, recipe: Recipe, name: str, seed: int, scenes: int, every_skill: int,
                      captions: int) -> dict:
    """WORK/<name>.jsonl: `naming_rows` (with the recipe's naming kinds of question) on
    training scenes no stage before it that trained asked about."""
    rows, counts = naming_rows(
        corpus, random.Random(seed), _used_scenes(work, trained_mixes(recipe.skip, _mixes_before(name))),
        _read_jsonl(work / "text_turns.jsonl"), scenes, every_skill, captions, recipe.naming_lookalike_share,
        recipe.naming_colour, recipe.naming_presence)
    _write_jsonl(work / f"{name}.jsonl", rows)
    return counts


def write_naming(corpus: Path, work: Path, recipe: Recipe) -> dict:
    """naming.jsonl: `naming_rows` on training scenes no stage that trained asked about."""
    return _write_naming_mix(corpus, work, recipe, "naming", recipe.seed + 31, recipe.naming_scenes,
                             recipe.naming_every_skill, recipe.naming_caption_singles)


CELL_INDEX = {name: cell for cell, name in CELL_NAMES.items()}  # "top left" -> (0, 0)


def cell_labels(layout: dict) -> dict[str, list[str | None]]:
    """What each cell of a scene holds, in raster order, as the sharpen stage's heads learn
    it: "object" is "empty", "emoji" (about a thousand names, a dozen training scenes each:
    only the kind is learned) or kind:key ("shape:star", "fashion:sandal",
    "clipart:arrow"); "colour" is a shape's colour, null elsewhere (not scored)."""
    objects: list[str | None] = ["empty"] * CELLS_PER_SIDE**2
    colours: list[str | None] = [None] * CELLS_PER_SIDE**2
    for obj in layout["objects"]:
        for cell in obj["cells"]:
            row, col = CELL_INDEX[cell]
            objects[row * CELLS_PER_SIDE + col] = "emoji" if obj["kind"] == "emoji" else f"{obj['kind']}:{obj['key']}"
            if obj["kind"] == "shape":
                colours[row * CELLS_PER_SIDE + col] = obj["color"]
    return {"object": objects, "colour": colours}


def write_sharpen(corpus: Path, work: Path, recipe: Recipe) -> dict:
    """sharpen.jsonl: the cell labels of every training scene; sharpen_val.jsonl: those of
    the first `sharpen_val_scenes` validation scenes (image paths absolute)."""
    counts = {}
    for split, name, limit in (("train", "sharpen", None), ("val", "sharpen_val", recipe.sharpen_val_scenes)):
        rows = [{"image": str((corpus / n).resolve()), "labels": cell_labels(layout)}
                for n, layout in list(layouts_of(corpus, split).items())[:limit]]
        _write_jsonl(work / f"{name}.jsonl", rows)
        counts[f"{split}_scenes"] = len(rows)
    return counts


def write_rename(corpus: Path, work: Path, recipe: Recipe) -> dict:
    """rename.jsonl: `naming_rows` again, `rename_scenes` + `rename_every_skill` training
    scenes no stage that trained asked about (naming's included)."""
    return _write_naming_mix(corpus, work, recipe, "rename", recipe.seed + 32, recipe.rename_scenes,
                             recipe.rename_every_skill, recipe.rename_caption_singles)


# The stages that write their own data file before they train, in build order.
MIX_WRITERS = {"drill": write_drill, "review": write_review, "lone": write_lone, "consolidate": write_consolidate,
               "crowd": write_crowd, "recall": write_recall, "tally": write_tally, "recount": write_recount,
               "tint": write_tint, "retint": write_retint, "discern": write_discern, "survey": write_survey,
               "resurvey": write_resurvey, "census": write_census, "naming": write_naming, "sharpen": write_sharpen,
               "rename": write_rename}
# Stages that train the vision tower alone on labels (`vlm-chat train --stage sharpen`), not
# the LLM on conversations: their scenes stay fresh for the mixes after them.
TOWER_STAGES = ("sharpen",)


def stage_files(stage: str) -> tuple[str, ...]:
    """The data files a stage's writer puts in WORK."""
    return (f"{stage}.jsonl", *((f"{stage}_val.jsonl",) if stage in TOWER_STAGES else ()))


# Every mix of the build that talks about training scenes, in build order, as (file in
# WORK, id prefix of its scene conversations): a later mix takes scenes none before used.
# scene ids not named after their stage
MORE_PREFIXES = {"consolidate": ("place:",), "naming": ("name:", "every:"), "rename": ("name:", "every:")}
SCENE_MIXES = (("instruct_images.jsonl", "scene:"),
               *((f"{stage}.jsonl", prefix) for stage in MIX_WRITERS if stage not in TOWER_STAGES
                 for prefix in (f"{stage}:", *MORE_PREFIXES.get(stage, ()))))
# What each stage writes into WORK, deleted when the stage must run again.
STAGE_OUTPUTS = {"clip": ("clip", "clip_captions.jsonl"), "align": ("align",), "instruct": ("instruct",),
                 **{stage: (stage, *stage_files(stage)) for stage in MIX_WRITERS}, "eval": ("eval",)}


_DESCRIBE = (
    "Describe this image.", "Describe the image briefly.", "What is shown in this picture?",
    "Give a short caption for this image.", "What do you see?",
)


def _conversation(conversation_id: str, image: str | None, turns: list[tuple[str, str]]) -> dict:
    messages = []
    for index, (question, answer) in enumerate(turns):
        prefix = f"{IMAGE}\n" if image and index == 0 else ""
        messages += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
    row = {"id": conversation_id, "conversations": messages}
    if image:
        row["image"] = image
    return row


def _trim_to_sentence(text: str) -> str:
    text = text.strip()
    if text.endswith((".", "!", "?")):
        return text
    cut = max(text.rfind(". "), text.rfind("! "), text.rfind("? "), text.rfind(".\n"))
    return text[: cut + 1] if cut > 0 else text


def _repeats_itself(text: str, n: int = 4, limit: int = 2) -> bool:
    """Degenerate loops ("a coin of gold, a coin of gold, ...") are not worth learning."""
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return any(grams.count(g) > limit for g in set(grams))


def distill_text_turns(bundle: Path, work: Path, recipe: Recipe, batch_size: int = 16, max_new_tokens: int = 160) -> dict:
    """The base LLM's own greedy answers to general prompts, as text-only turns (and the
    same turns with an unrelated image attached), appended to the instruct mix."""
    from vlm_chat.generation import GenerationSettings, generate_batch
    from vlm_chat.model import VisionLanguageModel

    prompts = distill_prompts()
    cache = work / "distill_answers.json"  # generation is the slow part; a rerun reuses it
    cached = json.loads(cache.read_text()) if cache.is_file() else {}
    if cached.get("prompts") == prompts and cached.get("max_new_tokens") == max_new_tokens:
        answers = cached["answers"]
    else:
        model, processor = VisionLanguageModel.from_pretrained(str(bundle), device="cpu", quantization="none")
        settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0)
        answers = []
        for start in range(0, len(prompts), batch_size):
            batch = [[{"role": "user", "content": p}] for p in prompts[start : start + batch_size]]
            answers += generate_batch(model, processor, batch, settings)
            print(f"distill: {len(answers)}/{len(prompts)} prompts answered", flush=True)
        cache.write_text(json.dumps({"prompts": prompts, "max_new_tokens": max_new_tokens, "answers": answers}, indent=1))
    turns = [(p, _trim_to_sentence(a)) for p, a in zip(prompts, answers)]
    turns = [(p, a) for p, a in turns if a and not _repeats_itself(a)]
    rng = random.Random(recipe.seed + 1)
    images = [row["image"] for row in _read_jsonl(work / "align.jsonl")]
    rows = []
    for copy in range(recipe.text_copies):
        for index, (prompt, answer) in enumerate(turns):
            attached = rng.choice(images) if copy % 2 == 1 else None
            rows.append(_conversation(f"text:{copy}:{index}", attached, [(prompt, answer)]))
    _write_jsonl(work / "text_turns.jsonl", rows)
    instruct = _read_jsonl(work / "instruct_images.jsonl") + rows
    random.Random(recipe.seed + 2).shuffle(instruct)
    _write_jsonl(work / "instruct.jsonl", instruct)
    return {"prompts": len(prompts), "text_turns": len(rows), "instruct_rows": len(instruct)}


# -- knowledge check ----------------------------------------------------------------------


def knowledge_check(bundle: Path, image: str | None) -> dict:
    """General questions held out of training, asked with an image attached: does the
    tuned LLM still know that the capital of France is Paris?"""
    from vlm_chat.generation import GenerationSettings, generate_batch
    from vlm_chat.images import load_image
    from vlm_chat.model import VisionLanguageModel

    model, processor = VisionLanguageModel.from_pretrained(str(bundle), device="cpu", quantization="none")
    attached = load_image(image) if image else None
    conversations = []
    for question, _ in KNOWLEDGE_CHECK:
        content = [{"type": "image", "image": attached}, {"type": "text", "text": question}] if attached else question
        conversations.append([{"role": "user", "content": content}])
    answers = generate_batch(model, processor, conversations, GenerationSettings(max_new_tokens=48))
    items = [
        {"question": q, "expected": word, "answer": a, "hit": word in a.lower()}
        for (q, word), a in zip(KNOWLEDGE_CHECK, answers)
    ]
    return {"image_attached": bool(attached), "hits": sum(i["hit"] for i in items), "n": len(items), "items": items}


# -- the build ------------------------------------------------------------------------------


def _flags(settings: dict) -> list[str]:
    argv = []
    for key, value in settings.items():
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, bool):  # a switch: given or not
            argv += [flag] if value else []
        else:
            argv += [flag, str(value)]
    return argv


def _cli(argv: list[str]) -> None:
    from cli.main import main  # the recipe is a sequence of the documented commands

    print("$ vlm-chat " + " ".join(argv), flush=True)
    code = main(argv)
    if code == 130:  # interrupted (Ctrl-C, SIGINT): a training stage saved its checkpoint; not a failure
        raise KeyboardInterrupt(f"`vlm-chat {argv[0]}` interrupted; run the same command again to resume")
    if code:
        raise UserFacingError(f"`vlm-chat {' '.join(argv)}` failed (exit {code}); fix the cause and run the build again")


@dataclass
class BuildPaths:
    work: Path
    corpus: Path
    clip: str  # "shipped" or "train"
    out: Path

    @property
    def clip_dir(self) -> Path:
        return SHIPPED_CLIP if self.clip == "shipped" else self.work / "clip" / "final"


def is_shape_caption(row: dict) -> bool:
    """Whether a corpus caption row describes a single-shape image (the corpus's shape/ folder)."""
    return "/shape/" in f"/{row['image']}"


def write_captions(corpus: Path, out: Path, rows: list[dict]) -> None:
    """`out`: the caption rows of `corpus`, with image paths made absolute so the file can live anywhere."""
    root = corpus.resolve()
    _write_jsonl(out, [{"image": str(root / r["image"]), "caption": r["caption"]} for r in rows])


def write_clip_captions(corpus: Path, out: Path, shape_copies: int, seed: int) -> dict:
    """`out`: every training caption of the corpus, plus `shape_copies` more of each caption
    of a single-shape image, shuffled; image paths absolute. Lone shapes in the 8 colours
    are then a larger share of each batch, where colour alone cannot match their captions."""
    rows = _read_jsonl(corpus / "captions_train.jsonl")
    shapes = [r for r in rows if is_shape_caption(r)]
    mixed = rows + shapes * shape_copies
    random.Random(seed).shuffle(mixed)
    write_captions(corpus, out, mixed)
    return {"captions": len(rows), "shape_captions": len(shapes), "pairs": len(mixed)}


def corpus_command(corpus: Path, recipe: Recipe) -> list[str]:
    """`vlm-chat corpus build` of the corpus a recipe's build reads (all its other settings the defaults)."""
    return ["corpus", "build", "--out", str(corpus), "--seed", str(recipe.seed)]


def clip_command(corpus: Path, out: Path, recipe: Recipe) -> list[str]:
    """`vlm-chat train --stage clip` into OUT/clip, on the corpus captions or, with shape
    copies, on OUT/clip_captions.jsonl (`write_clip_captions` writes it), held out on the
    corpus's val captions."""
    data = ["--data", str(corpus / "captions_train.jsonl")]
    if recipe.clip_shape_copies:  # clip_captions_val.jsonl beside it does not exist
        data = ["--data", str(out / "clip_captions.jsonl"), "--val", str(corpus / "captions_val.jsonl")]
    return [
        "train", "--stage", "clip", *data, "--out", str(out / "clip"),
        "--image-size", str(recipe.clip_image_size), "--patch-size", str(recipe.clip_patch_size),
        "--vision-width", "256", "--vision-layers", "6", "--text-width", "256", "--text-layers", "4",
        "--projection-dim", "256", "--vocab-size", "4096", "--max-text-len", "32", *([] if recipe.clip_augment else ["--no-augment"]),
        "--batch-size", "128", "--max-steps", str(recipe.clip_steps), "--lr", "5e-4",
        "--warmup", str(min(100, recipe.clip_steps // 10)),
        "--weight-decay", "0.1", "--eval-every", "200", "--eval-max-batches", "8", "--save-every-minutes", "5",
        "--log-every", "10", "--seed", str(recipe.seed), "--resume",
    ]


def trained_stages(recipe: Recipe) -> tuple[str, ...]:
    """The training stages that train in `recipe`, in build order: all but its `skip`."""
    unknown = [stage for stage in recipe.skip if stage not in MIX_WRITERS]
    if unknown:
        raise UserFacingError(f"cannot skip {', '.join(unknown)}: only the stages after instruct can be "
                              f"skipped ({', '.join(MIX_WRITERS)})")
    return tuple(stage for stage in TRAINING_STAGES if stage not in recipe.skip and not stage_off(recipe, stage))


# Stages a recipe field turns on; off, they neither write their data nor train.
OPTIONAL_STAGES = {"sharpen": "sharpen_tower", "rename": "sharpen_tower"}


def stage_off(recipe: Recipe, stage: str) -> bool:
    return stage in OPTIONAL_STAGES and not getattr(recipe, OPTIONAL_STAGES[stage])


def stage_commands(paths: BuildPaths, recipe: Recipe) -> dict[str, list[str]]:
    """The CLI command each training stage runs (also printed, so any one can be rerun by hand).
    A stage the recipe skips has none: the next one goes on from the bundle of the last
    stage before it that trained."""
    w = paths.work
    chain = trained_stages(recipe)

    def train(kind: str, stage: str, after: str, settings: dict) -> list[str]:
        """`vlm-chat train` of one stage: from the bundle `after` left, on WORK/<stage>.jsonl."""
        if stage in TOWER_STAGES:  # no shared loop: no checkpoints, precision or held-out share of its own
            return ["train", "--stage", "sharpen", "--model", str(w / after), "--data", str(w / f"{stage}.jsonl"),
                    "--val", str(w / f"{stage}_val.jsonl"), "--out", str(w / stage), "--seed", str(recipe.seed),
                    *_flags(settings)]
        return ["train", "--stage", kind, "--model", str(w / after), "--data", str(w / f"{stage}.jsonl"),
                "--out", str(w / stage), "--seed", str(recipe.seed), "--resume",
                *_flags({"mixed_precision": recipe.mixed_precision, **settings})]

    return {
        "corpus": corpus_command(paths.corpus, recipe),
        "clip": clip_command(paths.corpus, w, recipe),
        "bundle": bundle_command(paths, recipe),
        "align": train("align", "align", after="bundle", settings=recipe.align),
        "instruct": train("instruct", "instruct", after="align", settings=recipe.instruct),
        # each stage with its own mix goes on from the bundle the training stage before it left
        **{stage: train("instruct", stage, after=before, settings=getattr(recipe, stage))
           for before, stage in zip(chain[1:], chain[2:])},
        "eval": eval_command(w / chain[-1], w, w / "eval", recipe.eval_batch_size),
    }


def bundle_command(paths: BuildPaths, recipe: Recipe, vision: Path | None = None) -> list[str]:
    """`vlm-chat build` of the untrained bundle into WORK/bundle, on the build's CLIP or on `vision`."""
    return ["build", "--vision", str(vision or paths.clip_dir), "--llm", recipe.llm, "--projector", recipe.projector,
            "--token-reduction", recipe.token_reduction, "--reduction-factor", str(recipe.reduction_factor),
            "--image-tiles", str(0 if recipe.tiles_after_align else recipe.image_tiles), "--seed", str(recipe.seed),
            "--out", str(paths.work / "bundle")]


def eval_command(bundle: Path, data: Path, dest: Path, batch_size: int) -> list[str]:
    """`vlm-chat eval` of `bundle` on the test files the mix stage wrote into `data`."""
    return ["eval", "--model", str(bundle), "--data", str(data / "eval_triples.jsonl"), str(data / "eval_captions.jsonl"),
            "--batch-size", str(batch_size), "--out", str(dest)]


def knowledge_hits(result: dict) -> dict[str, str]:
    """A knowledge.json's checks as "hits/n" each (what the build records for its eval)."""
    return {k: f"{v['hits']}/{v['n']}" for k, v in result.items()}


def evaluate_bundle(bundle: Path, data: Path, dest: Path, batch_size: int, baseline: Path | None = None) -> dict:
    """`eval_command`, then the general questions asked of `bundle` with an image attached (and
    of `baseline` without one) into DEST/knowledge.json, the last file written; hits per check."""
    _cli(eval_command(bundle, data, dest, batch_size))
    first_image = _read_jsonl(data / "eval_triples.jsonl")[0]["image"]
    result = {"tuned_with_image": knowledge_check(bundle, first_image)}
    if baseline is not None:
        result["base_without_image"] = knowledge_check(baseline, None)
    (dest / "knowledge.json").write_text(json.dumps(result, indent=1))
    return knowledge_hits(result)


# The step runner of the experiments that rerun build stages (bench/aligned_grid.py,
# bench/cell_tiles.py): each step once, in order, skipped when the file it writes last
# exists, so a rerun resumes where the last one stopped. A training stage trains on a
# copy of the base build's mix for it (same data and order as the build's model had),
# and an eval follows the stages where MODEL_CARD.md reports the build's own model.
BENCH_EVAL_AFTER = ("drill", "consolidate", "recall", "recount", "retint", "discern", "survey", "resurvey", "census",
                    "naming")
BENCH_EVALS = {"eval": ("instruct", "eval"),  # step: (bundle, its eval dir)
               **{f"{stage}-eval": (stage, f"eval_{stage}") for stage in BENCH_EVAL_AFTER}}


def bench_later_steps(skip: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The steps after instruct's eval: each later stage not in `skip` nor optional (the bench
    runs the tiles line, where those are off), and its eval if it has one."""
    return tuple(step for stage in MIX_WRITERS if stage not in skip and stage not in OPTIONAL_STAGES
                 for step in (stage, *((f"{stage}-eval",) if stage in BENCH_EVAL_AFTER else ())))


BENCH_LATER_STEPS = bench_later_steps()


def bench_inputs(steps: tuple[str, ...], base: Path) -> list[Path]:
    """The files of the base build that `steps` read: the test files when an eval runs, and
    the mix of every training stage."""
    wanted = []
    for step in steps:
        if step in BENCH_EVALS:
            wanted += [base / "eval_triples.jsonl", base / "eval_captions.jsonl"]
        elif step in TRAINING_STAGES:
            wanted += [base / name for name in stage_files(step)]
    return list(dict.fromkeys(wanted))


def run_bench_steps(steps: tuple[str, ...], until: str, out: Path, base: Path, recipe: Recipe,
                    commands: dict[str, list[str]], own: dict[str, tuple[Path, Callable[[], None]]] | None = None) -> None:
    """Run `steps` up to `until` in OUT, from the one after the last step whose output is
    there (so OUT can start from a bundle carried over from another machine). A step in
    `own` is (the file it writes last, what runs it); an eval step (BENCH_EVALS) evaluates
    its bundle on BASE's test files into OUT/<dir>; any other is the build's command for it,
    on a copy of BASE/<step>.jsonl, done when OUT/<step>/vlm_config.json exists."""
    def marker(step: str) -> Path:
        if step in (own or {}):
            return own[step][0]
        if step in BENCH_EVALS:
            return out / BENCH_EVALS[step][1] / "knowledge.json"
        return out / step / "vlm_config.json"

    wanted = steps[:steps.index(until) + 1]
    finished = [index for index, step in enumerate(wanted) if marker(step).is_file()]
    todo = wanted[finished[-1] + 1:] if finished else wanted
    missing = [str(path) for path in bench_inputs(todo, base) if not path.is_file()]
    if missing:
        raise UserFacingError(f"not found: {', '.join(missing)}; the base build writes them "
                              f"(`vlm-chat default build --work {base} --until {FINAL_STAGE}`)")
    out.mkdir(parents=True, exist_ok=True)  # only once the inputs are known to be there
    for step in wanted:
        if step not in todo:
            print(f"[{step}] done before, skipped", flush=True)
        elif step in (own or {}):
            own[step][1]()
        elif step in BENCH_EVALS:
            bundle, dest = (out / name for name in BENCH_EVALS[step])
            _bench_evaluate(bundle, base, dest, recipe)
        else:
            _bench_train(step, out, base, commands[step])


def _bench_train(stage: str, out: Path, base: Path, command: list[str]) -> None:
    if stage in TRAINING_STAGES:
        for name in stage_files(stage):
            shutil.copy2(base / name, out / name)
    _cli(command)


def _bench_evaluate(bundle: Path, base: Path, dest: Path, recipe: Recipe) -> None:
    hits = evaluate_bundle(bundle, base, dest, recipe.eval_batch_size)
    print(f"general questions, image attached: {hits['tuned_with_image']}", flush=True)


# The recipe fields of the grid CLIP and its bundle (bench/aligned_grid.py): the scene read
# at its own 96 px in 16 px patches, each 3x3 cell exactly 2x2 patches, one image token per
# patch; more single-shape captions and no random crops for the CLIP.
GRID = {"clip_image_size": 96, "clip_patch_size": 16, "clip_shape_copies": 4, "clip_augment": False,
        "token_reduction": "none"}
# The stages between the drill and survey that teach one skill at a time, then all again.
SKILL_STAGES = ("review", "lone", "consolidate", "crowd", "recall", "tally", "recount", "tint", "retint", "discern")
# The build's recipes by name (`vlm-chat default build --recipe NAME`): the changes each
# makes to Recipe(). "tiles" makes vlm_chat/assets/default (since 2026-12-01): the grid CLIP,
# each cell's image tokens after its name (from instruct on, as its run did), and instruct,
# drill, survey, resurvey, census and naming in place of the chain of fifteen. Its drill runs in
# fp32 (bf16 autocast slowed the chain's drill as it ran) with batches grouped by length (a
# quarter of the drill's token slots were padding, bench/padding.py). "chain" is the
# recipe of the model shipped before it: the 64 px CLIP and every stage (MODEL_CARD.md;
# that model was built before census was added, and `--until resurvey` rebuilds it).
# "cells" is tiles with each cell's 2x2 patches stacked into one image token (pixel shuffle,
# as SmolVLM and nanoVLM reduce tokens): 9 tokens an image instead of 36, so the LLM reads a
# cell's object from one token rather than piecing it together from four (a linear probe on
# the four concatenated finds a cell's shape in 85 % of test scenes, the model names it in
# 63 %), and every sequence is 27 positions shorter.
TILES = {**GRID, "image_tiles": 3, "tiles_after_align": True, "skip": SKILL_STAGES,
         "drill": {**Recipe().drill, "mixed_precision": "no", "group_by_length": True}}
# The LoRA stages that train in tiles, and "quick": tiles trained about 2.6 times as fast. Without
# LoRA dropout, the masks in front of its 210 LoRA layers no longer take a quarter of each
# step. With the masks gone, bf16 autocast pays off on a CPU with AMX, so every stage runs in
# it, drill and naming too. Naming's own pass trained this way from census averaged 2.52
# samples/s against 0.95, to the same held-out loss (docs/experiments.md, "quick").
TILES_LORA_STAGES = ("instruct", "drill", "survey", "resurvey", "census", "naming")
QUICK = {**TILES, **{stage: {**TILES.get(stage, getattr(Recipe(), stage)), "lora_dropout": 0.0, "mixed_precision": "auto"}
                     for stage in TILES_LORA_STAGES}}
RECIPES = {
    "tiles": TILES,
    "quick": QUICK,
    "cells": {**TILES, "token_reduction": "pixel_shuffle", "reduction_factor": 2},
    # tiles with image tokens as long as the LLM's word embeddings from align on: align measures
    # 64 training images and scales the projector's output to match (`--match-word-scale`);
    # every later stage inherits the scale with the projector
    "wordscale": {**TILES, "align": {**Recipe().align, "match_word_scale": True}},
    # tiles, then the tower taught what each cell holds and the LLM taught to read it (sharpen,
    # rename): level with naming's model on naming and 0.8 points under it overall. Sharpen
    # placed before naming instead (census -> sharpen -> naming's own pass, not a recipe here)
    # was level overall (+0.0, paired SE 0.3) with object +2.8 (SE 1.1): docs/experiments.md
    "sharpen": {**TILES, "sharpen_tower": True},
    "chain": {},
}
SHIPPED_RECIPE = "tiles"  # the recipe whose build ships into vlm_chat/assets/default
HEARTBEAT_SECONDS = 60.0  # how often a running stage writes its time so far into state.json
FINAL_STAGE = "rename"  # the last training stage of the build (the one shipped unless a recipe skips it)
# The stages that train a bundle, in build order (each one's output is WORK/<stage>): align
# and instruct on the files the mix stage wrote, every later one on its own mix.
TRAINING_STAGES = ("align", "instruct", *MIX_WRITERS)
NOT_SHIPPED = ("checkpoints",)  # the bundle itself is the result; optimizer states stay in WORK
# What ship writes beside a bundle's weights about how it was made and how it scored; a copy
# whose weights are then changed (going on from the shipped model, a soup, a wider LoRA) leaves them behind.
RUN_RECORDS = ("recipe.json", "scores.json", "knowledge.json")


def set_image_tiles(bundle: Path, tiles: int) -> None:
    """Lay `bundle`'s image tokens out in tiles x tiles tiles from now on (its weights stay)."""
    from vlm_chat.config import VLMConfig
    from vlm_chat.processor import VLMProcessor

    config = VLMConfig.load(bundle)
    VLMProcessor.from_pretrained(bundle, replace(config, image_tiles=tiles))  # refuses a count the token grid does not divide by
    config.image_tiles = tiles
    config.save(bundle)


def ship(bundle: Path, out: Path, extra: dict[str, Path]) -> dict:
    """Copy a trained bundle (its LLM stays a reference to the installed package)."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(bundle, out, ignore=lambda folder, names: [n for n in names if n in NOT_SHIPPED] if Path(folder) == bundle else [])
    (out / "adapter" / "README.md").unlink(missing_ok=True)  # peft's empty model-card template; MODEL_CARD.md is ours
    for name, source in extra.items():
        if source.is_file():
            shutil.copy2(source, out / name)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"out": str(out), "megabytes": round(size / 2**20, 1)}


def recipe_json(recipe: Recipe) -> dict:
    """The recipe as state.json and recipe.json hold it (tuples become lists)."""
    return json.loads(json.dumps(asdict(recipe)))


def first_changed_stage(before: dict | None, after: dict) -> str | None:
    """The first stage (in build order) that reads a recipe field whose value changed. A
    field the earlier recipe did not have yet counts as its default, which is what the
    build did before the field existed (a new stage's fields are no exception: the stage
    itself has not run, which `build_default` sees)."""
    if before is None:
        return None
    defaults = recipe_json(Recipe())
    for stage in STAGES:
        if any(before.get(name, defaults.get(name)) != after.get(name) for name in STAGE_FIELDS[stage]):
            return stage
    return None


def first_inserted_stage(done: dict) -> str | None:
    """A stage that has not run while a later one has: one added to the build since (its
    output would make every later stage's stale)."""
    for index, stage in enumerate(STAGES):
        if stage not in done:
            return stage if any(later in done for later in STAGES[index + 1:]) else None
    return None


def recipe_from_json(data: dict) -> Recipe:
    """The Recipe a recipe.json or state.json records (the inverse of `recipe_json`). A field
    the record lacks takes its default, which is what the build did before the field existed."""
    defaults = Recipe()
    unknown = sorted(set(data) - {f.name for f in fields(Recipe)})
    if unknown:
        raise UserFacingError(f"the recorded recipe has fields this vlm-chat does not know ({', '.join(unknown)}): "
                              "a newer vlm-chat made it; update vlm-chat")
    return replace(defaults, **{k: tuple(v) if isinstance(getattr(defaults, k), tuple) else v for k, v in data.items()})


def count_differences(recorded: dict | None, written: dict) -> str:
    """What a data writer run again wrote that differs from the counts a build recorded for it
    ("scenes 4 (recorded 5)"), or "" when every count it recorded is the same."""
    recorded = recorded or {}
    return ", ".join(f"{k} {v} (recorded {recorded[k]})" for k, v in written.items() if k in recorded and recorded[k] != v)


def continue_from_shipped(paths: BuildPaths, recipe: Recipe, shipped: Path) -> str:
    """Set WORK up as the build left it when it made the `shipped` model, without training
    again: the corpus, the bundle, every data file up to the model's last training stage
    (the writers are seeded: minutes, not the hours of training), each checked against the
    counts its recipe.json recorded, and the model itself as that stage's output. The
    build then goes on with the stages after it. Returns that stage."""
    record_file = shipped / "recipe.json"
    if not record_file.is_file():
        raise UserFacingError(f"{record_file}: missing; --from-shipped needs a model the build shipped (with its recipe.json)")
    record = json.loads(record_file.read_text())
    done = record.get("stages", {})
    trained = [stage for stage in trained_stages(recipe) if stage in done]
    if not trained:
        raise UserFacingError(f"{record_file}: no training stage recorded; rebuild from nothing instead")
    last = trained[-1]
    changed = first_changed_stage(record.get("recipe"), recipe_json(recipe))
    if changed and STAGES.index(changed) <= STAGES.index(last):
        raise UserFacingError(f"{record_file}: the recipe changed at stage '{changed}', before the shipped model's last "
                              f"stage '{last}'; rebuild from nothing (drop --from-shipped)")
    if (done.get("clip", {}).get("result") or {}).get("reused") and paths.clip != "shipped":
        raise UserFacingError("the shipped model was built on the shipped CLIP: give --clip shipped with --from-shipped")
    state_file = paths.work / "state.json"
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        if state.get("continued_from") == str(shipped):
            return last  # set up by an earlier run of the same command: the build resumes
        if state.get("stages"):
            raise UserFacingError(f"{state_file}: this work dir already holds a build; give --from-shipped a new --work")
    paths.work.mkdir(parents=True, exist_ok=True)
    commands = stage_commands(paths, recipe)
    if not (paths.corpus / "manifest.json").is_file():
        _cli(commands["corpus"])
    if not (paths.work / "bundle" / "vlm_config.json").is_file():
        # the untrained bundle: distill's LLM and the knowledge check's baseline, both without
        # an image; on a CLIP the build trained, the shipped model's own vision tower stands in
        own_tower = paths.clip == "train" and not paths.clip_dir.is_dir()
        _cli(bundle_command(paths, recipe, shipped / "vision" if own_tower else None))

    def check(stage: str, written: dict) -> None:
        detail = count_differences(done.get(stage, {}).get("result"), written)
        if detail:
            raise UserFacingError(f"[{stage}] the data differ from the shipped model's: {detail}; was the corpus "
                                  f"built with another seed or version? Rebuild it, or rebuild from nothing")
        print(f"[{stage}] data rewritten, as recorded", flush=True)

    check("mix", write_mixes(paths.corpus, paths.work, recipe))
    check("distill", distill_text_turns(paths.work / "bundle", paths.work, recipe))
    for stage, write in MIX_WRITERS.items():
        if STAGES.index(stage) > STAGES.index(last):
            break
        check(stage, write(paths.corpus, paths.work, recipe))
    target = paths.work / last
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(shipped, target, ignore=shutil.ignore_patterns(*RUN_RECORDS))
    kept = {stage: info for stage, info in done.items() if STAGES.index(stage) <= STAGES.index(last)}
    state = {**record, "stages": kept, "unfinished_seconds": {}, "unfinished_machines": {}, "continued_from": str(shipped)}
    state_file.write_text(json.dumps(state, indent=1))
    print(f"[{last}] taken from {shipped}; the build goes on after it", flush=True)
    return last


def build_default(paths: BuildPaths, recipe: Recipe, until: str | None = None) -> dict:
    """Run (or continue) the build; returns the state with per-stage wall times."""
    paths.work.mkdir(parents=True, exist_ok=True)
    state_file = paths.work / "state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    wanted = recipe_json(recipe)
    stages = state.setdefault("stages", {})
    unfinished = state.setdefault("unfinished_seconds", {})  # stages that were interrupted, time spent so far
    ran_on = state.setdefault("unfinished_machines", {})  # and the machines they ran on (a build may move)
    w = paths.work

    def save_state() -> None:  # written whole then renamed: a kill mid-write leaves the last state, not half of one
        partial = state_file.with_suffix(".json.partial")
        partial.write_text(json.dumps(state, indent=1))
        partial.replace(state_file)

    changed = first_changed_stage(state.get("recipe"), wanted) if stages else None
    reason = "the recipe changed here"
    inserted = first_inserted_stage(stages)
    if inserted and (changed is None or STAGES.index(inserted) < STAGES.index(changed)):
        changed, reason = inserted, "new in the build, after it everything is stale"
    if changed:
        stale = STAGES[STAGES.index(changed):]
        print(f"[{changed}] {reason}: {', '.join(stale)} run again", flush=True)
        for stage in stale:
            stages.pop(stage, None)
            unfinished.pop(stage, None)
            ran_on.pop(stage, None)
            for name in STAGE_OUTPUTS.get(stage, ()):
                target = w / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
    state["recipe"] = wanted
    save_state()  # a kill from here on resumes, not re-deletes
    commands = stage_commands(paths, recipe)
    here = machine()
    final = trained_stages(recipe)[-1]  # the stage whose bundle is evaluated and shipped

    def corpus():
        if (paths.corpus / "manifest.json").is_file():
            return {"reused": str(paths.corpus)}
        _cli(commands["corpus"])

    def clip():
        if paths.clip == "shipped":
            shipped = json.loads((SHIPPED_CLIP / "config.json").read_text())["vision_config"]
            wanted = {"image_size": recipe.clip_image_size, "patch_size": recipe.clip_patch_size}
            if any(shipped[key] != value for key, value in wanted.items()):
                raise UserFacingError(
                    f"the recipe's CLIP reads {recipe.clip_image_size} px in {recipe.clip_patch_size} px patches, the shipped "
                    f"one {shipped['image_size']} px in {shipped['patch_size']} px patches: give --clip train to pretrain it")
            return {"reused": str(SHIPPED_CLIP)}
        written = write_clip_captions(paths.corpus, w / "clip_captions.jsonl", recipe.clip_shape_copies, recipe.seed) \
            if recipe.clip_shape_copies else None
        _cli(commands["clip"])
        return written

    def align():
        _cli(commands["align"])
        if recipe.tiles_after_align and recipe.image_tiles:
            set_image_tiles(w / "align", recipe.image_tiles)
            print(f"[align] {w / 'align'}: image_tiles {recipe.image_tiles} from instruct on", flush=True)

    def mix_then_train(stage: str, write_mix):
        def run():
            if stage_off(recipe, stage):
                print(f"[{stage}] not in this recipe ({OPTIONAL_STAGES[stage]} is off)", flush=True)
                return {"trained": False}
            written = write_mix(paths.corpus, w, recipe)
            if stage in recipe.skip:
                print(f"[{stage}] skipped by the recipe: its mix is written, nothing trains on it", flush=True)
                return {**written, "trained": False}
            _cli(commands[stage])
            return written
        return run

    runners = {
        "corpus": corpus,
        "clip": clip,
        "bundle": lambda: _cli(commands["bundle"]),
        "mix": lambda: write_mixes(paths.corpus, w, recipe),
        "distill": lambda: distill_text_turns(w / "bundle", w, recipe),
        "align": align,
        "instruct": lambda: _cli(commands["instruct"]),
        **{stage: mix_then_train(stage, write) for stage, write in MIX_WRITERS.items()},
        "eval": lambda: evaluate_bundle(w / final, w, w / "eval", recipe.eval_batch_size, baseline=w / "bundle"),
        "ship": lambda: ship(w / final, paths.out, {
            "recipe.json": state_file, "scores.json": w / "eval" / "scores.json", "knowledge.json": w / "eval" / "knowledge.json",
        }),
    }
    for stage in STAGES:
        if stage in stages:
            print(f"[{stage}] done before ({stages[stage]['seconds']:.0f} s), skipped", flush=True)
        else:
            print(f"[{stage}] starting", flush=True)
            before, start = unfinished.get(stage, 0.0), time.monotonic()
            if here not in ran_on.setdefault(stage, []):
                ran_on[stage].append(here)
            stop = threading.Event()

            def beat() -> None:  # the time spent so far, on disk every beat: a SIGKILL (a session's end) loses one beat at most
                while not stop.wait(HEARTBEAT_SECONDS):
                    unfinished[stage] = round(before + time.monotonic() - start, 1)
                    save_state()

            heart = threading.Thread(target=beat, daemon=True)
            heart.start()
            try:
                result = runners[stage]()
            finally:  # done, failed or interrupted: the time spent so far counts
                stop.set()
                heart.join()
                unfinished[stage] = round(before + time.monotonic() - start, 1)
                save_state()
            stages[stage] = {"seconds": unfinished.pop(stage), "machines": ran_on.pop(stage, []), "result": result}
            save_state()
            print(f"[{stage}] done in {stages[stage]['seconds']:.0f} s", flush=True)
        if stage == until:
            break
    scores_file = w / "eval" / "scores.json"
    if scores_file.is_file():
        knowledge_file = w / "eval" / "knowledge.json"
        knowledge = json.loads(knowledge_file.read_text()) if knowledge_file.is_file() else None
        print(report(json.loads(scores_file.read_text()), knowledge, state))
    return state


# -- the report -----------------------------------------------------------------------------

# The bars of the default model on the corpus test split: (label, how to read it, bar, higher is better).
BARS = (
    ("VQA accuracy, overall", lambda s: s["accuracy"], 0.85, True),
    ("counting", lambda s: s["by_type"]["count"]["accuracy"], 0.75, True),
    ("colour", lambda s: s["by_type"]["color"]["accuracy"], 0.90, True),
    ("position", lambda s: s["by_type"]["position"]["accuracy"], 0.90, True),
    ("yes/no F1", lambda s: s["yes_no"]["f1"], 0.90, True),
    ("yes/no: \"yes\" share minus true share", lambda s: abs(s["yes_no"]["yes_share"] - s["yes_no"]["true_yes_share"]), 0.10, False),
)


def report(scores: dict, knowledge: dict | None, state: dict | None) -> str:
    """Markdown: results against the bars, the other measures, and the wall time of each stage."""
    lines = ["| measure (corpus test split) | result | bar | |", "|---|---|---|---|"]
    for label, read, bar, higher in BARS:
        try:
            value = read(scores)
        except KeyError:
            continue
        met = value >= bar if higher else value <= bar
        sign = "≥" if higher else "≤"
        lines.append(f"| {label} | {100 * value:.1f} % | {sign} {100 * bar:.0f} % | {'met' if met else f'missed by {100 * abs(value - bar):.1f} pts'} |")
    for name, row in scores.get("by_type", {}).items():
        if name not in ("count", "color", "position"):
            lines.append(f"| {name} (n {row['n']}) | {100 * row['accuracy']:.1f} % | none | |")
    if "yes_no" in scores:
        yn = scores["yes_no"]
        lines.append(f"| yes/no accuracy / precision / recall (n {yn['n']}) | {100 * yn['accuracy']:.1f} / "
                     f"{100 * yn['precision']:.1f} / {100 * yn['recall']:.1f} % | none | |")
        lines.append(f"| \"yes\" share (true share) | {100 * yn['yes_share']:.1f} % ({100 * yn['true_yes_share']:.1f} %) | | |")
    if "captions" in scores:
        cap = scores["captions"]
        lines.append(f"| captions BLEU-4 / CIDEr (n {cap['n']} images) | {cap['bleu4']:.3f} / {cap['cider']:.3f} | none yet | |")
    if knowledge:
        for key, label in (("tuned_with_image", "tuned model, image attached"), ("base_without_image", "SmolLM2 before tuning, no image")):
            if key in knowledge:
                k = knowledge[key]
                lines.append(f"| held-out general questions, {label} | {k['hits']} / {k['n']} | | |")
    if state:
        lines += ["", "| stage | wall time | ran on |", "|---|---|---|"]
        for stage, info in state.get("stages", {}).items():
            result = info.get("result") or {}
            note = " (reused: " + Path(result["reused"]).name + ")" if isinstance(result, dict) and "reused" in result else ""
            where = "; ".join(info.get("machines", [])) or "not recorded"  # builds from before 2026-12-07
            lines.append(f"| {stage} | {info['seconds'] / 60:.1f} min{note} | {where} |")
    return "\n".join(lines)


# -- scoring a shipped model again ------------------------------------------------------------

# What `reevaluate` holds against the recorded scores after the overall accuracy and each
# question type's: (label, how to read it from scores.json).
RECORDED_MEASURES = (
    ("yes/no F1", lambda s: s["yes_no"]["f1"]),
    ("yes/no precision", lambda s: s["yes_no"]["precision"]),
    ("yes/no recall", lambda s: s["yes_no"]["recall"]),
    ("\"yes\" share", lambda s: s["yes_no"]["yes_share"]),
    ("captions BLEU-4", lambda s: s["captions"]["bleu4"]),
    ("captions CIDEr", lambda s: s["captions"]["cider"]),
)


def score_differences(recorded: dict, now: dict) -> dict[str, tuple[float | None, float | None]]:
    """measure -> (now, recorded) for the overall accuracy, every question type's accuracy
    and every measure of RECORDED_MEASURES that either run has and the two do not give alike (to 1e-9; greedy
    decoding of the same model on the same questions gives the same answers, so a
    difference is a changed answer)."""
    def read(scores: dict, how) -> float | None:
        try:
            return float(how(scores))
        except (KeyError, TypeError):
            return None

    types = sorted({*recorded.get("by_type", {}), *now.get("by_type", {})})
    measures = (("VQA accuracy, overall", lambda s: s["accuracy"]),
                *((f"{name} accuracy", lambda s, name=name: s["by_type"][name]["accuracy"]) for name in types),
                *RECORDED_MEASURES)
    differences = {}
    for label, how in measures:
        a, b = read(now, how), read(recorded, how)
        if (a is None) != (b is None) or (a is not None and abs(a - b) > 1e-9):
            differences[label] = (a, b)
    return differences


def reevaluate(bundle: Path, work: Path, corpus: Path, batch_size: int | None = None) -> dict:
    """Score `bundle`, a model `vlm-chat default build` shipped, again on the test sample its
    build scored it on: the corpus (built into `corpus` if it holds none), the eval files the
    mix stage writes (seeded by the model's recipe.json, their counts checked against it),
    `vlm-chat eval` into WORK/eval and the held-out general questions. Prints the scores
    against the bars, and against the scores.json and general questions the model records.
    Returns {"scores", "knowledge", "recorded" (None without a scores.json), "differences"}."""
    record_file = bundle / "recipe.json"
    if not record_file.is_file():
        raise UserFacingError(f"{record_file}: missing; `vlm-chat default eval` scores a model `vlm-chat default build` "
                              "made, on the test sample its recipe.json names. For any other bundle: "
                              "vlm-chat eval --model BUNDLE --data TEST.jsonl")
    record = json.loads(record_file.read_text())
    recipe = recipe_from_json(record.get("recipe") or {})
    if not (corpus / "manifest.json").is_file():
        _cli(corpus_command(corpus, recipe))
    seed = json.loads((corpus / "manifest.json").read_text()).get("seed")
    if seed != recipe.seed:
        raise UserFacingError(f"{corpus}: a corpus of seed {seed}; the model was scored on the corpus of seed {recipe.seed}. "
                              f"Give --corpus a new folder (it is built there) or one from "
                              f"`vlm-chat corpus build --out DIR --seed {recipe.seed}`")
    work.mkdir(parents=True, exist_ok=True)
    detail = count_differences(record.get("stages", {}).get("mix", {}).get("result"), write_mixes(corpus, work, recipe))
    if detail:
        raise UserFacingError(f"{corpus}: the test sample differs from the one {bundle.name} was scored on ({detail}); "
                              f"was the corpus built by another version of vlm-chat or with other settings? Give "
                              f"--corpus a new folder and it is built the way the build built it")
    print(f"test sample rewritten as recorded: {work / 'eval_triples.jsonl'}, {work / 'eval_captions.jsonl'}", flush=True)
    dest = work / "eval"
    evaluate_bundle(bundle, work, dest, batch_size or recipe.eval_batch_size)
    scores = json.loads((dest / "scores.json").read_text())
    knowledge = json.loads((dest / "knowledge.json").read_text())
    print(report(scores, knowledge, None))
    recorded_file = bundle / "scores.json"
    if not recorded_file.is_file():
        print(f"\n{recorded_file}: missing, so nothing to compare with", flush=True)
        return {"scores": scores, "knowledge": knowledge, "recorded": None, "differences": {}}
    from training.evaluate import comparison_table

    recorded = json.loads(recorded_file.read_text())
    differences = score_differences(recorded, scores)
    hits = knowledge_hits(knowledge).get("tuned_with_image")
    recorded_hits = ((record.get("stages", {}).get("eval") or {}).get("result") or {}).get("tuned_with_image")
    if recorded_hits is not None and hits != recorded_hits:
        differences["general questions, image attached"] = (hits, recorded_hits)
    print(f"\nagainst what {bundle} records (its scores.json; `now` is this run):\n")
    print(comparison_table({"recorded": recorded, "now": scores}))
    if differences:
        def show(value) -> str:
            return f"{value:.4f}" if isinstance(value, float) else str(value)

        print("\nNOT reproduced: " + "; ".join(f"{label} {show(now)} now, {show(then)} recorded"
                                               for label, (now, then) in differences.items()), flush=True)
    else:
        print(f"\nreproduced: every measure is the recorded one (general questions {hits})", flush=True)
    return {"scores": scores, "knowledge": knowledge, "recorded": recorded, "differences": differences}
