"""Builds rewards/data/pathology_lexicon.json, the entity lexicon of the PathReasoner entity reward.

Run once (the output is committed): `.venv/bin/python launch/build_pathology_lexicon.py`.

Source: the pathology report schemas of the PyPI package `digital-registrar` (MIT licence), read as
files without importing the package: `schemas/data/<organ>.json` (JSON schemas whose enums list
histology types, histological patterns and polyp types, biomarkers, primary/tumour sites and
invasion depths for 11 organs) and `schemas/aliases/*.toml` (surface forms of enum values). Its
field names also give the reported pathological features (lymphovascular invasion, tumour budding,
...). A short, clearly marked supplement written for pathorl adds stains, common morphology terms
and spelled-out biomarker and organ names, which the schemas do not list.

Surface-form convention (what rewards/entities.py expects): a form in lower case is matched
case-insensitively on text normalised like the form (hyphens, underscores and slashes as spaces); a
form containing an upper-case letter is matched case-sensitively as written (acronyms such as "ER").
"""

from __future__ import annotations

import importlib.util
import json
import re
import tomllib
from pathlib import Path

PACKAGE = "digital-registrar"
VERSION = "0.2.0b4"
OUT = Path(__file__).resolve().parent.parent / "rewards" / "data" / "pathology_lexicon.json"

# Which schema enums become entities, by the enum's $defs name or property name (suffix match).
ENUM_CATEGORIES = {
    "Histology": "histology", "histology": "histology", "TypeOfPolyp": "histology",
    "HistologicalPatternName": "pattern", "BiomarkerCategory": "biomarker",
    "PrimarySite": "site", "TumorSite": "site", "tumor_site": "site", "cancer_category": "organ",
    "TumorInvasion": "invasion_depth", "TumorExtent": "invasion_depth", "TumorExtension": "invasion_depth",
}
# Enum values that are placeholders or everyday words that would match ordinary prose.
SKIP_VALUES = {"others", "other", "not_stated", "not_specified", "other_special_types",
               "head", "neck", "body", "tail", "dome", "base"}
MAX_WORDS = 4  # longer enum values are sentences ("penetrate subserosal connective tissue no serosa")

# Schema fields that name a pathological finding -> surface forms of that finding.
FEATURE_FIELDS = {
    "lymphovascular_invasion": ["lymphovascular invasion", "LVI"],
    "perineural_invasion": ["perineural invasion", "PNI"],
    "vascular_invasion": ["vascular invasion"],
    "tumor_necrosis": ["tumor necrosis", "tumour necrosis"],
    "tumor_budding": ["tumor budding", "tumour budding"],
    "extranodal_extension": ["extranodal extension"],
    "extracellular_mucin": ["extracellular mucin"],
    "signet_ring": ["signet ring cell", "signet ring cells", "signet ring"],
    "visceral_pleural_invasion": ["visceral pleural invasion"],
    "spread_through_air_spaces_stas": ["spread through air spaces", "STAS"],
    "dcis_present": ["ductal carcinoma in situ", "DCIS"],
    "dcis_comedo_necrosis": ["comedo necrosis"],
    "cribriform_pattern_presence": ["cribriform pattern", "cribriform"],
    "intraductal_carcinoma_presence": ["intraductal carcinoma"],
    "extraprostatic_extension": ["extraprostatic extension"],
    "seminal_vesicle_invasion": ["seminal vesicle invasion"],
    "extrathyroid_extension": ["extrathyroidal extension", "extrathyroid extension"],
    "treatment_effect": ["treatment effect"],
    "tubule_formation": ["tubule formation"],
    "nuclear_grade": ["nuclear grade"],
    "mitotic_rate": ["mitotic rate", "mitotic count"],
    "mitotic_activity": ["mitotic activity"],
}

