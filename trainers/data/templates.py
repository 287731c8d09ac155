"""FLAN-style instruction templates for the synthetic world.

Each :class:`Task` is one kind of request with several natural-language templates (FLAN, Wei et al.
2022, wrote ten per data set; we write 3-4 per task, enough for the tiny demo model to see that the
same request comes in many phrasings). Templates are ``str.format`` strings whose ``{field}``
placeholders are filled by :mod:`trainers.data.world` and parsed back by :mod:`trainers.data.gold`.

Classification-type tasks end with an ``OPTIONS`` suffix listing the answer choices, as FLAN did::

    Which animal is Tilo?

    OPTIONS:
    - fox
    - owl

Tasks are grouped into *clusters* (FLAN's unit of held-out evaluation) and tagged with an InstructGPT
*use case* (Ouyang et al. 2022, Table 1). The ``sentiment`` cluster is held out: its tasks never
appear in demonstrations, comparisons or PPO prompts and are used for zero-shot evaluation only.

Field names used in templates (their vocabularies live in :mod:`trainers.data.gold`):
``name``, ``friend``, ``name2`` (characters), ``user`` (a person chatting), ``object``, ``home``,
``count`` (two/three/four), ``adjective``, ``day``; free-text fields ``fact``, ``long_text``,
``passage``, ``names_text``, ``topic_sentence``, ``food_sentence``, ``utterance``.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

OPTIONS_HEADER = "\n\nOPTIONS:\n"
"""Separates a prompt from its answer choices (FLAN's wording); each choice follows on a ``- `` line."""

USE_CASE_MIX: dict[str, float] = {
    "generation": 0.456,
    "open_qa": 0.124,
    "brainstorming": 0.112,
    "chat": 0.084,
    "rewrite": 0.066,
    "summarization": 0.042,
    "classification": 0.035,
    "other": 0.035,
    "closed_qa": 0.026,
    "extraction": 0.019,
}
"""InstructGPT Table 1: share of each use case in the API prompt data set (sums to 0.999)."""

HELDOUT_CLUSTERS: tuple[str, ...] = ("sentiment",)
"""Clusters kept out of all training data; evaluated zero-shot (FLAN's held-out clusters)."""


@dataclass(frozen=True)
class Task:
    """One instruction task: how its prompts look, where it belongs."""

    name: str
    """Unique task id, e.g. ``qa_food``."""
    cluster: str
    """FLAN-style task cluster (unit of held-out evaluation)."""
    use_case: str
    """InstructGPT use case (a key of :data:`USE_CASE_MIX`)."""
    templates: tuple[str, ...]
    """``str.format`` templates; at least three."""
    options: tuple[str, ...] | None = None
    """Answer choices (the pool; a prompt may show a subset via the ``options`` field), or None."""

    def fields(self) -> tuple[str, ...]:
        """Placeholder names used by any template of this task, in first-seen order."""
        seen: list[str] = []
        for template in self.templates:
            for _, field, _, _ in string.Formatter().parse(template):
                if field and field not in seen:
                    seen.append(field)
        return tuple(seen)


def _task(name: str, cluster: str, use_case: str, *templates: str, options=None) -> Task:
    """Shorthand used by the registry below (use case defaults to the cluster name)."""
    return Task(name, cluster, use_case or cluster, tuple(templates), tuple(options) if options else None)


_TASK_LIST: tuple[Task, ...] = (
    # --- generation ---
    _task(
        "story", "generation", "",
        "Write a short story about {name} and a {object}.",
        "Tell me a little story in which {name} finds a {object}.",
        "Can you write a story for children about {name} and a {object}?",
        "Write a few sentences of a story where {name} plays with a {object}.",
    ),
    _task(
        "describe", "generation", "",
        "Describe {name} in a few words.",
        "Who is {name}? Give a short description.",
        "Write a short description of {name}.",
        "Tell me what {name} is like.",
    ),
    _task(
        "note", "generation", "",
        "Write a short note from {name} to {friend}.",
        "Help {name} write a message to {friend}.",
        "Compose a friendly letter that {name} could send to {friend}.",
    ),
    # --- open QA (answers come from world knowledge learnt in pretraining) ---
    _task(
        "qa_food", "open_qa", "",
        "What does {name} like to eat?",
        "What is the favourite food of {name}?",
        "Which food does {name} eat most often?",
    ),
    _task(
        "qa_home", "open_qa", "",
        "Where does {name} live?",
        "Where is the home of {name}?",
        "In which place can you find {name}?",
    ),
    _task(
        "qa_kind", "open_qa", "",
        "What kind of animal is {name}?",
        "Tell me what animal {name} is.",
        "{name} is an animal. What sort of animal?",
    ),
    # --- brainstorming ---
    _task(
        "ideas", "brainstorming", "",
        "List {count} things {name} could do in the {home}.",
        "Give me {count} ideas for a fun day for {name} in the {home}.",
        "What are {count} activities {name} might enjoy in the {home}?",
    ),
    _task(
        "party_foods", "brainstorming", "",
        "Suggest {count} foods to bring to the party of {name}.",
        "Name {count} snacks that {name} could share with friends.",
        "I am planning a picnic with {name}. Which {count} foods should I pack?",
    ),
    # --- chat ---
    _task(
        "chat_greet", "chat", "",
        "Hi, my name is {user}. How are you today?",
        "Hello! I am {user}. Nice to meet you.",
        "Good morning, it is {user} here. Can we talk for a bit?",
    ),
    _task(
        "chat_bored", "chat", "",
        "I am in the {home} and I feel bored. What could I do?",
        "I am visiting the {home} today. Any tips for fun things to do?",
        "What is fun to do in the {home}?",
    ),
    # --- rewrite ---
    _task(
        "swap_name", "rewrite", "",
        "Rewrite the sentence, replacing {name} with {name2}: {fact}",
        "Change the name in this sentence from {name} to {name2}.\n\n{fact}",
        "Replace {name} by {name2} in the following text: {fact}",
    ),
    _task(
        "shorten", "rewrite", "",
        "Make this text shorter: {long_text}",
        "Rewrite the following in fewer words.\n\n{long_text}",
        "Shorten this: {long_text}",
    ),
    # --- summarization ---
    _task(
        "summarize", "summarization", "",
        "Summarize this in one sentence: {passage}",
        "{passage}\n\nWrite a one sentence summary of the text above.",
        "Give a short summary of the following text.\n\n{passage}",
    ),
    # --- classification (trained) ---
    _task(
        "classify_kind", "classification", "",
        "Which animal is {name}?",
        "{name} is one of these animals. Which one?",
        "Pick the animal that {name} is.",
        options=("fox", "owl", "cat", "bear", "frog", "rabbit", "mouse", "otter", "deer", "duck", "goat", "wolf"),
    ),
    _task(
        "classify_topic", "classification", "",
        "Is this sentence about food, a place or a hobby?\n\n{topic_sentence}",
        "What is the topic of the following sentence? {topic_sentence}",
        "Classify the sentence by its topic: {topic_sentence}",
        options=("food", "place", "hobby"),
    ),
    # --- extraction ---
    _task(
        "extract_names", "extraction", "",
        "List all the names that appear in this text: {names_text}",
        "Extract the names of the characters.\n\n{names_text}",
        "Which characters are mentioned below?\n\n{names_text}",
    ),
    _task(
        "extract_food", "extraction", "",
        "Which food is mentioned in this sentence? {food_sentence}",
        "Find the food in the text below.\n\n{food_sentence}",
        "Extract the name of the food: {food_sentence}",
    ),
    # --- closed QA (the answer is in the prompt) ---
    _task(
        "passage_who", "closed_qa", "",
        "{name} went to the {home} with {friend} on {day}.\n\nQuestion: Who went to the {home} with {name}?",
        "Read this: On {day}, {name} and {friend} walked to the {home}. Who was with {name}?",
        "Text: {name} visited the {home} on {day} together with {friend}.\nWho did {name} visit the {home} with?",
    ),
    _task(
        "passage_when", "closed_qa", "",
        "{name} went to the {home} with {friend} on {day}.\n\nQuestion: On which day did {name} go there?",
        "Read this: On {day}, {name} and {friend} walked to the {home}. When did they walk there?",
        "Text: {name} visited the {home} on {day} together with {friend}.\nWhen was the visit?",
    ),
    # --- other ---
    _task(
        "opposite", "other", "",
        "What is the opposite of {adjective}?",
        "Give me a word that means the opposite of {adjective}.",
        "Antonym of {adjective}:",
    ),
    # --- held out: sentiment (classification use case, never trained on) ---
    _task(
        "sentiment_said", "sentiment", "classification",
        '{name} said: "{utterance}" Is this positive or negative?',
        'How does {name} feel, judging by this remark? "{utterance}"',
        '"{utterance}" said {name}. What is the sentiment?',
        options=("positive", "negative"),
    ),
    _task(
        "sentiment_review", "sentiment", "classification",
        "Here is a review of the {home}: {utterance} Did the writer like the {home}?",
        "Review of the {home}: {utterance}\nDid the reviewer enjoy the {home}?",
        "Read this review of the {home} and say if the writer liked it. {utterance}",
        options=("yes", "no"),
    ),
)  # fmt: skip

TASKS: dict[str, Task] = {task.name: task for task in _TASK_LIST}
"""All tasks by name, in registry order."""


def get_task(task: Task | str) -> Task:
    """The :class:`Task` for a name (or the task itself); KeyError naming the valid tasks otherwise."""
    if isinstance(task, Task):
        return task
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return TASKS[task]


def add_options(prompt: str, options: list[str] | tuple[str, ...]) -> str:
    """Append FLAN's ``OPTIONS`` suffix: ``prompt + "\\n\\nOPTIONS:\\n- a\\n- b"``."""
    return prompt + OPTIONS_HEADER + "\n".join(f"- {option}" for option in options)


def split_options(prompt: str) -> tuple[str, list[str] | None]:
    """Inverse of :func:`add_options`: ``(prompt without the suffix, options or None)``."""
    head, sep, tail = prompt.rpartition(OPTIONS_HEADER)
    if not sep:
        return prompt, None
    lines = tail.split("\n")
    if not lines or not all(line.startswith("- ") and len(line) > 2 for line in lines):
        return prompt, None
    return head, [line[2:] for line in lines]


def render(task: Task | str, fields: dict, template_idx: int) -> str:
    """Fill template ``template_idx`` (modulo the number of templates) of ``task`` with ``fields``.

    Classification tasks get the ``OPTIONS`` suffix with ``fields["options"]`` when given (a shuffled
    subset of the pool), else the task's whole option pool.
    """
    task = get_task(task)
    template = task.templates[template_idx % len(task.templates)]
    prompt = template.format_map(fields)
    if task.options is not None:
        prompt = add_options(prompt, fields.get("options") or task.options)
    return prompt


def clusters() -> dict[str, list[str]]:
    """Cluster name -> task names, in registry order."""
    out: dict[str, list[str]] = {}
    for task in TASKS.values():
        out.setdefault(task.cluster, []).append(task.name)
    return out


def tasks_for_use_case(use_case: str, include_heldout: bool = False) -> list[str]:
    """Task names with this InstructGPT use case (held-out clusters excluded unless asked)."""
    return [
        t.name
        for t in TASKS.values()
        if t.use_case == use_case and (include_heldout or t.cluster not in HELDOUT_CLUSTERS)
    ]


def is_heldout(task: Task | str) -> bool:
    """True when the task's cluster is held out for zero-shot evaluation."""
    return get_task(task).cluster in HELDOUT_CLUSTERS
