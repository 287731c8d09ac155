"""Data: schemas, validated readers, InstructGPT hygiene, synthetic world, tokenizer and collation.

Imports only the standard library, pyarrow and torch (tokenizers for the tokenizer) -- never Ray,
DeepSpeed or vLLM, so every stage and test can use it in any process.
"""

from __future__ import annotations

# --- schemas, readers, validation, hygiene (see schema.py, io.py, validate.py, prepare.py) ---
# --- formats and sources (conversations.py: the canonical records; sources.py: where data lives) ---
from trainers.data.conversations import read_conversations
from trainers.data.io import records_to_table, write_jsonl, write_parquet
from trainers.data.prepare import DEFAULT_MAX_PER_USER, DEFAULT_PREFIX_CHARS, prepare
from trainers.data.schema import FORMATS, KINDS, OPTIONAL, REQUIRED, Format, check_record
from trainers.data.sources import kind_paths
from trainers.data.validate import MAX_PROBLEMS, ValidationReport, read_records, read_table, validate_files

__all__ = [
    "DEFAULT_MAX_PER_USER",
    "DEFAULT_PREFIX_CHARS",
    "FORMATS",
    "KINDS",
    "Format",
    "MAX_PROBLEMS",
    "OPTIONAL",
    "REQUIRED",
    "ValidationReport",
    "check_record",
    "kind_paths",
    "prepare",
    "read_conversations",
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
