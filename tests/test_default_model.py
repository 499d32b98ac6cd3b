"""The default model's recipe: data mixes, self-distilled text turns, the resumable build."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from tests.test_corpus import needs_sources
from training.corpus import CorpusConfig, build_corpus
from training.data import check_samples
from training.default_model import (
    KNOWLEDGE_CHECK, SHIPPED_CLIP, BuildPaths, Recipe, build_default, distill_prompts, distill_text_turns, lookalike_turns,
    naming_turns, ship, survey_turns, write_consolidate, write_crowd, write_discern, write_drill, write_lone, write_mixes,
    write_recall, write_recount, write_resurvey, write_retint, write_review, write_survey, write_tally, write_tint,
)

SMALL = Recipe(align_images=30, instruct_conversations=20, caption_singles=5, eval_questions=25, eval_caption_images=6)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write_text_turn(work: Path) -> None:
    """WORK/text_turns.jsonl with one distilled text turn, as the distill stage writes them."""
    text = {"id": "text:0:0", "conversations": [{"from": "human", "value": "Hello!"}, {"from": "gpt", "value": "Hi."}]}
    (work / "text_turns.jsonl").write_text(json.dumps(text) + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    build_corpus(CorpusConfig.small(out, seed=3))
    return out


@needs_sources
def test_mixes_are_valid_training_data_from_the_right_splits(corpus, tmp_path):
    counts = write_mixes(corpus, tmp_path, SMALL)
    for name in ("align.jsonl", "instruct_images.jsonl", "eval_triples.jsonl", "eval_captions.jsonl"):
        good, problems = check_samples([tmp_path / name])
        assert not problems, problems[:3]
        assert good
    conversations = _rows(tmp_path / "instruct_images.jsonl")
    scenes = [c for c in conversations if c["id"].startswith("scene:")]
    assert len(scenes) == counts["instruct_image_conversations"] - SMALL.caption_singles
    # Several questions share one image; only the first turn carries the placeholder.
    assert max(len(c["conversations"]) for c in scenes) >= 2 * SMALL.turns_per_conversation[0]
    for c in scenes:
        assert c["conversations"][0]["value"].startswith("<image>\n")
        assert all("<image>" not in t["value"] for t in c["conversations"][1:])
    train_images = {r["image"] for r in _rows(corpus / "triples_train.jsonl")}
    assert {str(Path(c["image"]).relative_to(corpus.resolve())) for c in scenes} <= train_images
    test_images = {r["image"] for r in _rows(corpus / "triples_test.jsonl")}
    eval_rows = _rows(tmp_path / "eval_triples.jsonl")
    assert len(eval_rows) == SMALL.eval_questions and all(r["type"] for r in eval_rows)
    assert {str(Path(r["image"]).relative_to(corpus.resolve())) for r in eval_rows} <= test_images
    # Same seed, same bytes.
    again = tmp_path / "again"
    write_mixes(corpus, again, SMALL)
    assert (again / "instruct_images.jsonl").read_bytes() == (tmp_path / "instruct_images.jsonl").read_bytes()


def test_knowledge_check_questions_are_held_out_of_distillation():
    prompts = distill_prompts()
    assert len(prompts) > 150 and len(set(prompts)) == len(prompts)
    assert not {q for q, _ in KNOWLEDGE_CHECK} & set(prompts)


@needs_sources
def test_distilled_turns_are_the_base_models_own_answers(corpus, tmp_path, tiny_bundle):
    bundle, model, processor = tiny_bundle
    write_mixes(corpus, tmp_path, SMALL)
    counts = distill_text_turns(bundle, tmp_path, replace(SMALL, text_copies=2), max_new_tokens=6)
    rows = _rows(tmp_path / "text_turns.jsonl")
    assert counts["text_turns"] == len(rows) > 0
    with_image = [r for r in rows if "image" in r]
    assert 0 < len(with_image) < len(rows)  # each turn once bare, once beside an unrelated image
    good, problems = check_samples([tmp_path / "instruct.jsonl"])
    assert not problems and len(good) == counts["instruct_rows"]
    # The answer is what the base model says to the prompt.
    from training.default_model import _trim_to_sentence
    from vlm_chat.generation import GenerationSettings, generate_batch

    first = rows[0]["conversations"]
    expected = generate_batch(model, processor, [[{"role": "user", "content": first[0]["value"]}]],
                              GenerationSettings(max_new_tokens=6))[0]
    assert first[1]["value"] == _trim_to_sentence(expected)


@needs_sources
def test_build_records_stage_times_skips_finished_stages_and_reruns_what_a_recipe_change_touches(corpus, tmp_path, tiny_parts, capsys):
    recipe = replace(SMALL, llm=str(tiny_parts["llm"]))
    paths = BuildPaths(work=tmp_path / "work", corpus=corpus, clip="shipped", out=tmp_path / "shipped")
    state = build_default(paths, recipe, until="mix")
    assert list(state["stages"]) == ["corpus", "clip", "bundle", "mix"]
    assert state["stages"]["corpus"]["result"] == {"reused": str(corpus)}
    assert all(info["seconds"] >= 0 for info in state["stages"].values())
    assert (paths.work / "bundle" / "vlm_config.json").is_file()
    capsys.readouterr()
    build_default(paths, recipe, until="mix")
    assert capsys.readouterr().out.count("skipped") == 4
    # A mix setting changed: corpus, CLIP and bundle are kept, mix runs again.
    bundle_written = (paths.work / "bundle" / "projector.safetensors").stat().st_mtime_ns
    state = build_default(paths, replace(recipe, instruct_conversations=12), until="mix")
    out = capsys.readouterr().out
    assert "[mix] the recipe changed here" in out and out.count("skipped") == 3
    assert (paths.work / "bundle" / "projector.safetensors").stat().st_mtime_ns == bundle_written
    assert len(_rows(paths.work / "instruct_images.jsonl")) == 12 + recipe.caption_singles
    assert json.loads((paths.work / "state.json").read_text())["recipe"]["instruct_conversations"] == 12
    # Outputs of a stage that must run again are deleted (a training stage would resume from them).
    (paths.work / "eval" / "checkpoints").mkdir(parents=True)
    build_default(paths, replace(recipe, instruct_conversations=12, eval_batch_size=4), until="mix")
    assert "[eval] the recipe changed here: eval, ship run again" in capsys.readouterr().out
    assert not (paths.work / "eval").exists() and (paths.work / "bundle").is_dir()
    # A stage added to the build since (here: bundle, as if new) runs, and every later stage again.
    state_file = paths.work / "state.json"
    state = json.loads(state_file.read_text())
    del state["stages"]["bundle"]
    state_file.write_text(json.dumps(state))
    mix_written = (paths.work / "eval_triples.jsonl").stat().st_mtime_ns
    state = build_default(paths, replace(recipe, instruct_conversations=12, eval_batch_size=4), until="mix")
    out = capsys.readouterr().out
    assert "[bundle] new in the build, after it everything is stale: bundle, mix," in out and out.count("skipped") == 2
    assert list(state["stages"]) == ["corpus", "clip", "bundle", "mix"]
    assert (paths.work / "eval_triples.jsonl").stat().st_mtime_ns != mix_written


@needs_sources
def test_build_with_clip_train_pretrains_its_own_clip_and_builds_the_bundle_on_it(corpus, tmp_path, tiny_parts):
    from vlm_chat.model import VisionLanguageModel

    from bench.aligned_grid import GRID

    # The grid recipe: 96 px in 16 px patches, shape-rich captions, no crops, one token per patch.
    recipe = replace(SMALL, llm=str(tiny_parts["llm"]), clip_steps=3, **GRID)
    paths = BuildPaths(work=tmp_path / "work", corpus=corpus, clip="train", out=tmp_path / "shipped")
    state = build_default(paths, recipe, until="bundle")
    trained = paths.work / "clip" / "final"
    written = state["stages"]["clip"]["result"]
    assert written["pairs"] == written["captions"] + 4 * written["shape_captions"] == len(_rows(paths.work / "clip_captions.jsonl"))
    vision = json.loads((trained / "config.json").read_text())["vision_config"]
    assert (vision["image_size"], vision["patch_size"]) == (96, 16)
    metrics = [json.loads(line) for line in (paths.work / "clip" / "metrics.jsonl").read_text().splitlines()]
    assert max(row.get("step", 0) for row in metrics) == 3
    config = json.loads((paths.work / "bundle" / "vlm_config.json").read_text())
    assert Path(config["vision"]["name_or_path"]).resolve() == trained.resolve()
    model, processor = VisionLanguageModel.from_pretrained(paths.work / "bundle", device="cpu")
    pixels = processor.preprocess_images([corpus / _rows(corpus / "layouts_train.jsonl")[0]["image"]])
    assert model.get_image_features(pixels).shape == (1, 36, model.language_model.config.hidden_size)
    # Another CLIP recipe reruns the stage from scratch: its old run and captions are gone.
    state = build_default(paths, replace(recipe, clip_shape_copies=0, clip_steps=2), until="clip")
    assert state["stages"]["clip"]["result"] is None and not (paths.work / "clip_captions.jsonl").exists()
    metrics = [json.loads(line) for line in (paths.work / "clip" / "metrics.jsonl").read_text().splitlines()]
    assert max(row.get("step", 0) for row in metrics) == 2


@needs_sources
def test_the_shipped_clip_is_refused_for_a_recipe_that_reads_another_grid(corpus, tmp_path):
    from bench.aligned_grid import GRID
    from vlm_chat.errors import UserFacingError

    paths = BuildPaths(work=tmp_path / "work", corpus=corpus, clip="shipped", out=tmp_path / "shipped")
    with pytest.raises(UserFacingError, match="96 px in 16 px patches.*64 px in 8 px patches.*--clip train"):
        build_default(paths, replace(SMALL, **GRID), until="clip")
    assert "clip" not in json.loads((paths.work / "state.json").read_text())["stages"]


def test_bench_steps_resume_after_the_last_finished_step_and_stop_at_until(tmp_path, monkeypatch):
    import pytest

    import training.default_model as default_model
    from vlm_chat.errors import UserFacingError

    ran = []
    monkeypatch.setattr(default_model, "_cli", lambda command: ran.append(command[0]))
    monkeypatch.setattr(default_model, "_bench_evaluate", lambda bundle, base, dest, recipe: ran.append(f"eval {bundle.name}"))
    base, out = tmp_path / "base", tmp_path / "out"
    base.mkdir()
    (out / "align").mkdir(parents=True)
    (out / "align" / "vlm_config.json").write_text("{}")  # align finished in an earlier run
    (out / "prep.done").write_text("")
    own = {"prep": (out / "prep.done", lambda: ran.append("prep")),
           "tiles": (out / "tiles.done", lambda: ran.append("tiles"))}
    commands = {stage: [stage] for stage in default_model.TRAINING_STAGES}
    steps = ("prep", "tiles", "align", "instruct", "eval", *default_model.BENCH_LATER_STEPS)
    assert steps[5:9] == ("drill", "drill-eval", "review", "lone")
    assert steps[-10:] == ("discern", "discern-eval", "survey", "survey-eval", "resurvey", "resurvey-eval", "census",
                           "census-eval", "naming", "naming-eval")
    for name in ("eval_triples.jsonl", "eval_captions.jsonl"):
        (base / name).write_text("{}\n")
    (base / "align.jsonl").write_text("{}\n")
    (base / "instruct.jsonl").write_text('{"id": "instruct mix"}\n')
    with pytest.raises(UserFacingError, match="drill.jsonl"):  # checked before anything runs
        default_model.run_bench_steps(steps, "drill-eval", out, base, Recipe(), commands, own=own)
    with pytest.raises(UserFacingError, match="drill.jsonl"):
        default_model.run_bench_steps(steps, "drill-eval", tmp_path / "new", base, Recipe(), commands, own=own)
    assert ran == [] and not (tmp_path / "new").exists()  # nothing ran, no folder was made
    default_model.run_bench_steps(steps, "eval", out, base, Recipe(), commands, own=own)
    # align was done, so everything before it was (tiles had run, or its output came with align's);
    # drill is past --until
    assert ran == ["instruct", "eval instruct"]
    assert (out / "instruct.jsonl").read_text() == '{"id": "instruct mix"}\n'  # trained on a copy of the base mix
    assert not (out / "align.jsonl").exists()  # a finished stage is not touched
    for stage in ("drill", "review", "lone", "consolidate"):
        (base / f"{stage}.jsonl").write_text("{}\n")
    ran.clear()
    default_model.run_bench_steps(steps, "consolidate-eval", out, base, Recipe(), commands, own=own)
    # the fakes wrote no marker, so every unfinished step runs again
    assert ran == ["instruct", "eval instruct", "drill", "eval drill", "review", "lone", "consolidate",
                   "eval consolidate"]
    # A bundle carried over to a new machine: OUT holds only drill's, BASE no mix before it.
    carried, ran[:] = tmp_path / "carried", []
    (carried / "drill").mkdir(parents=True)
    (carried / "drill" / "vlm_config.json").write_text("{}")
    (base / "instruct.jsonl").unlink()
    (base / "align.jsonl").unlink()
    default_model.run_bench_steps(steps, "consolidate-eval", carried, base, Recipe(), commands, own=own)
    assert ran == ["eval drill", "review", "lone", "consolidate", "eval consolidate"]
    assert default_model.BENCH_EVALS["drill-eval"] == ("drill", "eval_drill")  # where earlier runs wrote it


def test_a_stage_interrupted_by_the_user_is_an_interrupt_and_a_failed_one_an_error(monkeypatch):
    import pytest

    import cli.main
    from training.default_model import _cli
    from vlm_chat.errors import UserFacingError

    monkeypatch.setattr(cli.main, "main", lambda argv: 130)  # what `vlm-chat` returns on Ctrl-C
    with pytest.raises(KeyboardInterrupt, match="run the same command again to resume"):
        _cli(["train", "--stage", "instruct"])
    monkeypatch.setattr(cli.main, "main", lambda argv: 2)
    with pytest.raises(UserFacingError, match="failed \\(exit 2\\); fix the cause"):
        _cli(["train", "--stage", "instruct"])


def test_a_recipe_change_reruns_from_the_first_stage_that_reads_it():
    from dataclasses import asdict

    from training.default_model import STAGE_FIELDS, STAGES, first_changed_stage

    base = asdict(Recipe())
    assert set(STAGE_FIELDS) == set(STAGES)
    assert set(base) == {name for names in STAGE_FIELDS.values() for name in names}  # every field is read somewhere
    assert first_changed_stage(base, dict(base)) is None
    assert first_changed_stage(None, base) is None  # a fresh work dir
    assert first_changed_stage(base, {**base, "seed": 1}) == "corpus"
    assert first_changed_stage(base, {**base, "drill": {**base["drill"], "lr": 1e-4}}) == "drill"
    assert first_changed_stage(base, {**base, "eval_batch_size": 8}) == "eval"
    # A state.json from before a field existed: the field counts as its default.
    older = {k: v for k, v in base.items() if k != "clip_steps"}
    assert first_changed_stage(older, base) is None
    assert first_changed_stage(older, {**base, "clip_steps": 10}) == "clip"


def test_build_help_names_every_stage_in_order(capsys):
    from cli.main import build_parser
    from training.default_model import STAGES

    with pytest.raises(SystemExit):
        build_parser().parse_args(["default", "build", "--help"])
    listed = " ".join(capsys.readouterr().out.split()).split("one of: ")[1].split(")")[0]
    assert listed.split(", ") == list(STAGES)


@needs_sources
def test_drill_asks_many_questions_about_scenes_instruct_did_not_use(corpus, tmp_path):
    recipe = replace(SMALL, drill_conversations=15, drill_turns=(3, 4))
    write_mixes(corpus, tmp_path, recipe)
    _write_text_turn(tmp_path)
    counts = write_drill(corpus, tmp_path, recipe)
    rows = _rows(tmp_path / "drill.jsonl")
    good, problems = check_samples([tmp_path / "drill.jsonl"])
    assert not problems and len(good) == len(rows) == counts["scene_conversations"] + 1
    drills = [r for r in rows if r["id"].startswith("drill:")]
    instruct_images = {r.get("image") for r in _rows(tmp_path / "instruct_images.jsonl")}
    assert drills and not {r["image"] for r in drills} & instruct_images
    assert all(len(r["conversations"]) >= 2 * 3 for r in drills)
    assert counts["questions"] == sum(len(r["conversations"]) // 2 for r in drills)
    again = tmp_path / "again"
    again.mkdir()
    for name in ("instruct_images.jsonl", "text_turns.jsonl"):
        (again / name).write_bytes((tmp_path / name).read_bytes())
    write_drill(corpus, again, recipe)
    assert (again / "drill.jsonl").read_bytes() == (tmp_path / "drill.jsonl").read_bytes()


@needs_sources
def test_review_uses_scenes_no_earlier_stage_saw_and_brings_back_single_image_captions(corpus, tmp_path):
    recipe = replace(SMALL, drill_conversations=10, drill_turns=(3, 4), review_conversations=8, review_turns=(5, 13),
                     review_caption_singles=4)
    write_mixes(corpus, tmp_path, recipe)
    _write_text_turn(tmp_path)
    write_drill(corpus, tmp_path, recipe)
    counts = write_review(corpus, tmp_path, recipe)
    rows = _rows(tmp_path / "review.jsonl")
    good, problems = check_samples([tmp_path / "review.jsonl"])
    assert not problems and len(good) == len(rows) == counts["scene_conversations"] + 4 + 1
    scenes = [r for r in rows if r["id"].startswith("review:")]
    seen = {r.get("image") for name in ("instruct_images.jsonl", "drill.jsonl") for r in _rows(tmp_path / name)}
    assert len(scenes) == 8 and not {r["image"] for r in scenes} & seen
    assert all(len(r["conversations"]) >= 2 * 5 for r in scenes)
    singles = [r for r in rows if r["id"].startswith("describe:")]
    assert len(singles) == 4 and all("/scene/" not in r["image"] and len(r["conversations"]) == 2 for r in singles)
    assert counts["questions"] == sum(len(r["conversations"]) // 2 for r in scenes)


def _objects(corpus: Path) -> dict[str, int]:
    return {r["image"]: sum(o["count"] for o in r["objects"]) for r in _rows(corpus / "layouts_train.jsonl")}


def _all_questions_per_scene(corpus: Path, rows: list[dict], prefix: str, kind: str = "position") -> list[str]:
    """Checks that each row is one scene's conversation of all its `kind` questions, in
    corpus order, with the id "<prefix>:<scene>"; returns the scenes' corpus names."""
    asked: dict[str, list[tuple[str, str]]] = {}
    for t in _rows(corpus / "triples_train.jsonl"):
        if t["type"] == kind:
            asked.setdefault(t["image"], []).append((t["question"], t["answer"]))
    names = []
    for r in rows:
        name = str(Path(r["image"]).relative_to(corpus.resolve()))
        assert r["id"] == f"{prefix}:{name}"
        turns = [(q["value"].removeprefix("<image>\n"), a["value"]) for q, a in zip(r["conversations"][::2], r["conversations"][1::2])]
        assert turns == asked[name]  # all of them, in corpus order
        names.append(name)
    return names


