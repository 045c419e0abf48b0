"""What an end-to-end dash.py run of a published shape needs on a machine without the Hugging Face hub:

    python tests/local_shape.py model /tmp/qwen2.5-3b-random --shape qwen2.5-3b
    python tests/local_shape.py text /tmp/dash-text --tokens 21000000

`model`: a random-weight bf16 checkpoint of a SHAPES entry (tests/benchmark.py) with the shipped small model's
tokenizer (4096 tokens, all below the shape's vocabulary), which dash.py --model loads like any local folder.
Random weights run at the speed and memory of the real model; the search's choices mean nothing.

`text`: a folder dash.py --data reads: the shipped text (small_model/search_data.jsonl.gz, data/factbook_prose.txt.gz),
~1M tokens of the small tokenizer, repeated whole until it holds --tokens (a search of 12.3M tokens and a preparation
of 8.4M need ~20.7M). Repeated text is for timing only; the folder's ABOUT.md says so (not .txt: dash.py would read it as text)."""
import argparse
import gzip
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "tests"))
import dash  # noqa: E402
from benchmark import SHAPES  # noqa: E402


def save_model(out: Path, shape: str):
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    cls, kw = SHAPES[shape]
    tokenizer = AutoTokenizer.from_pretrained(dash.SMALL_MODEL)
    config = getattr(transformers, cls)(**kw, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # drawing 3B numbers on a CPU takes minutes
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        # transformers' init zeroes the pad token's row; no trained checkpoint has one, and a sequence that starts
        # with it overflows the search's gradient (README, Scaling: the non-finite steps)
        model.get_input_embeddings().weight.data[config.pad_token_id].normal_(0, config.initializer_range)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "SHAPE.txt").write_text(f"random weights of the {shape} shape (tests/benchmark.py SHAPES) with the small "
                                   f"model's tokenizer, made by tests/local_shape.py: for timing only\n")
    print(f"wrote {out}: {shape}, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, random")


def save_text(out: Path, tokens: int):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(dash.SMALL_MODEL)
    docs = list(dash.read_texts(str(dash.SMALL_MODEL / "search_data.jsonl.gz")))
    with gzip.open(HERE / "data" / "factbook_prose.txt.gz", "rt") as f:
        docs += [p for p in f.read().split("\n\n") if p.strip()]
    per_round = sum(len(ids) + 1 for ids in tokenizer(docs, add_special_tokens=False)["input_ids"])
    rounds = -(-tokens // per_round)
    out.mkdir(parents=True, exist_ok=True)
    with gzip.open(out / "text.jsonl.gz", "wt") as f:
        for _ in range(rounds):
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
    (out / "ABOUT.md").write_text(f"small_model/search_data.jsonl.gz and data/factbook_prose.txt.gz, {per_round:,} "
                                    f"tokens of the small model's tokenizer, repeated {rounds} times "
                                    f"(tests/local_shape.py): for timing only\n")
    print(f"wrote {out / 'text.jsonl.gz'}: {rounds} x {per_round:,} tokens")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["model", "text"])
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", default="qwen2.5-3b", choices=list(SHAPES))
    ap.add_argument("--tokens", type=int, default=21_000_000)
    args = ap.parse_args()
    save_model(args.out, args.shape) if args.what == "model" else save_text(args.out, args.tokens)
