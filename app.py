"""`streamlit run app.py`: PoolProp's navigation. The home page is pages/0_Home.py, the views
are pages/N_Name.py; everything that computes lives in core/.

The pages are listed (ui/navigation.py, for st.navigation) rather than found by Streamlit, so
that the first entry in the sidebar reads "Home" instead of the script's name. Page URLs stay
/Train, /Memory, ...
"""

import streamlit as st

from ui.navigation import HOME, VIEWS

st.navigation([st.Page(HOME, default=True)] + [st.Page(path) for path, _ in VIEWS]).run()
