"""Pre-train a GPT: `python train.py --help` lists every setting.

With no arguments it trains a small GPT on Python's own documentation (no
download) for about five minutes on two CPU cores, prints samples and the run
folder. The command line is gptjax.cli.train; the work is gptjax.train.pretrain.
"""

import sys

from gptjax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
