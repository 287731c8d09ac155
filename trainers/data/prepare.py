"""InstructGPT-style data hygiene: prefix deduplication, a per-user cap, and a split by user.

Ouyang et al. (2022), section 3.2: prompts were "heuristically deduplicated by checking for prompts
that share a long common prefix", at most 200 prompts were kept per user ID, and train / validation
/ test splits were made by user ID so that the validation and test sets hold no data from users
whose data is in the training set. :func:`prepare` does the same, in that order, on any data kind:

1. **dedup** -- a record is dropped when its normalised prompt (``text`` for ``pretrain``) has the
   same first ``prefix_chars`` characters as an earlier kept one. Normalisation lower-cases and
   collapses every run of whitespace to one space, so a prompt re-submitted with different
   capitalisation or spacing is caught. A prompt shorter than ``prefix_chars`` is compared by its
   whole normalised text. One pass with a set of prefix keys: O(total prompt length).
2. **cap** -- at most ``max_per_user`` records per ``user_id`` (the first ones, in input order).
3. **split** -- users, not records, are assigned to train / valid / test by a seeded shuffle of the
   sorted user list; a record without ``user_id`` counts as a user of its own. The fractions are
   fractions of users, so record fractions follow only approximately.

Why 64 characters by default: after normalisation that is about 10-12 English words. Two prompts
written independently almost never agree on that many leading characters, while a prompt a user
submitted again with a small edit at the end does. It must stay longer than any shared boilerplate
(a template's fixed instruction line): prompts that differ only after such boilerplate would all be
dropped as duplicates. Raise ``prefix_chars`` for data with long fixed preambles; 0 turns dedup off.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path

from trainers.data.columns import output_schema
from trainers.data.io import records_to_table, write_tables_atomic
from trainers.data.schema import key_text
from trainers.data.validate import check_kind, read_records
from trainers.errors import UserError

DEFAULT_PREFIX_CHARS = 64
DEFAULT_MAX_PER_USER = 200
DEFAULT_VALID_FRAC = 0.1
DEFAULT_TEST_FRAC = 0.1
SPLITS: tuple[str, ...] = ("train", "valid", "test")

# A user key: ("user", str(user_id)) for records with an id, ("record", index) for those without.
# User ids are compared as text, so 7 and "7" are one user: merging is the safe side for a split
# that must not leak users.
UserKey = tuple[str, str | int]


def normalise(text: str) -> str:
    """Lower-case and collapse runs of whitespace to one space (leading/trailing removed)."""
    return " ".join(text.split()).lower()


def prefix_key(text: str, prefix_chars: int) -> str:
    """The dedup key: the first ``prefix_chars`` characters of the normalised text (all if shorter)."""
    return normalise(text)[:prefix_chars]


def dedup_by_prefix(texts: Sequence[str], prefix_chars: int) -> list[int]:
    """Indices of the texts to keep: the first of every group sharing a prefix key, in input order.

    ``prefix_chars == 0`` keeps everything. A set of keys makes this one linear pass.
    """
    if prefix_chars == 0:
        return list(range(len(texts)))
    seen: set[str] = set()
    keep = []
    for i, text in enumerate(texts):
        key = prefix_key(text, prefix_chars)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep


def user_keys(records: Sequence[dict]) -> list[UserKey]:
    """One user key per record; a record without ``user_id`` is a user of its own."""
    return [("user", str(r["user_id"])) if "user_id" in r else ("record", i) for i, r in enumerate(records)]


def cap_per_user(users: Sequence[UserKey], max_per_user: int) -> list[int]:
    """Indices to keep so that no user has more than ``max_per_user`` records (first ones win; 0 = no cap)."""
    if max_per_user == 0:
        return list(range(len(users)))
    counts: dict[UserKey, int] = {}
    keep = []
    for i, user in enumerate(users):
        counts[user] = counts.get(user, 0) + 1
        if counts[user] <= max_per_user:
            keep.append(i)
    return keep


def user_split_counts(n_users: int, valid_frac: float, test_frac: float) -> tuple[int, int, int]:
    """Users per split ``(train, valid, test)``.

    Rounded fractions, but a split asked for (fraction > 0) gets at least one user while train keeps
    at least one, so a small data set still has a validation and a test split.
    """
    n_valid, n_test = round(valid_frac * n_users), round(test_frac * n_users)
    if test_frac > 0 and n_test == 0 and n_users - n_valid >= 2:
        n_test = 1
    if valid_frac > 0 and n_valid == 0 and n_users - n_test >= 2:
        n_valid = 1
    while n_users > 0 and n_valid + n_test > n_users - 1:  # train must not be empty
        if n_valid >= n_test:
            n_valid -= 1
        else:
            n_test -= 1
    return n_users - n_valid - n_test, n_valid, n_test


def assign_users(
    users: Sequence[UserKey], valid_frac: float, test_frac: float, seed: int
) -> dict[UserKey, str]:
    """Map each distinct user to ``train``, ``valid`` or ``test``.

    The sorted user list is shuffled with ``seed``: the same users and seed give the same split
    whatever the record order.
    """
    distinct = sorted(set(users))
    random.Random(seed).shuffle(distinct)
    _, n_valid, n_test = user_split_counts(len(distinct), valid_frac, test_frac)
    split_of = {}
    for i, user in enumerate(distinct):
        split_of[user] = "test" if i < n_test else "valid" if i < n_test + n_valid else "train"
    return split_of


def check_prepare_options(prefix_chars: int, max_per_user: int, valid_frac: float, test_frac: float) -> None:
    """Raise :class:`UserError` for option values that make no sense."""
    if prefix_chars < 0:
        raise UserError(f"--prefix-chars must be >= 0 (0 = no dedup), got {prefix_chars}")
    if max_per_user < 0:
        raise UserError(f"--max-per-user must be >= 0 (0 = no cap), got {max_per_user}")
    for name, frac in (("--valid-frac", valid_frac), ("--test-frac", test_frac)):
        if not 0.0 <= frac < 1.0:
            raise UserError(f"{name} must be in [0, 1), got {frac}")
    if valid_frac + test_frac >= 1.0:
        raise UserError(
            f"--valid-frac + --test-frac must be < 1 (train needs users), got {valid_frac + test_frac}"
        )


def check_prepare_output(out_dir: str | os.PathLike, overwrite: bool) -> None:
    """Refuse an output that is a file, or a directory already holding split files (unless ``overwrite``)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    existing = [f"{s}.parquet" for s in SPLITS if (out / f"{s}.parquet").exists()]
    if existing and not overwrite:
        raise UserError(f"--out {out} already holds {', '.join(existing)}; pass --overwrite to replace them")


