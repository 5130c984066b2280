"""`python -m gptjax.sample`: the same command as `python -m gptjax.cli.sample` (text from a
GPT, or --fill-mask predictions from a BERT), under the name the BERT issue uses."""

import sys

from gptjax.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
