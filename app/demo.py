"""The Gradio demo: one question about one image, answered by 2 to 4 trained variants side by
side, each with its token probabilities, latency and where it looked.

    lgemma demo                    # trains tiny + tiny-noalign if needed, then serves (make demo)
    lgemma demo tiny tiny-lmsmall  # any 2 to 4 presets; every variant in the runs folder is offered

One process, bound to 127.0.0.1, no share link, no analytics. Uploads are opened by lgemma's
own image loader (size checked before decoding, any mode converted to RGB, clear errors), so
Gradio hands the handler the upload's record instead of decoding it first (`preprocess=False`).
Gradio only ever passes files from its own upload folder; the handler reads no other path.
"""
from __future__ import annotations

import html
import json
import random
from pathlib import Path

import gradio as gr
import yaml

from lgemma.config import Config
from lgemma.data import shapes
from lgemma.data.llava_json import DataError, load_image, turns
from lgemma.pipeline import resolve_home

from . import variants

MAX_VARIANTS = 4
MAX_QUESTION_CHARS = 200
MAX_TABLE_ROWS = 12
MAX_UPLOAD = "5mb"
CSS = "#image img {min-height: 200px; object-fit: contain; image-rendering: pixelated}"  # 64 px shown large, sharp
EXAMPLES = ["What color is the circle?", "How many objects are there?", "Is there a red square in the image?",
            "What shape is the large object?", "Describe the image."]


# ---------------------------------------------------------------- inputs
def refuse(message: str) -> gr.Error:
    """A message for the user (shown in the app, raised by gradio_client); a bad input, not a bug."""
    return gr.Error(message, title="Cannot answer", print_exception=False)


def read_upload(file: dict | None):
    """The uploaded image as RGB, or a gr.Error saying what is wrong with it."""
    if not file or not file.get("path"):
        raise refuse("No image yet: upload one, press 'New ShapesWorld sample' or pick a held-out sample.")
    name = file.get("orig_name") or "the upload"
    try:
        return load_image(file["path"], "upload")
    except DataError as e:  # name the file as the user knows it, not by its place on the server
        raise refuse(str(e).replace(str(file["path"]), name)) from None


def check_question(question) -> str:
    question = str(question or "").replace("<image>", "").strip()
    if not question:
        raise refuse("Type a question about the image, e.g. 'What color is the circle?'.")
    if len(question) > MAX_QUESTION_CHARS:
        raise refuse(f"The question has {len(question)} characters; keep it under {MAX_QUESTION_CHARS} "
                     "(the models were trained on short ShapesWorld questions).")
    return question


def overlay_choices(runs: dict[str, Path]) -> dict[str, tuple[str, int | None]]:
    """Overlay menu: label -> (method, layer). Layers go up to the deepest LM found."""
    depth = max((yaml.safe_load((d / "config.yaml").read_text())["language"]["layers"] for d in runs.values()),
                default=0)
    return {"relevancy (all layers)": ("relevancy", None), "attention, mean of layers": ("attention", None),
            **{f"attention, layer {i + 1}": ("attention", i) for i in range(depth)}}


def heldout_samples(run_dir: Path | None, n: int = 10) -> list[tuple]:
    """(image, question, answer) for the first `n` held-out images of the variant's ShapesWorld."""
    if run_dir is None:
        return []
    root = Path(resolve_home(Config.from_yaml(run_dir / "config.yaml")).data.root)
    try:
        recs = json.loads((root / "instruct_heldout.json").read_text())
    except OSError:
        return []  # data not generated here: no gallery
    first = {}
    for r in recs:
        first.setdefault(r["image"], r)  # the first question of each image
    return [(load_image(root / r["image"], r["id"]), turns(r)[0][0].replace("<image>\n", ""), r["answer"])
            for r in list(first.values())[:n]]


