"""Fine-tune a GPT on a labelled task: `python finetune.py --help` lists every setting.

With no arguments it fine-tunes the model `python train.py` pre-trained
(runs/cpu-small) on the built-in multiple-choice task, evaluates every epoch and
prints a metrics table. The work is done by gptjax.finetune.
"""

import sys

from gptjax.finetune.run import main

if __name__ == "__main__":
    sys.exit(main())
