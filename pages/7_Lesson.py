"""Lesson: the method in eight steps for a class, one idea and one figure each, with Next and Back
(the steps and their figures: core.analysis.lesson)."""

import streamlit as st

from core.analysis import lesson
from ui import common as ui

ui.page("Lesson", "Backpropagation with compressed activations in eight steps, built from the shipped runs "
                  "and images. Each step links to the page that shows more.")
STEP_KEY = "lesson_step"
N = len(lesson.STEPS)


@st.cache_data(show_spinner=False, max_entries=len(lesson.STEPS))
def step_content(key: str):
    """(figure, text) of one step, from checkpoints/: computed once per server (well under a
    second a step on a CPU), then shared by every visitor."""
    return lesson.build(key)


def go(delta: int) -> None:
    st.session_state[STEP_KEY] = min(max(st.session_state[STEP_KEY] + delta, 0), N - 1)


lesson.warm_up()  # the later steps' slow first parts, measured while the first is read
if STEP_KEY not in st.session_state:  # ?step=3 opens the third step (a teacher's bookmark)
    asked = st.query_params.get("step", "1")
    st.session_state[STEP_KEY] = min(max(int(asked) - 1, 0), N - 1) if asked.isdigit() else 0
i = st.session_state[STEP_KEY]
st.query_params["step"] = str(i + 1)
step = lesson.STEPS[i]

back, where, forward = st.columns([1, 3, 1], vertical_alignment="center")
# the arrow keys too: a presenter's remote sends them
back.button("Back", on_click=go, args=(-1,), disabled=i == 0, key="lesson_back", width="stretch", shortcut="Left")
where.progress((i + 1) / N, text=f"Step {i + 1} of {N}")
forward.button("Next", on_click=go, args=(1,), disabled=i == N - 1, key="lesson_next", type="primary",
               width="stretch", shortcut="Right")
st.subheader(f"{i + 1}. {step.title}")
with ui.guard("This step cannot be shown here", warn=True), st.spinner("Building the figure…"):
    fig, text = step_content(step.key)
    st.markdown(text)
    ui.show(fig, f"lesson-{i + 1}-{step.key}")
st.page_link(step.page, label=f"More: {step.link}")
