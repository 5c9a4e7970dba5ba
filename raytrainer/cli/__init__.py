"""The `raytrainer` command and the job it runs (jobs/finetune.py is a thin entry to the same code).

Modules: arguments (the job's dataclasses), config (YAML + command line -> dataclasses), shipped (the
packaged configs), inputs (model, tokenizer, data), search_space (a sweep's hp_space), ray_session (Ray
and a plain job log), job (train or sweep, then the summary), summary (dry run and summary output),
help (the grouped --help, without importing torch), command (the console entry).
"""
