"""FLAN-style template registry: tasks, clusters, OPTIONS suffix, rendering."""

from __future__ import annotations

import string

import pytest

from trainers.data import templates
from trainers.data.templates import (
    HELDOUT_CLUSTERS,
    OPTIONS_HEADER,
    TASKS,
    USE_CASE_MIX,
    add_options,
    clusters,
    render,
    split_options,
)


def test_every_task_has_three_templates_and_a_known_use_case():
    for task in TASKS.values():
        assert len(task.templates) >= 3, task.name
        assert len(set(task.templates)) == len(task.templates), task.name
        assert task.use_case in USE_CASE_MIX, task.name


def test_all_templates_of_a_task_use_the_same_fields():
    # Any template must be able to render any field dict drawn for its task.
    for task in TASKS.values():
        expected = set(task.fields())
        for template in task.templates:
            used = {f for _, f, _, _ in string.Formatter().parse(template) if f}
            assert used == expected, (task.name, template)


def test_clusters_cover_the_instructgpt_use_cases_and_a_heldout_cluster():
    groups = clusters()
    assert set(USE_CASE_MIX) <= set(groups)
    assert set(HELDOUT_CLUSTERS) <= set(groups)
    assert sorted(n for names in groups.values() for n in names) == sorted(TASKS)
    for cluster in HELDOUT_CLUSTERS:
        for name in groups[cluster]:
            assert TASKS[name].options is not None  # held-out zero-shot tasks are classification-type
            assert templates.is_heldout(name)
    assert not templates.is_heldout("qa_food")


def test_use_case_mix_is_instructgpt_table_1():
    assert USE_CASE_MIX["generation"] == 0.456 and USE_CASE_MIX["extraction"] == 0.019
    assert sum(USE_CASE_MIX.values()) == pytest.approx(0.999)
    # every use case has at least one trained (not held-out) task to draw from
    for use_case in USE_CASE_MIX:
        assert templates.tasks_for_use_case(use_case), use_case
    assert "sentiment_said" not in templates.tasks_for_use_case("classification")
    assert "sentiment_said" in templates.tasks_for_use_case("classification", include_heldout=True)


def test_add_options_is_flan_format_and_split_options_inverts_it():
    assert add_options("Is it?", ["yes", "no"]) == "Is it?\n\nOPTIONS:\n- yes\n- no"
    assert split_options("Is it?\n\nOPTIONS:\n- yes\n- no") == ("Is it?", ["yes", "no"])
    assert split_options("No options here.") == ("No options here.", None)
    # a malformed suffix is not taken for options
    assert split_options("Q" + OPTIONS_HEADER + "yes") == ("Q" + OPTIONS_HEADER + "yes", None)


def test_render_fills_fields_and_appends_options_for_classification():
    prompt = render("qa_food", {"name": "Tilo"}, 0)
    assert prompt == "What does Tilo like to eat?"
    assert render("qa_food", {"name": "Tilo"}, 3) == prompt  # template index wraps around
    shown = ["fox", "owl", "cat"]
    kind = render("classify_kind", {"name": "Mara", "options": shown}, 0)
    assert kind == "Which animal is Mara?\n\nOPTIONS:\n- fox\n- owl\n- cat"
    topic = render("classify_topic", {"topic_sentence": "Mara eats fish every day."}, 1)
    assert topic.endswith("\n\nOPTIONS:\n- food\n- place\n- hobby")  # the whole pool when none given


def test_unknown_task_names_the_known_ones():
    with pytest.raises(KeyError, match="qa_food"):
        render("nope", {}, 0)
