"""Read LLaVA-style conversation files: ShapesWorld's and the real LLaVA-1.5 ones.

One record looks like this (blip_laion_cc_sbu_558k.json, llava_v1_5_mix665k.json):

    {"id": "000000033471",
     "image": "coco/train2017/000000033471.jpg",       # optional: text-only records have none
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

`<image>` marks where the image features go; it appears once, in the first human turn,
either before ("<image>\\nQ") or after ("Q\\n<image>") the text.
Every problem raises DataError with the file, the record and a hint on how to fix it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_TOKEN = "<image>"
MAX_PIXELS = 40_000_000  # refuse larger images: they are almost surely broken or malicious


class DataError(ValueError):
    """A problem with a data file or record; the message says where and how to fix it."""


def _where(json_path, index: int, rec) -> str:
    rid = rec.get("id") if isinstance(rec, dict) else None
    return f"{json_path}, record #{index}" + (f" (id={rid!r})" if rid is not None else "")


def load_records(json_path, image_root=None) -> list[dict]:
    """Read and validate a LLaVA-format JSON list of records.

    image_root is the folder the records' `image` paths are relative to (default: the
    JSON file's folder, which is right for ShapesWorld). Each record with an image gets
    an extra key `image_path` with the joined path; files are only opened later, by
    load_image.
    """
    path = Path(json_path)
    if not path.is_file():
        raise DataError(f"{path}: file not found. Check the path, or download/generate the data first.")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}). "
            "The file may be truncated: re-download or regenerate it."
        ) from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}). Is this really a JSON file?") from e
    if not isinstance(data, list):
        raise DataError(
            f"{path}: expected a JSON list of records at the top level, found {type(data).__name__}. "
            "LLaVA files are lists like [{\"id\": ..., \"conversations\": [...]}, ...]."
        )

    root = Path(image_root) if image_root is not None else path.parent
    if image_root is not None and not root.is_dir():
        raise DataError(f"{path}: image_root {root} is not a folder. Pass the folder the 'image' paths are relative to.")
    for i, rec in enumerate(data):
        validate_record(rec, _where(path, i, rec))
        if "image" in rec:
            rec["image_path"] = str(root / rec["image"])
    return data


def validate_record(rec, where: str) -> None:
    """Check one record's structure; raise DataError naming `where` if it is malformed."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a record must be a JSON object, found {type(rec).__name__}.")
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise DataError(f"{where}: needs a non-empty 'conversations' list of {{'from', 'value'}} turns.")

    for t, turn in enumerate(conv):
        expected = "human" if t % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != expected:
            found = turn.get("from") if isinstance(turn, dict) else turn
            raise DataError(
                f"{where}: turn {t} should be from {expected!r} but is {found!r}. "
                "Conversations must alternate human, gpt, human, gpt, ... starting with human."
            )
        if not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: turn {t} 'value' must be a string, found {type(turn.get('value')).__name__}.")
        if expected == "gpt" and IMAGE_TOKEN in turn["value"]:
            raise DataError(f"{where}: gpt turn {t} contains {IMAGE_TOKEN}; only human turns may. Remove it.")
    if len(conv) % 2:
        raise DataError(f"{where}: the last human turn has no gpt answer. Add the answer or drop the turn.")

    counts = [turn["value"].count(IMAGE_TOKEN) for turn in conv[::2]]
    total = sum(counts)
    if "image" in rec:
        if not isinstance(rec["image"], str) or not rec["image"]:
            raise DataError(f"{where}: 'image' must be a non-empty relative path string, found {rec['image']!r}.")
        if total == 0:
            raise DataError(
                f"{where}: has an 'image' but found 0 {IMAGE_TOKEN} placeholders. "
                f"Add exactly one, e.g. start the first human turn with '{IMAGE_TOKEN}\\n'."
            )
        if total > 1:
            raise DataError(
                f"{where}: found {total} {IMAGE_TOKEN} placeholders, expected exactly 1. "
                "Keep only the one in the first human turn and remove the others."
            )
        if counts[0] != 1:
            turn = 2 * counts.index(1)
            raise DataError(f"{where}: {IMAGE_TOKEN} is in turn {turn}; move it to the first human turn (turn 0).")
    elif total:
        raise DataError(
            f"{where}: has no 'image' but found {total} {IMAGE_TOKEN} placeholder(s). "
            "Remove them (text-only record) or add the 'image' path."
        )


def _to_8bit_gray(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float grayscale -> 8-bit L by scaling (PIL's convert would clip to 255)."""
    arr = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
        arr = arr / 257.0  # 0..65535 -> 0..255
    elif img.mode == "F" and arr.max(initial=0) <= 1.0:
        arr = arr * 255.0  # floats in 0..1
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparent pixels become white, as on a web page."""
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit_gray(img)
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path, where: str) -> Image.Image:
    """Open an image file as RGB; raise DataError naming `where` and the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{where}: image file not found: {path}. Check image_root (the folder the record's "
            "'image' paths are relative to) and that the images were downloaded or generated."
        )
    try:
        with Image.open(path) as img:
            w, h = img.size  # read from the header, before decoding any pixels
            if w * h > MAX_PIXELS:
                raise DataError(
                    f"{where}: image {path} is {w}x{h} = {w * h / 1e6:.0f} megapixels, over the "
                    f"{MAX_PIXELS / 1e6:.0f} MP limit (decompression-bomb guard). Resize it or drop the record."
                )
            img.load()  # decode now so truncated files fail here, not later in a batch
            return _to_rgb(img)
    except DataError:
        raise
    except Image.DecompressionBombError as e:  # PIL's own, larger limit, hit while opening
        raise DataError(f"{where}: image {path} is too large to load safely ({e}). Resize it or drop the record.") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(
            f"{where}: cannot read image {path}: {type(e).__name__}: {e}. "
            "The file is not an image or is corrupt/truncated: re-download or regenerate it."
        ) from e


def expand_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pad to a square of color `fill`, image centered (LLaVA-1.5's image_aspect_ratio='pad')."""
    img = img.convert("RGB") if img.mode != "RGB" else img
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), tuple(fill))
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def turns(rec: dict) -> list[tuple[str, str]]:
    """The conversation as (human text, gpt text) pairs."""
    conv = rec["conversations"]
    return [(conv[i]["value"], conv[i + 1]["value"]) for i in range(0, len(conv) - 1, 2)]


def split_image_placeholder(text: str) -> tuple[str, str]:
    """Text before and after the single <image>, without the newline that joins them.

    "<image>\\nQ" -> ("", "Q") and "Q\\n<image>" -> ("Q", "").
    """
    n = text.count(IMAGE_TOKEN)
    if n != 1:
        raise DataError(f"expected exactly one {IMAGE_TOKEN} in {text[:60]!r}, found {n}.")
    before, after = text.split(IMAGE_TOKEN)
    return before.removesuffix("\n"), after.removeprefix("\n")
