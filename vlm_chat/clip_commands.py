"""CLIP commands of the `vlm-chat` CLI: classify, index, search, eval-clip (see cli/main.py).

Only argparse at top level; torch/transformers are imported inside the handlers.
"""

from __future__ import annotations

import argparse

CLIP_HELP = "CLIP dir (save_pretrained) or hub id; default: the bundled vlm_chat/assets/clip"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add classify, index, search and eval-clip."""
    classify = subparsers.add_parser("classify", help="zero-shot classify images against a list of labels")
    classify.add_argument("images", nargs="+", metavar="IMAGE")
    labels = classify.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help='comma-separated labels, e.g. "cat,dog,car"')
    labels.add_argument("--labels-file", help="text file with one label per line")
    classify.add_argument("--template", action="append", dest="templates", metavar="TEXT",
                          help='prompt template with {} for the label (repeatable); default: a built-in ensemble')
    classify.add_argument("--top-k", type=int, default=3)
    classify.add_argument("--json", action="store_true", help="print one JSON object per image")
    classify.add_argument("--clip", help=CLIP_HELP)
    classify.set_defaults(func=_classify)

    index = subparsers.add_parser("index", help="embed a folder of images for `vlm-chat search` (incremental)")
    index.add_argument("folder", metavar="DIR")
    index.add_argument("--out", required=True, metavar="INDEX", help="index directory (created or updated)")
    index.add_argument("--batch-size", type=int, default=64)
    index.add_argument("--clip", help=CLIP_HELP)
    index.set_defaults(func=_index)

    search = subparsers.add_parser("search", help="find indexed images by text or by a query image")
    search.add_argument("index", metavar="INDEX")
    search.add_argument("query", nargs="?", help="text query")
    search.add_argument("--image", help="query image instead of text")
    search.add_argument("-k", "--top-k", type=int, default=5)
    search.add_argument("--json", action="store_true")
    search.add_argument("--clip", help="CLIP to embed the query; default: the one the index was built with")
    search.set_defaults(func=_search)

    evaluate = subparsers.add_parser(
        "eval-clip",
        help="zero-shot accuracy (Fashion-MNIST, emoji, clip art) and retrieval recall on a corpus test split",
        description="Top-1 zero-shot accuracy on labels_{fashion_mnist,emoji,clipart}_test.jsonl and text<->image "
        "recall@1/@5 on --pairs test pairs with distinct images. A retrieved item is a hit when its caption text "
        "equals the query's caption (identical captions are interchangeable).",
    )
    evaluate.add_argument("--corpus", required=True, help="corpus dir (captions_test.jsonl, labels_*_test.jsonl, classes_*.json)")
    evaluate.add_argument("--pairs", type=int, default=1000)
    evaluate.add_argument("--seed", type=int, default=0, help="which test pairs are drawn")
    evaluate.add_argument("--json", action="store_true")
    evaluate.add_argument("--clip", help=CLIP_HELP)
    evaluate.set_defaults(func=_eval_clip)


def _read_labels(args: argparse.Namespace) -> list[str]:
    from pathlib import Path

    from vlm_chat.errors import UserFacingError

    if args.labels is not None:
        labels = [label.strip() for label in args.labels.split(",")]
    else:
        path = Path(args.labels_file)
        if not path.is_file():
            raise UserFacingError(f"--labels-file {path}: file not found")
        labels = [line.strip() for line in path.read_text().splitlines()]
    labels = [label for label in labels if label]
    if len(labels) < 2:
        raise UserFacingError(f"need at least two labels to choose between, got {labels}")
    return labels


def _classify(args: argparse.Namespace) -> int:
    import json

    from vlm_chat.images import load_image
    from vlm_chat.zero_shot import DEFAULT_TEMPLATES, classify, load_clip

    labels = _read_labels(args)
    model, processor = load_clip(args.clip)
    images = [load_image(path) for path in args.images]
    templates = tuple(args.templates) if args.templates else DEFAULT_TEMPLATES
    for path, predictions in zip(args.images, classify(model, processor, images, labels, templates, args.top_k)):
        if args.json:
            print(json.dumps({"image": path, "predictions": [{"label": p.label, "probability": round(p.probability, 4)} for p in predictions]}))
        else:
            print(f"{path}: " + ", ".join(f"{p.label} {p.probability:.1%}" for p in predictions))
    return 0


def _index(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vlm_chat.search import build_index
    from vlm_chat.zero_shot import default_clip, load_clip

    clip_name = args.clip or default_clip()
    if Path(clip_name).exists():
        clip_name = str(Path(clip_name).resolve())
    model, processor = load_clip(clip_name)
    stats = build_index(args.folder, args.out, model, processor, clip_name, args.batch_size)
    print(f"{args.out}: embedded {stats.embedded}, reused {stats.reused}, removed {stats.removed}"
          + (f", skipped {len(stats.skipped)} unreadable: {stats.skipped[:5]}" if stats.skipped else ""))
    return 0


def _search(args: argparse.Namespace) -> int:
    import json

    from vlm_chat.search import load_index, search
    from vlm_chat.zero_shot import load_clip

    meta, _ = load_index(args.index)
    model, processor = load_clip(args.clip or meta["clip"])
    hits = search(args.index, model, processor, text=args.query, image=args.image, k=args.top_k)
    for hit in hits:
        print(json.dumps({"path": hit.path, "score": round(hit.score, 4)}) if args.json else f"{hit.score:.3f}  {hit.path}")
    return 0


def _eval_clip(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from vlm_chat.zero_shot import load_clip, retrieval_recall, zero_shot_accuracy

    corpus = Path(args.corpus)
    model, processor = load_clip(args.clip)
    results = {}
    for name in ("fashion_mnist", "emoji", "clipart"):
        labels_file, classes_file = corpus / f"labels_{name}_test.jsonl", corpus / f"classes_{name}.json"
        if labels_file.exists() and classes_file.exists():
            results[f"zero_shot_top1/{name}"] = zero_shot_accuracy(model, processor, labels_file, classes_file)
    results.update(retrieval_recall(model, processor, corpus / "captions_test.jsonl", args.pairs, args.seed))
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for key, value in results.items():
            print(f"{key:32s} {value:.4f}" if isinstance(value, float) else f"{key:32s} {value}")
    return 0
