"""Tokenize a corpus into train.bin / val.bin / meta.json.

    python recipes/tokenize.py                                   # Tiny Shakespeare, o200k_base
    accelerate launch recipes/tokenize.py                        # the same, under Accelerate
    python recipes/tokenize.py --input PATH --encoding gpt2 --out data/mine [--overwrite]
    python recipes/tokenize.py --preset char                     # the data the `char` teacher trains on
    python recipes/tokenize.py --input hf:roneneldan/TinyStories --hf-val-split validation --streaming

Offline: TIKTOKEN_CACHE_DIR=../shared/tiktoken TINYSHAKESPEARE_PATH=../shared/data/tinyshakespeare.txt
"""

import os
import sys

# recipes/tokenize.py shares its name with the standard library's `tokenize`, which torch imports:
# keep this folder off the import path (no recipe imports another).
sys.path = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]

from dataclasses import replace

from pipeline import cli
from pipeline.config import TokenizeConfig
from pipeline.data import tokenize
from teachers import PRESETS as TEACHERS


def _from_teacher(name: str):
    def preset() -> TokenizeConfig:
        data = TEACHERS[name]().data
        return replace(TokenizeConfig(), input=data.corpus, encoding=data.encoding, out=data.dir)

    return preset


PRESETS = {name: _from_teacher(name) for name in TEACHERS}


def main(cfg: TokenizeConfig) -> None:
    # One process tokenizes; under `accelerate launch --num_processes N` the others have nothing to do.
    if int(os.environ.get("RANK", "0")) != 0:
        return
    tokenize.tokenize(cfg)


if __name__ == "__main__":
    config = cli.parse(TokenizeConfig, PRESETS)
    cli.run(main, config)