# ---------------------------------------------------------------- the app
def build_demo(runs_dir: str | Path, chosen: list[str] | None = None) -> gr.Blocks:
    """The Blocks app over the variants found in `runs_dir`; `chosen` are shown first."""
    runs = variants.find_variants(runs_dir)
    chosen = [v for v in (chosen or []) if v in runs][:MAX_VARIANTS] or list(runs)[:2]
    views = overlay_choices(runs)
    samples = heldout_samples(runs[chosen[0]] if chosen else None)

    def ask(upload, question, names, view):
        image, question = read_upload(upload), check_question(question)
        names = [n for n in (names or []) if n in runs][:MAX_VARIANTS]
        if not names:
            raise refuse("Pick at least one variant (2 to 4 to compare them).")
        method, layer = views.get(view, ("relevancy", None))
        out = []
        for name in names:
            variant = variants.load(runs[name])
            reply = variants.answer(variant, image, question)
            heat, caption = variants.explain(variant, image, question, reply, method, layer)
            out += [reply.text or "(empty answer)", token_table(reply, caption), heat]
        return out + [None] * 3 * (MAX_VARIANTS - len(names))

    def show(names):
        """Show one column per chosen variant, with its name and info."""
        names = [n for n in (names or []) if n in runs]
        if len(names) > MAX_VARIANTS:
            gr.Warning(f"At most {MAX_VARIANTS} variants side by side: showing the first {MAX_VARIANTS}.")
            names = names[:MAX_VARIANTS]
        padded = names + [None] * (MAX_VARIANTS - len(names))
        return ([gr.Column(visible=n is not None) for n in padded] + [f"### {n}" if n else "" for n in padded]
                + [variants.info(runs[n]) if n else "" for n in padded] + [None] * 3 * MAX_VARIANTS + [names])

    def new_sample():
        seed = random.randrange(10**6)
        image, scene = shapes.sample(seed)
        return image, f"ShapesWorld seed {seed}: **{shapes.describe(scene)}**"

    def pick(evt: gr.SelectData):
        image, question, truth = samples[evt.index]
        return image, question, f"held-out sample, expected answer: **{truth}**"

    with gr.Blocks(title="lgemma demo", analytics_enabled=False) as demo:
        gr.Markdown("# lgemma: LLaVA-Gemma variants side by side\nAsk a question about a ShapesWorld image "
                    "(or your own, shown to the model at 64 px). Each column is one trained variant.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="image", sources=["upload", "clipboard"], format="png", height=256,
                                 elem_id="image")
                sample_btn = gr.Button("New ShapesWorld sample")
                truth = gr.Markdown()
                gallery = gr.Gallery([s[0] for s in samples], label="held-out samples (click one)", columns=5,
                                     height=240, allow_preview=False, visible=bool(samples))
            with gr.Column():
                question = gr.Textbox(label="question", placeholder="What color is the circle?")
                gr.Examples([[q] for q in EXAMPLES], inputs=question)
                names = gr.CheckboxGroup(list(runs), value=chosen, label=f"variants (2 to {MAX_VARIANTS}), "
                                         f"every trained model found in {runs_dir}")
                view = gr.Dropdown(list(views), value=next(iter(views)), label="overlay")
                ask_btn = gr.Button("Ask", variant="primary")
        columns, titles, abouts, results = [], [], [], []
        with gr.Row():
            for i in range(MAX_VARIANTS):
                name = chosen[i] if i < len(chosen) else None
                with gr.Column(visible=name is not None, elem_classes="variant") as col:
                    titles.append(gr.Markdown(f"### {name}" if name else ""))
                    results += [gr.Textbox(label="answer", interactive=False),
                                gr.Markdown(),
                                gr.Image(label="where it looked", format="png", interactive=False, height=256)]
                    with gr.Accordion("about this variant", open=False):
                        abouts.append(gr.Markdown(variants.info(runs[name]) if name else ""))
                columns.append(col)

        sample_btn.click(new_sample, outputs=[image, truth], api_name="new_sample")
        gallery.select(pick, outputs=[image, question, truth], api_visibility="private")
        gr.on([image.upload, question.input], lambda: "", outputs=truth, api_visibility="private")  # stale
        names.input(show, inputs=names, outputs=columns + titles + abouts + results + [names], api_name="show")
        gr.on([ask_btn.click, question.submit], ask, inputs=[image, question, names, view], outputs=results,
              api_name="ask", preprocess=False)
    return demo.queue(default_concurrency_limit=1, max_size=16)  # one model run at a time: 2 CPU cores


def token_table(reply: variants.Reply, caption: str) -> str:
    """Markdown: latency, then each answer token with its probability and the runner-ups."""
    def code(token):
        return "`" + token.replace("\n", "\\n").replace("`", "'") + "`"
    rows = "\n".join(f"| {code(t)} | {p:.2f} | " + ", ".join(f"{code(a)} {q:.2f}" for a, q in top if a != t) + " |"
                     for t, p, top in reply.tokens[:MAX_TABLE_ROWS])
    more = len(reply.tokens) - MAX_TABLE_ROWS
    return (f"answered in **{reply.seconds * 1000:.0f} ms**\n\n| token | p | runner-ups |\n|---|---|---|\n{rows}"
            + (f"\n\n({more} more tokens)" if more > 0 else "") + f"\n\n*overlay: {html.escape(caption)}*")


def prepare(names: list[str], overrides: list[str] = (), jobs: int = 1) -> list[Path]:
    """Train the variants `names` unless cached (data, stage 0, 1, 2 and eval, with progress bars),
    `jobs` at a time; returns their run folders."""
    from lgemma.pipeline import get_config, train_variant, train_variants
    cfgs = [get_config(name, list(overrides)) for name in names]
    train_variants(cfgs, jobs)  # with jobs > 1, several at once; the loop below reads them
    for cfg in cfgs:
        train_variant(cfg)
    return [cfg.run_dir for cfg in cfgs]


def launch(runs_dir: str | Path, chosen: list[str] | None = None, port: int | None = 7860,
           open_browser: bool = False, block: bool = True) -> gr.Blocks:
    """Serve the demo on http://127.0.0.1:`port` (local only; None: the first free port from 7860).
    With `block=False` it returns at once, serving in the background (`demo.local_url`, `demo.close()`)."""
    demo = build_demo(runs_dir, chosen)
    try:
        demo.launch(server_name="127.0.0.1", server_port=port, share=False, inbrowser=open_browser,
                    max_file_size=MAX_UPLOAD, ssr_mode=False, prevent_thread_lock=True, quiet=True, css=CSS)
    except OSError as e:  # e.g. the port is taken by another app (or an earlier demo still running)
        raise ValueError(f"cannot serve on 127.0.0.1:{port} ({e}); stop what uses that port or pick "
                         f"another with `lgemma demo --port 7861`") from None
    if block:
        print(f"lgemma demo: {demo.local_url} (this machine only; Ctrl+C stops it)", flush=True)
        demo.block_thread()
    return demo

