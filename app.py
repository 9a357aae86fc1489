"""`streamlit run app.py`: PoolProp's navigation. The home page is pages/0_Home.py, the views
are pages/N_Name.py; everything that computes lives in core/.

Listed here (st.navigation) rather than found by Streamlit, so that the first entry in the
sidebar reads "Home" instead of the script's name. Page URLs stay /Train, /Memory, ...
"""

import streamlit as st

PAGES = ["pages/0_Home.py", "pages/1_Train.py", "pages/2_Loss_curves.py", "pages/3_Memory.py",
         "pages/4_Gradient_fidelity.py", "pages/5_Filters_and_features.py", "pages/6_Attributions.py"]

st.navigation([st.Page(path, default=(path == PAGES[0])) for path in PAGES]).run()
