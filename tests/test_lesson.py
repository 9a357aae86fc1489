"""The Lesson page: eight steps built from the shipped runs and images (core.analysis.lesson), walked
with Next and Back (AppTest); what they look like in a browser: tests/test_browser.py."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.analysis import lesson

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not list((ROOT / "checkpoints").glob("r20-cifar-*")),
                                reason="the lesson is built from the shipped CIFAR-10 runs")


@pytest.fixture(scope="module")
def shipped():
    return lesson.shipped_runs()


def _sentences(text: str) -> int:
    return len(re.findall(r"[.!?](\s|$)", text))


@pytest.mark.parametrize("step", lesson.STEPS, ids=[s.key for s in lesson.STEPS])
def test_each_step_is_one_figure_and_a_few_sentences(shipped, step):
    t0 = time.perf_counter()
    fig, text = lesson.build(step.key, shipped)
    seconds = time.perf_counter() - t0
    assert fig.data, step.key
    assert 2 <= _sentences(text) <= 4, text
    assert (ROOT / step.page).exists()
    assert seconds < 20, f"{step.key} took {seconds:.1f} s"  # well under 2 s on an idle CPU; CI shares 2 cores


def test_the_steps_follow_the_issue(shipped):
    """The path the lesson promises: what a layer keeps, the ReLU catch, the ladder, the gradients,
    the cost, filters and attributions, checkpointing; 6-8 steps."""
    assert [s.key for s in lesson.STEPS] == ["keeps", "catch", "ladder", "gradients", "cost", "filters",
                                              "attributions", "checkpointing"]
    assert 6 <= len(lesson.STEPS) <= 8


def test_numbers_in_the_text_come_from_the_shipped_runs(shipped):
    _, text = lesson.build("cost", shipped)
    none = [r for r in shipped if (r.config or {}).get("policy") == "none" and r.config.get("epochs") == 20
            and "cifar" in r.name]
    mean = sum(r.summary["last_val_acc"] for r in none) / len(none)
    assert f"against {100 * mean:.1f} %" in text
    _, text = lesson.build("catch", shipped)
    assert "avg2 alone keeps" in text and "more than none" in text


def test_the_step_times_it_quotes_are_the_readmes(shipped):
    """The lesson quotes step times, not measures them: they must be the README's training-run
    ratios (scripts/trainer_speed.py), and the text must say them (a class told bn8 costs 1.5x and
    checkpointing 1.25x, the opposite order to the README's, was the bug)."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("**In a training run"):]
    for policy, ratio in lesson.TRAINING_STEP_TIME.items():
        row = re.search(rf"^\| `{re.escape(policy)}`[^|]*\| \d+ \| (?:\*\*)?([\d.]+)", table, re.M)
        assert row, f"{policy} is not in the README's speed table"
        assert float(row.group(1)) == ratio, policy
    _, cost = lesson.build("cost", shipped)
    _, ckpt = lesson.build("checkpointing", shipped)
    assert f"{lesson.TRAINING_STEP_TIME['avg2+mask']:.2f} times a baseline step" in cost
    assert f"{lesson.TRAINING_STEP_TIME['ckpt']:.2f} times" in ckpt
    assert f"{lesson.TRAINING_STEP_TIME['avg2+mask+bn8']:.2f} times" in ckpt


def test_a_run_has_one_colour_in_every_step_and_the_first_starts_chips(shipped):
    """Steps 4-7 colour different sets of runs (the Pareto step every 20-epoch setting): each run
    keeps one colour across them, and the runs the app selects at first start have their chips'."""
    from core.analysis import plots
    from core.analysis.run_views import default_selection

    casts = [lesson.COMPRESSED, lesson.PICTURED, ("none", "avg2+mask", "avg4+mask"),
             sorted({(r.config or {}).get("policy") for r in lesson._cifar(shipped)})]
    seen: dict[str, str] = {}
    for cast in casts:
        colours = lesson.run_colors(shipped, {p: lesson.pick(shipped, p) for p in cast})
        assert len(set(colours.values())) == len(cast), cast
        for p, c in colours.items():
            assert seen.setdefault(p, c) == c, p
    first = [Path(p).name for p in default_selection(shipped)]
    chips = plots.selection_colors([r.name for r in shipped], first)
    for r in shipped:
        if r.name in chips:
            assert seen[r.config["policy"]] == chips[r.name], r.name


def test_the_attribution_step_shows_images_the_baseline_gets_right(shipped):
    """Its first picture was an airplane every model called a ship: a class asked what the maps of a
    wrong answer meant. Each row's target is now the baseline's own prediction."""
    fig, text = lesson.build("attributions", shipped)
    titles = [a.text.split("<br>") for a in fig.layout.annotations]
    rows = [titles[i:i + 4] for i in range(0, len(titles), 4)]
    assert len(rows) == 3
    for row in rows:
        target, baseline = row[0][-1], row[1][-2]  # "[input, ]target, CLASS" / "[none, ]CLASS, 93%"
        assert baseline == target, row
    assert "the baseline classifies correctly" in text


def test_the_lesson_uses_cpu_runs_of_one_recipe(shipped):
    """The 20-epoch baseline of seed 0 trained on an H200 in bf16, the others on the CPU: the
    lesson's figures compare runs of one device (seed 1 of the baseline)."""
    from core.analysis.reproduction import trained_on

    picked = [lesson.pick(shipped, p) for p in ("none", "avg2+mask", "avg4+mask")]
    assert picked[0].name == "r20-cifar-none-e20-s1"
    assert {trained_on(r.config) for r in picked} == {"CPU, float32"}


def test_scaled_ladder_equals_a_direct_measurement():
    """Saved bytes are affine in the batch: two tiny measurements scale exactly to any batch."""
    from core.analysis.memory_ladder import memory_ladder

    policies = ("none", "avg2", "mask", "avg2+mask", "avg2+mask+bn8")
    scaled = lesson.scaled_ladder(policies, batch=6)
    direct = memory_ladder("resnet20", 6, policies=policies, time_steps=False).to_dict()
    for a, b in zip(scaled["steps"], direct["steps"]):
        assert a["policy"] == b["policy"]
        assert a["total_bytes"] == b["total_bytes"]
        assert {k: v for k, v in a["by_kind"].items() if v} == {k: v for k, v in b["by_kind"].items() if v}
        assert a["cut"] == pytest.approx(b["cut"])
    assert scaled["batch"] == 6


def test_a_missing_run_gives_a_one_line_error(shipped):
    with pytest.raises(lesson.LessonError, match="avg4\\+mask · 20 ep"):
        lesson.build("filters", [r for r in shipped if (r.config or {}).get("policy") != "avg4+mask"])


def lesson_page(step: str | None = None) -> AppTest:
    """The Lesson page through app.py's navigation (its links name the other pages)."""
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    if step is not None:
        at.query_params["step"] = step
    at.switch_page("pages/7_Lesson.py")
    return at.run()


def test_the_lesson_page_walks_through_every_step(tmp_path, monkeypatch):
    monkeypatch.setenv("POOLPROP_RUN_DIRS", str(ROOT / "checkpoints"))
    monkeypatch.setenv("POOLPROP_RUNS_ROOT", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)  # a fresh clone: no CIFAR-10 data
    at = lesson_page()
    seen = []
    for i, step in enumerate(lesson.STEPS):
        assert not at.exception, [e.message for e in at.exception]
        assert not at.error and not at.warning, (step.key, [w.value for w in at.warning])
        assert at.subheader[0].value == f"{i + 1}. {step.title}"
        assert at.query_params["step"] in (str(i + 1), [str(i + 1)])
        assert len(at.get("plotly_chart")) == 1
        assert at.button(key="lesson_back").disabled == (i == 0)
        assert at.button(key="lesson_next").disabled == (i == len(lesson.STEPS) - 1)
        seen.append(at.subheader[0].value)
        if i < len(lesson.STEPS) - 1:
            at.button(key="lesson_next").click().run()
    assert len(set(seen)) == len(lesson.STEPS)
    at.button(key="lesson_back").click().run()
    assert at.subheader[0].value.startswith(f"{len(lesson.STEPS) - 1}. ")


def test_a_step_in_the_address_opens_that_step(tmp_path, monkeypatch):
    monkeypatch.setenv("POOLPROP_RUN_DIRS", str(ROOT / "checkpoints"))
    monkeypatch.setenv("POOLPROP_RUNS_ROOT", str(tmp_path / "runs"))
    at = lesson_page("3")
    assert at.subheader[0].value == f"3. {lesson.STEPS[2].title}"


def test_warm_up_measures_the_memory_steps_in_the_background_once():
    lesson.warm_up()
    lesson.warm_up()
    assert len(lesson._warming) == 1
    lesson._warming[0].join(120)
    hits = lesson.scaled_ladder.cache_info().hits
    lesson.scaled_ladder(lesson.MEASURED)
    assert lesson.scaled_ladder.cache_info().hits == hits + 1  # the step finds it measured
