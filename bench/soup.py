"""Average the trained weights of bundles that share one architecture (a "model soup",
Wortsman et al. 2022): vision tower, projector and LoRA, each tensor the weighted mean of
the bundles' tensors. Everything else (tokenizer, configs) comes from the first bundle.

LoRA's A and B are averaged one by one, which equals averaging the weight updates B @ A
only to first order; the bundles should be fine-tunes of one another (check `--report`:
the relative distance of each bundle's tensors from the first's).

    python bench/soup.py --bundles runs/next/census vlm_chat/assets/default --out runs/soup
    python bench/soup.py --bundles A B C --weights 0.5 0.25 0.25 --out runs/soup
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from training.default_model import RUN_RECORDS

WEIGHT_FILES = ("vision/model.safetensors", "projector.safetensors", "adapter/adapter_model.safetensors")
SAME_CONFIGS = ("vlm_config.json", "vision/config.json", "adapter/adapter_config.json")
NOT_COPIED = ("checkpoints", *RUN_RECORDS, "soup.json")  # they describe one bundle


def _config(bundle: Path, name: str) -> dict | None:
    path = bundle / name
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    config.pop("base_model_name_or_path", None)  # where the LLM was cached, not what it is
    config.pop("transformers_version", None)  # which release saved it
    if isinstance(config.get("target_modules"), list):  # peft writes the set in any order
        config["target_modules"] = sorted(config["target_modules"])
    return config


def check_bundles(bundles: list[Path]) -> None:
    """Refuse bundles whose weights cannot be averaged, naming the file and what differs."""
    first = bundles[0]
    for bundle in bundles:
        for name in WEIGHT_FILES:
            if not (bundle / name).is_file():
                raise SystemExit(f"{bundle / name}: missing; every bundle of a soup needs {', '.join(WEIGHT_FILES)}")
    for bundle in bundles[1:]:
        for name in SAME_CONFIGS:
            if _config(bundle, name) != _config(first, name):
                raise SystemExit(f"{bundle / name} differs from {first / name}: only bundles of one architecture average")


def soup(bundles: list[Path], weights: list[float], out: Path) -> dict[str, float]:
    """Write the weighted mean of `bundles` into `out`; returns, per weight file, the largest
    relative distance of a bundle's tensors from the first bundle's."""
    if len(weights) != len(bundles):
        raise SystemExit(f"--weights: {len(weights)} given for {len(bundles)} bundles")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise SystemExit("--weights: give non-negative numbers with a positive sum")
    check_bundles(bundles)
    total = sum(weights)
    weights = [w / total for w in weights]
    if out.exists():
        raise SystemExit(f"{out}: already exists; give a new --out")
    means, distances = {}, {}
    for name in WEIGHT_FILES:  # everything is read and checked before anything is written
        states = [load_file(str(bundle / name)) for bundle in bundles]
        keys = set(states[0])
        for bundle, state in zip(bundles[1:], states[1:]):
            if set(state) != keys:
                raise SystemExit(f"{bundle / name}: its tensors are not those of {bundles[0] / name}")
        mean = {}
        for key in states[0]:
            shapes = {tuple(state[key].shape) for state in states}
            if len(shapes) > 1:
                raise SystemExit(f"{name}: tensor {key} has shapes {sorted(shapes)} in the bundles")
            mean[key] = sum(w * state[key].float() for w, state in zip(weights, states)).to(states[0][key].dtype).contiguous()
        base = torch.sqrt(sum((t.float() ** 2).sum() for t in states[0].values()))
        distances[name] = max(
            (torch.sqrt(sum(((s[k].float() - states[0][k].float()) ** 2).sum() for k in keys)) / base).item()
            for s in states[1:]) if len(states) > 1 else 0.0
        means[name] = mean
    shutil.copytree(bundles[0], out, ignore=shutil.ignore_patterns(*NOT_COPIED))
    for name, mean in means.items():
        save_file(mean, str(out / name), metadata={"format": "pt"})
    (out / "soup.json").write_text(json.dumps(
        {"bundles": [str(b) for b in bundles], "weights": weights, "relative_distance": distances}, indent=1))
    return distances


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundles", type=Path, nargs="+", required=True)
    parser.add_argument("--weights", type=float, nargs="+", help="one per bundle (default: equal)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    weights = args.weights or [1.0] * len(args.bundles)
    distances = soup(args.bundles, weights, args.out)
    for name, distance in distances.items():
        print(f"{name}: farthest bundle {distance:.3f} of the first's norm away")
    print(f"soup written to {args.out}: evaluate it with `vlm-chat eval --model {args.out} ...`")


if __name__ == "__main__":
    main()
