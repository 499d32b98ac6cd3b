"""Conversation -> `input_ids` with N image-token positions per image, + `pixel_values`.

Prompts come from the tokenizer's own chat template (ChatML, Llama, ...). Image
parts are rendered as one `<image>` placeholder, which this processor expands into
`num_image_tokens` copies of the image token id, so the model only has to scatter
image embeddings into those positions (the transformers Llava contract).

With `image_tiles` k > 0 the image's square grid of tokens is cut into k x k tiles,
and each tile's tokens follow its position in words ("top left:", as SmolVLM writes
`<row_1_col_1>`): a question about a place in the image then finds it as text, not
as a learned code of the token's index. The model scatters its embeddings tile by
tile to match (`tile_order`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import AutoTokenizer, BatchFeature
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from vlm_chat.errors import ConfigError, ImageTokenMismatchError
from vlm_chat.images import ImageInput, load_image

TOKENIZER_DIR = "tokenizer"
Message = dict[str, Any]

_ROWS = {2: ("top", "bottom"), 3: ("top", "middle", "bottom")}
_COLS = {2: ("left", "right"), 3: ("left", "middle", "right")}


def tile_names(tiles: int) -> list[str]:
    """Names of the k x k tiles in row-major order: words for 2 and 3, else row/column numbers."""
    if tiles in _ROWS:
        return [f"{row} {col}".replace("middle middle", "center") for row in _ROWS[tiles] for col in _COLS[tiles]]
    return [f"row {r + 1} column {c + 1}" for r in range(tiles) for c in range(tiles)]


def tile_order(num_tokens: int, tiles: int) -> list[int]:
    """Raster indices of a square token grid, tile by tile (row-major tiles, row-major within)."""
    side = math.isqrt(num_tokens)
    if tiles < 1 or side * side != num_tokens or side % tiles:
        raise ConfigError(
            f"image_tiles={tiles} needs a square grid of image tokens whose side divides by {tiles}; "
            f"this bundle gives {num_tokens} tokens per image (use a tile count that divides {side}, or 0)"
        )
    step = side // tiles
    return [(tr * step + r) * side + tc * step + c
            for tr in range(tiles) for tc in range(tiles) for r in range(step) for c in range(step)]


def flatten_message(message: Message, image_token: str) -> tuple[dict[str, str], list[ImageInput]]:
    """One message with list content -> string content with placeholders, and its images.

    Parts are joined with newlines, so [image, text] renders as "<image>\\nquestion",
    the LLaVA layout.
    """
    role = message.get("role")
    if role not in ("system", "user", "assistant"):
        raise ConfigError(f"message role must be system, user or assistant, got {role!r}")
    content = message.get("content", "")
    if isinstance(content, str):
        return {"role": role, "content": content}, []
    if not isinstance(content, list):
        raise ConfigError(f"message content must be a string or a list of parts, got {type(content).__name__}")
    pieces, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            pieces.append(str(part.get("text", "")))
        elif kind == "image":
            if part.get("image") is None:
                raise ConfigError("an image part has no 'image' value")
            pieces.append(image_token)
            images.append(part["image"])
        else:
            raise ConfigError(f"unknown content part type {kind!r}; use 'text' or 'image'")
    return {"role": role, "content": "\n".join(pieces)}, images


class VLMProcessor:
    def __init__(
        self,
        tokenizer,
        image_processor: LlavaImageProcessorPil,
        num_image_tokens: int,
        image_token: str = "<image>",
        system_prompt: str | None = None,
        image_tiles: int = 0,
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        self.system_prompt = system_prompt
        self.image_tiles = image_tiles
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ConfigError(f"the tokenizer has no {image_token!r} token; rebuild the bundle with `vlm-chat build`")
        # What one placeholder becomes: the image tokens, each tile's after its name.
        self.image_ids = [self.image_token_id] * num_image_tokens
        if image_tiles:
            tile_order(num_image_tokens, image_tiles)  # refuses a count that does not divide the grid
            per_tile = num_image_tokens // image_tiles**2
            self.image_ids = [
                token for name in tile_names(image_tiles)
                for token in [*tokenizer(f"\n{name}:", add_special_tokens=False)["input_ids"], *[self.image_token_id] * per_tile]
            ]
        if tokenizer.chat_template is None:
            raise ConfigError("the tokenizer has no chat template; use an instruction-tuned LLM or add a template")

    # -- prompts ---------------------------------------------------------------------

    def render(
        self, messages: Sequence[Message], add_generation_prompt: bool = True
    ) -> tuple[str, list[ImageInput]]:
        """Chat-template text (with one placeholder per image) and the images in order."""
        flat, images = [], []
        for message in messages:
            text_message, message_images = flatten_message(message, self.image_token)
            flat.append(text_message)
            images.extend(message_images)
        if self.system_prompt and (not flat or flat[0]["role"] != "system"):
            flat.insert(0, {"role": "system", "content": self.system_prompt})
        text = self.tokenizer.apply_chat_template(flat, tokenize=False, add_generation_prompt=add_generation_prompt)
        return text, images

    def expand_image_tokens(self, ids: list[int]) -> list[int]:
        out: list[int] = []
        for token in ids:
            out.extend(self.image_ids if token == self.image_token_id else [token])
        return out

    def encode_text(self, text: str) -> list[int]:
        """Token ids of rendered text, one image token id per placeholder (not expanded)."""
        # The chat template already wrote BOS/special tokens where the model wants them.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def preprocess_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        pil = [load_image(image) for image in images]
        return self.image_processor(images=pil, return_tensors="pt")["pixel_values"]  # (N, 3, S, S)

    def __call__(
        self,
        conversations: Sequence[Message] | Sequence[Sequence[Message]],
        add_generation_prompt: bool = True,
    ) -> BatchFeature:
        """One conversation or a batch of them -> left-padded `input_ids`, `attention_mask`, `pixel_values`."""
        batch = [conversations] if conversations and isinstance(conversations[0], dict) else list(conversations)
        sequences, all_images = [], []
        for index, messages in enumerate(batch):
            text, images = self.render(messages, add_generation_prompt)
            ids = self.encode_text(text)
            placeholders = ids.count(self.image_token_id)
            if placeholders != len(images):
                where = f"conversation {index}: " if len(batch) > 1 else ""
                raise ImageTokenMismatchError(
                    f"{where}the text has {placeholders} {self.image_token} placeholder(s) but "
                    f"{len(images)} image(s) were given; use one {self.image_token} per image "
                    "(or pass images as content parts and leave the placeholder out of the text)"
                )
            sequences.append(self.expand_image_tokens(ids))
            all_images.extend(images)
        # Left padding: generation appends on the right of every row.
        width = max(len(s) for s in sequences)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            input_ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, width - len(seq):] = 1
        data = {"input_ids": input_ids, "attention_mask": attention_mask}
        if all_images:
            data["pixel_values"] = self.preprocess_images(all_images)
        return BatchFeature(data)

    # -- files -----------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.tokenizer.save_pretrained(directory / TOKENIZER_DIR)
        self.image_processor.save_pretrained(directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, config) -> VLMProcessor:
        directory = Path(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory / TOKENIZER_DIR)
        image_processor = LlavaImageProcessorPil.from_pretrained(directory)
        return cls(tokenizer, image_processor, config.num_image_tokens, config.image_token, config.system_prompt,
                   config.image_tiles)
