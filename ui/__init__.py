"""Streamlit helpers shared by app.py and pages/ (the run picker, cached loaders, messages)."""
