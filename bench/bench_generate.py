"""Chat-path overhead against plain transformers `generate`, measured in one run.

    python bench/bench_generate.py [--bundle DIR] [--new-tokens 64] [--repeats 3]

Each variant runs in its own subprocess (so peak RSS is its own), `--repeats`
times, and the median is reported:
  plain   transformers generate on the bundle's LLM, text only, no streamer
  ours    vlm-chat ChatSession.reply, same text-only prompt (the overhead figure)
  ours+image  vlm-chat with one image + the question (adds the vision tower and the
              image tokens to the prompt)
Without --bundle, one is built from the shipped CLIP (or, if that is absent, a
randomly initialised CLIP of the same shape) and SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Write a short story about a robot who learns to paint."


def run_variant(variant: str, bundle: str, new_tokens: int) -> dict:
    import torch
    from transformers import GenerationConfig

    from vlm_chat.chat import ChatSession
    from vlm_chat.generation import GenerationSettings
    from vlm_chat.model import VisionLanguageModel

    torch.manual_seed(0)
    # As ask, chat and serve load it: a bundle's LoRA is folded into the weights (plain generate gets the same weights).
    model, processor = VisionLanguageModel.from_pretrained(bundle, device="cpu", merge_adapter=True)
    tokenizer = processor.tokenizer
    image = None
    if variant == "ours+image":
        from PIL import Image

        image = Image.new("RGB", (320, 240), (200, 40, 40))
    if variant == "plain":
        llm = model.language_model
        text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
        llm.generate(**inputs, generation_config=config)  # warm-up, not timed
        # Plain generate, no streamer: time to first token is a 1-token generate,
        # decode speed comes from the full run minus that.
        start = time.perf_counter()
        llm.generate(**inputs, generation_config=GenerationConfig(**{**config.to_diff_dict(), "max_new_tokens": 1}))
        first = time.perf_counter() - start
        start = time.perf_counter()
        out = llm.generate(**inputs, generation_config=config)
        total = time.perf_counter() - start
        tokens = out.shape[1] - inputs["input_ids"].shape[1]
        prompt_tokens = inputs["input_ids"].shape[1]
    else:
        session = ChatSession(model, processor, GenerationSettings(max_new_tokens=new_tokens))
        for _ in session.reply(PROMPT, images=[image] if image else []):  # warm-up, not timed
            pass
        session.reset()
        for _ in session.reply(PROMPT, images=[image] if image else []):
            pass
        stats = session.last_stats
        total, first, tokens, prompt_tokens = stats.seconds, stats.time_to_first_token, stats.completion_tokens, stats.prompt_tokens
    return {
        "variant": variant,
        "prompt_tokens": prompt_tokens,
        "new_tokens": tokens,
        "ttft_s": first,
        "decode_tokens_per_s": (tokens - 1) / (total - first),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def default_bundle(workdir: Path) -> str:
    shipped = REPO / "vlm_chat" / "assets" / "clip"
    vision = shipped
    if not (shipped / "config.json").is_file():
        import torch
        from transformers import CLIPVisionConfig, CLIPVisionModel

        torch.manual_seed(0)
        vision = workdir / "clip-random"
        CLIPVisionModel(CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                                         num_attention_heads=4, image_size=64, patch_size=8)).save_pretrained(vision)
    out = workdir / "bundle"
    subprocess.run([sys.executable, "-m", "cli", "build", "--vision", str(vision), "--llm", "smollm2-135m-instruct",
                    "--out", str(out)], check=True, cwd=REPO)
    return str(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=None)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.bundle, args.new_tokens)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or default_bundle(Path(tmp))
        results: dict[str, list[dict]] = {}
        # Interleave variants so drift in machine load hits all of them alike.
        for _ in range(args.repeats):
            for variant in ("plain", "ours", "ours+image"):
                cmd = [sys.executable, __file__, "--variant", variant, "--bundle", bundle, "--new-tokens", str(args.new_tokens)]
                line = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ)).stdout.strip().splitlines()[-1]
                results.setdefault(variant, []).append(json.loads(line))
    base = {k: statistics.median(r[k] for r in results["plain"]) for k in ("ttft_s", "decode_tokens_per_s", "peak_rss_mb")}
    print(f"bundle: {args.bundle or 'built from SmolLM2-135M + CLIP'}; {args.new_tokens} new tokens, greedy, median of {args.repeats}")
    print(f"{'variant':<12} {'prompt':>6} {'new':>4} {'TTFT s':>7} {'tok/s':>7} {'tok/s vs plain':>14} {'peak RSS MB':>11}")
    for variant, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in ("ttft_s", "decode_tokens_per_s", "peak_rss_mb")}
        print(f"{variant:<12} {runs[0]['prompt_tokens']:>6} {runs[0]['new_tokens']:>4} {med['ttft_s']:>7.3f} "
              f"{med['decode_tokens_per_s']:>7.1f} {med['decode_tokens_per_s'] / base['decode_tokens_per_s']:>14.3f} "
              f"{med['peak_rss_mb']:>11.0f}")


if __name__ == "__main__":
    main()