@needs_sources
def test_lone_asks_every_position_question_of_one_object_scenes(corpus, tmp_path):
    counts = write_lone(corpus, tmp_path, replace(SMALL, lone_scenes=6))
    rows = _rows(tmp_path / "lone.jsonl")
    good, problems = check_samples([tmp_path / "lone.jsonl"])
    assert not problems and len(good) == len(rows) == counts["scenes"] == 6
    objects = _objects(corpus)
    for name in _all_questions_per_scene(corpus, rows, "lone"):
        assert objects[name] == 1
    assert counts["questions"] == sum(len(r["conversations"]) // 2 for r in rows)


CHAIN = replace(SMALL, instruct_conversations=10, drill_conversations=5, drill_turns=(3, 4), review_conversations=4,
                review_turns=(5, 13), review_caption_singles=2, lone_scenes=3, consolidate_conversations=5,
                consolidate_turns=(5, 13), consolidate_position_scenes=4, consolidate_lone_replay=2,
                consolidate_caption_singles=3, crowd_scenes=4,
                recall_conversations=3, recall_turns=(5, 13), recall_crowd_replay=2, recall_caption_singles=2,
                tally_scenes=4, recount_conversations=3, recount_turns=(5, 13), recount_tally_replay=2,
                recount_crowd_replay=2, recount_caption_singles=2, tint_scenes=6, retint_conversations=2,
                retint_turns=(5, 13), retint_tint_replay=3, retint_tally_replay=1, retint_crowd_replay=1,
                retint_caption_singles=1, discern_naming_scenes=5, discern_lookalike_scenes=6,
                discern_conversations=2, discern_turns=(5, 13), discern_tint_replay=2, discern_tally_replay=2,
                discern_crowd_replay=1, discern_caption_singles=1)


def _mixes_up_to_consolidate(corpus: Path, work: Path, recipe: Recipe) -> dict:
    """Every mix of the build in order, up to consolidate's; returns consolidate's counts."""
    write_mixes(corpus, work, recipe)
    _write_text_turn(work)
    write_drill(corpus, work, recipe)
    write_review(corpus, work, recipe)
    write_lone(corpus, work, recipe)
    return write_consolidate(corpus, work, recipe)


@needs_sources
def test_consolidate_brings_every_skill_back_with_position_kept_in_view(corpus, tmp_path):
    counts = _mixes_up_to_consolidate(corpus, tmp_path, CHAIN)
    rows = _rows(tmp_path / "consolidate.jsonl")
    good, problems = check_samples([tmp_path / "consolidate.jsonl"])
    assert counts["fresh_scenes"] >= 5 + 4  # the small corpus has room for both parts
    assert not problems and len(good) == len(rows) == 5 + 4 + 2 + 3 + 1
    by_kind: dict[str, list[dict]] = {}
    for r in rows:
        by_kind.setdefault(r["id"].split(":")[0], []).append(r)
    assert {k: len(v) for k, v in by_kind.items()} == {"consolidate": 5, "place": 4, "lone": 2, "describe": 3, "text": 1}
    # Fresh scenes: none an earlier mix (or the other part of this one) talked about.
    earlier = {r.get("image") for name in ("instruct_images.jsonl", "drill.jsonl", "review.jsonl", "lone.jsonl")
               for r in _rows(tmp_path / name)}
    fresh = [r["image"] for r in by_kind["consolidate"] + by_kind["place"]]
    assert len(set(fresh)) == len(fresh) and not set(fresh) & earlier
    assert all(len(r["conversations"]) >= 2 * 5 for r in by_kind["consolidate"])
    # Position among distractors: scenes of two or more objects, position questions only.
    objects = _objects(corpus)
    position = {(t["image"], t["question"]) for t in _rows(corpus / "triples_train.jsonl") if t["type"] == "position"}
    for r in by_kind["place"]:
        name = str(Path(r["image"]).relative_to(corpus.resolve()))
        assert objects[name] >= 2
        assert all((name, q["value"].removeprefix("<image>\n")) in position for q in r["conversations"][::2])
    lone = _rows(tmp_path / "lone.jsonl")
    assert all(r in lone for r in by_kind["lone"])
    assert counts["position_questions"] == sum(len(r["conversations"]) // 2 for r in by_kind["place"])


@needs_sources
def test_crowd_asks_every_position_question_of_crowded_scenes_no_earlier_mix_used(corpus, tmp_path):
    _mixes_up_to_consolidate(corpus, tmp_path, CHAIN)
    counts = write_crowd(corpus, tmp_path, CHAIN)
    rows = _rows(tmp_path / "crowd.jsonl")
    good, problems = check_samples([tmp_path / "crowd.jsonl"])
    assert counts["fresh_crowded_scenes"] > 4  # the small corpus has one left over
    assert not problems and len(good) == len(rows) == counts["scenes"] == 4
    earlier = {r.get("image") for name in ("instruct_images.jsonl", "drill.jsonl", "review.jsonl", "lone.jsonl",
                                           "consolidate.jsonl") for r in _rows(tmp_path / name)}
    assert not {r["image"] for r in rows} & earlier and len({r["image"] for r in rows}) == 4
    objects = _objects(corpus)
    for name in _all_questions_per_scene(corpus, rows, "crowd"):
        assert objects[name] >= 2
    assert counts["questions"] == sum(len(r["conversations"]) // 2 for r in rows)
    # Later bench runs (skill_alone) leave the crowd's scenes out too.
    from bench.skill_alone import write

    write(corpus, tmp_path, "position", tmp_path / "alone", scenes=10_000, test=5, seed=1, min_objects=2)
    assert not {r["image"] for r in _rows(tmp_path / "alone" / "train.jsonl")} & {r["image"] for r in rows}


@needs_sources
def test_recall_brings_every_skill_back_on_fresh_scenes_with_the_crowd_replayed(corpus, tmp_path):
    _mixes_up_to_consolidate(corpus, tmp_path, CHAIN)
    write_crowd(corpus, tmp_path, CHAIN)
    counts = write_recall(corpus, tmp_path, CHAIN)
    rows = _rows(tmp_path / "recall.jsonl")
    good, problems = check_samples([tmp_path / "recall.jsonl"])
    assert counts["fresh_scenes"] >= 3
    assert not problems and len(good) == len(rows) == 3 + 2 + 2 + 1
    by_kind: dict[str, list[dict]] = {}
    for r in rows:
        by_kind.setdefault(r["id"].split(":")[0], []).append(r)
    assert {k: len(v) for k, v in by_kind.items()} == {"recall": 3, "crowd": 2, "describe": 2, "text": 1}
    earlier = {r.get("image") for name in ("instruct_images.jsonl", "drill.jsonl", "review.jsonl", "lone.jsonl",
                                           "consolidate.jsonl", "crowd.jsonl") for r in _rows(tmp_path / name)}
    fresh = [r["image"] for r in by_kind["recall"]]
    assert len(set(fresh)) == 3 and not set(fresh) & earlier
    assert all(len(r["conversations"]) >= 2 * 5 for r in by_kind["recall"])
    crowd = _rows(tmp_path / "crowd.jsonl")
    assert all(r in crowd for r in by_kind["crowd"])
    assert counts["scene_questions"] == sum(len(r["conversations"]) // 2 for r in by_kind["recall"])


@needs_sources
def test_tally_asks_every_count_question_of_scenes_no_earlier_mix_used(corpus, tmp_path):
    _mixes_up_to_consolidate(corpus, tmp_path, CHAIN)
    write_crowd(corpus, tmp_path, CHAIN)
    write_recall(corpus, tmp_path, CHAIN)
    counts = write_tally(corpus, tmp_path, CHAIN)
    rows = _rows(tmp_path / "tally.jsonl")
    good, problems = check_samples([tmp_path / "tally.jsonl"])
    assert counts["fresh_scenes"] > 4
    assert not problems and len(good) == len(rows) == counts["scenes"] == 4
    earlier = {r.get("image") for name in ("instruct_images.jsonl", "drill.jsonl", "review.jsonl", "lone.jsonl",
                                           "consolidate.jsonl", "crowd.jsonl", "recall.jsonl") for r in _rows(tmp_path / name)}
    assert not {r["image"] for r in rows} & earlier and len({r["image"] for r in rows}) == 4
    _all_questions_per_scene(corpus, rows, "tally", kind="count")
    assert all(len(r["conversations"]) >= 2 for r in rows)
    assert counts["questions"] == sum(len(r["conversations"]) // 2 for r in rows)


@needs_sources
def test_recount_brings_every_skill_back_with_tally_and_crowd_replayed(corpus, tmp_path):
    _mixes_up_to_consolidate(corpus, tmp_path, CHAIN)
    for write in (write_crowd, write_recall, write_tally):
        write(corpus, tmp_path, CHAIN)
    counts = write_recount(corpus, tmp_path, CHAIN)
    rows = _rows(tmp_path / "recount.jsonl")
    good, problems = check_samples([tmp_path / "recount.jsonl"])
    assert not problems and len(good) == len(rows) == 3 + 2 + 2 + 2 + 1
    by_kind: dict[str, list[dict]] = {}
    for r in rows:
        by_kind.setdefault(r["id"].split(":")[0], []).append(r)
    assert {k: len(v) for k, v in by_kind.items()} == {"recount": 3, "tally": 2, "crowd": 2, "describe": 2, "text": 1}
    assert counts["tally_replay"] == counts["crowd_replay"] == 2
    earlier = {r.get("image") for name in ("instruct_images.jsonl", "drill.jsonl", "review.jsonl", "lone.jsonl",
                                           "consolidate.jsonl", "crowd.jsonl", "recall.jsonl", "tally.jsonl")
               for r in _rows(tmp_path / name)}
    assert not {r["image"] for r in by_kind["recount"]} & earlier
    for mix in ("tally", "crowd"):
        replayed = _rows(tmp_path / f"{mix}.jsonl")
        assert all(r in replayed for r in by_kind[mix])


@needs_sources
def test_tint_asks_the_colour_questions_of_crowded_scenes_used_before_or_not(corpus, tmp_path):
    _mixes_up_to_consolidate(corpus, tmp_path, CHAIN)
    for write in (write_crowd, write_recall, write_tally, write_recount):
        write(corpus, tmp_path, CHAIN)
    counts = write_tint(corpus, tmp_path, CHAIN)
    rows = _rows(tmp_path / "tint.jsonl")
    good, problems = check_samples([tmp_path / "tint.jsonl"])
    assert not problems and len(good) == len(rows) == counts["scenes"] == 6 and len({r["image"] for r in rows}) == 6
    objects = _objects(corpus)
    for name in _all_questions_per_scene(corpus, rows, "tint", kind="color"):
        assert objects[name] >= 2
    assert counts["questions"] == sum(len(r["conversations"]) // 2 for r in rows)
    # Drawn from every crowded training scene with a colour question, earlier mixes' included.
    with_colour = {t["image"] for t in _rows(corpus / "triples_train.jsonl") if t["type"] == "color"}
    assert counts["crowded_scenes"] == len({n for n in with_colour if objects.get(n, 0) >= 2})
    again = write_tint(corpus, tmp_path / "again", replace(CHAIN, tint_scenes=counts["crowded_scenes"]))
    earlier = {r.get("image") for name in ("instruct_images.jsonl", "drill.jsonl", "review.jsonl", "consolidate.jsonl",
                                           "crowd.jsonl", "recall.jsonl", "tally.jsonl", "recount.jsonl")
               for r in _rows(tmp_path / name)}
    assert again["scenes"] == counts["crowded_scenes"] and {r["image"] for r in _rows(tmp_path / "again" / "tint.jsonl")} & earlier


@needs_sources
def test_retint_brings_every_skill_back_with_tint_tally_and_crowd_replayed(corpus, tmp_path):
    _mixes_up_to_consolidate(corpus, tmp_path, CHAIN)
    for write in (write_crowd, write_recall, write_tally, write_recount, write_tint):
        write(corpus, tmp_path, CHAIN)
    counts = write_retint(corpus, tmp_path, CHAIN)
    rows = _rows(tmp_path / "retint.jsonl")
    good, problems = check_samples([tmp_path / "retint.jsonl"])
    assert not problems and len(good) == len(rows) == 2 + 3 + 1 + 1 + 1 + 1
    by_kind: dict[str, list[dict]] = {}
    for r in rows:
        by_kind.setdefault(r["id"].split(":")[0], []).append(r)
    assert {k: len(v) for k, v in by_kind.items()} == {"retint": 2, "tint": 3, "tally": 1, "crowd": 1, "describe": 1,
                                                       "text": 1}
    assert counts["tint_replay"] == 3 and counts["tally_replay"] == counts["crowd_replay"] == 1
    earlier = {r.get("image") for name in ("instruct_images.jsonl", "drill.jsonl", "review.jsonl", "lone.jsonl",
                                           "consolidate.jsonl", "crowd.jsonl", "recall.jsonl", "tally.jsonl",
                                           "recount.jsonl", "tint.jsonl") for r in _rows(tmp_path / name)}
    assert not {r["image"] for r in by_kind["retint"]} & earlier
    for mix in ("tint", "tally", "crowd"):
        replayed = _rows(tmp_path / f"{mix}.jsonl")
        assert all(r in replayed for r in by_kind[mix])


def test_naming_asks_what_is_in_every_occupied_cell_and_what_the_image_shows_last():
    import random

    two_kinds = {"objects": [
        {"name": "red hexagon", "kind": "shape", "color": "red", "key": "hexagon", "count": 2,
         "cells": ["top left", "center"]},
        {"name": "pair of trousers", "kind": "fashion", "color": None, "key": "trouser", "count": 1,
         "cells": ["bottom right"]}]}
    turns = naming_turns(random.Random(0), two_kinds)
    cells = {q.rsplit("the ", 1)[1].rstrip("?"): a for q, a in turns}
    assert cells == {"top left": "a red hexagon", "center": "a red hexagon", "bottom right": "a pair of trousers"}
    one_kind = {"objects": [two_kinds["objects"][0]]}
    turns = naming_turns(random.Random(0), one_kind)
    assert len(turns) == 3 and turns[-1][1] == "two red hexagons"
    assert [a for _, a in turns[:2]] == ["a red hexagon"] * 2


def test_cell_labels_name_every_cell_in_raster_order_and_only_a_shapes_colour():
    from training.default_model import cell_labels

    layout = {"objects": [
        {"name": "red hexagon", "kind": "shape", "color": "red", "key": "hexagon", "count": 2, "cells": ["top left", "center"]},
        {"name": "pair of trousers", "kind": "fashion", "color": None, "key": "trouser", "count": 1, "cells": ["bottom right"]},
        {"name": "dog face", "kind": "emoji", "color": None, "key": "dog face", "count": 1, "cells": ["middle left"]},
        {"name": "arrow", "kind": "clipart", "color": None, "key": "arrow", "count": 1, "cells": ["top right"]}]}
    labels = cell_labels(layout)
    assert labels["object"] == ["shape:hexagon", "empty", "clipart:arrow", "emoji", "shape:hexagon", "empty",
                                "empty", "empty", "fashion:trouser"]  # an emoji by its kind alone: test glyphs are unseen
    assert labels["colour"] == ["red", None, None, None, "red", None, None, None, None]


def test_lookalikes_are_absent_known_and_as_many_as_the_yes_questions():
    import random

    known = {"red circle": "shape", "red star": "shape", "red square": "shape", "blue circle": "shape",
             "shirt": "fashion", "t-shirt": "fashion", "coat": "fashion", "sneaker": "fashion", "dog face": "emoji"}
    layout = {"objects": [
        {"name": "red circle", "kind": "shape", "color": "red", "key": "circle", "count": 1, "cells": ["center"]},
        {"name": "red star", "kind": "shape", "color": "red", "key": "star", "count": 2, "cells": ["top left", "top right"]},
        {"name": "t-shirt", "kind": "fashion", "color": None, "key": "T-shirt/top", "count": 1, "cells": ["bottom left"]},
        {"name": "dog face", "kind": "emoji", "color": None, "key": "dog face", "count": 1, "cells": ["bottom right"]}]}
    for seed in range(20):
        turns = lookalike_turns(random.Random(seed), layout, known)
        asked = {q.split(" a ", 1)[1].split(" in the")[0].rstrip("?"): a for q, a in turns}
        yes = {name for name, a in asked.items() if a == "yes"}
        no = {name for name, a in asked.items() if a == "no"}
        assert yes == {"red circle", "red star", "t-shirt"}  # the emoji has no look-alike list
        assert len(turns) == 6 and [a for _, a in turns].count("no") == 3
        # Red in another shape the scene lacks ("red star" is present, "red hexagon" is
        # never shown in training); a garment sharing no word with "t-shirt" (not "shirt").
        assert no <= {"red square", "coat", "sneaker"} and "red square" in no
    assert lookalike_turns(random.Random(0), {"objects": [layout["objects"][3]]}, known) == []


@needs_sources
def test_discern_names_objects_asks_about_lookalikes_and_keeps_every_skill(corpus, tmp_path):
    _mixes_up_to_consolidate(corpus, tmp_path, CHAIN)
    for write in (write_crowd, write_recall, write_tally, write_recount, write_tint, write_retint):
        write(corpus, tmp_path, CHAIN)
    counts = write_discern(corpus, tmp_path, CHAIN)
    rows = _rows(tmp_path / "discern.jsonl")
    good, problems = check_samples([tmp_path / "discern.jsonl"])
    assert not problems and len(good) == len(rows)
    by_kind: dict[str, list[dict]] = {}
    for r in rows:
        by_kind.setdefault(r["id"].split(":")[0], []).append(r)
    assert {k: len(v) for k, v in by_kind.items()} == {
        "name": 5, "alike": counts["lookalike_scenes"], "discern": counts["scene_conversations"], "tint": 2, "tally": 2, "crowd": 1,
        "describe": 1, "text": 1}
    assert 0 < counts["lookalike_scenes"] <= 6 and counts["naming_scenes"] == 5
    assert 0 < counts["scene_conversations"] <= 2  # the small corpus has few fresh scenes left
    layouts = {r["image"]: r for r in _rows(corpus / "layouts_train.jsonl")}
    named = [str(Path(r["image"]).relative_to(corpus.resolve())) for r in by_kind["name"]]
    alike = [str(Path(r["image"]).relative_to(corpus.resolve())) for r in by_kind["alike"]]
    assert not set(named) & set(alike)
    for r, name in zip(by_kind["name"], named):
        answers = [t["value"] for t in r["conversations"][1::2]]
        placed = sum(o["count"] for o in layouts[name]["objects"])
        assert len(answers) == placed + (len(layouts[name]["objects"]) == 1)
    for r in by_kind["alike"]:
        answers = [t["value"] for t in r["conversations"][1::2]]
        assert answers.count("yes") == answers.count("no") > 0
    assert counts["naming_questions"] == sum(len(r["conversations"]) // 2 for r in by_kind["name"])
    earlier = {r.get("image") for name in ("instruct_images.jsonl", "drill.jsonl", "review.jsonl", "lone.jsonl",
                                           "consolidate.jsonl", "crowd.jsonl", "recall.jsonl", "tally.jsonl",
                                           "recount.jsonl", "tint.jsonl", "retint.jsonl") for r in _rows(tmp_path / name)}
    assert not {r["image"] for r in by_kind["discern"]} & earlier
    for mix in ("tint", "tally", "crowd"):
        replayed = _rows(tmp_path / f"{mix}.jsonl")
        assert all(r in replayed for r in by_kind[mix])
    again = tmp_path / "again"
    shutil.copytree(tmp_path, again, ignore=lambda d, names: ["again", "discern.jsonl"])
    write_discern(corpus, again, CHAIN)
    assert (again / "discern.jsonl").read_bytes() == (tmp_path / "discern.jsonl").read_bytes()


def test_a_survey_asks_every_count_colour_and_position_and_balanced_yes_no():
    import random

    from training.corpus.scenes import Holdouts, Item, Vocabulary

    layout = {"objects": [
        {"name": "blue circle", "kind": "shape", "color": "blue", "key": "circle", "count": 1, "cells": ["top left"]},
        {"name": "green star", "kind": "shape", "color": "green", "key": "star", "count": 2, "cells": ["center", "bottom right"]},
        {"name": "sneaker", "kind": "fashion", "color": None, "key": "sneaker", "count": 1, "cells": ["bottom middle"]}],
        "word": None, "word_color": None}
    vocab = Vocabulary({"fashion": (Item("fashion", "", "coat", None, "coat"), Item("fashion", "", "sneaker", None, "sneaker"))})
    # Every colour of the square and the triangle held out: a "no" may never name one.
    held = tuple((shape, color) for shape in ("square", "triangle")
                 for color in ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown"))
    holdouts = Holdouts(shape_colors=held, counts=())
    for seed in range(30):
        turns = survey_turns(random.Random(seed), layout, vocab, holdouts)
        answers = dict(turns)
        assert len(answers) == len(turns)  # no question twice
        counts = {q: a for q, a in turns if a.isdigit()}
        assert set(counts.values()) >= {"1", "2", "4"}  # every kind counted (1 circle, 2 stars, 1 sneaker), and all 4
        assert sorted(a for a in answers.values() if a in ("blue", "green")) == ["blue", "green"]
        places = {a for a in answers.values() if a in ("top left", "bottom middle", "left", "right", "top", "bottom")}
        assert {"top left", "bottom middle", "left", "top", "bottom"} <= places  # where, left/right and top/bottom of each single
        present = [(q, a) for q, a in turns if a in ("yes", "no") and not q.startswith("Is the ")]
        assert [a for _, a in present].count("yes") == [a for _, a in present].count("no") == 3
        assert not any(f"{c} {s}" in q for q, a in present if a == "no" for s, c in held)
        assert sum(q.startswith(("What is in the", "What object is at", "What can you see in")) for q, _ in turns) <= 2
        # resurvey's skew: half again as many absent things (3 present here: round(4.5) = 4 absent)
        skewed = survey_turns(random.Random(seed), layout, vocab, holdouts, no_per_yes=1.5)
        present = [(q, a) for q, a in skewed if a in ("yes", "no") and not q.startswith("Is the ")]
        assert ([a for _, a in present].count("yes"), [a for _, a in present].count("no")) == (3, 4)
        assert {q for q, a in skewed if a.isdigit()} == set(counts)  # every count question still asked


@needs_sources
def test_survey_is_one_conversation_per_scene_with_captions_and_text_turns(corpus, tmp_path):
    _write_text_turn(tmp_path)
    recipe = replace(SMALL, survey_scenes=7, survey_caption_singles=2)
    counts = write_survey(corpus, tmp_path, recipe)
    rows = _rows(tmp_path / "survey.jsonl")
    good, problems = check_samples([tmp_path / "survey.jsonl"])
    assert not problems and len(good) == len(rows)
    kinds = [r["id"].split(":")[0] for r in rows]
    assert {k: kinds.count(k) for k in set(kinds)} == {"survey": 7, "describe": 2, "text": 1}
    scenes = [r for r in rows if r["id"].startswith("survey:")]
    assert all("/images/train/scene/" in r["image"] for r in scenes)
    assert counts == {"scenes": 7, "questions": sum(len(r["conversations"]) // 2 for r in scenes),
                      "caption_singles": 2, "text_turns": 1}
    layouts = {r["image"]: r for r in _rows(corpus / "layouts_train.jsonl")}
    for r in scenes:  # more than the corpus asks of a scene: at least a count per kind, the total and a yes and a no
        layout = layouts[str(Path(r["image"]).relative_to(corpus.resolve()))]
        assert len(r["conversations"]) // 2 >= len(layout["objects"]) + 3
    again = tmp_path / "again"
    again.mkdir()
    shutil.copy2(tmp_path / "text_turns.jsonl", again)
    write_survey(corpus, again, recipe)
    assert (again / "survey.jsonl").read_bytes() == (tmp_path / "survey.jsonl").read_bytes()


@needs_sources
def test_resurvey_asks_only_scenes_survey_did_not(corpus, tmp_path):
    _write_text_turn(tmp_path)
    train_scenes = [r["image"] for r in _rows(corpus / "layouts_train.jsonl")]
    recipe = replace(SMALL, survey_scenes=len(train_scenes) - 3, survey_caption_singles=0,
                     resurvey_scenes=7, resurvey_caption_singles=1)
    write_survey(corpus, tmp_path, recipe)
    counts = write_resurvey(corpus, tmp_path, recipe)
    surveyed = {r["image"] for r in _rows(tmp_path / "survey.jsonl") if r["id"].startswith("survey:")}
    rows = _rows(tmp_path / "resurvey.jsonl")
    scenes = [r for r in rows if r["id"].startswith("resurvey:")]
    root = str(corpus.resolve())
    # only the 3 scenes survey left are there to ask about: it takes those, none twice
    assert sorted(r["image"] for r in scenes) == sorted(f"{root}/{n}" for n in train_scenes if f"{root}/{n}" not in surveyed)
    assert counts["scenes"] == 3 and counts["caption_singles"] == 1 and counts["text_turns"] == 1
    good, problems = check_samples([tmp_path / "resurvey.jsonl"])
    assert not problems and len(good) == len(rows)


@needs_sources
def test_census_asks_fresh_mostly_crowded_scenes_every_object_by_its_cell(corpus, tmp_path):
    from training.corpus.scenes import CELL_NAMES
    from training.default_model import CROWDED, objects_in, write_census

    _write_text_turn(tmp_path)
    layouts = {r["image"]: r for r in _rows(corpus / "layouts_train.jsonl")}
    recipe = replace(SMALL, survey_scenes=6, survey_caption_singles=0, resurvey_scenes=6, resurvey_caption_singles=0,
                     census_scenes=10, census_crowded_share=0.7, census_caption_singles=1)
    write_survey(corpus, tmp_path, recipe)
    write_resurvey(corpus, tmp_path, recipe)
    counts = write_census(corpus, tmp_path, recipe)
    root = corpus.resolve()
    asked_before = {r["image"] for f in ("survey", "resurvey") for r in _rows(tmp_path / f"{f}.jsonl")
                    if r["id"].startswith(f"{f}:")}
    rows = _rows(tmp_path / "census.jsonl")
    scenes = [r for r in rows if r["id"].startswith("census:")]
    assert len(scenes) == 10 and not {r["image"] for r in scenes} & asked_before
    placed = [objects_in(layouts[str(Path(r["image"]).relative_to(root))]) for r in scenes]
    assert sum(n >= CROWDED for n in placed) == counts["crowded_scenes"] == 7  # 70 % of the 10, from the crowded pool
    by_cell = tuple(f"{ask} the {cell}?" for ask in ("What is in", "What object is at", "What can you see in")
                    for cell in CELL_NAMES.values())
    for r, n in zip(scenes, placed):  # every placed object is asked about by its cell
        questions = [turn["value"].removeprefix("<image>\n") for turn in r["conversations"][::2]]
        assert sum(q in by_cell for q in questions) == n
    assert counts["caption_singles"] == 1 and counts["text_turns"] == 1
    good, problems = check_samples([tmp_path / "census.jsonl"])
    assert not problems and len(good) == len(rows)
    again = tmp_path / "again"
    again.mkdir()
    for name in ("text_turns", "survey", "resurvey"):
        shutil.copy2(tmp_path / f"{name}.jsonl", again)
    write_census(corpus, again, recipe)
    assert (again / "census.jsonl").read_bytes() == (tmp_path / "census.jsonl").read_bytes()


@needs_sources
def test_resight_tells_objects_apart_again_on_fresh_scenes_with_discern_replayed(corpus, tmp_path):
    from bench.resight import write_resight

    _mixes_up_to_consolidate(corpus, tmp_path, CHAIN)
    for write in (write_crowd, write_recall, write_tally, write_recount, write_tint, write_retint, write_discern):
        write(corpus, tmp_path, CHAIN)
    counts = write_resight(corpus, tmp_path, seed=0, naming_scenes=4, lookalike_scenes=5, conversations=2,
                           replays=(("tint", 1), ("tally", 1), ("crowd", 1), ("discern", 3)), caption_singles=1)
    rows = _rows(tmp_path / "resight.jsonl")
    good, problems = check_samples([tmp_path / "resight.jsonl"])
    assert not problems and len(good) == len(rows)
    kinds: dict[str, int] = {}
    for r in rows:
        kinds[r["id"].split(":")[0]] = kinds.get(r["id"].split(":")[0], 0) + 1
    # discern's rows come back, but not its text turns and captions, nor a row twice (check_samples: no id twice)
    replayed = [r for r in rows if r["id"].split(":")[0] in ("name", "alike", "discern")]
    assert counts["discern_replay"] == 3 and 0 < len(replayed) <= 3
    assert all(r in _rows(tmp_path / "discern.jsonl") for r in replayed)
    assert kinds["text"] == counts["text_turns"] == 1 and kinds["describe"] == counts["caption_singles"] == 1
    assert len(rows) == sum(counts[k] for k in ("scene_conversations", "naming_scenes", "lookalike_scenes", "tint_replay",
                                               "tally_replay", "crowd_replay", "discern_replay", "caption_singles",
                                               "text_turns"))
    assert kinds["resight-name"] == counts["naming_scenes"] == 4 and kinds["resight-alike"] == counts["lookalike_scenes"]
    assert counts["tint_replay"] == counts["tally_replay"] == counts["crowd_replay"] == 1
    # Its own fresh scenes are none that discern or any earlier mix asked about.
    earlier = {r.get("image") for name in ("instruct_images", "drill", "review", "lone", "consolidate", "crowd", "recall",
                                           "tally", "recount", "tint", "retint", "discern") for r in _rows(tmp_path / f"{name}.jsonl")}
    own = [r for r in rows if r["id"].startswith("resight:")]
    assert len(own) == counts["scene_conversations"] and not {r["image"] for r in own} & earlier
    # Another seed than discern's: not the same naming scenes.
    assert {r["image"] for r in rows if r["id"].startswith("resight-name:")} != {
        r["image"] for r in _rows(tmp_path / "discern.jsonl") if r["id"].startswith("name:")}


@needs_sources
def test_sharpen_captions_hold_every_single_shape_caption_and_as_many_others(corpus, tmp_path):
    from bench.resight import write_sharpen

    counts = write_sharpen(corpus, tmp_path / "sharpen.jsonl", 40, seed=0)
    rows = _rows(tmp_path / "sharpen.jsonl")
    train = _rows(corpus / "captions_train.jsonl")
    shapes = [r for r in train if "/shape/" in r["image"]]
    assert counts == {"shape_captions": len(shapes), "other_captions": 40} and len(rows) == len(shapes) + 40
    assert all(Path(r["image"]).is_absolute() and Path(r["image"]).is_file() for r in rows)
    as_read = {(str(corpus.resolve() / r["image"]), r["caption"]) for r in train}
    assert {(r["image"], r["caption"]) for r in rows} <= as_read
    assert sum("/shape/" in r["image"] for r in rows) == len(shapes)
    assert [r["image"] for r in rows[:len(shapes)]] != [str(corpus.resolve() / r["image"]) for r in shapes]  # shuffled
    first = (tmp_path / "sharpen.jsonl").read_bytes()
    write_sharpen(corpus, tmp_path / "sharpen.jsonl", 40, seed=0)
    assert (tmp_path / "sharpen.jsonl").read_bytes() == first


def test_clip_captions_are_the_corpus_with_more_single_shape_copies(corpus, tmp_path):
    from training.default_model import write_clip_captions

    counts = write_clip_captions(corpus, tmp_path / "clip.jsonl", shape_copies=3, seed=0)
    rows = _rows(tmp_path / "clip.jsonl")
    train = _rows(corpus / "captions_train.jsonl")
    shapes = [r for r in train if "/shape/" in r["image"]]
    assert shapes and counts == {"captions": len(train), "shape_captions": len(shapes), "pairs": len(train) + 3 * len(shapes)}
    pairs = lambda items, root="": sorted((root + r["image"], r["caption"]) for r in items)  # noqa: E731
    root = f"{corpus.resolve()}/"
    assert pairs(rows) == pairs(train + shapes * 3, root)  # every caption once, each single-shape one 4 times
    assert all(Path(r["image"]).is_file() for r in rows)
    assert [r["image"] for r in rows] != [root + r["image"] for r in train + shapes * 3]  # shuffled
    first = (tmp_path / "clip.jsonl").read_bytes()
    write_clip_captions(corpus, tmp_path / "clip.jsonl", shape_copies=3, seed=0)
    assert (tmp_path / "clip.jsonl").read_bytes() == first


def test_a_bundles_vision_tower_goes_into_a_clip_and_back(tiny_parts, tiny_bundle, tmp_path):
    import torch
    from transformers import AutoProcessor, CLIPModel, CLIPVisionModel

    from bench.resight import bundle_with_tower, clip_with_tower
    from tests.conftest import make_vision_dir
    from vlm_chat.model import VisionLanguageModel

    clip = tmp_path / "clip"
    shutil.copytree(tiny_parts["clip_full"], clip)
    AutoProcessor.from_pretrained(SHIPPED_CLIP).save_pretrained(clip)  # the processor the CLIP trainer reads
    tower = make_vision_dir(tmp_path / "tuned-tower", seed=7)  # as a bundle's trained vision/ holds it
    clip_with_tower(clip, tower, tmp_path / "joined")
    joined, original = CLIPModel.from_pretrained(tmp_path / "joined"), CLIPModel.from_pretrained(clip)
    source = CLIPVisionModel.from_pretrained(tower)
    tuned = getattr(source, "vision_model", source).state_dict()  # older transformers keep a vision_model wrapper
    for name, weight in joined.state_dict().items():
        if name.startswith("vision_model."):
            assert torch.equal(weight, tuned[name.removeprefix("vision_model.")]), name
        else:
            assert torch.equal(weight, original.state_dict()[name]), name
    assert not torch.equal(joined.vision_model.embeddings.patch_embedding.weight,
                           original.vision_model.embeddings.patch_embedding.weight)
    assert (tmp_path / "joined" / "processor_config.json").is_file()

    bundle = tmp_path / "bundle"  # a copy: the session's tiny bundle stays as it is
    shutil.copytree(tiny_bundle[0], bundle)
    (bundle / "checkpoints").mkdir()
    bundle_with_tower(bundle, tmp_path / "joined", tmp_path / "swapped")
    assert not (tmp_path / "swapped" / "checkpoints").exists()
    assert json.loads((tmp_path / "swapped" / "vlm_config.json").read_text())["vision"]["name_or_path"] == "vision"
    assert (tmp_path / "swapped" / "projector.safetensors").read_bytes() == (bundle / "projector.safetensors").read_bytes()
    model, _ = VisionLanguageModel.from_pretrained(tmp_path / "swapped", device="cpu")
    loaded = model.vision_tower.model
    loaded = getattr(loaded, "vision_model", loaded)
    for name, weight in joined.vision_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], weight), name


@needs_sources
def test_from_shipped_rewrites_the_data_it_was_trained_on_and_goes_on_after_its_last_stage(corpus, tmp_path,
                                                                                           monkeypatch):
    from dataclasses import asdict

    import training.default_model as dm
    from vlm_chat.errors import UserFacingError

    # The build that made the "shipped" model: its data files and the counts it recorded.
    made = tmp_path / "made"
    stages = {"corpus": {"seconds": 1, "result": {"reused": str(corpus)}}, "clip": {"seconds": 0, "result": {"reused": "clip"}},
              "bundle": {"seconds": 1, "result": None}, "mix": {"seconds": 1, "result": write_mixes(corpus, made, CHAIN)}}

    def distill(bundle, work, recipe):
        _write_text_turn(work)
        return {"text_turns": 1}

    stages["distill"] = {"seconds": 1, "result": distill(None, made, CHAIN)}
    for stage in ("align", "instruct"):
        stages[stage] = {"seconds": 60, "result": None}
    for stage in ("drill", "review", "lone", "consolidate", "crowd", "recall", "tally", "recount"):
        stages[stage] = {"seconds": 60, "result": dm.MIX_WRITERS[stage](corpus, made, CHAIN)}
    stages["eval"] = stages["ship"] = {"seconds": 1, "result": None}
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "projector.safetensors").write_bytes(b"weights")
    (shipped / "scores.json").write_text("{}")
    record = {"recipe": asdict(CHAIN), "stages": stages, "unfinished_seconds": {}}
    (shipped / "recipe.json").write_text(json.dumps(record))

    commands = []

    def cli(argv):  # only `vlm-chat build` of the untrained bundle is expected
        commands.append(argv[0])
        (Path(argv[argv.index("--out") + 1]) / "vlm_config.json").parent.mkdir(parents=True)
        (Path(argv[argv.index("--out") + 1]) / "vlm_config.json").write_text("{}")

    monkeypatch.setattr(dm, "distill_text_turns", distill)
    monkeypatch.setattr(dm, "_cli", cli)
    work = tmp_path / "work"
    paths = dm.BuildPaths(work=work, corpus=corpus, clip="shipped", out=shipped)
    assert dm.continue_from_shipped(paths, CHAIN, shipped) == "recount"
    assert commands == ["build"]  # the untrained bundle only; the corpus is there
    for name in ("align", "instruct_images", "eval_triples", "eval_captions", "drill", "review", "lone", "consolidate",
                 "crowd", "recall", "tally", "recount"):
        assert (work / f"{name}.jsonl").read_bytes() == (made / f"{name}.jsonl").read_bytes(), name
    assert (work / "recount" / "projector.safetensors").read_bytes() == b"weights"
    assert not (work / "recount" / "recipe.json").exists() and not (work / "recount" / "scores.json").exists()
    state = json.loads((work / "state.json").read_text())
    assert list(state["stages"]) == list(dm.STAGES[:dm.STAGES.index("recount") + 1])  # eval and ship run again
    assert state["stages"]["crowd"] == stages["crowd"] and dm.first_inserted_stage(state["stages"]) is None
    assert dm.continue_from_shipped(paths, CHAIN, shipped) == "recount"  # the same command again: resumes

    (tmp_path / "w1").mkdir()
    (tmp_path / "w1" / "state.json").write_text(json.dumps({"stages": {"corpus": stages["corpus"]}}))
    with pytest.raises(UserFacingError, match="new --work"):  # another build's work dir is left alone
        dm.continue_from_shipped(replace(paths, work=tmp_path / "w1"), CHAIN, shipped)
    with pytest.raises(UserFacingError, match="changed at stage 'crowd'"):
        dm.continue_from_shipped(replace(paths, work=tmp_path / "w2"), replace(CHAIN, crowd_scenes=5), shipped)
    with pytest.raises(UserFacingError, match="--clip shipped"):
        dm.continue_from_shipped(replace(paths, work=tmp_path / "w3", clip="train"), CHAIN, shipped)
    # A model on a CLIP its build trained (the tiles recipe's): no CLIP in WORK, so the untrained
    # bundle (text-only distillation and baseline) is built on the model's own vision tower.
    stages["clip"] = {"seconds": 2700, "result": {"pairs": 10}}
    (shipped / "recipe.json").write_text(json.dumps(record))
    seen = []
    monkeypatch.setattr(dm, "_cli", lambda argv: seen.append(argv) or cli(argv))
    assert dm.continue_from_shipped(replace(paths, work=tmp_path / "w5", clip="train"), CHAIN, shipped) == "recount"
    assert [argv[argv.index("--vision") + 1] for argv in seen] == [str(shipped / "vision")]
    stages["crowd"]["result"]["scenes"] += 1
    (shipped / "recipe.json").write_text(json.dumps(record))
    with pytest.raises(UserFacingError, match=r"\[crowd\] the data differ.*scenes 4 \(recorded 5\)"):
        dm.continue_from_shipped(replace(paths, work=tmp_path / "w4"), CHAIN, shipped)


def test_ship_copies_trained_parts_and_leaves_the_llm_a_reference(tiny_bundle, tmp_path):
    bundle, _, _ = tiny_bundle
    out = tmp_path / "default"
    (tmp_path / "scores.json").write_text("{}")
    result = ship(bundle, out, {"scores.json": tmp_path / "scores.json", "absent.json": tmp_path / "absent.json"})
    assert (out / "vlm_config.json").is_file() and (out / "projector.safetensors").is_file()
    assert (out / "scores.json").is_file() and not (out / "absent.json").exists()
    assert not (out / "llm").exists()
    assert result["megabytes"] < 50


def test_report_says_which_bars_are_met_and_by_how_much_others_are_missed():
    from training.default_model import report

    scores = {
        "accuracy": 0.9, "n": 100,
        "by_type": {"count": {"accuracy": 0.7, "n": 20}, "color": {"accuracy": 0.95, "n": 20},
                    "position": {"accuracy": 0.91, "n": 20}, "read": {"accuracy": 0.5, "n": 4}},
        "yes_no": {"n": 40, "accuracy": 0.9, "precision": 0.9, "recall": 0.9, "f1": 0.9, "yes_share": 0.62, "true_yes_share": 0.5},
        "captions": {"n": 5, "bleu4": 0.25, "cider": 1.5},
    }
    state = {"stages": {"corpus": {"seconds": 0.0, "result": {"reused": "/x/corpus"}},  # recorded before machines were
                        "instruct": {"seconds": 600.0, "machines": ["AMD EPYC, 2 CPUs", "Xeon, 2 CPUs"], "result": None}}}
    text = report(scores, {"tuned_with_image": {"hits": 7, "n": 8}}, state)
    assert "| counting | 70.0 % | ≥ 75 % | missed by 5.0 pts |" in text
    assert "| colour | 95.0 % | ≥ 90 % | met |" in text
    assert "| yes/no: \"yes\" share minus true share | 12.0 % | ≤ 10 % | missed by 2.0 pts |" in text
    assert "| read (n 4) | 50.0 % |" in text
    assert "1.500" in text and "7 / 8" in text
    assert "| instruct | 10.0 min | AMD EPYC, 2 CPUs; Xeon, 2 CPUs |" in text
    assert "| corpus | 0.0 min (reused: corpus) | not recorded |" in text


@needs_sources
def test_an_interrupted_stage_counts_the_time_spent_before_the_kill(corpus, tmp_path, tiny_parts, monkeypatch):
    import training.default_model as recipe_module

    recipe = replace(SMALL, llm=str(tiny_parts["llm"]))
    paths = BuildPaths(work=tmp_path / "work", corpus=corpus, clip="shipped", out=tmp_path / "shipped")
    real_write_mixes = recipe_module.write_mixes

    def killed(*args):
        import time

        time.sleep(0.3)
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe_module, "write_mixes", killed)
    monkeypatch.setattr(recipe_module, "machine", lambda: "machine A")
    with pytest.raises(KeyboardInterrupt):
        build_default(paths, recipe, until="mix")
    state = json.loads((paths.work / "state.json").read_text())
    assert "mix" not in state["stages"] and state["unfinished_seconds"]["mix"] >= 0.3
    assert state["unfinished_machines"]["mix"] == ["machine A"]
    # The build resumes on another machine: the stage's time and both machines are kept.
    monkeypatch.setattr(recipe_module, "write_mixes", real_write_mixes)
    monkeypatch.setattr(recipe_module, "machine", lambda: "machine B")
    state = build_default(paths, recipe, until="mix")
    assert state["stages"]["mix"]["seconds"] >= 0.3 and "mix" not in state["unfinished_seconds"]
    assert state["stages"]["mix"]["machines"] == ["machine A", "machine B"] and "mix" not in state["unfinished_machines"]
    assert state["stages"]["corpus"]["machines"] == ["machine A"]  # finished on the first run, not touched again


@needs_sources
def test_a_running_stage_keeps_its_time_so_far_on_disk_so_a_sigkill_loses_little(corpus, tmp_path, tiny_parts, monkeypatch):
    import time

    import training.default_model as recipe_module

    recipe = replace(SMALL, llm=str(tiny_parts["llm"]))
    paths = BuildPaths(work=tmp_path / "work", corpus=corpus, clip="shipped", out=tmp_path / "shipped")
    real_write_mixes, on_disk = recipe_module.write_mixes, []

    def slow(*args):  # what a SIGKILL now would leave behind: the state file as it is
        time.sleep(0.5)
        on_disk.append(json.loads((paths.work / "state.json").read_text()))
        return real_write_mixes(*args)

    monkeypatch.setattr(recipe_module, "HEARTBEAT_SECONDS", 0.05)
    monkeypatch.setattr(recipe_module, "write_mixes", slow)
    state = build_default(paths, recipe, until="mix")
    assert "mix" not in on_disk[0]["stages"]
    assert 0.3 <= on_disk[0]["unfinished_seconds"]["mix"] <= state["stages"]["mix"]["seconds"]
    assert state["stages"]["mix"]["seconds"] >= 0.5 and "mix" not in state["unfinished_seconds"]
    assert json.loads((paths.work / "state.json").read_text()) == state
    assert not list(paths.work.glob("*.partial"))


@needs_sources
def test_lone_object_mix_holds_every_position_question_of_one_object_scenes(corpus, tmp_path):
    from bench.lone_objects import write

    counts = write(corpus, tmp_path, scenes=5, test=2, seed=1)  # the small corpus has 2 such test questions
    layouts = {str((corpus / r["image"]).resolve()): r for s in ("train", "test") for r in _rows(corpus / f"layouts_{s}.jsonl")}
    position: dict[str, list] = {}
    for s in ("train", "test"):
        for t in _rows(corpus / f"triples_{s}.jsonl"):
            if t["type"] == "position":
                position.setdefault(str((corpus / t["image"]).resolve()), []).append((t["question"], t["answer"]))
    train, test = _rows(tmp_path / "train.jsonl"), _rows(tmp_path / "test.jsonl")
    good, problems = check_samples([tmp_path / "train.jsonl", tmp_path / "test.jsonl"])
    assert not problems and len(good) == len(train) + len(test) == 5 + 2 == counts["train_scenes"] + counts["test_questions"]
    for row in train:
        assert "/train/" in row["image"] and sum(o["count"] for o in layouts[row["image"]]["objects"]) == 1
        turns = [(q["value"].removeprefix("<image>\n"), a["value"]) for q, a in zip(row["conversations"][::2], row["conversations"][1::2])]
        assert sorted(turns) == sorted(position[row["image"]])
    for row in test:
        assert "/test/" in row["image"] and row["type"] == "position"
        assert sum(o["count"] for o in layouts[row["image"]]["objects"]) == 1
        assert (row["question"], row["answer"]) in position[row["image"]]


@needs_sources
def test_skill_alone_mix_holds_one_type_of_question_about_scenes_the_build_never_used(corpus, tmp_path):
    from bench.skill_alone import write

    work = tmp_path / "work"
    write_mixes(corpus, work, replace(SMALL, instruct_conversations=10))
    counts = write(corpus, work, "count", tmp_path / "out", scenes=6, test=3, seed=2)
    used = {r["image"] for r in _rows(work / "instruct_images.jsonl") if r["id"].startswith("scene:")}
    count: dict[str, list] = {}
    for s in ("train", "test"):
        for t in _rows(corpus / f"triples_{s}.jsonl"):
            if t["type"] == "count":
                count.setdefault(str((corpus / t["image"]).resolve()), []).append((t["question"], t["answer"]))
    train, test = _rows(tmp_path / "out" / "train.jsonl"), _rows(tmp_path / "out" / "test.jsonl")
    good, problems = check_samples([tmp_path / "out" / "train.jsonl", tmp_path / "out" / "test.jsonl"])
    assert not problems and len(good) == len(train) + len(test) == 6 + 3 == counts["train_scenes"] + counts["test_questions"]
    assert counts["scenes_used_by_the_build"] == len(used) > 0
    for row in train:
        assert "/train/" in row["image"] and row["image"] not in used
        turns = [(q["value"].removeprefix("<image>\n"), a["value"]) for q, a in zip(row["conversations"][::2], row["conversations"][1::2])]
        assert turns == count[row["image"]]  # all of them, in corpus order
    for row in test:
        assert "/test/" in row["image"] and row["type"] == "count" and (row["question"], row["answer"]) in count[row["image"]]


@needs_sources
def test_skill_alone_keeps_only_scenes_of_min_to_max_objects(corpus, tmp_path):
    from bench.skill_alone import write

    write(corpus, tmp_path / "work", "position", tmp_path / "out", scenes=5, test=3, seed=2, min_objects=3, max_objects=4)
    objects = {str((corpus / r["image"]).resolve()): sum(o["count"] for o in r["objects"])
               for s in ("train", "test") for r in _rows(corpus / f"layouts_{s}.jsonl")}
    rows = _rows(tmp_path / "out" / "train.jsonl") + _rows(tmp_path / "out" / "test.jsonl")
    assert len(rows) == 5 + 3 and all(3 <= objects[r["image"]] <= 4 for r in rows)


@needs_sources
def test_skill_alone_reuse_draws_from_the_scenes_the_build_used_too(corpus, tmp_path):
    from bench.skill_alone import write

    work = tmp_path / "work"
    write_mixes(corpus, work, replace(SMALL, instruct_conversations=10))
    used = {r["image"] for r in _rows(work / "instruct_images.jsonl") if r["id"].startswith("scene:")}
    fresh = write(corpus, work, "count", tmp_path / "fresh", scenes=10**6, test=1, seed=2)
    every = write(corpus, work, "count", tmp_path / "every", scenes=10**6, test=1, seed=2, reuse=True)
    images = {r["image"] for r in _rows(tmp_path / "every" / "train.jsonl")}
    assert every["train_scenes"] == len(images) > fresh["train_scenes"] > 0
    assert images & used and images >= {r["image"] for r in _rows(tmp_path / "fresh" / "train.jsonl")}


def _model_of(command: list[str]) -> str:
    return command[command.index("--model") + 1]


def test_a_skipped_stage_is_left_out_and_the_next_one_goes_on_from_the_last_one_run():
    from training.default_model import SKILL_STAGES, BuildPaths, bench_later_steps, stage_commands
    from vlm_chat.errors import UserFacingError

    model_of = _model_of
    paths = BuildPaths(work=Path("/w"), corpus=Path("/c"), clip="shipped", out=Path("/o"))
    between = ("review", "lone", "consolidate", "crowd", "recall", "tally", "recount", "tint", "retint", "discern")
    assert between == SKILL_STAGES
    full, short = stage_commands(paths, Recipe()), stage_commands(paths, replace(Recipe(), skip=between))
    assert model_of(full["survey"]) == "/w/discern" and model_of(short["survey"]) == "/w/drill"
    assert model_of(short["drill"]) == model_of(full["drill"]) == "/w/instruct"
    assert model_of(short["resurvey"]) == "/w/survey" and model_of(short["census"]) == "/w/resurvey"
    assert not set(between) & set(short)
    assert short["survey"][short["survey"].index("--data") + 1] == "/w/survey.jsonl"  # its own mix still
    assert bench_later_steps(between) == ("drill", "drill-eval", "survey", "survey-eval", "resurvey", "resurvey-eval",
                                          "census", "census-eval", "naming", "naming-eval")
    assert model_of(short["naming"]) == "/w/census" and "sharpen" not in short  # off unless the recipe turns it on
    short = stage_commands(paths, replace(Recipe(), skip=between, sharpen_tower=True))
    # the tower stage: its own trainer, on the cell labels and their validation file, from naming's bundle
    sharpen = short["sharpen"]
    assert sharpen[:3] == ["train", "--stage", "sharpen"] and model_of(sharpen) == "/w/naming"
    assert sharpen[sharpen.index("--val") + 1] == "/w/sharpen_val.jsonl" and "--resume" not in sharpen
    assert sharpen[sharpen.index("--max-steps") + 1] == "1500" and sharpen[sharpen.index("--anchor") + 1] == "1.0"
    assert model_of(short["rename"]) == "/w/sharpen" and short["rename"][2] == "instruct"
    assert model_of(stage_commands(paths, replace(Recipe(), skip=("sharpen",), sharpen_tower=True))["rename"]) == "/w/naming"
    with pytest.raises(UserFacingError, match="cannot skip align, instruct: only the stages after instruct"):
        stage_commands(paths, replace(Recipe(), skip=("align", "instruct")))


def test_training_stages_take_the_recipes_precision_unless_their_settings_name_one():
    from training.default_model import RECIPES, BuildPaths, first_changed_stage, recipe_json, stage_commands

    def precision(command):
        return command[command.index("--mixed-precision") + 1]

    paths = BuildPaths(work=Path("/w"), corpus=Path("/c"), clip="shipped", out=Path("/o"))
    tiles = replace(Recipe(), **RECIPES["tiles"])
    commands = stage_commands(paths, tiles)
    assert [precision(commands[s]) for s in ("align", "instruct", "drill", "census")] == ["auto", "auto", "no", "auto"]
    assert precision(stage_commands(paths, replace(tiles, mixed_precision="no"))["census"]) == "no"
    # A build from before the field counts as "auto"; changing it re-runs every training stage.
    before = recipe_json(tiles)
    del before["mixed_precision"]
    assert first_changed_stage(before, recipe_json(tiles)) is None
    assert first_changed_stage(before, recipe_json(replace(tiles, mixed_precision="no"))) == "align"


@needs_sources
def test_a_recipe_that_skips_stages_writes_their_mixes_trains_the_rest_in_a_chain_and_ships_the_last(
        corpus, tmp_path, monkeypatch):
    import training.default_model as dm

    ran, evaluated = [], []

    def cli(argv):  # a stage's bundle appears where its command says
        ran.append(argv)
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "vlm_config.json").write_text("{}")

    def distill(bundle, work, recipe):
        text = {"id": "text:0:0", "conversations": [{"from": "human", "value": "Hi!"}, {"from": "gpt", "value": "Hello."}]}
        (work / "text_turns.jsonl").write_text(json.dumps(text) + "\n")
        return {"text_turns": 1}

    monkeypatch.setattr(dm, "_cli", cli)
    monkeypatch.setattr(dm, "distill_text_turns", distill)
    monkeypatch.setattr(dm, "evaluate_bundle", lambda bundle, *rest, **kw: evaluated.append(bundle.name))
    recipe = replace(CHAIN, survey_scenes=3, resurvey_scenes=3, census_scenes=3, naming_scenes=3, naming_every_skill=1,
                     naming_caption_singles=1, sharpen_val_scenes=4, rename_scenes=2, rename_every_skill=1,
                     rename_caption_singles=1, sharpen_tower=True, skip=dm.SKILL_STAGES)
    paths = dm.BuildPaths(work=tmp_path / "work", corpus=corpus, clip="shipped", out=tmp_path / "shipped")
    state = dm.build_default(paths, recipe)
    trained = {argv[argv.index("--out") + 1].split("/")[-1]: argv for argv in ran if argv[0] == "train"}
    assert list(trained) == ["align", "instruct", "drill", "survey", "resurvey", "census", "naming", "sharpen", "rename"]
    assert _model_of(trained["sharpen"]).endswith("/work/naming") and _model_of(trained["rename"]).endswith("/work/sharpen")
    assert len(_rows(paths.work / "sharpen.jsonl")) == len(_rows(corpus / "layouts_train.jsonl"))
    assert len(_rows(paths.work / "sharpen_val.jsonl")) == 4
    named = {r["id"] for r in _rows(paths.work / "naming.jsonl")}
    renamed = {r["id"] for r in _rows(paths.work / "rename.jsonl") if r["id"].startswith(("name:", "every:"))}
    assert len(renamed) == 3 and not named & renamed  # rename's scenes are fresh: none naming asked about
    assert _model_of(trained["survey"]).endswith("/work/drill") and _model_of(trained["resurvey"]).endswith("/work/survey")
    assert _model_of(trained["census"]).endswith("/work/resurvey") and _model_of(trained["naming"]).endswith("/work/census")
    for stage in dm.SKILL_STAGES:  # each mix written (later ones may read it), nothing trained on it
        assert (paths.work / f"{stage}.jsonl").is_file() and not (paths.work / stage).exists(), stage
        assert state["stages"][stage]["result"]["trained"] is False
    assert evaluated == ["rename"] and (paths.out / "vlm_config.json").is_file()
    assert json.loads((paths.work / "state.json").read_text())["recipe"]["skip"] == list(dm.SKILL_STAGES)
    # The same recipe with one stage less skipped trains again from that stage on.
    ran.clear()
    dm.build_default(paths, replace(recipe, skip=dm.SKILL_STAGES[1:]), until="review")
    assert [argv[argv.index("--out") + 1].split("/")[-1] for argv in ran] == ["drill", "review"]


@needs_sources
def test_tiles_after_align_aligns_on_one_run_of_image_tokens_then_lays_them_out_in_tiles(
        corpus, tiny_bundle, tmp_path, monkeypatch):
    import shutil

    import training.default_model as dm
    from vlm_chat.config import VLMConfig
    from vlm_chat.errors import ConfigError

    ran = []

    def cli(argv):  # build copies the tiny bundle; train copies the bundle it goes on from
        ran.append(argv)
        source = tiny_bundle[0] if argv[0] == "build" else Path(_model_of(argv))
        shutil.copytree(source, argv[argv.index("--out") + 1])

    monkeypatch.setattr(dm, "_cli", cli)
    monkeypatch.setattr(dm, "distill_text_turns", lambda bundle, work, recipe: {"text_turns": 0})
    recipe = replace(CHAIN, image_tiles=2, tiles_after_align=True)
    paths = dm.BuildPaths(work=tmp_path / "work", corpus=corpus, clip="shipped", out=tmp_path / "shipped")
    dm.build_default(paths, recipe, until="instruct")
    build = next(argv for argv in ran if argv[0] == "build")
    assert build[build.index("--image-tiles") + 1] == "0"
    assert VLMConfig.load(paths.work / "bundle").image_tiles == 0
    assert VLMConfig.load(paths.work / "align").image_tiles == 2  # set once align is done
    assert VLMConfig.load(paths.work / "instruct").image_tiles == 2
    # Without the flag the bundle has its tiles from the start; a count the token grid does
    # not divide by (4x4 tokens, 3 tiles) is refused before it is written.
    without = dm.stage_commands(paths, replace(recipe, tiles_after_align=False))["bundle"]
    assert without[without.index("--image-tiles") + 1] == "2"
    with pytest.raises(ConfigError, match="image_tiles=3"):
        dm.set_image_tiles(paths.work / "bundle", 3)
    assert VLMConfig.load(paths.work / "bundle").image_tiles == 0


def test_cell_tiles_runs_the_tiles_recipe_with_this_runs_tiles_and_skipped_stages(tmp_path, monkeypatch, capsys):
    import sys

    import bench.cell_tiles as cell_tiles
    from training.default_model import SKILL_STAGES

    seen = {}
    monkeypatch.setattr(cell_tiles, "run_bench_steps", lambda steps, until, out, base, recipe, commands, own: seen.update(
        steps=steps, until=until, recipe=recipe, commands=commands))
    argv = ["cell_tiles.py", "--base", str(tmp_path), "--grid", str(tmp_path), "--out", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", [*argv, "--tiles", "2", "--skip", ",".join(SKILL_STAGES)])
    cell_tiles.main()
    assert seen["steps"] == ("tiles", "instruct", "eval", "drill", "drill-eval", "survey", "survey-eval", "resurvey",
                             "resurvey-eval", "census", "census-eval", "naming", "naming-eval")
    recipe = seen["recipe"]
    assert (recipe.image_tiles, recipe.token_reduction, recipe.clip_patch_size) == (2, "none", 16)
    assert recipe.drill["mixed_precision"] == "no" and "--group-by-length" in seen["commands"]["drill"]
    assert _model_of(seen["commands"]["survey"]) == str(tmp_path / "out" / "drill")
    monkeypatch.setattr(sys, "argv", [*argv, "--skip", "review", "--until", "review"])
    with pytest.raises(SystemExit):
        cell_tiles.main()
    assert "--until review: that step is skipped" in capsys.readouterr().err


def test_default_build_ships_the_tiles_recipe_and_builds_the_chain_into_work_not_the_package(tmp_path, monkeypatch, capsys):
    import training.default_model as dm
    from cli.main import main
    from vlm_chat.defaults import SHIPPED_DEFAULT

    runs = []
    monkeypatch.setattr(dm, "build_default", lambda paths, recipe, until=None: runs.append((paths, recipe)) or {"stages": {}})
    assert main(["default", "build", "--recipe", "chain", "--work", str(tmp_path / "w"), "--until", "mix"]) == 0
    assert main(["default", "build", "--work", str(tmp_path / "w2"), "--until", "mix"]) == 0
    (chain_paths, chain), (tiles_paths, tiles) = runs
    assert chain_paths.out == tmp_path / "w" / "model" and tiles_paths.out == SHIPPED_DEFAULT
    assert tiles.skip == dm.SKILL_STAGES and tiles.image_tiles == 3 and tiles.clip_patch_size == 16
    assert tiles.tiles_after_align and dm.SHIPPED_RECIPE == "tiles"
    assert chain == Recipe()
    assert main(["default", "build", "--recipe", "cells", "--work", str(tmp_path / "w3"), "--until", "mix"]) == 0
    cells_paths, cells = runs[2]
    assert cells_paths.out == tmp_path / "w3" / "model"  # only tiles ships into the package
    assert cells == replace(tiles, token_reduction="pixel_shuffle", reduction_factor=2)
    assert main(["default", "build", "--recipe", "wordscale", "--work", str(tmp_path / "w4"), "--until", "mix"]) == 0
    assert runs[3][1] == replace(tiles, align={**tiles.align, "match_word_scale": True})
    assert "--match-word-scale" in dm.stage_commands(runs[3][0], runs[3][1])["align"]
    assert main(["default", "build", "--recipe", "quick", "--work", str(tmp_path / "w5"), "--until", "mix"]) == 0
    quick_paths, quick = runs[4]
    fast = {"lora_dropout": 0.0, "mixed_precision": "auto"}
    assert quick == replace(tiles, **{stage: {**getattr(tiles, stage), **fast} for stage in dm.TILES_LORA_STAGES})
    assert set(dm.TILES_LORA_STAGES) == set(dm.trained_stages(tiles)) - {"align"}  # every LoRA stage tiles trains
    commands = dm.stage_commands(quick_paths, quick)
    for stage in dm.TILES_LORA_STAGES:
        flags = commands[stage]
        assert flags[flags.index("--lora-dropout") + 1] == "0.0", stage
        assert flags[flags.index("--mixed-precision") + 1] == "auto", stage  # drill and naming too (fp32 in tiles)
    assert "--lora-dropout" not in commands["align"] and quick.drill["group_by_length"]
    # --recipe's choices are written out so that --help needs no torch: they are RECIPES' names
    with pytest.raises(SystemExit):
        main(["default", "build", "--recipe", "no-such-recipe"])
    assert "{" + ",".join(dm.RECIPES) + "}" in capsys.readouterr().err


@needs_sources
def test_naming_at_scale_names_every_object_of_scenes_the_model_never_trained_on(corpus, tmp_path):
    from bench.naming_at_scale import write
    from training.corpus.templates import article

    work = tmp_path / "work"
    recipe = replace(SMALL, drill_conversations=4, review_conversations=4, review_caption_singles=0, survey_scenes=6,
                     survey_caption_singles=0, skip=("review",))
    write_mixes(corpus, work, recipe)
    _write_text_turn(work)
    write_drill(corpus, work, recipe)
    write_review(corpus, work, recipe)  # skipped by the recipe: its scenes stay usable
    write_survey(corpus, work, recipe)
    (work / "state.json").write_text(json.dumps({"recipe": {"skip": ["review"]}}))
    counts = write(corpus, work, tmp_path / "out", scenes=5, every_skill=2, captions=1, seed=4, lookalike_share=1.0)
    rows = _rows(tmp_path / "out" / "train.jsonl")
    good, problems = check_samples([tmp_path / "out" / "train.jsonl"])
    assert not problems and len(good) == len(rows) == 5 + 2 + 1 + 1
    by_kind: dict[str, list[dict]] = {}
    for r in rows:
        by_kind.setdefault(r["id"].split(":")[0], []).append(r)
    assert {k: len(v) for k, v in by_kind.items()} == {"name": 5, "every": 2, "describe": 1, "text": 1}
    root = corpus.resolve()
    trained = {str(Path(r["image"]).relative_to(root)) for name in ("instruct_images.jsonl", "drill.jsonl", "survey.jsonl")
               for r in _rows(work / name) if r["id"].split(":")[0] not in ("text", "describe")}
    reviewed = {str(Path(r["image"]).relative_to(root)) for r in _rows(work / "review.jsonl")
                if r["id"].split(":")[0] not in ("text", "describe")}
    layouts = {r["image"]: r for r in _rows(corpus / "layouts_train.jsonl")}
    assert reviewed - trained and counts["fresh_scenes"] == len(set(layouts) - trained)  # the skipped stage's count as fresh
    scenes = [str(Path(r["image"]).relative_to(root)) for r in by_kind["name"] + by_kind["every"]]
    assert len(set(scenes)) == 7 and not set(scenes) & trained
    templates = ("What is in the {}?", "What object is at the {}?", "What can you see in the {}?")
    for r in by_kind["name"]:
        layout = layouts[str(Path(r["image"]).relative_to(root))]
        at = {t.format(cell): article(obj["name"]) for obj in layout["objects"] for cell in obj["cells"] for t in templates}
        turns = [(q["value"].removeprefix("<image>\n"), a["value"])
                 for q, a in zip(r["conversations"][::2], r["conversations"][1::2])]
        named = [(q, a) for q, a in turns if q in at]
        assert len(named) == sum(len(obj["cells"]) for obj in layout["objects"])  # every object, by its cell
        assert all(at[q] == a for q, a in named)
    assert counts["yes_no_questions"] > 0  # look-alikes asked (share 1.0)
    assert counts["naming_questions"] == sum(len(r["conversations"]) // 2 for r in by_kind["name"])
    assert counts["every_skill_questions"] == sum(len(r["conversations"]) // 2 for r in by_kind["every"])


@needs_sources
def test_naming_at_scale_asks_colour_and_as_many_absent_as_present_things_when_told(corpus, tmp_path):
    from bench.naming_at_scale import write
    from training.corpus.templates import QUESTIONS

    work = tmp_path / "work"
    recipe = replace(SMALL, skip=())
    write_mixes(corpus, work, recipe)
    _write_text_turn(work)
    (work / "state.json").write_text(json.dumps({"recipe": {"skip": []}}))
    counts = write(corpus, work, tmp_path / "out", scenes=8, every_skill=0, captions=0, seed=5, lookalike_share=0.0,
                   colour=True, presence=2)
    root = corpus.resolve()
    layouts = {r["image"]: r for r in _rows(corpus / "layouts_train.jsonl")}
    colour_asks = {t.format(name="{}", plural="{}") for t in QUESTIONS["color"] + QUESTIONS["color_many"]}
    asked_colours = 0
    for r in _rows(tmp_path / "out" / "train.jsonl"):
        if not r["id"].startswith("name:"):
            continue
        layout = layouts[str(Path(r["image"]).relative_to(root))]
        turns = [(q["value"].removeprefix("<image>\n"), a["value"])
                 for q, a in zip(r["conversations"][::2], r["conversations"][1::2])]
        answers = [a for _, a in turns]
        assert 0 < answers.count("yes") == answers.count("no") <= 2
        colours = [(q, a) for q, a in turns if any(q.startswith(t.split("{}")[0]) for t in colour_asks)]
        shown = {obj["color"] for obj in layout["objects"] if obj["color"]} | {layout["word_color"]} - {None}
        assert all(a in shown for _, a in colours)
        assert len(colours) == len([o for o in layout["objects"] if o["color"]]) + bool(layout["word"])
        asked_colours += len(colours)
    assert asked_colours > 0 and counts["yes_answers"] * 2 == counts["yes_no_questions"]
    # Once WORK holds the build's naming mix, its scenes count as used.
    (work / "naming.jsonl").write_bytes((tmp_path / "out" / "train.jsonl").read_bytes())
    again = write(corpus, work, tmp_path / "again", scenes=8, every_skill=0, captions=0, seed=5, lookalike_share=0.0,
                  colour=True, presence=2)
    first, second = ({r["image"] for r in _rows(d / "train.jsonl") if r["id"].startswith("name:")}
                     for d in (tmp_path / "out", tmp_path / "again"))
    assert len(second) == 8 and not first & second and again["fresh_scenes"] == counts["fresh_scenes"] - 8


def test_a_recorded_recipe_reads_back_as_the_recipe_with_defaults_for_fields_it_lacks():
    import training.default_model as dm
    from vlm_chat.errors import UserFacingError

    for name in dm.RECIPES:
        recipe = replace(Recipe(), **dm.RECIPES[name])
        assert dm.recipe_from_json(json.loads(json.dumps(dm.recipe_json(recipe)))) == recipe, name
    older = dm.recipe_json(SMALL)
    del older["naming_scenes"]  # recorded before the field existed: the build ran its default
    assert dm.recipe_from_json(older) == SMALL
    with pytest.raises(UserFacingError, match="does not know \\(frobnicate\\).*update vlm-chat"):
        dm.recipe_from_json({**older, "frobnicate": 1})


@needs_sources
def test_default_eval_scores_a_shipped_model_again_on_its_own_test_sample_and_says_if_it_reproduced(
        corpus, tmp_path, tiny_bundle, capsys):
    import training.default_model as dm
    from cli.main import main
    from vlm_chat.errors import UserFacingError

    recipe = replace(SMALL, seed=3)  # the corpus fixture's seed
    model = tmp_path / "model"
    shutil.copytree(tiny_bundle[0], model)
    record = {"recipe": dm.recipe_json(recipe), "stages": {"mix": {"result": write_mixes(corpus, tmp_path / "made", recipe)}}}
    (model / "recipe.json").write_text(json.dumps(record))

    first = dm.reevaluate(model, tmp_path / "w1", corpus)
    assert first["recorded"] is None and first["scores"]["n"] == 25 and first["scores"]["captions"]["n"] == 6
    for name in ("eval_triples.jsonl", "eval_captions.jsonl"):  # the very sample the model was scored on
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "made" / name).read_bytes()
    assert "nothing to compare with" in capsys.readouterr().out

    # as shipped: its scores and general questions recorded beside it
    shutil.copy(tmp_path / "w1" / "eval" / "scores.json", model / "scores.json")
    record["stages"]["eval"] = {"result": dm.knowledge_hits(first["knowledge"])}
    (model / "recipe.json").write_text(json.dumps(record))
    again = dm.reevaluate(model, tmp_path / "w2", corpus)
    assert again["differences"] == {} and again["scores"] == first["scores"]
    out = capsys.readouterr().out
    assert "reproduced: every measure is the recorded one" in out and "| recorded | now |" in out
    assert "VQA accuracy, overall" in out  # the bars

    changed = json.loads(json.dumps(first["scores"]))
    changed["accuracy"] += 0.01
    changed["captions"]["cider"] += 0.5
    kind = sorted(changed["by_type"])[0]
    changed["by_type"][kind]["accuracy"] += 0.5
    changed["by_type"]["new kind"] = {"accuracy": 1.0, "n": 1}
    assert set(dm.score_differences(changed, first["scores"])) == {
        "VQA accuracy, overall", f"{kind} accuracy", "new kind accuracy", "captions CIDEr"}
    assert dm.score_differences(changed, first["scores"])["new kind accuracy"] == (None, 1.0)  # (now, recorded)
    del changed["yes_no"]
    assert dm.score_differences(changed, first["scores"])["yes/no F1"][1] is None  # missing from the record

    # what it refuses, before any eval
    record["stages"]["mix"]["result"]["eval_questions"] = 24
    (model / "recipe.json").write_text(json.dumps(record))
    with pytest.raises(UserFacingError, match=r"test sample differs.*eval_questions 25 \(recorded 24\)"):
        dm.reevaluate(model, tmp_path / "w3", corpus)
    record["recipe"]["seed"] = 0
    (model / "recipe.json").write_text(json.dumps(record))
    with pytest.raises(UserFacingError, match="corpus of seed 3; the model was scored on the corpus of seed 0"):
        dm.reevaluate(model, tmp_path / "w4", corpus)
    (model / "recipe.json").unlink()
    assert main(["default", "eval", "--model", str(model), "--work", str(tmp_path / "w5"), "--corpus", str(corpus)]) != 0
    assert "recipe.json: missing" in capsys.readouterr().err
