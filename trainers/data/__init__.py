"""Data: schemas, validated readers, InstructGPT hygiene, synthetic world, tokenizer and collation.

Imports only the standard library, pyarrow and torch (tokenizers for the tokenizer) -- never Ray,
DeepSpeed or vLLM, so every stage and test can use it in any process.
"""

from __future__ import annotations

# --- schemas, readers, validation, hygiene (see schema.py, io.py, validate.py, prepare.py) ---
from trainers.data.io import records_to_table, write_jsonl, write_parquet
from trainers.data.prepare import DEFAULT_MAX_PER_USER, DEFAULT_PREFIX_CHARS, prepare
from trainers.data.schema import KINDS, OPTIONAL, REQUIRED, check_record
from trainers.data.validate import MAX_PROBLEMS, ValidationReport, read_records, read_table, validate_files

__all__ = [
    "DEFAULT_MAX_PER_USER",
    "DEFAULT_PREFIX_CHARS",
    "KINDS",
    "MAX_PROBLEMS",
    "OPTIONAL",
    "REQUIRED",
    "ValidationReport",
    "check_record",
    "prepare",
    "read_records",
    "read_table",
    "records_to_table",
    "validate_files",
    "write_jsonl",
    "write_parquet",
]

# The synthetic world, templates, gold labeler, tokenizer and collation are imported by module path
# (trainers.data.world, .templates, .gold, .tokenizer, .collate) so that `rlhf data validate` does not
# pay for torch and tokenizers.