def _make_output_dir(out_dir: str | os.PathLike) -> None:
    """Create the output directory; one-line :class:`UserError` when that or writing in it fails."""
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        if not os.access(out_dir, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as err:
        raise UserError(f"cannot write to output directory {out_dir}: {err.strerror or err}") from None


def prepare(
    kind: str,
    paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    prefix_chars: int = DEFAULT_PREFIX_CHARS,
    max_per_user: int = DEFAULT_MAX_PER_USER,
    valid_frac: float = DEFAULT_VALID_FRAC,
    test_frac: float = DEFAULT_TEST_FRAC,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, int]:
    """Validate, deduplicate, cap and split data files into ``out_dir/{train,valid,test}.parquet``.

    Nothing is written unless every input is valid; the three files are written atomically. Returns
    counts: ``read``, ``duplicates_dropped``, ``capped``, ``kept``, then records and users per split
    (``train``, ``train_users``, ...). Raises :class:`DataError` (validation lines) or
    :class:`UserError` (bad options, existing or unwritable output).
    """
    check_kind(kind)
    check_prepare_options(prefix_chars, max_per_user, valid_frac, test_frac)
    check_prepare_output(out_dir, overwrite)
    records = read_records(kind, paths)

    deduped = [records[i] for i in dedup_by_prefix([key_text(kind, r) for r in records], prefix_chars)]
    users = user_keys(deduped)
    kept_idx = cap_per_user(users, max_per_user)
    kept, kept_users = [deduped[i] for i in kept_idx], [users[i] for i in kept_idx]
    split_of = assign_users(kept_users, valid_frac, test_frac, seed)

    by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for record, user in zip(kept, kept_users):
        by_split[split_of[user]].append(record)
    counts = {
        "read": len(records),
        "duplicates_dropped": len(records) - len(deduped),
        "capped": len(deduped) - len(kept),
        "kept": len(kept),
    }
    for s in SPLITS:
        counts[s] = len(by_split[s])
        counts[f"{s}_users"] = sum(1 for v in split_of.values() if v == s)

    _make_output_dir(out_dir)
    schema = output_schema(kind, kept)  # one schema for all splits, even an empty one
    tables = {f"{s}.parquet": records_to_table(kind, by_split[s], schema) for s in SPLITS}
    try:
        write_tables_atomic(tables, out_dir)
    except OSError as err:
        raise UserError(f"cannot write to output directory {out_dir}: {err.strerror or err}") from None
    return counts
