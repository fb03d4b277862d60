"""Quality under a budget: generated tasks, metrics, a resumable grid runner, records, tables, plots.

  tasks.py    passkey, needle, ruler-lite (multikey, multivalue, vt, cwe), ppl text
  runner.py   the policy × budget × length × depth × sample grid, RULER string matching, teacher-forced perplexity
              under eviction
  records.py  one JSON record per cell (records.jsonl, resumable by cell id), the markdown table, the folder's lock
  plots.py    quality vs measured cache ratio, depth heatmaps, surviving positions, D2O / Ada-KV report views
  cli.py      `minikv eval`
"""
