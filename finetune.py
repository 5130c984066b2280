"""Fine-tune a GPT on a labelled task: `python finetune.py --help` lists every setting.

With no arguments it fine-tunes the model `python train.py` pre-trained
(runs/cpu-small) on the built-in multiple-choice task, evaluates every epoch and
prints a metrics table. The command line is gptjax.cli.finetune; the work is
gptjax.finetune.run.
"""

import sys

from gptjax.cli.finetune import main

if __name__ == "__main__":
    sys.exit(main())
