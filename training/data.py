"""Users' training data -> checked samples -> (input_ids, labels, pixel_values).

Accepted files (images resolved relative to the data file):
  triples   JSONL {"image", "question", "answer", "type"?}   or CSV with header image,question,answer[,type]
  captions  JSONL {"image", "caption"}
  LLaVA     JSON list or JSONL of {"id", "image" (str or list), "conversations": [{"from", "value"}, ...]}
The kind of each row is read from its keys. Every problem is reported with the file,
the row number (1-based line in JSONL/CSV, item in a JSON list) and the field.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from vlm_chat.errors import UserFacingError

IMAGE = "<image>"
IGNORE_INDEX = -100  # label of positions the loss skips (prompt, images, padding)
# Instructions that turn a caption into a turn (LLaVA stage 1 uses such a list).
CAPTION_INSTRUCTIONS = (
    "Describe this image.",
    "Describe the image briefly.",
    "What is shown in this picture?",
    "Give a short caption for this image.",
    "Summarize what you see in the image.",
)
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(UserFacingError, ValueError):
    pass


@dataclass
class Problem:
    file: str
    row: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}, row {self.row}, field '{self.field}': {self.message}"


@dataclass
class Sample:
    file: str
    row: int
    id: str
    messages: list[dict[str, str]]  # role + string content, one IMAGE placeholder per image
    images: list[Path] = field(default_factory=list)
    type: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)  # the row as read, for --fix-out
    tokens: int | None = None  # its training length, image tokens included, once check_samples counted it


# -- reading --------------------------------------------------------------------------------


def read_rows(path: Path) -> list[tuple[int, Any]]:
    """(row number, row) pairs of a JSONL, JSON-list or CSV file."""
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        missing = {"image", "question", "answer"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: CSV header must have image,question,answer; missing {sorted(missing)}")
        return [(number, dict(row)) for number, row in enumerate(reader, start=2)]  # row 1 is the header
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON at line {err.lineno}: {err.msg}") from None
        return list(enumerate(items, start=1))
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            rows.append((number, _Unparsable(err.msg)))
    return rows


@dataclass
class _Unparsable:
    message: str


def _instruction(file: str, row: int) -> str:
    digest = hashlib.sha256(f"{file}:{row}".encode()).digest()
    return CAPTION_INSTRUCTIONS[digest[0] % len(CAPTION_INSTRUCTIONS)]


def _text(row: dict, key: str, problems: list[Problem], where: tuple[str, int]) -> str | None:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        problems.append(Problem(*where, key, "missing or empty text" if value in (None, "") else f"expected text, got {type(value).__name__}"))
        return None
    return value


def parse_row(file: str, number: int, row: Any, base: Path) -> tuple[Sample | None, list[Problem]]:
    """One row -> a Sample, or the problems that keep it out."""
    where = (file, number)
    problems: list[Problem] = []
    if isinstance(row, _Unparsable):
        return None, [Problem(file, number, "-", f"not valid JSON: {row.message}")]
    if not isinstance(row, dict):
        return None, [Problem(file, number, "-", f"expected an object, got {type(row).__name__}")]
    image_value = row.get("image")
    if image_value in (None, ""):
        image_list: list[str] = []
    elif isinstance(image_value, str):
        image_list = [image_value]
    elif isinstance(image_value, list) and all(isinstance(i, str) and i for i in image_value):
        image_list = image_value
    else:
        problems.append(Problem(*where, "image", "expected a path or a list of paths"))
        image_list = []
    images = [base / name for name in image_list]
    sample_id = str(row.get("id", f"{Path(file).name}:{number}"))

    if "conversations" in row:
        turns = row["conversations"]
        if not isinstance(turns, list) or not turns:
            return None, problems + [Problem(*where, "conversations", "expected a non-empty list of turns")]
        messages = []
        for index, turn in enumerate(turns):
            turn_field = f"conversations[{index}]"
            if not isinstance(turn, dict) or turn.get("from") not in ROLES:
                problems.append(Problem(*where, turn_field, f"each turn needs 'from' in {sorted(ROLES)}"))
                continue
            value = turn.get("value")
            if not isinstance(value, str) or not value.replace(IMAGE, "").strip():
                problems.append(Problem(*where, turn_field + ".value", "turn without text"))
                continue
            messages.append({"role": ROLES[turn["from"]], "content": value.strip()})
        if messages and messages[-1]["role"] != "assistant":
            problems.append(Problem(*where, "conversations", "the last turn must be the assistant's (gpt) answer"))
    elif "question" in row or "answer" in row:
        question = _text(row, "question", problems, where)
        answer = _text(row, "answer", problems, where)
        if question is None or answer is None:
            return None, problems
        prefix = f"{IMAGE}\n" * len(images) if IMAGE not in question else ""
        messages = [{"role": "user", "content": prefix + question.strip()}, {"role": "assistant", "content": answer.strip()}]
    elif "caption" in row:
        caption = _text(row, "caption", problems, where)
        if caption is None:
            return None, problems
        if not images:
            problems.append(Problem(*where, "image", "a caption row needs an image"))
        messages = [
            {"role": "user", "content": f"{IMAGE}\n" * len(images) + _instruction(file, number)},
            {"role": "assistant", "content": caption.strip()},
        ]
    else:
        return None, problems + [Problem(*where, "-", "unknown row: expected 'conversations', 'question'+'answer' or 'caption'")]

    placeholders = sum(m["content"].count(IMAGE) for m in messages)
    if placeholders != len(images):
        problems.append(Problem(*where, "image", f"{placeholders} {IMAGE} placeholder(s) in the text but {len(images)} image(s)"))
    for name, path in zip(image_list, images):
        if not path.is_file():
            problems.append(Problem(*where, "image", f"image file not found: {name} (looked in {path.parent})"))
    sample_type = row.get("type") if isinstance(row.get("type"), str) else None
    if problems:
        return None, problems
    return Sample(file, number, sample_id, messages, images, sample_type, row), []


def load_samples(paths: list[str | Path]) -> tuple[list[Sample], list[Problem]]:
    samples, problems = [], []
    seen_ids: dict[str, tuple[str, int]] = {}
    for raw_path in paths:
        path = Path(raw_path)
        for number, row in read_rows(path):
            sample, row_problems = parse_row(str(path), number, row, path.parent)
            problems.extend(row_problems)
            if sample is None:
                continue
            if isinstance(row, dict) and "id" in row:
                if sample.id in seen_ids:
                    first = seen_ids[sample.id]
                    problems.append(Problem(str(path), number, "id", f"duplicate id {sample.id!r} (first at {first[0]}, row {first[1]})"))
                    continue
                seen_ids[sample.id] = (str(path), number)
            samples.append(sample)
    return samples, problems


def check_images(samples: list[Sample], full_decode: bool) -> list[Problem]:
    """Open every image (header only, or a full decode) and report unreadable ones."""
    problems = []
    for sample in samples:
        for path in sample.images:
            try:
                with Image.open(path) as image:
                    if full_decode:
                        image.load()
                    else:
                        image.verify()
            except Exception as err:  # any decoder failure is this row's problem
                problems.append(Problem(sample.file, sample.row, "image", f"unreadable image {path.name}: {err}"))
    return problems


def check_samples(
    paths: list[str | Path], processor=None, max_length: int = 0, full_decode: bool = False
) -> tuple[list[Sample], list[Problem]]:
    """Every problem of the data files (rows, images, and with a processor, length),
    and the samples that have none."""
    samples, problems = load_samples(paths)
    problems += check_images(samples, full_decode)
    if processor is not None:
        bad = {(p.file, p.row) for p in problems}
        for sample in samples:
            if (sample.file, sample.row) in bad:
                continue
            count = sample.tokens = token_count(processor, sample)
            if count > max_length:
                problems.append(Problem(sample.file, sample.row, "-", f"{count} tokens, over the context of {max_length}"))
    bad = {(p.file, p.row) for p in problems}
    return [s for s in samples if (s.file, s.row) not in bad], problems


# -- tokenizing with labels -----------------------------------------------------------------


def assistant_spans(processor, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Full chat-template text and the character spans the loss supervises.

    Each assistant turn is located by rendering the history before it (with the
    generation prompt) and the history including it: what the turn adds is its text
    plus the template's end-of-turn marker (<|im_end|>, </s>, <|eot_id|> ...), which
    is supervised too so the model learns to stop. Trailing whitespace is not.
    """
    text, _ = processor.render(messages, add_generation_prompt=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, _ = processor.render(messages[:index], add_generation_prompt=True)
        through, _ = processor.render(messages[: index + 1], add_generation_prompt=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise DataError(
                "the chat template renders earlier turns differently once later turns follow; "
                "assistant tokens cannot be located for label masking with this template"
            )
        start = through.find(message["content"], len(before))
        spans.append((start if start >= 0 else len(before), len(through.rstrip())))
    return text, spans


def encode_for_training(processor, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """input_ids with image tokens expanded, and labels = ids on assistant tokens, else -100."""
    text, spans = assistant_spans(processor, messages)
    encoded = processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = [], []
    for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        if token == processor.image_token_id:
            ids.extend(processor.image_ids)
            labels.extend([IGNORE_INDEX] * len(processor.image_ids))
            continue
        supervised = any(start < span_end and end > span_start for span_start, span_end in spans)
        ids.append(token)
        labels.append(token if supervised else IGNORE_INDEX)
    return ids, labels


class ConversationDataset(Dataset):
    """Samples -> dicts of input_ids, labels and pixel_values (images decoded lazily)."""

    def __init__(self, samples: list[Sample], processor, max_length: int):
        self.samples = samples
        self.processor = processor
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        ids, labels = encode_for_training(self.processor, sample.messages)
        if len(ids) > self.max_length:
            raise DataError(f"{sample.file}, row {sample.row}: {len(ids)} tokens, over the context of {self.max_length}")
        pixel_values = self.processor.preprocess_images(sample.images) if sample.images else None
        return {"input_ids": ids, "labels": labels, "pixel_values": pixel_values}

    def lengths(self) -> list[int]:
        """Tokens per sample, image tokens included (for batches of similar length); the
        count check_samples made (training passes both the same processor) is reused."""
        return [token_count(self.processor, s) if s.tokens is None else s.tokens for s in self.samples]


def token_count(processor, sample: Sample) -> int:
    return len(encode_for_training(processor, sample.messages)[0])


def padded_labels(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Each item's labels right-padded with IGNORE_INDEX to the longest, and the attention
    mask that marks the real positions (training never generates, so padding side is free)."""
    width = max(len(item["labels"]) for item in batch)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item["labels"])
        labels[row, :n] = torch.tensor(item["labels"])
        attention_mask[row, :n] = 1
    return {"labels": labels, "attention_mask": attention_mask}


def collate(batch: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: token ids with `pad_id`, labels and mask by `padded_labels`."""
    out = padded_labels(batch)
    input_ids = torch.full(out["labels"].shape, pad_id, dtype=torch.long)
    for row, item in enumerate(batch):
        input_ids[row, : len(item["input_ids"])] = torch.tensor(item["input_ids"])
    out = {"input_ids": input_ids, **out}
    pixels = [item["pixel_values"] for item in batch if item["pixel_values"] is not None]
    if pixels:
        out["pixel_values"] = torch.cat(pixels)  # (total images in batch, 3, S, S), in sample order
    return out
