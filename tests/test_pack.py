"""`lgemma pack` / `lgemma unpack`: trained variants handed out as one offline zip.

A teacher's home trains the fast-mode `tiny` and `tiny-noalign` (what `LGEMMA_FAST=1 make train`
trains) and packs them; a student's empty home unpacks the zip, then serves the demo (through
gradio_client, as `make demo` does) and runs notebook 03 from it, and the tests check that nothing
was trained there: no file under the student's runs folder appears or changes. Damaged, foreign and
malicious archives are refused with a message that says what, where and what to do, and nothing is
written. About two minutes on 2 CPU cores, most of it the teacher's training and notebook 03."""
import hashlib
import json
import zipfile
from pathlib import Path

import pytest
import yaml

from lgemma import cli, course
from lgemma.pack import MANIFEST, PackError, pack, unpack

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ["tiny", "tiny-noalign"]


def tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256): what changed, appeared or vanished."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """Fast-mode variants trained in the teacher's home, and their pack."""
    from lgemma.pipeline import get_config, train_variant
    home = tmp_path_factory.mktemp("teacher")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LGEMMA_FAST", "1")
        mp.setenv("LGEMMA_HOME", str(home))
        runs = []
        for name in VARIANTS:
            cfg = get_config(name)
            train_variant(cfg, progress=False)
            runs.append(cfg.run_dir)
        archive = tmp_path_factory.mktemp("handout") / "variants.zip"
        assert cli.main(["pack", *map(str, runs), "-o", str(archive)]) == 0
    return {"home": home, "runs": runs, "archive": archive}


@pytest.fixture(scope="module")
def student(teacher, tmp_path_factory):
    """An empty home after `lgemma unpack variants.zip`, run from inside it as a student would."""
    home = tmp_path_factory.mktemp("student")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LGEMMA_FAST", "1")
        mp.delenv("LGEMMA_HOME", raising=False)
        mp.chdir(home)
        assert cli.main(["unpack", str(teacher["archive"])]) == 0
    return {"home": home, "runs": tree(home / "runs-fast")}


@pytest.fixture
def fast_env(student, monkeypatch):
    monkeypatch.setenv("LGEMMA_FAST", "1")
    monkeypatch.setenv("LGEMMA_HOME", str(student["home"]))
    return student["home"]


def test_pack_holds_every_weight_as_safetensors_and_no_pickle(teacher):
    with zipfile.ZipFile(teacher["archive"]) as zf:
        names = zf.namelist()
        manifest = json.loads(zf.read(MANIFEST))
        configs = {v["name"]: yaml.safe_load(zf.read(f"{v['folder']}/config.yaml")) for v in manifest["variants"]}
    assert [v["name"] for v in manifest["variants"]] == VARIANTS
    assert all(n.endswith((".safetensors", ".json", ".yaml", ".jinja", ".txt")) for n in names), names
    assert not any("ckpt" in n or "logs" in n or "features-" in n for n in names), names
    # both variants share one stage 0, packed once: the tower, and the LM with its tokenizer
    shared = {tuple(v["stage0"].values()) for v in manifest["variants"]}
    assert len(shared) == 1
    vision, lm = next(iter(shared))
    assert f"{vision}/clip.safetensors" in names
    assert {f"{lm}/{f}" for f in ("model.safetensors", "config.json", "tokenizer.json")} <= set(names)
    for name, cfg in configs.items():  # folders relative to the home, so any home can hold them
        assert cfg["runs_dir"] == "runs-fast" and cfg["data"]["root"] == "data/generated/shapesworld-s0-fast"
        assert {f"variants/{name}/{f}" for f in ("model.safetensors", "metrics.json")} <= set(names)


def test_unpack_puts_variants_where_lgemma_finds_them(teacher, student):
    from app.variants import find_variants
    home = student["home"]
    assert list(find_variants(home / "runs-fast")) == VARIANTS
    assert (home / "data" / "generated" / "shapesworld-s0-fast" / "summary.json").exists()  # its data, regenerated
    for run in teacher["runs"]:  # the same trained weights and metrics as the teacher's
        for f in ("model.safetensors", "metrics.json"):
            assert (home / "runs-fast" / run.name / f).read_bytes() == (run / f).read_bytes()
    assert not list((home / "runs-fast").rglob("*.ckpt"))
    assert cli.main(["unpack", str(teacher["archive"]), "--home", str(home), "--no-data"]) == 0  # again: nothing to do
    assert tree(home / "runs-fast") == student["runs"]


def test_demo_serves_unpacked_variants_without_training(fast_env, student):
    from gradio_client import Client, handle_file

    from app.demo import MAX_VARIANTS, launch, prepare
    from lgemma.data.shapes import sample
    runs = prepare(VARIANTS)  # what `make demo` does first: train what is not cached (here: nothing)
    demo = launch(runs[0].parent, VARIANTS, port=None, block=False)
    try:
        image = fast_env / "scene.png"
        sample(3)[0].save(image)
        out = Client(demo.local_url, verbose=False).predict(handle_file(image), "What color is the circle?", VARIANTS,
                                                            "relevancy (all layers)", api_name="/ask")
    finally:
        demo.close()
    answers = [out[3 * i] for i in range(MAX_VARIANTS)]
    assert all(answers[:2]) and answers[2:] == [None] * (MAX_VARIANTS - 2)
    assert tree(fast_env / "runs-fast") == student["runs"], "the demo trained or rewrote something"


def test_notebook_03_runs_from_unpacked_variants_without_training(fast_env, student, tmp_path):
    nb = ROOT / "notebooks" / "03_attention_maps.ipynb"
    [result] = course.run_notebooks([nb], tmp_path, env={"LGEMMA_FAST": "1", "LGEMMA_HOME": str(fast_env)})
    print(f"notebook 03 from the unpacked variants: {result['seconds']} s")
    assert result["ok"], result["error"]
    assert tree(fast_env / "runs-fast") == student["runs"], "notebook 03 trained or rewrote something"