# pathorl-curated supplement: canonical -> (category, surface forms).
CURATED = {
    "er": ("biomarker", ["ER", "estrogen receptor", "oestrogen receptor"]),
    "pr": ("biomarker", ["PR", "PgR", "progesterone receptor"]),
    "her2": ("biomarker", ["her2", "her 2", "HER2", "HER-2", "ERBB2"]),
    "ki67": ("biomarker", ["ki67", "ki 67", "Ki-67", "Ki67", "MIB-1"]),
    "lung": ("organ", ["lung", "pulmonary"]),
    "stomach": ("organ", ["stomach", "gastric"]),
    "colorectal": ("organ", ["colorectal", "colon", "colonic", "rectal"]),
    "esophagus": ("organ", ["esophagus", "oesophagus", "esophageal", "oesophageal"]),
    "liver": ("organ", ["liver", "hepatic"]),
    "pancreas": ("organ", ["pancreas", "pancreatic"]),
    "prostate": ("organ", ["prostate", "prostatic"]),
    "thyroid": ("organ", ["thyroid"]),
    "cervix": ("organ", ["cervix", "uterine cervix"]),
    "breast": ("organ", ["breast", "mammary"]),
    "bladder": ("organ", ["bladder", "urinary bladder"]),
    "hematoxylin and eosin": ("stain", ["hematoxylin and eosin", "haematoxylin and eosin", "H&E"]),
    "immunohistochemistry": ("stain", ["immunohistochemistry", "immunohistochemical", "IHC"]),
    "periodic acid schiff": ("stain", ["periodic acid schiff", "PAS"]),
    "masson trichrome": ("stain", ["masson trichrome", "trichrome"]),
    "reticulin": ("stain", ["reticulin"]),
    "congo red": ("stain", ["congo red"]),
    "mucicarmine": ("stain", ["mucicarmine"]),
    "alcian blue": ("stain", ["alcian blue"]),
    "giemsa": ("stain", ["giemsa"]),
    "ziehl neelsen": ("stain", ["ziehl neelsen", "acid fast"]),
    "grocott": ("stain", ["grocott", "GMS"]),
    "cytokeratin": ("biomarker", ["cytokeratin", "pancytokeratin"]),
    "ck7": ("biomarker", ["CK7"]),
    "ck20": ("biomarker", ["CK20"]),
    "ttf1": ("biomarker", ["TTF-1", "TTF1"]),
    "p40": ("biomarker", ["p40"]),
    "p63": ("biomarker", ["p63"]),
    "cdx2": ("biomarker", ["cdx2", "CDX2", "CDX-2"]),
    "synaptophysin": ("biomarker", ["synaptophysin"]),
    "chromogranin": ("biomarker", ["chromogranin"]),
    "necrosis": ("morphology", ["necrosis", "necrotic"]),
    "mitotic figures": ("morphology", ["mitotic figures", "mitoses", "mitosis"]),
    "nuclear pleomorphism": ("morphology", ["nuclear pleomorphism", "pleomorphic nuclei", "pleomorphism"]),
    "nuclear atypia": ("morphology", ["nuclear atypia", "cytologic atypia", "atypia"]),
    "hyperchromasia": ("morphology", ["hyperchromasia", "hyperchromatic nuclei", "hyperchromatic"]),
    "prominent nucleoli": ("morphology", ["prominent nucleoli", "nucleoli"]),
    "gland formation": ("morphology", ["gland formation", "glandular structures", "glands"]),
    "keratin pearls": ("morphology", ["keratin pearls", "keratinization", "keratinisation"]),
    "intercellular bridges": ("morphology", ["intercellular bridges"]),
    "desmoplasia": ("morphology", ["desmoplasia", "desmoplastic stroma", "desmoplastic"]),
    "inflammatory infiltrate": ("morphology", ["inflammatory infiltrate", "inflammation", "inflammatory cells"]),
    "lymphocytes": ("morphology", ["lymphocytes", "lymphocytic infiltrate"]),
    "granuloma": ("morphology", ["granuloma", "granulomas", "granulomatous"]),
    "fibrosis": ("morphology", ["fibrosis", "fibrotic"]),
    "hemorrhage": ("morphology", ["hemorrhage", "haemorrhage"]),
    "calcification": ("morphology", ["calcification", "calcifications"]),
    "psammoma bodies": ("morphology", ["psammoma bodies"]),
    "mucin": ("morphology", ["mucin", "mucinous"]),
    "dysplasia": ("morphology", ["dysplasia", "dysplastic"]),
    "metaplasia": ("morphology", ["metaplasia"]),
    "hyperplasia": ("morphology", ["hyperplasia"]),
    "stromal invasion": ("morphology", ["stromal invasion", "invasion", "invasive"]),
    "nuclear grooves": ("morphology", ["nuclear grooves"]),
    "clear cytoplasm": ("morphology", ["clear cytoplasm"]),
    "eosinophilic cytoplasm": ("morphology", ["eosinophilic cytoplasm"]),
}


def package_root() -> Path:
    spec = importlib.util.find_spec("digital_registrar")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{PACKAGE}=={VERSION} is not installed (pip install --no-deps {PACKAGE}=={VERSION})")
    return Path(spec.submodule_search_locations[0])


