"""Image search with CLIP: index a folder once, then query it by text or by image.

An index is a directory:
    embeddings.safetensors  {"embeddings": (N, D) float32, L2-normalised}
    files.json              {"clip": ..., "root": ..., "files": [{"path", "size", "mtime"}, ...]}
Row i of the embeddings belongs to files[i]. Re-indexing embeds only files whose
(path, size, mtime) is new; removed files drop out. Both files are replaced atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from vlm_chat.errors import ImageError, UserFacingError
from vlm_chat.images import load_image
from vlm_chat.zero_shot import encode_images, encode_texts

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
EMBEDDINGS_FILE, FILES_FILE = "embeddings.safetensors", "files.json"


@dataclass
class IndexStats:
    embedded: int  # new or changed files
    reused: int
    removed: int
    skipped: list[str]  # unreadable files


@dataclass
class Hit:
    path: str
    score: float  # cosine similarity


def _scan(root: Path) -> list[dict]:
    found = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            stat = path.stat()
            found.append({"path": path.relative_to(root).as_posix(), "size": stat.st_size, "mtime": stat.st_mtime})
    return found


def _key(entry: dict) -> tuple:
    return entry["path"], entry["size"], entry["mtime"]


def load_index(index_dir: str | Path) -> tuple[dict, torch.Tensor]:
    """(files.json contents, embeddings (N, D))."""
    from safetensors.torch import load_file

    index_dir = Path(index_dir)
    if not (index_dir / FILES_FILE).is_file() or not (index_dir / EMBEDDINGS_FILE).is_file():
        raise UserFacingError(f"{index_dir} is not an image index; build one with `vlm-chat index FOLDER --out {index_dir}`")
    meta = json.loads((index_dir / FILES_FILE).read_text())
    embeddings = load_file(index_dir / EMBEDDINGS_FILE)["embeddings"]
    if embeddings.shape[0] != len(meta["files"]):
        raise UserFacingError(f"{index_dir}: {embeddings.shape[0]} embeddings for {len(meta['files'])} files; re-run `vlm-chat index`")
    return meta, embeddings


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def build_index(folder: str | Path, index_dir: str | Path, model, processor, clip_name: str, batch_size: int = 64) -> IndexStats:
    """Embed the images under `folder` into `index_dir`, reusing rows of unchanged files."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    root, index_dir = Path(folder).resolve(), Path(index_dir)
    if not root.is_dir():
        raise UserFacingError(f"{folder} is not a directory; give a folder of images to index")
    current = _scan(root)
    old_rows: dict[tuple, torch.Tensor] = {}
    old_count = 0
    if (index_dir / FILES_FILE).exists():
        meta, embeddings = load_index(index_dir)
        old_count = len(meta["files"])
        if meta["clip"] == clip_name and meta["root"] == str(root):
            old_rows = {_key(entry): row for entry, row in zip(meta["files"], embeddings)}
        else:
            print(f"index was built with clip={meta['clip']!r} over {meta['root']}: re-embedding everything")
    todo = [entry for entry in current if _key(entry) not in old_rows]
    new_rows: dict[tuple, torch.Tensor] = {}
    skipped = []
    for start in tqdm(range(0, len(todo), batch_size), desc="embedding", unit="batch", disable=not todo):
        batch, images = [], []
        for entry in todo[start : start + batch_size]:
            try:
                images.append(load_image(root / entry["path"]))
                batch.append(entry)
            except ImageError:
                skipped.append(entry["path"])
        if images:
            for entry, row in zip(batch, encode_images(model, processor, images, batch_size=batch_size)):
                new_rows[_key(entry)] = row
    kept = [entry for entry in current if _key(entry) in old_rows or _key(entry) in new_rows]
    dim = model.config.projection_dim
    rows = [old_rows.get(_key(e), new_rows.get(_key(e))) for e in kept]
    embeddings = torch.stack(rows) if rows else torch.empty(0, dim)  # (N, D)
    index_dir.mkdir(parents=True, exist_ok=True)
    # embeddings first, then the file list: a kill in between leaves a count mismatch that load_index reports
    _atomic_write(index_dir / EMBEDDINGS_FILE, lambda p: save_file({"embeddings": embeddings.contiguous()}, p))
    meta = {"clip": clip_name, "root": str(root), "files": kept}
    _atomic_write(index_dir / FILES_FILE, lambda p: p.write_text(json.dumps(meta)))
    reused = len(kept) - len(new_rows)
    return IndexStats(embedded=len(new_rows), reused=reused, removed=old_count - reused if old_rows else old_count, skipped=skipped)


def search(index_dir: str | Path, model, processor, text: str | None = None, image: str | Path | None = None, k: int = 5) -> list[Hit]:
    """Top-k indexed images by cosine similarity to a text query or a query image."""
    if (text is None) == (image is None):
        raise UserFacingError("give exactly one query: a text, or --image FILE")
    meta, embeddings = load_index(index_dir)  # (N, D)
    if text is not None:
        query = encode_texts(model, processor, [text])[0]  # (D,)
    else:
        query = encode_images(model, processor, [load_image(image)])[0]
    if query.shape[0] != embeddings.shape[1]:
        raise UserFacingError(
            f"query embedding has {query.shape[0]} dims but {index_dir} holds {embeddings.shape[1]}; "
            f"search with the CLIP the index was built with ({meta['clip']})"
        )
    scores = embeddings @ query  # (N,)
    top = scores.topk(min(k, len(scores)))
    root = Path(meta["root"])
    return [Hit(str(root / meta["files"][i]["path"]), s) for s, i in zip(top.values.tolist(), top.indices.tolist())]
