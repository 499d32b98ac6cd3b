"""`vlm-chat eval`: how good a bundle is on triples and caption files.

  VQA      exact match after answer normalisation (case, punctuation, articles, number
           words: "Two." = "2"), overall and per `type`
  yes/no   accuracy, precision, recall and F1 of "yes", and the share of "yes" answers
           next to the true share (POPE's way of showing hallucination)
  captions BLEU-4 and CIDEr (pycocoevalcap's scorers) against every reference caption
           of the image
Answers are greedy and batched.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from dataclasses import dataclass

NUMBER_WORDS = {
    "zero": "0", "none": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
UNTYPED = "untyped"  # the by_type key of questions without a `type`


def normalize_answer(text: str) -> str:
    """'The answer is: Two.' stays itself, 'Two.' -> '2', 'A Red apple!' -> 'red apple'."""
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(NUMBER_WORDS.get(w, w) for w in words if w not in ARTICLES)


@dataclass
class VQAItem:
    prediction: str
    answer: str
    type: str | None

    @property
    def correct(self) -> bool:
        return normalize_answer(self.prediction) == normalize_answer(self.answer)


def vqa_scores(items: list[VQAItem]) -> dict:
    if not items:
        return {}
    hits = [i.correct for i in items]
    by_type: dict[str, list[bool]] = defaultdict(list)
    for item, hit in zip(items, hits):
        by_type[item.type or UNTYPED].append(hit)
    scores = {
        "accuracy": sum(hits) / len(hits),
        "n": len(hits),
        "by_type": {t: {"accuracy": sum(h) / len(h), "n": len(h)} for t, h in sorted(by_type.items())},
    }
    yes_no = [i for i in items if normalize_answer(i.answer) in ("yes", "no")]
    if yes_no:
        scores["yes_no"] = yes_no_scores(yes_no)
    return scores


def yes_no_scores(items: list[VQAItem]) -> dict:
    """POPE metrics: "yes" is the positive class; an answer starting with neither counts as wrong."""
    tp = fp = fn = tn = 0
    said_yes = 0
    for item in items:
        truth = normalize_answer(item.answer) == "yes"
        words = normalize_answer(item.prediction).split()
        said = words[0] if words else ""
        said_yes += said == "yes"
        if truth:
            tp += said == "yes"
            fn += said != "yes"
        else:
            fp += said == "yes"
            tn += said == "no"
    n = len(items)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "n": n,
        "accuracy": (tp + tn) / n,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_share": said_yes / n,
        "true_yes_share": (tp + fn) / n,
    }


def caption_scores(predictions: dict[str, str], references: dict[str, list[str]]) -> dict:
    """BLEU-4 and CIDEr over images (keys), each with one prediction and its references."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if not predictions:
        return {}
    # pycocoevalcap's PTB tokenizer needs Java; lower-case + punctuation split is the same idea.
    tok = {k: [normalize_caption(c) for c in v] for k, v in references.items()}
    res = {k: [normalize_caption(v)] for k, v in predictions.items()}
    bleu, _ = Bleu(4).compute_score(tok, res, verbose=0)
    cider, _ = Cider().compute_score(tok, res)
    return {"n": len(res), "bleu4": bleu[3], "cider": cider}


