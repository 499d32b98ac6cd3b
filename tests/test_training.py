"""Stages align and instruct on tiny towers: data, label masking, what trains, overfit, resume, QLoRA, merge."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from adapters.lora import LoraSettings, is_lora
from cli.main import main
from tests.conftest import build_tiny_bundle
from training.data import IGNORE_INDEX, encode_for_training, load_samples
from training.trainable import TrainablePlan, apply_plan
from vlm_chat.chat import user_message
from vlm_chat.errors import ConfigError
from vlm_chat.generation import GenerationSettings, generate_batch
from vlm_chat.model import VisionLanguageModel

COLOURS = {"red": (220, 30, 30), "blue": (20, 40, 220), "green": (30, 200, 40), "yellow": (230, 220, 20)}
QUESTIONS = {
    "what colour is this ?": lambda c: c,
    "describe the picture": lambda c: f"a {c} square",
    "what is in this image ?": lambda c: "a square",
    "read the word": lambda c: "hello",
}


@pytest.fixture(scope="module")
def triples(tmp_path_factory) -> Path:
    """16 (image, question, answer) triples: 4 colours x 4 questions."""
    root = tmp_path_factory.mktemp("triples")
    (root / "img").mkdir()
    with open(root / "triples.jsonl", "w") as out:
        for colour, rgb in COLOURS.items():
            Image.new("RGB", (16, 16), rgb).save(root / "img" / f"{colour}.png")
            for question, answer in QUESTIONS.items():
                out.write(json.dumps({"image": f"img/{colour}.png", "question": question, "answer": answer(colour), "type": "color"}) + "\n")
    return root / "triples.jsonl"


@pytest.fixture(scope="module")
def bundle(tiny_parts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "bundle"
    build_tiny_bundle(tiny_parts, out)
    return out


def train(*args) -> int:
    return main(["train", *map(str, args)])


# -- label masking --------------------------------------------------------------------------


LLAVA_CONVERSATION = [
    {"role": "user", "content": "<image>\nwhat colour is this ?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "and how many ?"},
    {"role": "assistant", "content": "two cats and one apple"},
]


def supervised_runs(ids, labels):
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([current] if current else [])


@pytest.mark.parametrize("llm", ["llm", "llm_llama2"])
def test_supervised_tokens_decode_to_exactly_the_answers(tiny_parts, tmp_path, llm):
    _, processor = build_tiny_bundle(dict(tiny_parts, llm=tiny_parts[llm]), tmp_path / "b")
    ids, labels = encode_for_training(processor, LLAVA_CONVERSATION)
    runs = supervised_runs(ids, labels)
    tokenizer = processor.tokenizer
    decoded = [tokenizer.decode(run, skip_special_tokens=True) for run in runs]
    # Llama-style templates put a space before the answer inside its first token.
    assert [text.removeprefix(" ") if llm == "llm_llama2" else text for text in decoded] == ["red", "two cats and one apple"]
    # Each answer's end-of-turn token is supervised too, so the model learns to stop.
    assert all(run[-1] == tokenizer.eos_token_id for run in runs)
    # Image positions are expanded and never supervised.
    image_positions = [i for i, t in enumerate(ids) if t == processor.image_token_id]
    assert len(image_positions) == processor.num_image_tokens
    assert all(labels[i] == IGNORE_INDEX for i in image_positions)


# -- what trains ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "plan, expected",
    [
        (TrainablePlan("frozen", "full", "frozen"), {"projector"}),
        (TrainablePlan("frozen", "full", "lora"), {"projector", "llm-lora"}),
        (TrainablePlan("frozen", "frozen", "full"), {"llm"}),
        (TrainablePlan("lora", "full", "lora"), {"projector", "llm-lora", "vision-lora"}),
        (TrainablePlan("full", "frozen", "frozen"), {"vision"}),
    ],
)
def test_plan_sets_exactly_the_intended_parameters(bundle, plan, expected):
    model, _ = VisionLanguageModel.from_pretrained(bundle, device="cpu")
    llm_total = sum(1 for _ in model.language_model.parameters())
    apply_plan(model, plan, LoraSettings(r=4, alpha=8))
    groups = set()
    for name, param in model.named_parameters():
        part = name.split(".")[0].replace("language_model", "llm").replace("vision_tower", "vision")
        is_lora = "lora_" in name
        if param.requires_grad:
            groups.add(f"{part}-lora" if is_lora else part)
        elif is_lora:
            pytest.fail(f"LoRA parameter {name} is frozen")
    assert groups == expected
    if plan.llm == "full":
        assert sum(p.requires_grad for p in model.language_model.parameters()) == llm_total
    with pytest.raises(ConfigError, match="nothing would train"):
        apply_plan(model, TrainablePlan("frozen", "frozen", "frozen"), LoraSettings())


# -- data formats and bad rows ---------------------------------------------------------------


def test_every_format_loads(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    (tmp_path / "t.csv").write_text("image,question,answer,type\na.png,what ?,red,color\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"image": "a.png", "caption": "a black square"}) + "\n")
    (tmp_path / "llava.json").write_text(json.dumps([{
        "id": "x1", "image": ["a.png", "b.png"],
        "conversations": [
            {"from": "human", "value": "<image>\n<image>\ncompare them"}, {"from": "gpt", "value": "same"},
            {"from": "human", "value": "sure ?"}, {"from": "gpt", "value": "yes"},
        ],
    }]))
    (tmp_path / "text.jsonl").write_text(json.dumps({"question": "capital of france ?", "answer": "paris"}) + "\n")
    samples, problems = load_samples([tmp_path / n for n in ("t.csv", "c.jsonl", "llava.json", "text.jsonl")])
    assert problems == []
    csv_row, caption, llava, text_only = samples
    assert csv_row.type == "color" and csv_row.row == 2 and csv_row.messages[0]["content"] == "<image>\nwhat ?"
    assert caption.messages[0]["content"].startswith("<image>\n") and caption.messages[1]["content"] == "a black square"
    assert len(llava.images) == 2 and [m["role"] for m in llava.messages] == ["user", "assistant"] * 2
    assert text_only.images == [] and text_only.messages[0]["content"] == "capital of france ?"


@pytest.fixture()
def bad_data(tmp_path) -> Path:
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = [
        {"id": "1", "image": "ok.png", "question": "what ?", "answer": "fine"},  # row 1: good
        {"id": "2", "image": "missing.png", "question": "what ?", "answer": "x"},  # 2: missing image
        {"id": "3", "image": "broken.png", "question": "what ?", "answer": "x"},  # 3: unreadable
        {"id": "4", "image": "ok.png", "conversations": [{"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": "x"}]},  # 4: empty turn
        {"id": "5", "image": "ok.png", "question": "<image> and <image> ?", "answer": "x"},  # 5: 2 placeholders, 1 image
        {"id": "1", "image": "ok.png", "question": "again ?", "answer": "dup"},  # 6: duplicate id
        {"id": "7", "image": "ok.png", "question": "what " * 300, "answer": "long"},  # 7: too long for 256
    ]
    lines = [json.dumps(r) for r in rows] + ["{not json"]  # 8: invalid JSON
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_data_check_reports_each_problem_with_its_row(bad_data, bundle, tmp_path, capsys):
    fixed = tmp_path / "clean" / "fixed.jsonl"
    fixed.parent.mkdir()
    assert main(["data", "check", str(bad_data), "--model", str(bundle), "--fix-out", str(fixed)]) == 1
    out = capsys.readouterr().out
    for row, needle in [(2, "image file not found: missing.png"), (3, "unreadable image broken.png"),
                        (4, "turn without text"), (5, "2 <image> placeholder(s) in the text but 1 image(s)"),
                        (6, "duplicate id '1' (first at"), (7, "tokens, over the context of 256"), (8, "not valid JSON")]:
        assert f"row {row}, field" in out and needle in out, (row, needle, out)
    assert "1 good row(s), 7 bad row(s)" in out
    clean = [json.loads(line) for line in fixed.read_text().splitlines()]
    assert [r["id"] for r in clean] == ["1"] and (fixed.parent / clean[0]["image"]).resolve() == (bad_data.parent / "ok.png").resolve()
    assert main(["data", "check", str(fixed)]) == 0


def test_training_refuses_bad_rows_unless_told_to_skip(bad_data, bundle, tmp_path, capsys):
    code = train("--stage", "instruct", "--model", bundle, "--data", bad_data, "--out", tmp_path / "run", "--max-steps", 1)
    assert code == 2
    err = capsys.readouterr().err
    assert "7 bad row(s) in the training data" in err and "row 2, field 'image'" in err and "--skip-bad" in err
    assert train("--stage", "instruct", "--model", bundle, "--data", bad_data, "--out", tmp_path / "run",
                 "--max-steps", 1, "--skip-bad", "--batch-size", 1) == 0
    assert "skipping 7 bad row(s)" in capsys.readouterr().out


# -- training runs ---------------------------------------------------------------------------


def answers(model_dir, triples_path):
    model, processor = VisionLanguageModel.from_pretrained(model_dir, device="cpu")
    rows = [json.loads(line) for line in triples_path.read_text().splitlines()]
    conversations = [[user_message(r["question"], [triples_path.parent / r["image"]])] for r in rows]
    got = generate_batch(model, processor, conversations, GenerationSettings(max_new_tokens=16))
    return [g.strip() for g in got], [r["answer"] for r in rows]


def test_instruct_overfits_16_triples(bundle, triples, tmp_path):
    out = tmp_path / "run"
    assert train("--stage", "instruct", "--model", bundle, "--data", triples, "--out", out, "--max-steps", 60,
                 "--batch-size", 16, "--lr", 1e-2, "--projector-lr", 1e-2, "--lora-dropout", 0, "--warmup", 0,
                 "--val-fraction", 0, "--log-every", 5) == 0
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < losses[0] / 2, losses
    got, expected = answers(out, triples)
    assert got == expected
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()
    # The adapter holds LoRA matrices only (the resized embedding is not copied).
    assert all("lora_" in key for key in load_file(out / "adapter" / "adapter_model.safetensors"))


def test_merge_gives_the_same_model_without_an_adapter(bundle, triples, tmp_path):
    out = tmp_path / "run"
    assert train("--stage", "instruct", "--model", bundle, "--data", triples, "--out", out, "--max-steps", 3,
                 "--batch-size", 4, "--lr", 1e-2, "--val-fraction", 0) == 0
    assert main(["merge", "--model", str(out), "--out", str(tmp_path / "merged")]) == 0
    lora_model, processor = VisionLanguageModel.from_pretrained(out, device="cpu")
    merged, _ = VisionLanguageModel.from_pretrained(tmp_path / "merged", device="cpu")
    assert merged.config.adapter is None and (tmp_path / "merged" / "llm" / "model.safetensors").is_file()
    inputs = processor([user_message("what colour is this ?", [Image.new("RGB", (16, 16), (220, 30, 30))])])
    with torch.no_grad():
        torch.testing.assert_close(lora_model(**inputs).logits, merged(**inputs).logits, atol=1e-4, rtol=1e-4)
    assert main(["export", "--model", str(out), "--format", "hf-llava", "--out", str(tmp_path / "llava")]) == 0


def test_align_trains_only_the_projector(bundle, triples, tmp_path):
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(
        json.dumps({"image": str(triples.parent / "img" / f"{c}.png"), "caption": f"a {c} square"}) + "\n" for c in COLOURS
    ))
    out = tmp_path / "aligned"
    assert train("--stage", "align", "--model", bundle, "--data", captions, "--out", out, "--max-steps", 3, "--batch-size", 2) == 0
    before, _ = VisionLanguageModel.from_pretrained(bundle, device="cpu")
    after, _ = VisionLanguageModel.from_pretrained(out, device="cpu")
    assert after.config.adapter is None
    assert not torch.equal(before.projector.mlp.linear_1.weight, after.projector.mlp.linear_1.weight)
    for (name, a), b in zip(before.language_model.state_dict().items(), after.language_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_continues_exactly(bundle, triples, tmp_path):
    common = ["--stage", "instruct", "--model", bundle, "--data", triples, "--max-steps", 8, "--batch-size", 2,
              "--grad-accum", 2, "--lr", 1e-2, "--val-fraction", 0, "--lora-dropout", 0]
    assert train(*common, "--out", tmp_path / "straight") == 0
    assert train(*common, "--out", tmp_path / "halves", "--save-every", 4) == 0
    # Pretend the run was killed right after the step-4 checkpoint: drop everything later.
    checkpoints = tmp_path / "halves" / "checkpoints"
    shutil.rmtree(checkpoints / "step-00000008")
    (tmp_path / "halves" / "adapter" / "adapter_model.safetensors").unlink()
    assert train(*common, "--out", tmp_path / "halves", "--resume") == 0
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "halves" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    pa = load_file(tmp_path / "straight" / "projector.safetensors")
    pb = load_file(tmp_path / "halves" / "projector.safetensors")
    for key in pa:
        torch.testing.assert_close(pa[key], pb[key], atol=1e-6, rtol=1e-5)


def test_qlora_builds_and_takes_a_step_on_cpu(bundle, triples, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    assert train("--stage", "instruct", "--model", bundle, "--data", triples, "--out", out, "--max-steps", 1,
                 "--batch-size", 2, "--qlora", "--val-fraction", 0) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    model, _ = VisionLanguageModel.from_pretrained(out, device="cpu", quantization="4bit")
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.language_model.modules())


def test_yaml_config_and_flag_override(bundle, triples, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"stage: instruct\nmodel: {bundle}\ndata: {triples}\nmax_steps: 2\nbatch_size: 2\nlora_r: 4\nval_fraction: 0\n")
    assert train("--config", config, "--out", tmp_path / "run", "--max-steps", 1) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 1
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert train("--stage", "pretrain", "--out", tmp_path / "x") == 2
    assert "choose --stage one of: clip, align, instruct" in capsys.readouterr().err


def test_merge_on_load_gives_the_same_logits_and_refuses_to_save(bundle, triples, tmp_path):

    out = tmp_path / "run"
    assert train("--stage", "instruct", "--model", bundle, "--data", triples, "--out", out, "--max-steps", 3,
                 "--batch-size", 4, "--lr", 1e-2, "--val-fraction", 0) == 0
    lora_model, processor = VisionLanguageModel.from_pretrained(out, device="cpu")
    merged, _ = VisionLanguageModel.from_pretrained(out, device="cpu", merge_adapter=True)
    assert is_lora(lora_model.language_model) and not is_lora(merged.language_model)
    inputs = processor([user_message("what colour is this ?", [Image.new("RGB", (16, 16), (220, 30, 30))])])
    with torch.no_grad():
        torch.testing.assert_close(lora_model(**inputs).logits, merged(**inputs).logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="inference only"):
        merged.save_pretrained(tmp_path / "again", processor)


def test_lora_dropout_of_a_continued_adapter_is_kept_unless_given(bundle, triples, tmp_path):
    """A bundle's adapter keeps training with the dropout it was made with; --lora-dropout
    replaces it (0: no dropout layers at all) and the saved adapter says which it had."""
    from torch import nn

    def dropouts(model) -> set:
        layers = [d for m in model.language_model.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values()]
        assert len(layers) > 0
        return {d.p if isinstance(d, nn.Dropout) else 0.0 for d in layers}

    first = tmp_path / "first"
    assert train("--stage", "instruct", "--model", bundle, "--data", triples, "--out", first, "--max-steps", 1,
                 "--batch-size", 2, "--lora-r", 4, "--lora-dropout", 0.1, "--val-fraction", 0) == 0
    model, _ = VisionLanguageModel.from_pretrained(first, device="cpu")
    apply_plan(model, TrainablePlan(llm="lora"), LoraSettings(dropout=0.05))  # not given: kept
    assert dropouts(model) == {0.1}
    apply_plan(model, TrainablePlan(llm="lora"), LoraSettings(), adapter_dropout=0.0)
    assert {type(d) for m in model.language_model.modules() if hasattr(m, "lora_dropout")
            for d in m.lora_dropout.values()} == {nn.Identity}

    again = tmp_path / "again"
    assert train("--stage", "instruct", "--model", first, "--data", triples, "--out", again, "--max-steps", 1,
                 "--batch-size", 2, "--lora-dropout", 0, "--val-fraction", 0) == 0
    config = json.loads((again / "adapter" / "adapter_config.json").read_text())
    assert config["lora_dropout"] == 0 and config["r"] == 4
    assert train("--stage", "instruct", "--model", first, "--data", triples, "--out", tmp_path / "bad",
                 "--lora-dropout", 1.5) == 2
    assert not (tmp_path / "bad").exists()


def test_the_step_profile_lists_the_dropout_masks_only_when_there_is_dropout(bundle, triples, monkeypatch, capsys):
    import sys

    from bench import profile_step

    def run(*flags) -> str:
        monkeypatch.setattr(sys, "argv", ["profile_step.py", "--bundle", str(bundle), "--data", str(triples),
                                          "--batch-size", "2", "--rows", "200", *flags])
        profile_step.main()
        return capsys.readouterr().out

    with_dropout = run("--lora-dropout", "0.5")
    assert "batch 2" in with_dropout and "LoRA dropout 0.5, fp32" in with_dropout and "aten::mm" in with_dropout
    assert "matrix products: " in with_dropout and "one 2048^3 fp32 product here: " in with_dropout
    assert "aten::bernoulli_" in with_dropout
    without = run("--lora-dropout", "0", "--bf16")
    assert "LoRA dropout 0.0, bf16" in without and "aten::bernoulli_" not in without
    monkeypatch.setattr(sys, "argv", ["profile_step.py", "--bundle", str(bundle), "--data", str(triples),
                                      "--batch-size", "8"])
    with pytest.raises(SystemExit, match="has 16 rows; 6 steps of 8 needs 48"):
        profile_step.main()


def test_the_step_profile_counts_matrix_product_work_and_compiles_every_decoder_layer(bundle, triples):
    from types import SimpleNamespace

    from bench.bench_train import bare_setup
    from bench.profile_step import compile_decoder_layers, matmul_ceiling, matmul_work

    events = [SimpleNamespace(key="aten::mm", flops=3e9, self_cpu_time_total=2e6),
              SimpleNamespace(key="aten::addmm", flops=1e9, self_cpu_time_total=1e6),
              SimpleNamespace(key="aten::mul", flops=5e8, self_cpu_time_total=4e6)]  # not a product
    assert matmul_work(events) == (4e9, 3.0)
    assert matmul_ceiling(64, repeats=2) > 0
    model, _, _ = bare_setup(str(bundle), triples, 2, 1)
    layers = model.language_model.get_base_model().config.num_hidden_layers
    assert compile_decoder_layers(model) == layers  # compiled lazily: nothing runs until a forward


def test_the_bare_loop_trains_the_same_batches_the_profiler_does(bundle, triples):
    """bench_train's baseline and profile_step share one setup: the rows in file order, wrapping round."""
    import torch

    from bench.bench_train import bare_loop, bare_setup, bare_step

    model, batches, optimizer = bare_setup(str(bundle), triples, batch_size=6, n_batches=3, lora_dropout=0.0)
    assert len(batches) == 3 and all(b["input_ids"].shape[0] == 6 for b in batches)
    pixels = [b["pixel_values"] for b in batches]  # 16 rows, 4 to a colour: the third batch is rows 12-15, 0, 1
    assert torch.equal(pixels[2][4], pixels[0][0]) and not torch.equal(pixels[2][0], pixels[0][0])
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    bare_step(model, optimizer, batches[0], loss_only=True)
    after = [p for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert bare_loop(str(bundle), triples, steps=3, batch_size=2) > 0


def test_answer_only_loss_equals_the_full_loss_and_its_gradients(bundle, triples):
    """Training computes the output head only where labels are; same loss, same gradients."""
    from functools import partial

    from training.data import ConversationDataset, collate
    from training.vlm import prepare_samples

    model, processor = VisionLanguageModel.from_pretrained(bundle, device="cpu")
    apply_plan(model, TrainablePlan(vision="frozen", projector="full", llm="lora"), LoraSettings(r=4))
    samples = prepare_samples([str(triples)], processor, model.max_context, False, "training")[:4]
    dataset = ConversationDataset(samples, processor, model.max_context)
    batch = partial(collate, pad_id=processor.tokenizer.pad_token_id)([dataset[i] for i in range(4)])
    assert dataset.lengths() == [len(dataset[i]["input_ids"]) for i in range(4)]  # what length grouping sorts by
    assert (batch["labels"] == IGNORE_INDEX).sum() > (batch["labels"] != IGNORE_INDEX).sum()  # prompts are masked
    model.eval()  # no dropout, so both passes see the same network

    def loss_and_grads(**flags):
        model.zero_grad()
        loss = model(**batch, **flags).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    full, full_grads = loss_and_grads()
    fast, fast_grads = loss_and_grads(loss_only=True)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    assert full_grads.keys() == fast_grads.keys() and len(full_grads) > 0
    for name, grad in full_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="needs labels"):
        model(input_ids=batch["input_ids"], loss_only=True)


