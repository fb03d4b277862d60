"""Quality under a budget (specs/eval.md): generated tasks, metrics, a resumable grid runner, records, tables, plots.

  tasks.py    passkey, needle, ruler-lite (multikey, multivalue, vt, cwe), ppl text, LongBench-format rows
  metrics.py  RULER string matching; LongBench qa-F1, ROUGE-L, classification, code edit similarity, ...
  runner.py   the policy × budget × length × depth × sample grid; teacher-forced perplexity under eviction
  records.py  one JSON record per cell (records.jsonl, resumable by cell id), the markdown table, the folder's lock
  plots.py    quality vs measured cache ratio, length × depth heatmaps, surviving-position strips
  cli.py      `minikv eval`
"""
from minikv.tools.eval.metrics import longbench_score, qa_f1, rouge_l, string_match_all
from minikv.tools.eval.records import markdown_table, read_records
from minikv.tools.eval.runner import EvalConfig, build_grid, parse_budgets, parse_policies, run_grid
from minikv.tools.eval.tasks import Example, make_example

__all__ = ["EvalConfig", "Example", "build_grid", "longbench_score", "make_example", "markdown_table", "parse_budgets",
           "parse_policies", "qa_f1", "read_records", "rouge_l", "run_grid", "string_match_all"]
