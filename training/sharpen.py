"""Stage cells: teach a bundle's vision tower what each cell of a grid holds, and keep the rest of its features.

    vlm-chat train --stage cells --model BUNDLE --data cells.jsonl --val cells_val.jsonl --out OUT
        [--max-steps 1500] [--batch-size 64] [--lr 1e-4] [--head-lr 1e-3] [--anchor 1.0] [--seed 0]

Data: JSONL rows `{"image": "a.png", "labels": {"object": [...], "colour": [...]}}`, image
paths relative to the file. Each key of "labels" is one head; its list gives every cell of
a side x side grid over the image, in raster order (top left first), a label or null (not
scored). The grid must split the tower's patch grid evenly: a 96 px image in 16 px patches
is 6x6 patches, so a 3x3 grid gives each cell its own 2x2 of them.

A linear head per key reads a cell's own patch features, stacked (the layer the projector
receives, so what the LLM is given), and the tower learns from those heads' cross entropy
plus an anchor: the mean squared distance of every patch feature from the frozen original
tower's, in units of the original features' spread, weighted `--anchor`, so the projector
and LoRA trained on the old features still read the new ones.

First the heads alone fit the frozen tower's features (the same number of steps): their
validation accuracy is the baseline, and they are where the joint training starts. Then
tower and heads train together with AdamW, a warmup of a twentieth of the steps and a
cosine decay, gradients of the tower clipped to norm 1. The output is a copy of the bundle
with the new tower (projector and adapter as they were) and cells.json: the accuracy of
each head on the validation rows before and after, by the label's kind (what comes before
a ":" in it), and how far the features moved.

This stage does not run the shared loop of training/trainer.py: it holds all images in
memory as pixels and takes about a quarter of an hour on two cores for 48,000 scenes, so a
killed run starts again instead of resuming.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from pathlib import Path

import torch

from vlm_chat.errors import UserFacingError

IGNORE = -100


def cell_patches(side: int, row: int, col: int, grid: int = 3) -> list[int]:
    """Raster indices of the patches of a side x side patch grid that fall in cell (row, col)
    of a grid x grid split: only one the cells split evenly, so no patch is shared."""
    if side % grid:
        raise ValueError(f"a {side}x{side} patch grid does not split into {grid}x{grid} cells")
    per = side // grid
    return [(row * per + r) * side + col * per + c for r in range(per) for c in range(per)]


def read_cell_labels(path: Path) -> tuple[list[Path], dict[str, list[list[str | None]]]]:
    """A cells JSONL file: the images (absolute) and, per head, each row's labels; every row
    must name the same heads with as many cells, a square number of them."""
    if not path.is_file():
        raise UserFacingError(f"{path}: file not found")
    images: list[Path] = []
    heads: dict[str, list[list[str | None]]] = {}
    cells = None
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                labels = row["labels"]
                image = row["image"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise UserFacingError(f"{path}, row {number}: expected {{\"image\": ..., \"labels\": {{head: [label or "
                                      f"null per cell]}}}} ({error})") from None
            if not isinstance(labels, dict) or not labels:
                raise UserFacingError(f"{path}, row {number}: 'labels' must map head names to lists of cell labels")
            if heads and set(labels) != set(heads):
                raise UserFacingError(f"{path}, row {number}: heads {sorted(labels)}, earlier rows {sorted(heads)}; "
                                      "every row names the same heads")
            for name, values in labels.items():
                if not isinstance(values, list) or not all(v is None or isinstance(v, str) for v in values):
                    raise UserFacingError(f"{path}, row {number}, head {name!r}: a list of labels (strings or null)")
                if cells is None:
                    cells = len(values)
                    if math.isqrt(cells) ** 2 != cells:
                        raise UserFacingError(f"{path}, row {number}, head {name!r}: {cells} cells are no square grid")
                if len(values) != cells:
                    raise UserFacingError(f"{path}, row {number}, head {name!r}: {len(values)} cells, earlier {cells}")
                heads.setdefault(name, []).append(values)
            images.append((path.parent / image).resolve())
    if not images:
        raise UserFacingError(f"{path}: no rows")
    return images, heads


def stacked_cells(features: torch.Tensor, grid: int) -> torch.Tensor:
    """(N, P, D) patch features -> (N, grid*grid, k*D): each cell's own patches, stacked."""
    side = math.isqrt(features.shape[1])
    index = torch.tensor([cell_patches(side, r, c, grid) for r in range(grid) for c in range(grid)])
    return features[:, index].flatten(2)


