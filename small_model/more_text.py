"""More finetuning text for the small teacher: fresh documents of its training mixture, for finetune.py --data.

The shipped search_data.jsonl.gz holds 327,680 finetuning tokens after the held-out, preparation and search tokens;
longer finetunes repeat them (finetune.py --epochs). This writes a folder that dash reads in name order:

    0-search_data.jsonl.gz   the shipped file, unchanged: held-out, preparation, search and its finetuning tokens
                             stay the same tokens, so held-out KLs compare with the shipped text's
    1-more-NN.jsonl.gz       new documents, as train.write_search_data makes them: RULER-format documents with
                             fresh seeds (never the evaluation's seeds, which are >= 2**40) over noise or over
                             training-split Python source, and windows of training-split Python code (the
                             teacher's training text, never the held-out files that the search data comes from)

    python small_model/more_text.py --out /tmp/ft-text --tokens 20000000 --workers 16
    python finetune.py --arch out/gdn16.json --data /tmp/ft-text --tokens 20000000

Code comes from this Python's standard library and site-packages, as train.py's did (it ran Python 3.12.3), so the
code windows depend on the machine; more.json records what made the folder.
"""
import argparse
import dataclasses
import json
import multiprocessing as mp
import platform
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train  # noqa: E402


def code_and_texts(extra_mb: float) -> tuple[list[str], np.ndarray, object]:
    """The training split of the stdlib and of a fixed site-packages sample (train.py's), as texts and tokens."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(HERE)
    texts, _ = train.python_texts(Path(sysconfig.get_paths()["stdlib"]), 10)
    if extra_mb:
        more, _ = train.python_texts(Path(sysconfig.get_paths()["purelib"]), 10, max_mb=extra_mb, max_file_kb=300)
        texts += more
    return texts, train.encode_stream(tok, texts), tok


SHARED = {}  # what every worker reads: set before the pool forks, so the code and texts are not pickled per file


def shard(path: Path, tokens: int, seed: int) -> int:
    """One file of about `tokens` tokens: seed (1, 2, ...; the shipped file is seed 0) and its own slice of code."""
    cfg = dataclasses.replace(train.TrainConfig(), seed=seed, search_tokens=tokens)
    code = SHARED["slices"][seed - 1]
    return train.write_search_data(path, cfg, SHARED["tok"], code, SHARED["texts"])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder to write (finetune.py --data)")
    ap.add_argument("--tokens", type=int, default=20_000_000, help="new tokens, about")
    ap.add_argument("--workers", type=int, default=4, help="processes, one file each")
    ap.add_argument("--extra-code-mb", type=float, default=100.0, help="site-packages sample, as train.py's")
    args = ap.parse_args(argv)
    if not 1 <= args.workers <= args.tokens:
        ap.error(f"--workers {args.workers}, --tokens {args.tokens}: need 1 <= workers <= tokens")
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HERE / "search_data.jsonl.gz", out / "0-search_data.jsonl.gz")
    texts, code, tok = code_and_texts(args.extra_code_mb)
    w = args.workers
    # each file walks its own part of the code: no window twice
    SHARED.update(tok=tok, texts=texts, slices=np.array_split(code, w))
    jobs = [(out / f"1-more-{i:02d}.jsonl.gz", args.tokens // w, i + 1) for i in range(w)]
    with mp.get_context("fork").Pool(w) as pool:
        counts = pool.starmap(shard, jobs)
    record = dict(command=" ".join(sys.argv), new_tokens=sum(counts), files=[j[0].name for j in jobs], seeds=[
        j[2] for j in jobs], code_tokens=len(code), code_files=len(texts), python=platform.python_version(),
        stdlib=sysconfig.get_paths()["stdlib"], wall_s=round(time.time() - t0, 1))
    (out / "more.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
