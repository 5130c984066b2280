"""GPT-1 fine-tuning: the input transformations, the Flax task heads, task readers,
the built-in demo tasks and task metrics, and the job that finetune.py runs."""
