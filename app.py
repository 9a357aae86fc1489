"""`streamlit run app.py`: PoolProp's navigation. The home page is pages/0_Home.py, the views
are pages/N_Name.py; everything that computes lives in core/.

The pages are listed (ui/navigation.py, for st.navigation) rather than found by Streamlit, so
that the first entry in the sidebar reads "Home" instead of the script's name. Page URLs stay
/Train, /Memory, ...
"""

import os

# OpenMP threads that sleep while they wait, as core.engine.environment gives the trainer. Set
# here, before the first page imports torch: with spinning threads and a training beside the app
# on a 2-core machine, the app's own small computations (the Lesson's, the ladder) took 10-50x as long.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import streamlit as st  # noqa: E402

from ui.navigation import HOME, VIEWS  # noqa: E402

st.navigation([st.Page(HOME, default=True)] + [st.Page(path) for path, _ in VIEWS]).run()
