"""The app's pages, in sidebar order: one list for app.py's st.navigation and the Home page's links."""

HOME = "pages/0_Home.py"

# (script, what the Home page says the view is for); the sidebar title comes from the file name
VIEWS = [
    ("pages/7_Lesson.py", "Lesson — the method in eight steps, for a class"),
    ("pages/1_Train.py", "Train — start a run, watch it live"),
    ("pages/2_Loss_curves.py", "Loss curves — compare runs over time"),
    ("pages/3_Memory.py", "Memory — what each policy keeps, and the largest batch a GPU fits"),
    ("pages/4_Gradient_fidelity.py", "Gradient fidelity — how close the compressed gradients are"),
    ("pages/5_Filters_and_features.py", "Filters & features — what the networks learned"),
    ("pages/6_Attributions.py", "Attributions — where the models look"),
]