def licence_text(root: Path) -> str:
    dist = next(root.parent.glob("digital_registrar-*.dist-info"))
    return next((dist / "licenses").rglob("LICENSE*")).read_text()


def enums(node, key=""):
    """(name, values) for every enum in a JSON schema, named by its $defs key or property name."""
    if isinstance(node, dict):
        if "enum" in node:
            yield key, node["enum"]
        for child_key, child in node.items():
            yield from enums(child, key if child_key in ("anyOf", "items", "properties") else child_key)
    elif isinstance(node, list):
        for child in node:
            yield from enums(child, key)


def category_of(name: str) -> str | None:
    return next((cat for suffix, cat in ENUM_CATEGORIES.items() if name.endswith(suffix)), None)


def forms_of(value: str) -> list[str]:
    text = value.replace("_", " ")
    return [text] if len(text) > 3 else [text.upper()]


def build() -> dict:
    root = package_root()
    entries: dict[str, dict] = {}

    def add(canonical, category, forms, source, organ=None):
        entry = entries.setdefault(canonical, {"canonical": canonical, "category": category, "organs": [],
                                               "surface_forms": [], "source": source, "curated_forms": []})
        new = [f for f in forms if f not in entry["surface_forms"]]
        entry["surface_forms"] += new
        if source == "pathorl-curated":
            entry["curated_forms"] += new
        if organ and organ not in entry["organs"]:
            entry["organs"].append(organ)

    for path in sorted((root / "schemas" / "data").glob("*.json")):
        schema = json.loads(path.read_text())
        for name, values in enums(schema):
            category = category_of(name)
            for value in values if category else []:
                if (not isinstance(value, str) or value in SKIP_VALUES or value.count("_") >= MAX_WORDS
                        or (category == "site" and re.search(r"\d", value))):
                    continue
                canonical = value.replace("_", " ")
                add(canonical, category, forms_of(value), "digital-registrar",
                    None if path.stem == "common" else path.stem)
        properties = json.dumps(schema)
        for field, forms in FEATURE_FIELDS.items():
            if f'"{field}"' in properties:
                add(forms[0], "finding", forms, "digital-registrar", None if path.stem == "common" else path.stem)

    for path in sorted((root / "schemas" / "aliases").glob("*.toml")):
        for table, mapping in tomllib.loads(path.read_text()).items():
            if table.endswith("biomarker_category"):
                for canonical, forms in mapping.items():
                    add(canonical, "biomarker", [f for f in forms if len(f) > 3 or f.upper() == f],
                        "digital-registrar", path.stem)

    for canonical, (category, forms) in CURATED.items():
        add(canonical, category, forms, "pathorl-curated")

    for entry in entries.values():
        entry["organs"].sort()
        bad = [f for f in entry["surface_forms"] if f == f.lower() and len(f) <= 3 and not re.search(r"\d", f)]
        if bad:
            raise SystemExit(f"short lower-case surface forms would match ordinary words: {entry['canonical']}: {bad}")
    return {
        "header": {
            "description": "Pathology entity lexicon for the PathReasoner entity reward (rewards/entities.py).",
            "generated_by": "launch/build_pathology_lexicon.py (do not edit by hand; rerun the script)",
            "source": f"PyPI package {PACKAGE}=={VERSION} (https://github.com/kblab2024/digitalregistrar): "
                      "enum values and field names of digital_registrar/schemas/data/*.json and the "
                      "surface forms of digital_registrar/schemas/aliases/*.toml",
            "licence": "MIT License (digital-registrar); the full notice is in licence_text below",
            "licence_text": licence_text(root),
            "supplement": "entries with source 'pathorl-curated' and the forms listed in an entry's "
                          "curated_forms (stains, morphology terms, spelled-out biomarker and organ names) "
                          "were written for pathorl and carry pathorl's licence",
            "surface_forms": "a lower-case form matches case-insensitively, hyphens/underscores/slashes as "
                             "spaces; a form with an upper-case letter matches case-sensitively as written",
        },
        "entities": sorted(entries.values(), key=lambda e: (e["category"], e["canonical"])),
    }


def main():
    lexicon = build()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(lexicon, indent=1, ensure_ascii=False) + "\n")
    counts = {}
    for entry in lexicon["entities"]:
        counts[entry["category"]] = counts.get(entry["category"], 0) + 1
    print(f"wrote {OUT} with {len(lexicon['entities'])} entities: {counts}")


if __name__ == "__main__":
    main()