def test_position_embedding_and_word_scale_join_a_trained_bundle(bundle, triples, tmp_path, capsys):
    tuned = tmp_path / "tuned"
    assert train("--stage", "instruct", "--model", bundle, "--data", triples, "--out", tuned, "--max-steps", 2,
                 "--batch-size", 4, "--val-fraction", 0) == 0
    out = tmp_path / "with_pos"
    assert train("--stage", "instruct", "--model", tuned, "--data", triples, "--out", out, "--max-steps", 3,
                 "--batch-size", 4, "--projector-lr", 1e-2, "--val-fraction", 0, "--position-embedding",
                 "--match-word-scale") == 0
    printed = capsys.readouterr().out
    scale = float(re.search(r"output scale now ([0-9.]+)", printed).group(1))
    model, _ = VisionLanguageModel.from_pretrained(out, device="cpu")
    assert model.config.projector.output_scale == pytest.approx(scale, rel=1e-3) and scale != 1.0
    assert model.config.projector.position_embedding
    assert model.projector.position_embedding.abs().sum() > 0  # it trained with the projector
    assert main(["export", "--model", str(out), "--format", "hf-llava", "--out", str(tmp_path / "llava")]) == 2
    assert train("--stage", "instruct", "--model", tuned, "--data", triples, "--out", tmp_path / "frozen",
                 "--max-steps", 1, "--projector", "frozen", "--position-embedding") == 2
    assert "use --projector full" in capsys.readouterr().err


