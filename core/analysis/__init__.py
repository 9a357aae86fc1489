"""The analysis: what the app and the reports show, computed and drawn.

    fidelity.py, fidelity_history.py      exact vs compressed gradients, and over training
    layers.py, filters.py, activation_max.py, cka.py   what the networks learned
    attribution.py                        Captum attributions and their agreement
    curves.py                             training curves, time to accuracy, Pareto fronts
    memory_ladder.py, planner.py, synthetic.py, bench.py   memory and speed, measured
    reproduction.py, report.py            the reproduction table, offline reports
    run_views.py, images.py, method_picture.py   runs and images as the pages show them
    plots/                                plotly figures (data in, go.Figure out)

Imports: core.method, core.models, core.engine (and plotly, captum where a figure or an
attribution needs them, imported by the modules that do). Never core.cli, the app or
streamlit.
"""
