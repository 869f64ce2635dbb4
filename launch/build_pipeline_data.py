"""Builds the staged pipeline's supervised data from the demo images (artifacts/demo-data):

  cpt.jsonl        image-caption pairs (continued pre-training): what colour deconvolution measures in
                   the patch, e.g. "Immunohistochemistry: background 12%; in the tissue eosin 0%, DAB
                   76%, haematoxylin 5%."
  sft_train.jsonl  chain-of-thought SFT rows in the engine's schema with a `response`: the demo's
  sft_val.jsonl    questions, a <think> that states the measurements and the rule they decide, and
                   the answer that follows from them.

The measurements: background = fraction of bright pixels (mean RGB > 215); on the other (tissue)
pixels, scikit-image's colour deconvolution `rgb2hed` (Ruifrok & Johnston 2001) gives haematoxylin,
eosin and DAB optical densities, reported as the fraction of tissue pixels above 0.01 (eosin) and
0.03 (DAB, haematoxylin). The rule "content: background >= 60% is empty glass; otherwise no eosin
(< 3%) is immunohistochemistry, else H&E" gives the demo label of every train and validation row
(checked here: the build fails otherwise), so each <think> entails its answer.

    python launch/build_pipeline_data.py --demo artifacts/demo-data --out artifacts/pipeline-data
"""

import argparse
import json
import os

import numpy as np
from PIL import Image
from skimage.color import rgb2hed


def measure(path: str) -> dict[str, float]:
    rgb = np.asarray(Image.open(path).convert("RGB"))
    bright = rgb.astype(np.float64).mean(-1) > 215
    tissue = ~bright
    hed = rgb2hed(rgb)
    if tissue.sum() < 50:
        return {"background": float(bright.mean()), "haematoxylin": 0.0, "eosin": 0.0, "dab": 0.0}
    return {"background": float(bright.mean()), "haematoxylin": float((hed[..., 0][tissue] > 0.03).mean()),
            "eosin": float((hed[..., 1][tissue] > 0.01).mean()), "dab": float((hed[..., 2][tissue] > 0.03).mean())}


def decide(m: dict[str, float], family: str) -> str:
    """"glass", "ihc" or "he" from the measurements (see the module docstring)."""
    if family == "content" and m["background"] >= 0.6:
        return "glass"
    return "ihc" if m["eosin"] < 0.03 else "he"


def _pct(x: float) -> str:
    return f"{round(100 * x)}%"


def caption(m: dict[str, float], kind: str) -> str:
    name = {"glass": "Mostly empty glass", "ihc": "Immunohistochemistry", "he": "H&E"}[kind]
    return (f"{name}: background {_pct(m['background'])}; in the tissue eosin {_pct(m['eosin'])}, "
            f"DAB {_pct(m['dab'])}, haematoxylin {_pct(m['haematoxylin'])}.")


def think(m: dict[str, float], kind: str) -> str:
    measured = (f"Background {_pct(m['background'])}. Tissue: eosin {_pct(m['eosin'])}, DAB {_pct(m['dab'])}, "
                f"haematoxylin {_pct(m['haematoxylin'])}.")
    reason = {"glass": "Mostly background: empty glass.", "ihc": "No eosin: immunostained.",
              "he": "Eosin present: H&E."}[kind]
    return f"{measured} {reason}"


def _kind_of(option: str) -> str:
    text = option.lower()
    return "glass" if "glass" in text else "ihc" if "immuno" in text else "he"


def build(demo: str, out: str) -> dict[str, int]:
    os.makedirs(out, exist_ok=True)
    rel = os.path.relpath(demo, out)
    counts = {}
    for split, sft_name in (("train", "sft_train.jsonl"), ("val", "sft_val.jsonl")):
        with open(os.path.join(demo, f"{split}.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        sft_rows, captions = [], []
        for row in rows:
            m = measure(os.path.join(demo, row["images"][0]))
            family = row["data_source"].rsplit("/", 1)[-1]
            truth = row["options"][ord(row["answer"]) - ord("A")]
            kind = decide(m, family)
            if kind != _kind_of(truth):
                raise SystemExit(f"build_pipeline_data: the measurement rule says {kind} for {row['id']}, the label is "
                                 f"{truth!r}: the rule no longer entails the answers")
            images = [os.path.join(rel, p) for p in row["images"]]
            sft_rows.append({**row, "images": images,
                             "response": f"<think>{think(m, kind)}</think><answer>{truth}</answer>"})
            captions.append({"id": f"cpt-{row['id']}", "images": images, "caption": caption(m, kind),
                             "data_source": row["data_source"]})
        with open(os.path.join(out, sft_name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in sft_rows)
        counts[sft_name] = len(sft_rows)
        if split == "train":
            with open(os.path.join(out, "cpt.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in captions)
            counts["cpt.jsonl"] = len(captions)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default="artifacts/demo-data")
    parser.add_argument("--out", default="artifacts/pipeline-data")
    args = parser.parse_args()
    print(json.dumps(build(args.demo, args.out)))


if __name__ == "__main__":
    main()
