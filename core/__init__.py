"""PoolProp core: everything that computes. Never imports streamlit."""
