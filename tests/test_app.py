"""The Gradio demo through its API (gradio_client), serving two fast-mode variants trained into a
temporary LGEMMA_HOME: every chosen variant answers, and bad inputs get a message, never a crash."""
import json

import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from app import variants
from app.demo import MAX_QUESTION_CHARS, MAX_VARIANTS, launch, prepare
from lgemma import cli
from lgemma.data.shapes import sample

VARIANTS = ["tiny", "tiny-noalign"]
# Fast mode cut further: the demo needs really trained variants, not good ones (seconds, not minutes).
TOY = [f"train.{k}=2" for k in ("stage0.clip_steps", "stage0.lm_steps", "align.steps", "instruct.steps")] + \
      [f"train.{k}=8" for k in ("stage0.clip_batch_size", "stage0.lm_batch_size", "align.batch_size",
                                "instruct.batch_size")] + \
      ["data.n_train=64", "data.n_heldout=8", "data.n_compositional=8"]
RELEVANCY = "relevancy (all layers)"


@pytest.fixture(scope="module")
def fast_home(tmp_path_factory):
    """Fast-mode tiny and tiny-noalign, trained once per session (cached on disk, shared with
    test_demo_browser.py), with the environment that finds them."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LGEMMA_FAST", "1")
        mp.setenv("LGEMMA_HOME", str(tmp_path_factory.getbasetemp() / "demo-home"))
        yield prepare(VARIANTS, TOY)[0].parent


@pytest.fixture(scope="module")
def demo(fast_home):
    app = launch(fast_home, VARIANTS, port=None, block=False)
    yield app
    app.close()


@pytest.fixture(scope="module")
def client(demo):
    return Client(demo.local_url, verbose=False)


@pytest.fixture(scope="module")
def shapes_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    sample(5)[0].save(path)
    return path


def ask(client, image, question="What color is the circle?", names=VARIANTS, view=RELEVANCY):
    return client.predict(image, question, names, view, api_name="/ask")


def check_answers(out, names=VARIANTS):
    assert len(out) == 3 * MAX_VARIANTS
    for i in range(MAX_VARIANTS):
        answer, table, overlay = out[3 * i: 3 * i + 3]
        if i < len(names):
            assert answer and "| token | p |" in table and " ms**" in table
            with Image.open(overlay) as im:
                assert im.size == (variants.DISPLAY_SIZE, variants.DISPLAY_SIZE)
        else:
            assert answer is None and overlay is None


def test_served_locally_with_safe_defaults(demo):
    assert demo.local_url.startswith("http://127.0.0.1:")
    assert not demo.share and not demo.analytics_enabled
    assert demo.max_file_size == 5 * 1024 * 1024
    assert demo._queue.default_concurrency_limit == 1


def test_every_chosen_variant_answers_with_probabilities_and_overlay(client, shapes_png):
    check_answers(ask(client, handle_file(shapes_png)))
    out = ask(client, handle_file(shapes_png), "How many objects are there?", ["tiny"], "attention, layer 2")
    check_answers(out, ["tiny"])
    assert "layer 2" in out[1]
    image, text = client.predict(api_name="/new_sample")
    assert Image.open(image).size == (64, 64) and "ShapesWorld seed" in text


def test_show_lists_columns_and_info(client):
    out = client.predict(VARIANTS, api_name="/show")
    titles, infos = list(out[:MAX_VARIANTS]), out[MAX_VARIANTS: 2 * MAX_VARIANTS]
    assert titles[:2] == ["### tiny", "### tiny-noalign"] and titles[2] == ""
    assert "held-out accuracy" in infos[0] and "skipped" in infos[1]  # tiny-noalign has no stage 1


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "I;16", "CMYK"])
def test_non_rgb_images_are_converted(client, tmp_path, mode):
    image = sample(7)[0]
    image = image.convert("I;16") if mode == "I;16" else image.convert(mode)
    path = tmp_path / ("img.jpg" if mode == "CMYK" else "img.png")
    image.save(path)
    check_answers(ask(client, handle_file(path), names=["tiny"]), ["tiny"])


def test_bad_inputs_get_a_message_and_the_app_keeps_serving(client, demo, shapes_png, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    bomb = tmp_path / "bomb.png"
    Image.new("1", (8000, 6000)).save(bomb)  # 48 megapixels in a few kB
    assert bomb.stat().st_size < 100_000
    good = handle_file(shapes_png)
    cases = [
        ((handle_file(text),), "cannot read image notes.png"),
        ((handle_file(bomb),), "decompression-bomb guard"),
        ((None,), "No image yet"),
        ((good, ""), "Type a question"),
        ((good, "   <image>  "), "Type a question"),
        ((good, "why? " * 100), f"keep it under {MAX_QUESTION_CHARS}"),
        ((good, "What color?", ["no-such-variant"]), "Pick at least one variant"),
    ]
    for args, message in cases:
        with pytest.raises(AppError, match=message):
            ask(client, *args)
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1600, 1600, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > demo.max_file_size
    with pytest.raises(Exception, match="413|too large|exceeds"):
        ask(client, handle_file(big))
    check_answers(ask(client, good))  # still serving


def test_paths_the_client_names_are_never_read(demo, client, shapes_png):
    """Only files uploaded to Gradio's own folder are accepted; a path sent in the request is refused."""
    url = demo.local_url + "gradio_api/call/ask"
    payload = {"data": [{"path": str(shapes_png), "meta": {"_type": "gradio.FileData"}}, "What color?", VARIANTS,
                        RELEVANCY]}
    event = httpx.post(url, json=payload).json()["event_id"]
    stream = httpx.get(f"{url}/{event}", timeout=60).text
    assert "event: error" in stream and "event: complete" not in stream
    check_answers(ask(client, handle_file(shapes_png)))


def test_find_variants_needs_weights_config_and_metrics(tmp_path):
    for name, files in {"a": variants.RUN_FILES, "b": variants.RUN_FILES[:2], "stage0": ()}.items():
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).write_text("{}")
    assert list(variants.find_variants(tmp_path)) == ["a"]
    assert variants.find_variants(tmp_path / "missing") == {}


def test_cli_demo_prepares_then_launches(fast_home, monkeypatch):
    import app.demo
    calls = []
    monkeypatch.setattr(app.demo, "launch", lambda *a, **k: calls.append(a))
    assert cli.main(["demo", "--port", "7999", *(f"--set={s}" for s in TOY)]) == 0  # cached: no training
    runs, names, port = calls[0]
    assert runs == fast_home and names == VARIANTS and port == 7999
    assert json.loads((fast_home / "tiny" / "metrics.json").read_text())["variant"] == "tiny"
