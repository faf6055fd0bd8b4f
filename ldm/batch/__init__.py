"""Batch generation from prompt files: resumable after a kill at any moment, and shared by many processes.

    ldm batch prompts.txt --out renders/ --seed 1          # the same command again resumes
    accelerate launch --multi_gpu --num_processes 2 -m ldm batch prompts.txt --out renders/

  run            the plan (one item per image, fixed batches), resume, processes, the contact sheet
  prompt_file    .txt / .jsonl / .csv prompt files, checked line by line (errors name file:line)
  manifest       the crash-safe manifest (one fsynced JSON line per finished image) and the plan record
  control_units  control units as text (--control, prompt-file lines, PNG infotext), control folders, loading

Imports: ``ldm.pipeline`` and below, and ``ldm.files``; never ``cli``.
"""

from ldm.batch.prompt_file import FORMATS, PromptFile, read_prompt_file
from ldm.batch.run import (DEFAULT_BATCH_SIZE, GRID, BatchError, BatchOptions, Item, Plan, file_name, line_seed,
                           make_plan, run_batch, slug)

__all__ = ["BatchOptions", "BatchError", "run_batch", "make_plan", "Plan", "Item", "line_seed", "slug", "file_name",
           "read_prompt_file", "PromptFile", "FORMATS", "DEFAULT_BATCH_SIZE", "GRID"]
