"""Derive SD1.5's CLIPTokenizer files (vocab.json, merges.txt) from OpenAI's BPE file.

The open-clip-torch wheel ships `bpe_simple_vocab_16e6.txt.gz` (MIT). Run once by a developer;
the output is committed under spdbench/targets/assets/clip_tokenizer (no network, no hub).
"""
import gzip
import json
import sys
from pathlib import Path

import open_clip.tokenizer as oct

OUT = Path(__file__).resolve().parents[1] / "spdbench" / "targets" / "assets" / "clip_tokenizer"


def main() -> None:
    bpe = Path(oct.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    byte_chars = list(oct.bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    print(f"{len(vocab)} tokens, {len(merges)} merges -> {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
