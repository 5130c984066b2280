"""`python -m gptjax.scaling`: the ladder's command line (gptjax.cli.scaling)."""

import sys

from gptjax.cli.scaling import main

if __name__ == "__main__":
    sys.exit(main())
