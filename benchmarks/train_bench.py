"""Training-step benchmark: `python benchmarks/train_bench.py ARGS` is
`python -m gptjax.cli.bench ARGS`.

    python benchmarks/train_bench.py --preset char --no-scan --reference
    python benchmarks/train_bench.py --preset cpu-6x384 --batch-size 8 --reference --json 6x384.json

See gptjax/bench.py for what is timed and how; benchmarks/gpu_suite.sh runs the GPU comparison.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptjax.cli.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