# -- --top-layers: the last layers train on cached inputs -------------------------------------


def test_top_layers_from_cached_inputs_give_the_whole_model_s_loss_and_gradients(bundle, triples):
    """What layer k receives, cached once, stands in for the image, tower, projector and
    lower layers: the loss and the top layers' gradients are those of the whole model."""
    from functools import partial

    from training.data import ConversationDataset, collate
    from training.top_layers import cache_layer_inputs, collate_layer_inputs, first_trained_layer, freeze_below
    from training.vlm import prepare_samples

    model, processor = VisionLanguageModel.from_pretrained(bundle, device="cpu")
    plan = TrainablePlan(vision="frozen", projector="frozen", llm="lora")
    apply_plan(model, plan, LoraSettings(r=4))
    with torch.no_grad():  # as if trained: a fresh adapter's B is zero, and A would get no gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    assert model.llm_layer_count == 2
    split = first_trained_layer(model, 1, plan)
    freeze_below(model, split)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".layers.1." in n and "lora_" in n for n in trained)
    samples = prepare_samples([str(triples)], processor, model.max_context, False, "training")[:5]
    dataset = ConversationDataset(samples, processor, model.max_context)
    pad = partial(collate, pad_id=processor.tokenizer.pad_token_id)
    cached = cache_layer_inputs(model, dataset, pad, split, batch_size=2)  # three batches, sorted by length
    assert len(cached) == 5 and cached.lengths() == dataset.lengths()
    assert [x.shape for x in cached.inputs] == [(n, model.projector.llm_dim) for n in dataset.lengths()]
    model.eval()

    def loss_and_grads(batch):
        model.zero_grad()
        loss = model(**batch, loss_only=True).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    whole, whole_grads = loss_and_grads(pad([dataset[i] for i in range(5)]))
    top, top_grads = loss_and_grads(collate_layer_inputs([cached[i] for i in range(5)], split))
    torch.testing.assert_close(top, whole, atol=1e-5, rtol=1e-5)
    assert top_grads.keys() == whole_grads.keys() == trained
    for name, grad in whole_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(top_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="loss_only"):
        model(layer_inputs=cached[0]["layer_inputs"][None])


