"""LoRA instruct-stage training speed: our trainer against a bare PyTorch loop, one run.

    python bench/bench_train.py [--bundle DIR] [--steps 12] [--batch-size 4]

Both sides train the same model (the bundle's SmolLM2 + projector, LoRA r=16 on all
LLM linear layers, frozen vision tower) on the same batches of generated
(image, question, answer) triples. "ours" is `vlm-chat train --stage instruct`
(accelerate, gradient clipping, cosine schedule, progress bar, metrics log, the
output head computed only where labels are), once in fp32 and once with
`--mixed-precision bf16` (autocast; pays off on CPUs with AMX or AVX512-BF16);
"bare" is forward (the model's full loss) / backward / AdamW step in a plain
for-loop. The first two steps of each are warm-up and not timed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WARMUP = 2


def make_triples(folder: Path, n: int) -> Path:
    from PIL import Image, ImageDraw

    colours = {"red": (220, 30, 30), "blue": (20, 40, 220), "green": (30, 200, 40), "yellow": (230, 220, 20)}
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name, rgb = list(colours.items())[i % 4]
        image = Image.new("RGB", (96, 96), "white")
        ImageDraw.Draw(image).ellipse((10 + i % 20, 10, 60 + i % 20, 60), fill=rgb)
        image.save(folder / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "question": "What colour is the circle in this picture?",
                     "answer": f"The circle is {name}. It sits near the top left of a white background."})
    path = folder / "triples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def bare_loop(bundle: str, data: Path, steps: int, batch_size: int) -> float:
    import torch

    from adapters.lora import LoraSettings
    from training.data import ConversationDataset, collate, load_samples
    from training.trainable import TrainablePlan, apply_plan
    from vlm_chat.model import VisionLanguageModel

    torch.manual_seed(0)
    model, processor = VisionLanguageModel.from_pretrained(bundle, device="cpu", quantization="none")
    apply_plan(model, TrainablePlan("frozen", "full", "lora"), LoraSettings())
    samples, _ = load_samples([data])
    dataset = ConversationDataset(samples, processor, model.max_context)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    model.train()
    timed_samples, start = 0, None
    for step in range(steps):
        if step == WARMUP:
            start = time.perf_counter()
        batch = collate([dataset[(step * batch_size + i) % len(dataset)] for i in range(batch_size)], pad_id=0)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if start is not None:
            timed_samples += batch_size
    return timed_samples / (time.perf_counter() - start)


def ours(bundle: str, data: Path, steps: int, batch_size: int, out: Path, precision: str = "no") -> float:
    cmd = [sys.executable, "-m", "cli", "train", "--stage", "instruct", "--model", bundle, "--data", str(data),
           "--out", str(out), "--max-steps", str(steps), "--batch-size", str(batch_size), "--log-every", "1",
           "--val-fraction", "0", "--save-every", "0", "--mixed-precision", precision]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "samples_per_s" in r and r["step"] > WARMUP]
    # Each record covers one step of batch_size samples: the mean of per-step times.
    seconds = sum(batch_size / r["samples_per_s"] for r in timed)
    return len(timed) * batch_size / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=None, help="default: build one like bench_generate.py does")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    from bench.bench_generate import default_bundle

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = args.bundle or default_bundle(tmp)
        data = make_triples(tmp / "data", 64)
        bare = bare_loop(bundle, data, args.steps, args.batch_size)
        ours_speed = ours(bundle, data, args.steps, args.batch_size, tmp / "run")
        ours_bf16 = ours(bundle, data, args.steps, args.batch_size, tmp / "run-bf16", "bf16")
        bare_again = bare_loop(bundle, data, args.steps, args.batch_size)  # bracket ours against drift
    base = (bare + bare_again) / 2
    print(f"LoRA instruct stage, batch {args.batch_size}, {args.steps - WARMUP} timed steps")
    print(f"{'loop':<11} {'samples/s':>10} {'vs bare':>8}")
    print(f"{'bare':<11} {base:>10.2f} {1.0:>8.3f}   (runs: {bare:.2f}, {bare_again:.2f})")
    print(f"{'ours':<11} {ours_speed:>10.2f} {ours_speed / base:>8.3f}")
    print(f"{'ours, bf16':<11} {ours_bf16:>10.2f} {ours_bf16 / base:>8.3f}")


if __name__ == "__main__":
    main()