# ---------------------------------------------------------------- bad archives
def rewrite(archive: Path, out: Path, change) -> Path:
    """A copy of `archive` whose members (name -> bytes) went through `change(members)`."""
    with zipfile.ZipFile(archive) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members = change(members)
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return out


def relisted(members: dict, name: str, data: bytes) -> dict:
    """`members` with `name` set to `data` and the manifest's size and sha256 updated to match."""
    manifest = json.loads(members[MANIFEST])
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return {**members, name: data, MANIFEST: json.dumps(manifest).encode()}


def new_config(members: dict, variant: str, edit) -> dict:
    name = f"variants/{variant}/config.yaml"
    cfg = yaml.safe_load(members[name])
    edit(cfg)
    return relisted(members, name, yaml.safe_dump(cfg).encode())


def flipped(members: dict, name: str) -> dict:
    """`members` with the last byte of `name` flipped (same size, other content)."""
    data = members[name]
    return {**members, name: data[:-1] + bytes([data[-1] ^ 0xFF])}


def _manifest(members, edit):
    manifest = json.loads(members[MANIFEST])
    edit(manifest)
    return {**members, MANIFEST: json.dumps(manifest).encode()}


BAD = {
    "truncated": (None, "not a complete zip archive"),
    "not lgemma's": (lambda m: {"notes.txt": b"hello"}, "not an lgemma pack"),
    "a member outside the target": (lambda m: {**m, "../../evil.json": b"{}"}, r"'\.\./\.\./evil\.json'.*outside"),
    "an absolute member name": (lambda m: {**m, "/tmp/evil.json": b"{}"}, r"'/tmp/evil\.json'.*outside"),
    "a variant name that escapes": (lambda m: _manifest(m, lambda x: x["variants"][0].update(name="../../x")),
                                    "outside the target"),
    "an unlisted member": (lambda m: {**m, "variants/tiny/extra.json": b"{}"}, "not in its lgemma-pack.json"),
    "a pickle": (lambda m: relisted(m, "variants/tiny/extra.pkl", b"\x80\x04."), "no pickles"),
    "a changed weight": (lambda m: flipped(m, "variants/tiny/model.safetensors"), "sha256"),
    "a newer pack format": (lambda m: _manifest(m, lambda x: x.update(version=99)), "newer lgemma"),
    "an unknown connector": (lambda m: new_config(m, "tiny", lambda c: c["connector"].update(kind="qformer")),
                             r"variant 'tiny': this version of lgemma cannot build it: connector 'qformer'"),
    "an unknown config field": (lambda m: new_config(m, "tiny-noalign", lambda c: c["vision"].update(registers=4)),
                                r"variant 'tiny-noalign': this version of lgemma cannot read its config .*registers"),
    "weights of another shape": (lambda m: new_config(m, "tiny", lambda c: c["vision"].update(width=96)),
                                 r"variant 'tiny': this version of lgemma cannot build it from the packed files"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_archives_are_refused_and_nothing_is_written(teacher, tmp_path, case):
    change, message = BAD[case]
    bad = tmp_path / "bad.zip"
    if change is None:
        data = teacher["archive"].read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    else:
        rewrite(teacher["archive"], bad, change)
    home = tmp_path / "home"
    home.mkdir()
    with pytest.raises(PackError, match=message):
        unpack(bad, home)
    assert tree(home) == {}, "a refused archive wrote files"


def test_cli_reports_a_bad_archive(tmp_path, capsys):
    (tmp_path / "x.zip").write_bytes(b"PK\x03\x04 not really")
    assert cli.main(["unpack", str(tmp_path / "x.zip"), "--home", str(tmp_path / "h")]) == 2
    assert "lgemma unpack: error:" in capsys.readouterr().err and not (tmp_path / "h").exists()


def test_unpack_never_overwrites_another_stage0(teacher, tmp_path):
    """A home whose stage 0 was trained there (same key, other weights) keeps it: the variants built on
    it would break. The refusal names the folder and the way out."""
    from lgemma.pipeline import get_config, stage0_dirs
    home = tmp_path / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LGEMMA_FAST", "1")
        mp.setenv("LGEMMA_HOME", str(home))
        vision_dir, _ = stage0_dirs(get_config("tiny"))
    vision_dir.mkdir(parents=True)
    (vision_dir / "clip.safetensors").write_bytes(b"other weights")
    before = tree(home)
    with pytest.raises(PackError, match=rf"{vision_dir.name}.*already exists.*--home"):
        unpack(teacher["archive"], home)
    assert tree(home) == before


def test_pack_refuses_what_it_cannot_carry(teacher, tmp_path):
    unfinished = tmp_path / "runs" / "half"
    unfinished.mkdir(parents=True)
    (unfinished / "config.yaml").write_text((teacher["runs"][0] / "config.yaml").read_text())
    with pytest.raises(PackError, match="not a finished run .*metrics.json"):
        pack([unfinished], tmp_path / "x.zip")
    from lgemma.config import get_preset
    paper = tmp_path / "runs" / "paper-2b-clip"
    paper.mkdir()
    get_preset("paper-2b-clip").to_yaml(paper / "config.yaml")
    for f in ("model.safetensors", "metrics.json"):
        (paper / f).write_text("{}")
    with pytest.raises(PackError, match="ViT-L-14-336-quickgelu.*cannot carry"):
        pack([paper], tmp_path / "x.zip")
    assert not (tmp_path / "x.zip").exists()
