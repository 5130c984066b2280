"""Pre-train a GPT: `python train.py --help` lists every setting.

With no arguments it trains a small GPT on Python's own documentation (no
download) for about five minutes on two CPU cores, prints samples and the run
folder. The work is done by gptjax.pretrain.
"""

import sys

from gptjax.train.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
