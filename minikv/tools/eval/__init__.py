"""Quality under a budget (`minikv eval`): tasks.py (prompts), runner.py (the grid, metrics, perplexity),
records.py (records.jsonl, the table, the lock), plots.py, cli.py."""
