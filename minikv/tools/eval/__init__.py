"""Quality under a budget (`minikv eval`): tasks.py (prompts), runner.py (the grid, metrics, perplexity),
records.py (records.jsonl, the table with its 95% intervals, the lock), plots.py, cli.py."""
