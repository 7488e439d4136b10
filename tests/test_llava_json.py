"""Tests for lgemma.data.llava_json: the LLaVA-format record and image loader."""

import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from lgemma.data.llava_json import (
    DataError,
    expand_to_square,
    load_image,
    load_records,
    split_image_placeholder,
    turns,
    validate_record,
)


def conv(*values):
    """Alternating human/gpt turns from plain strings."""
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def write_json(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


# ---------------------------------------------------------------- records


def test_real_558k_and_665k_shapes_load(tmp_path):
    # Copies of the structure of real entries, including "Q\n<image>" order and a
    # text-only ShareGPT record (no "image", extra "model" key).
    pretrain = [
        {"id": "004539375", "image": "00453/004539375.jpg",
         "conversations": conv("Render a clear and concise summary of the photo.\n<image>",
                               "select luxury furniture 3 - inch gel memory foam mattress topper")},
        {"id": "002239345", "image": "00223/002239345.jpg",
         "conversations": conv("<image>\nGive a brief description of the image.",
                               "a grey watch with an army style strap")},
    ]
    mix = [
        {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
         "conversations": conv("<image>\nWhat are the colors of the bus in the image?",
                               "The bus in the image is white and red.",
                               "What feature can be seen on the back of the bus?",
                               "The back of the bus features an advertisement.")},
        {"id": "i6IyJda_0", "model": "",
         "conversations": conv("How to tell if a customer segment is well segmented? In 3 bullet points.",
                               "1. Homogeneity\n2. Distinctiveness\n3. Stability")},
        {"id": "VG_100K_2/2380", "image": "vg/VG_100K_2/2380.jpg",
         "conversations": conv("What is the man holding?\n<image>", "A kite.")},
    ]
    recs = load_records(write_json(tmp_path / "blip_laion_cc_sbu_558k.json", pretrain), image_root=tmp_path)
    assert [r["id"] for r in recs] == ["004539375", "002239345"]
    assert recs[0]["image_path"] == str(tmp_path / "00453/004539375.jpg")
    assert split_image_placeholder(turns(recs[0])[0][0]) == ("Render a clear and concise summary of the photo.", "")
    assert split_image_placeholder(turns(recs[1])[0][0]) == ("", "Give a brief description of the image.")

    recs = load_records(write_json(tmp_path / "llava_v1_5_mix665k.json", mix))
    assert len(turns(recs[0])) == 2 and turns(recs[0])[1][1].startswith("The back")
    assert "image_path" not in recs[1]  # text-only
    assert recs[2]["image_path"] == str(tmp_path / "vg/VG_100K_2/2380.jpg")


def test_text_only_record_is_fine():
    validate_record({"id": "t", "conversations": conv("Hi", "Hello!")}, "x.json record 0")


@pytest.mark.parametrize("values,count", [
    (("What is this?", "A cat."), 0),
    (("<image>\nWhat is this? <image>", "A cat."), 2),
    (("<image>\nWhat is this?", "A cat.", "<image>\nAnd now?", "A dog."), 2),
])
def test_wrong_placeholder_count_names_count_and_record(tmp_path, values, count):
    path = write_json(tmp_path / "bad.json", [{"id": "rec-7", "image": "a.png", "conversations": conv(*values)}])
    with pytest.raises(DataError) as e:
        load_records(path)
    msg = str(e.value)
    assert f"found {count}" in msg and "rec-7" in msg and "bad.json" in msg


def test_placeholder_must_be_in_first_human_turn():
    rec = {"id": "r", "image": "a.png", "conversations": conv("Look.", "Ok.", "<image>\nNow?", "Cat.")}
    with pytest.raises(DataError, match="first human turn"):
        validate_record(rec, "f.json record 0")


def test_placeholder_without_image_is_rejected():
    with pytest.raises(DataError, match="no 'image'"):
        validate_record({"id": "r", "conversations": conv("<image>\nQ", "A")}, "f.json record 0")


def test_gpt_placeholder_and_bad_structure_rejected():
    bad = [
        {"id": "r", "image": "a.png", "conversations": conv("<image>\nQ", "A <image>")},
        {"id": "r", "conversations": []},
        {"id": "r"},
        {"id": "r", "conversations": [{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}]},
        {"id": "r", "conversations": conv("Q", "A", "Q2")},
        {"id": "r", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "A"}]},
        "not a dict",
    ]
    for rec in bad:
        with pytest.raises(DataError, match="where-42"):
            validate_record(rec, "where-42")


