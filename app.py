"""PoolProp home page (the full home view arrives with the app issue)."""

import streamlit as st

st.set_page_config(page_title="PoolProp", layout="wide")
st.title("PoolProp")
st.markdown(
    "Backpropagation with **compressed activations**: the forward pass is exact; each layer "
    "keeps only a pooled copy of its input for the backward pass."
)