def _pixels(processor, paths: list[Path], batch: int = 256) -> torch.Tensor:
    from vlm_chat.images import load_image

    return torch.cat([processor.preprocess_images([load_image(p) for p in paths[i : i + batch]])
                      for i in range(0, len(paths), batch)])


def encode(tower, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The tower's patch features of `pixels`, `batch` images at a time, without gradients."""
    with torch.no_grad():
        return torch.cat([tower(pixels[i : i + batch]) for i in range(0, len(pixels), batch)])


def head_loss(heads, features: torch.Tensor, targets: dict[str, torch.Tensor], grid: int) -> torch.Tensor:
    """The summed cross entropy of every head of `targets` on each cell's stacked features."""
    x = stacked_cells(features, grid)
    return sum(torch.nn.functional.cross_entropy(heads[head](x).flatten(0, 1), y.flatten(), ignore_index=IGNORE)
               for head, y in targets.items())


def fit_heads(features: torch.Tensor, targets: dict[str, torch.Tensor], classes: dict[str, int], grid: int, steps: int,
              batch_size: int, lr: float, seed: int) -> torch.nn.ModuleDict:
    """A linear head per key of `targets` (its `classes`), fit alone on fixed `features` (N, P, D):
    `steps` AdamW steps on batches drawn with a generator seeded `seed`."""
    dim = stacked_cells(features[:1], grid).shape[-1]
    heads = torch.nn.ModuleDict({head: torch.nn.Linear(dim, classes[head]) for head in targets})
    optim = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(len(features), (batch_size,), generator=generator)
        loss = head_loss(heads, features[index], {head: y[index] for head, y in targets.items()}, grid)
        optim.zero_grad()
        loss.backward()
        optim.step()
    return heads


def _accuracy(heads, features, targets: dict[str, torch.Tensor], names: dict[str, list[str]], grid: int) -> dict:
    """Per head: overall accuracy on scored cells, and by the kind of the true label."""
    out = {}
    with torch.no_grad():
        x = stacked_cells(features, grid)
        for head, y in targets.items():
            hit = heads[head](x).argmax(-1) == y
            scored = y != IGNORE
            kinds = {"all": scored}
            for kind in sorted({n.split(":")[0] for n in names[head]}):
                ids = torch.tensor([i for i, n in enumerate(names[head]) if n.split(":")[0] == kind])
                kinds[kind] = torch.isin(y, ids)
            out[head] = {kind: round(hit[mask].float().mean().item(), 4) for kind, mask in kinds.items() if mask.any()}
    return out


def recoloured(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image with its R, G and B channels in a random order (one of the 6): the same
    shapes and background, other colours. `pixels` are normalised by `mean` and `std` (C,)."""
    raw = pixels * std[:, None, None] + mean[:, None, None]
    orders = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])
    picked = orders[torch.randint(len(orders), (len(pixels),), generator=generator)]  # (N, 3)
    shuffled = torch.gather(raw, 1, picked[:, :, None, None].expand_as(raw))
    return (shuffled - mean[:, None, None]) / std[:, None, None]


def sharpen(model_dir: str | Path, data: str | Path, val: str | Path, out: str | Path, max_steps: int = 1500,
            batch_size: int = 64, lr: float = 1e-4, head_lr: float = 1e-3, anchor: float = 1.0, seed: int = 0,
            recolour: str | None = None) -> dict:
    """Train the tower of the bundle at `model_dir` on the cell labels of `data`; writes the new bundle to `out`.
    With `recolour` (a head's name), that head also learns from each batch with its colour
    channels shuffled (`recoloured`), so what it reads cannot lean on the colours a label
    was seen in."""
    from vlm_chat.model import VisionLanguageModel

    torch.manual_seed(seed)
    source, out = Path(model_dir), Path(out)
    model, processor = VisionLanguageModel.from_pretrained(source, device="cpu", quantization="none")
    tower = model.vision_tower
    frozen = copy.deepcopy(tower).eval().requires_grad_(False)
    start = time.perf_counter()
    train_paths, train_labels = read_cell_labels(Path(data))
    val_paths, val_labels = read_cell_labels(Path(val))
    if set(val_labels) != set(train_labels):
        raise UserFacingError(f"{val}: heads {sorted(val_labels)}, {data} has {sorted(train_labels)}")
    if recolour is not None and recolour not in train_labels:
        raise UserFacingError(f"--recolour {recolour}: {data} has no such head (it has {', '.join(sorted(train_labels))})")
    grid = math.isqrt(len(next(iter(train_labels.values()))[0]))
    names = {head: sorted({n for row in rows for n in row if n is not None}) for head, rows in train_labels.items()}
    ids = {head: {n: i for i, n in enumerate(labels)} for head, labels in names.items()}

    def targets(labels):  # a label the training rows never give cannot be learned: not scored
        return {head: torch.tensor([[ids[head].get(n, IGNORE) if n is not None else IGNORE for n in row]
                                    for row in rows]) for head, rows in labels.items()}

    train_x, train_y = _pixels(processor, train_paths), targets(train_labels)
    val_x, val_y = _pixels(processor, val_paths), targets(val_labels)
    print(f"cells: {len(train_paths)} training / {len(val_paths)} validation images, {grid}x{grid} cells, heads "
          + ", ".join(f"{h} ({len(n)} labels)" for h, n in names.items())
          + f"; pixels in {time.perf_counter() - start:.0f} s", flush=True)

    scale = encode(frozen, train_x[:2048]).std(dim=(0, 1)) + 1e-6  # (D,) spread of the original features

    # The heads alone on the frozen tower: the baseline, and the start of the joint training.
    train_f, val_f0 = encode(frozen, train_x), encode(frozen, val_x)
    heads = fit_heads(train_f, train_y, {head: len(labels) for head, labels in names.items()}, grid, max_steps,
                      batch_size, head_lr, seed)
    before = _accuracy(heads, val_f0, val_y, names, grid)
    print(f"cells: frozen tower, heads alone: {json.dumps(before)}", flush=True)
    del train_f

    tower.train().requires_grad_(True)
    params = [p for p in tower.parameters() if p.requires_grad]
    optim = torch.optim.AdamW([{"params": params, "lr": lr}, {"params": heads.parameters(), "lr": head_lr}],
                              weight_decay=1e-2)
    warmup = max(1, max_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max_steps))))
    generator = torch.Generator().manual_seed(seed + 1)
    colours = torch.Generator().manual_seed(seed + 2)
    norm = [torch.tensor(getattr(processor.image_processor, key)) for key in ("image_mean", "image_std")]
    start = time.perf_counter()
    for step in range(max_steps):
        index = torch.randint(len(train_x), (batch_size,), generator=generator)
        x = train_x[index]
        features = tower(x)
        with torch.no_grad():
            original = frozen(x)
        task = head_loss(heads, features, {head: y[index] for head, y in train_y.items()}, grid)
        if recolour is not None:
            cells = stacked_cells(tower(recoloured(x, *norm, colours)), grid)
            task = task + torch.nn.functional.cross_entropy(heads[recolour](cells).flatten(0, 1),
                                                            train_y[recolour][index].flatten(), ignore_index=IGNORE)
        drift = (((features - original) / scale) ** 2).mean()
        loss = task + anchor * drift
        optim.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        schedule.step()
        if step % 100 == 0 or step == max_steps - 1:
            print(f"cells: step {step + 1}/{max_steps}: heads {task.item():.3f}, drift {drift.item():.4f}, "
                  f"{(time.perf_counter() - start) / (step + 1):.2f} s a step", flush=True)
    tower.eval()
    val_f = encode(tower, val_x)
    after = _accuracy(heads, val_f, val_y, names, grid)
    moved = (((val_f - val_f0) / scale) ** 2).mean().sqrt().item()
    print(f"cells: trained tower: {json.dumps(after)}; features moved {moved:.3f} of their spread (root mean square)",
          flush=True)

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("checkpoints"))
    model.save_pretrained(out, processor, save_vision=True)
    result = {"before": before, "after": after, "moved": round(moved, 4), "steps": max_steps, "recolour": recolour,
              "train_images": len(train_paths), "val_images": len(val_paths)}
    (out / "cells.json").write_text(json.dumps({**result, "labels": names}, indent=1))
    print(f"cells: wrote {out}", flush=True)
    return result