def test_invalid_json_missing_file_and_not_a_list(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": "a", "conversations": [', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.json.*not valid JSON"):
        load_records(broken)
    with pytest.raises(DataError, match=r"nope\.json.*not found"):
        load_records(tmp_path / "nope.json")
    with pytest.raises(DataError, match="expected a JSON list"):
        load_records(write_json(tmp_path / "dict.json", {"id": "a"}))
    with pytest.raises(DataError, match="image_root"):
        load_records(write_json(tmp_path / "ok.json", []), image_root=tmp_path / "no_such_folder")


# ---------------------------------------------------------------- images


def test_missing_image_names_record_and_path(tmp_path):
    path = write_json(tmp_path / "d.json", [{"id": "img-3", "image": "sub/missing.png", "conversations": conv("<image>\nQ", "A")}])
    rec = load_records(path)[0]
    with pytest.raises(DataError) as e:
        load_image(rec["image_path"], "d.json record #0 (id='img-3')")
    msg = str(e.value)
    assert "img-3" in msg and "sub/missing.png" in msg and "image_root" in msg


def test_corrupt_text_and_truncated_files_name_the_file(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "noise.png").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    (tmp_path / "notes.png").write_text("just some text\n")
    # Half a PNG whose pixels vary, so the compressed data really is cut off.
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    for name in ("noise.png", "notes.png", "truncated.png"):
        with pytest.raises(DataError) as e:
            load_image(tmp_path / name, "rec 1")
        assert name in str(e.value) and "rec 1" in str(e.value)


def test_decompression_bomb_is_refused(tmp_path):
    # A PNG header claiming 8000x8000 pixels: refused before any pixel is decoded.
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 8000, 8000, 8, 0, 0, 0, 0)  # 64 MP, 8-bit gray
    idat = zlib.compress(b"\x00" * 1000)  # only the start of the pixel data
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    (tmp_path / "bomb.png").write_bytes(png)
    with pytest.raises(DataError, match="megapixels"):
        load_image(tmp_path / "bomb.png", "rec 9")


def _save(img, path, **kw):
    img.save(path, **kw)
    return path


def test_odd_modes_load_as_rgb(tmp_path):
    clear = Image.new("RGBA", (4, 4), (200, 10, 10, 0))
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([10, 20, 30] * 256)
    gray16 = Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16))
    cases = {
        "rgba.png": (_save(clear, tmp_path / "rgba.png"), (255, 255, 255)),  # transparent -> white
        "rgba_half.png": (_save(half, tmp_path / "rgba_half.png"), (127, 127, 127)),
        "la.png": (_save(Image.new("LA", (4, 4), (50, 0)), tmp_path / "la.png"), (255, 255, 255)),
        "l.png": (_save(Image.new("L", (4, 4), 77), tmp_path / "l.png"), (77, 77, 77)),
        "p.png": (_save(palette, tmp_path / "p.png"), (10, 20, 30)),
        "p_transparent.png": (_save(palette, tmp_path / "p_transparent.png", transparency=0), (255, 255, 255)),
        "gray16.png": (_save(gray16, tmp_path / "gray16.png"), (156, 156, 156)),  # 40000/257, not clipped
        "cmyk.jpg": (_save(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), tmp_path / "cmyk.jpg"), (255, 255, 255)),
    }
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")  # really a 16-bit file
    for name, (path, expected) in cases.items():
        img = load_image(path, "rec")
        assert img.mode == "RGB" and img.size == (4, 4), name
        got = img.getpixel((1, 1))
        assert all(abs(a - b) <= 2 for a, b in zip(got, expected)), (name, got, expected)


def test_expand_to_square_centers_image():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    out = expand_to_square(img, (1, 2, 3))
    assert out.size == (40, 40)
    arr = np.asarray(out)
    assert (arr[10:30] == (255, 0, 0)).all()  # rows 10..29 hold the original
    assert (arr[:10] == (1, 2, 3)).all() and (arr[30:] == (1, 2, 3)).all()
    tall = expand_to_square(Image.new("RGB", (10, 30), (0, 255, 0)), (0, 0, 0))
    assert tall.size == (30, 30) and tall.getpixel((15, 15)) == (0, 255, 0) and tall.getpixel((5, 15)) == (0, 0, 0)
    square = Image.new("RGB", (8, 8))
    assert expand_to_square(square, (0, 0, 0)).size == (8, 8)


def test_split_image_placeholder():
    assert split_image_placeholder("<image>\nWhat is it?") == ("", "What is it?")
    assert split_image_placeholder("What is it?\n<image>") == ("What is it?", "")
    with pytest.raises(DataError, match="found 0"):
        split_image_placeholder("no image here")