def test_top_layers_training_changes_only_the_top_layers_and_refuses_what_a_cache_cannot_serve(
        bundle, triples, tmp_path, capsys):
    tuned = tmp_path / "tuned"
    assert train("--stage", "instruct", "--model", bundle, "--data", triples, "--out", tuned, "--max-steps", 2,
                 "--batch-size", 4, "--lora-r", 4, "--val-fraction", 0) == 0
    out = tmp_path / "top"
    assert train("--stage", "instruct", "--model", tuned, "--data", triples, "--out", out, "--top-layers", 1,
                 "--projector", "frozen", "--max-steps", 30, "--batch-size", 8, "--lr", 1e-2, "--lora-dropout", 0,
                 "--warmup", 0, "--val", triples, "--log-every", 5) == 0
    assert "the inputs of layer 1 for 16 + 16 samples" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < 0.7 * losses[0], losses  # one rank-4 layer of a random LLM learns slowly
    assert any("eval_loss" in r for r in records)
    before = load_file(tuned / "adapter" / "adapter_model.safetensors")
    after = load_file(out / "adapter" / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value) == (".layers.0." in key), key
    assert load_file(out / "projector.safetensors").keys() == load_file(tuned / "projector.safetensors").keys()
    for key, value in load_file(tuned / "projector.safetensors").items():
        assert torch.equal(load_file(out / "projector.safetensors")[key], value), key

    common = ["--stage", "instruct", "--model", tuned, "--data", triples, "--max-steps", 1, "--val-fraction", 0]
    assert train(*common, "--out", tmp_path / "moving", "--top-layers", 1) == 2  # the projector trains by default
    assert "--projector frozen" in capsys.readouterr().err
    assert train(*common, "--out", tmp_path / "all", "--top-layers", 2, "--projector", "frozen") == 2
    assert "has 2 decoder layers; give 1 to 1" in capsys.readouterr().err
