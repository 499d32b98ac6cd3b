"""How much of a training epoch is padding? Shuffled batches against length-grouped ones.

    python bench/padding.py DATA.jsonl [DATA2.jsonl ...] [--model BUNDLE] [--batch-size 8]

Batches are padded to their longest sample, so a batch that holds one long conversation
costs as much as eight. This counts, over one epoch of the trainer's own samplers, the
token slots the model computes (batch size x longest sample, summed over batches) and
how many of them are real tokens, for the default shuffle (the baseline) and for
`--group-by-length`. Token counts come from the bundle's processor (image tokens
included), exactly as training encodes the rows. Compute on the 2-core CPU is close to
proportional to the slots; the wall time of a real run is in the model card.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def slots(order: list[int], lengths: list[int], batch_size: int) -> int:
    return sum(max(lengths[i] for i in order[s:s + batch_size]) * len(order[s:s + batch_size])
               for s in range(0, len(order), batch_size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="+")
    parser.add_argument("--model", default=None, help="bundle whose processor encodes the rows (default: the default model)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from training.data import ConversationDataset
    from training.trainer import EpochPermutation, LengthGroupedPermutation
    from training.vlm import prepare_samples
    from vlm_chat.defaults import resolve_model
    from vlm_chat.model import VisionLanguageModel

    model, processor = VisionLanguageModel.from_pretrained(resolve_model(args.model), device="cpu", quantization="none")
    print("| data | samples | real tokens | slots, shuffled | padding | slots, grouped | padding | grouped / shuffled |")
    print("|---|---|---|---|---|---|---|---|")
    for data in args.data:
        samples = prepare_samples([data], processor, model.max_context, False, "training")
        lengths = ConversationDataset(samples, processor, model.max_context).lengths()
        real = sum(lengths)
        plain = slots(list(EpochPermutation(len(lengths), args.seed)), lengths, args.batch_size)
        grouped = slots(list(LengthGroupedPermutation(lengths, args.batch_size, args.seed)), lengths, args.batch_size)
        print(f"| {Path(data).name} | {len(lengths)} | {real:,} | {plain:,} | {1 - real / plain:.0%} | {grouped:,} "
              f"| {1 - real / grouped:.0%} | {grouped / plain:.2f}x |")


if __name__ == "__main__":
    main()