def normalize_caption(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def markdown_table(scores: dict) -> str:
    lines = ["| measure | value | n |", "|---|---|---|"]
    if "accuracy" in scores:
        lines.append(f"| VQA accuracy | {100 * scores['accuracy']:.1f} % | {scores['n']} |")
        for name, row in scores["by_type"].items():
            lines.append(f"| - {name} | {100 * row['accuracy']:.1f} % | {row['n']} |")
    if "yes_no" in scores:
        yn = scores["yes_no"]
        lines.append(f"| yes/no F1 | {100 * yn['f1']:.1f} % | {yn['n']} |")
        lines.append(f"| yes/no accuracy / precision / recall | {100 * yn['accuracy']:.1f} / {100 * yn['precision']:.1f} / "
                     f"{100 * yn['recall']:.1f} % | {yn['n']} |")
        lines.append(f"| \"yes\" share (true share) | {100 * yn['yes_share']:.1f} % ({100 * yn['true_yes_share']:.1f} %) | {yn['n']} |")
    if "captions" in scores:
        cap = scores["captions"]
        lines.append(f"| captions BLEU-4 | {cap['bleu4']:.3f} | {cap['n']} |")
        lines.append(f"| captions CIDEr | {cap['cider']:.3f} | {cap['n']} |")
    return "\n".join(lines)


def comparison_table(runs: dict[str, dict], predictions: dict[str, list[dict]] | None = None) -> str:
    """Markdown table of several runs' scores side by side (name: scores.json as `evaluate`
    returns it), each run after the first with its difference to the first. Proportions
    (accuracies, the "yes" share) also get the difference's standard error, and `*` marks a
    difference over two of them; F1, BLEU-4 and CIDEr get the difference alone.

    The error is unpaired unless `predictions` (name: the rows of predictions.jsonl) holds
    both runs' answers to the same questions: then an accuracy's error comes from the
    questions one run got right and the other wrong (paired, "pSE"), which is tighter,
    because most questions are easy or hard for both."""
    names = list(runs)
    if len(names) < 2:
        raise ValueError("comparison_table needs two runs or more")
    correct = {name: _correct_by_question(rows) for name, rows in (predictions or {}).items()}
    rows: list[tuple[str, list[tuple[float, int] | None], bool, str, object]] = []

    def add(label: str, read, proportion: bool = True, unit: str = "%", kind: object = False) -> None:
        """kind: False for a measure that is no accuracy, None for all questions, else a type."""
        values = []
        for scores in runs.values():
            try:
                values.append(read(scores))
            except (KeyError, TypeError):
                values.append(None)
        if any(v is not None for v in values):
            rows.append((label, values, proportion, unit, kind))

    add("VQA accuracy", lambda s: (s["accuracy"], s["n"]), kind=None)
    types = sorted({t for scores in runs.values() for t in scores.get("by_type", {})})
    for name in types:
        add(f"- {name}", lambda s, name=name: (s["by_type"][name]["accuracy"], s["by_type"][name]["n"]), kind=name)
    add("yes/no F1", lambda s: (s["yes_no"]["f1"], s["yes_no"]["n"]), proportion=False)
    add("\"yes\" share", lambda s: (s["yes_no"]["yes_share"], s["yes_no"]["n"]))
    add("true \"yes\" share", lambda s: (s["yes_no"]["true_yes_share"], s["yes_no"]["n"]), proportion=False)
    add("captions BLEU-4", lambda s: (s["captions"]["bleu4"], s["captions"]["n"]), proportion=False, unit="")
    add("captions CIDEr", lambda s: (s["captions"]["cider"], s["captions"]["n"]), proportion=False, unit="")

    def show(value: float, unit: str, signed: bool = False) -> str:
        sign = "+" if signed else ""
        return f"{100 * value:{sign}.1f}" if unit == "%" else f"{value:{sign}.3f}"

    header = ["measure", *names, *(f"{name} - {names[0]}" for name in names[1:])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, values, proportion, unit, kind in rows:
        cells = [label] + ["-" if v is None else f"{show(v[0], unit)}{' %' if unit else ''}" for v in values]
        first = values[0]
        for name, value in zip(names[1:], values[1:]):
            if first is None or value is None:
                cells.append("-")
                continue
            diff = value[0] - first[0]
            cell = show(diff, unit, signed=True)
            if proportion:
                paired = _paired_se(correct.get(names[0]), correct.get(name), kind, (first[1], value[1]))
                if paired is not None:
                    se, tag = paired, "pSE"
                else:
                    se, tag = ((first[0] * (1 - first[0]) / first[1]) + (value[0] * (1 - value[0]) / value[1])) ** 0.5, "SE"
                cell += f" ({tag} {100 * se:.1f}){' *' if se and abs(diff) > 2 * se else ''}"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _correct_by_question(rows: list[dict]) -> dict[tuple, tuple[str, bool]]:
    """(file, row, question): (type, answered right) of every question in predictions.jsonl."""
    return {(r.get("file"), r.get("row"), r["question"]): (r.get("type") or UNTYPED, bool(r["correct"]))
            for r in rows if "question" in r and "correct" in r}


def _paired_se(a: dict | None, b: dict | None, kind: object, counts: tuple[int, int]) -> float | None:
    """Standard error of b's accuracy minus a's over the same questions (of type `kind`, or all
    for None), from the per-question differences; None unless both answered exactly the
    questions their scores count."""
    if a is None or b is None or kind is False:
        return None
    keys = [k for k, (t, _) in a.items() if kind is None or t == kind]
    if not keys or len(keys) != counts[0] or counts[0] != counts[1] or any(k not in b for k in keys):
        return None
    d = [int(b[k][1]) - int(a[k][1]) for k in keys]
    mean = sum(d) / len(d)
    variance = sum(x * x for x in d) / len(d) - mean * mean
    return (variance / len(d)) ** 0.5


def plot_by_type(scores: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(scores["by_type"])
    values = [100 * scores["by_type"][n]["accuracy"] for n in names]
    fig, ax = plt.subplots(figsize=(max(4, len(names) * 0.9), 3.5))
    ax.bar(names, values, color="#4a78c2")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"VQA accuracy by type (overall {100 * scores['accuracy']:.1f} %)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def to_parts(messages: list[dict[str, str]], images: list) -> list[dict]:
    """Messages with `<image>` placeholders in their text -> content parts with the images."""
    from training.data import IMAGE

    queue = list(images)
    out = []
    for message in messages:
        pieces = message["content"].split(IMAGE)
        parts = []
        for index, piece in enumerate(pieces):
            if index:
                parts.append({"type": "image", "image": queue.pop(0)})
            if piece.strip():
                parts.append({"type": "text", "text": piece.strip()})
        out.append({"role": message["role"], "content": parts})
    return out


def evaluate(model, processor, paths: list[str], batch_size: int = 8, max_new_tokens: int = 32,
             limit: int = 0, skip_bad: bool = False, prompt: str = "Describe this image.") -> tuple[dict, list[dict]]:
    """(scores, predictions): one prediction row per question and per captioned image,
    so a wrong answer can be looked at next to its question and image."""
    from tqdm import tqdm

    from training.data import IMAGE
    from training.vlm import prepare_samples
    from vlm_chat.generation import GenerationSettings, generate_batch

    # The same checks as training: bad rows (and ones over the context) refused or skipped.
    samples = prepare_samples(paths, processor, model.max_context, skip_bad, "evaluation")
    questions = [s for s in samples if "caption" not in s.raw]
    references: dict[str, list[str]] = defaultdict(list)
    for sample in samples:
        if "caption" in sample.raw:
            references[str(sample.images[0])].append(sample.raw["caption"])
    if limit:
        questions = questions[:limit]
        references = dict(list(references.items())[:limit])
    jobs = [(to_parts(s.messages[:-1], s.images), s) for s in questions]
    jobs += [([{"role": "user", "content": [{"type": "image", "image": path}, {"type": "text", "text": prompt}]}], path)
             for path in references]
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    items, captions, predictions = [], {}, []
    with tqdm(total=len(jobs), unit="sample", desc="eval") as bar:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            answers = generate_batch(model, processor, [conversation for conversation, _ in batch], settings)
            for (_, source), answer in zip(batch, answers):
                if isinstance(source, str):
                    captions[source] = answer.strip()
                    predictions.append({"image": source, "prediction": answer.strip(), "references": references[source]})
                else:
                    item = VQAItem(answer.strip(), source.messages[-1]["content"], source.type)
                    items.append(item)
                    predictions.append({
                        "file": source.file, "row": source.row, "image": str(source.images[0]) if source.images else None,
                        "question": source.messages[-2]["content"].replace(IMAGE, "").strip(),
                        "answer": item.answer, "prediction": item.prediction, "type": item.type,
                        "correct": item.correct,
                    })
            bar.update(len(batch))
    scores = vqa_scores(items)
    if captions:
        scores["captions"] = caption_scores(captions, {k: references[k] for k in captions})
    return scores, predictions
