"""How far apart the demo's text encoders put its prompts, and how much of that a quantized folder keeps.

    python benchmarks/text_separation.py digits-quickstart/fp16 digits-quickstart/int8

Encodes the demo's 240 prompts (every digit, colour and phrasing) through ovsd3's runtime with both folders'
text encoders and prints, for the pooled embeddings and for the CLIP token embeddings the transformer attends
to, the measures of :mod:`ovsd3.demo.separation`: how far apart prompts that differ in one word are, how far the
quantized weights move each prompt, and whether any prompt moved as far as the nearest prompt asking for
another digit or colour.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ovsd3.demo.digits import all_prompts
from ovsd3.demo.separation import TABLE_HEADER, embeddings, separation
from ovsd3.runtime import SD3Pipeline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference", type=Path, help="the FP16 folder")
    parser.add_argument("candidate", type=Path, help="the quantized folder")
    args = parser.parse_args()
    prompts = all_prompts()
    texts = [prompt.text for prompt in prompts]
    reference, candidate = (embeddings(SD3Pipeline.load(folder, device="CPU", cache_dir=None), texts)
                            for folder in (args.reference, args.candidate))
    print(f"{len(texts)} prompts; {args.reference} against {args.candidate}\n")
    print(TABLE_HEADER)
    for name in reference:
        print(separation(reference[name], candidate[name], prompts).row(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
