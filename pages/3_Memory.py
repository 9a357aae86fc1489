"""Memory: the saved-activation ladder per policy, where a step peaks, what runs recorded, and the
batch-size planner."""

import streamlit as st
import torch

from core.analysis import bench, memory_ladder, planner, plots
from core.method import CompressionPolicy
from core.models import MODEL_MENU, PREFIX
from ui import common as ui

runs = ui.page("Memory", "What each policy keeps for the backward pass, measured, beside gradient checkpointing; "
                         "what the runs recorded; and the largest batch a GPU budget fits.")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@st.cache_data(show_spinner=False, max_entries=16)
def ladder(model: str, batch: int, size: int, stem: str, policies: tuple, timed: bool) -> dict:
    # on a CPU the steps are timed at batch <= 16, twice each: the ratio, not the seconds, is the point
    return memory_ladder.memory_ladder(model, batch, size, policies=policies, stem=stem, time_steps=timed,
                                time_repeats=3 if DEVICE == "cuda" else 2, device=DEVICE,
                                time_batch=batch if DEVICE == "cuda" else min(batch, 16)).to_dict()


@st.cache_data(show_spinner=False, max_entries=64)
def plan(model: str, policy: str, size: int, stem: str, step_in_backward: bool) -> planner.MemoryPlan:
    # the meter is exactly linear in the batch; the transients nearly so from 8 images on (tested
    # at 128 from 8-32; a fit at 4 and 8 fell 8 % short for avg2+mask on ResNet-20)
    fit = (2, 4) if size >= 128 else (8, 16)
    return planner.plan_memory(model, policy, size=size, stem=stem, device=DEVICE, fit_batches=fit,
                               num_classes=1000 if model.startswith(PREFIX) else 10,
                               step_in_backward=step_in_backward)


@st.cache_data(show_spinner=False, max_entries=16)
def peak_makers(model: str, batch: int, size: int, stem: str, policy: str, step_in_backward: bool) -> dict:
    return bench.step_peak_makers(model, policy, batch, size, stem, step_in_backward)


# ---------------------------------------------------------------------------------------
st.header("The ladder")
c1, c2, c3, c4 = st.columns(4)
model = c1.selectbox("Model", MODEL_MENU, index=MODEL_MENU.index("resnet20"), key="mem_model",
                     help="PoolProp's ResNets, or one of torchvision's CNNs as it comes (random weights: "
                          "nothing is downloaded); they take ImageNet-sized images: pick 224")
batch = c2.number_input("Batch size", 1, 4096, 32, key="mem_batch")
size = c3.select_slider("Image size", [32, 64, 96, 128, 224], 32, key="mem_size")
own_stem = model in ("resnet18", "resnet34", "resnet50")
stem = c4.radio("Stem", ["cifar", "imagenet"], horizontal=True, key="mem_stem", disabled=not own_stem,
                help="PoolProp's ResNet-18/34/50 only: 3×3 CIFAR stem or 7×7 ImageNet stem with max-pool")
if not own_stem:
    stem = "cifar"
if model.startswith(PREFIX) and size < 128:
    st.caption(f"{model} is built for 224 px images: at {size} px its last stages are 1×1 or 2×2, too small for "
               "pooling by 2 (the codes, qB, still fit).")
c5, c6 = st.columns([3, 1])
CHOICES = list(dict.fromkeys([*memory_ladder.LADDER_POLICIES, "avg4+mask", memory_ladder.STRONGEST_POLICY,
                              *memory_ladder.FAMILY_POLICIES]))
policies = c5.multiselect("Policies", CHOICES, default=list(memory_ladder.LADDER_POLICIES), key="mem_policies")
extra = c5.text_input("Add a policy", placeholder="e.g. avg2-lowres+mask", key="mem_extra")
families = c6.checkbox("All families", value=False, key="mem_families",
                       help="Instead of the picked policies: each compression family's steps side by side "
                            "(pooling, quantisation, pooled + residual, checkpointing)")
timed = c6.checkbox("Time the steps", value=True, key="mem_timed",
                    help="Median of interleaved training steps (on a CPU at batch 16 at most; a minute or so), "
                         "with PyTorch's reference passes as this app runs them: the trainer's fused passes make "
                         "the compressed steps cheaper (README, \"Speed\")")


def chosen_policies() -> tuple[str, ...]:
    """The picked policies and the typed one (the ladder and the planner both use them)."""
    chosen = list(memory_ladder.FAMILY_POLICIES if families else policies)
    if extra.strip():
        try:
            chosen.append(str(CompressionPolicy.parse(extra)))
        except ValueError as e:
            st.error(f"Policy {extra!r}: {ui.one_line(e)}")
    return tuple(dict.fromkeys(chosen))


if c6.button("Measure", type="primary", key="mem_measure"):
    st.session_state["mem_ladder_args"] = (model, int(batch), int(size), stem, chosen_policies(), timed)

args = st.session_state.get("mem_ladder_args")
if args is None:
    st.info("Pick a model and batch, then press **Measure** (a few seconds on a CPU).")
else:
    with ui.guard("Cannot measure this ladder"), st.spinner("Measuring what each policy keeps…"):
        lad = ladder(*args)
        for pol, why in lad["skipped"].items():
            st.warning(f"{pol} left out: {why}")
        ui.show(plots.memory_ladder_figure(lad), "memory-ladder",
                f"Bytes kept for backward by one training step of {lad['model']} at batch {lad['batch']}, "
                "split by what keeps them; labels give the change against 'none' and the step-time cost, timed "
                "here with PyTorch's reference passes at a small batch, where fixed costs weigh most (a "
                "training run with the fused passes costs less: ResNet-20 at batch 128, "
                + ", ".join(f"{p} {r:.2f}×" for p, r in bench.TRAINING_STEP_TIME.items()) + ', README "Speed").')
        rows = [{"policy": s["policy"], "saved MiB": round(s["total_bytes"] / 2 ** 20, 1),
                 "change %": None if s["cut"] is None else round(-100 * s["cut"], 1),
                 "step time ×": None if s.get("time_ratio") is None else round(s["time_ratio"], 2)}
                for s in lad["steps"]]
        if all(r["step time ×"] is None for r in rows):  # untimed: no column of blanks
            rows = [{k: v for k, v in r.items() if k != "step time ×"} for r in rows]
        st.dataframe(rows, hide_index=True, column_config={
            "step time ×": st.column_config.NumberColumn(format="%.2f", help="Training-step time against 'none', "
                                                          "with the reference passes"),
            "change %": st.column_config.NumberColumn(format="%+.1f", help="Saved activations against 'none'")})
        ui.download_csv(rows, f"ladder-{lad['model']}-b{lad['batch']}.csv")

# ---------------------------------------------------------------------------------------
st.header("Where a training step peaks")
w1, w2, w3 = st.columns([5, 4, 3], vertical_alignment="bottom")
peak_policy = w1.selectbox("Policy", CHOICES, index=CHOICES.index(memory_ladder.BEST_POLICY), key="mem_peak_policy")
peak_in_backward = w2.checkbox("Step in backward", key="mem_peak_step_in_backward",
                               help="The optimiser updates each parameter as soon as its gradient is complete "
                                    "(train --step-in-backward): the gradients never all coexist")
if w3.button("Find the peak", key="mem_peak"):
    st.session_state["mem_peak_args"] = (model, int(batch), int(size), stem, peak_policy, peak_in_backward)
pargs_peak = st.session_state.get("mem_peak_args")
if pargs_peak is None:
    st.info("Press **Find the peak**: one training step on this CPU under the profiler, and what was alive at "
            "the moment it held the most (the model, batch and image size above).")
else:
    with ui.guard("Cannot find the peak"), st.spinner("Profiling one training step…"):
        found = peak_makers(*pargs_peak)
        ui.show(plots.peak_makers_figure(found), "step-peak",
                f"One training step of {found['model']} at batch {found['batch']} on this CPU: the tensors alive "
                "at its peak (above what existed before the step: the weights and the optimiser's state), grouped "
                "by the op that made them. The forward's are what it keeps for the backward and what is still in "
                "flight; the backward's are gradients and what a compressed layer rebuilds. Measured with the "
                "passes this app runs (PyTorch's reference ones); the trainer's fused passes hold less "
                "(`python -m core bench memory --where`).")

# ---------------------------------------------------------------------------------------
st.header("Recorded by the runs")
if ui.need_runs(runs, "recorded memory"):
    names = ui.names_of(runs)
    colors = ui.colors_for(runs)
    ui.show(plots.run_memory_bars(ui.memory_rows(runs), colors=colors, title="Saved activations and model state"),
            "run-memory",
            "What each run kept for backward in one step (its own batch size), with the weights, gradients and "
            "optimiser state on top.")
    metrics = {n: ui.metrics_of(r) for n, r in zip(names, runs)}
    ui.show(plots.memory_over_training(metrics, colors=colors, title="Memory over training"), "memory-over-training",
            "A GPU run: the most memory the GPU had allocated so far, step by step (model, activations and the "
            "backward pass's transients). A CPU run: the activations one step keeps for backward, which its "
            "policy fixes.")

# ---------------------------------------------------------------------------------------
st.header("Planner: does it fit my GPU?")
p1, p2 = st.columns([3, 1])
budget = p1.select_slider("GPU memory (GiB)", [2, 4, 6, 8, 12, 16, 24, 32, 40, 48, 80], 8, key="mem_budget",
                          help="A card's memory in GiB, 2³⁰ bytes: what GPU makers sell as GB (an '8 GB' card "
                               "holds 8 GiB)")
check_batch = p2.number_input("Batch to check", 1, 65536, 128, key="mem_check_batch")
p3, p4 = st.columns([3, 1], vertical_alignment="center")  # the button under "Batch to check"
in_backward = p3.checkbox("Optimiser step inside the backward", key="mem_step_in_backward",
                          help="Plan for training with --step-in-backward: each parameter is updated as soon as its "
                               "gradient is complete, so the gradients never all coexist")
if p4.button("Fit the planner", key="mem_plan"):
    st.session_state["mem_plan_args"] = (model, int(size), stem, chosen_policies() or ("none",), in_backward)
pargs = st.session_state.get("mem_plan_args")
if pargs is None:
    st.info("Press **Fit the planner**: it measures each policy at a few small batches and fits a line.")
else:
    with ui.guard("Cannot plan"), st.spinner("Measuring at small batches…"):
        pmodel, psize, pstem, ppolicies, pin_backward = pargs
        plans = []
        for pol in ppolicies:
            with ui.guard(f"{pol} left out", warn=True):
                plans.append(plan(pmodel, pol, psize, pstem, pin_backward))
        gib = budget * planner.GIB
        ui.show(plots.planner_figure(plans, gib, colors=ui.policy_colors([p.policy for p in plans])), "planner",
                f"Predicted training memory of {pmodel} against the batch size, in GiB of "
                f"{plots.planner_measure(plans)}; each diamond is the largest batch that fits {budget} GiB "
                "(the table below lists them).")
        if plans:  # the paper's question, answered: this batch on this card, per policy
            article = "an" if str(budget).startswith("8") else "a"  # "an 8", "an 80"
            st.markdown(f"**{pmodel} at {psize} px, batch {int(check_batch)}, on {article} {budget} GiB card:** "
                        + ", ".join(f"`{p.policy}` → {'yes' if p.fits(int(check_batch), gib) else 'no'} "
                                    f"({p.predict(int(check_batch)) / planner.GIB:.1f} GiB)" for p in plans))
        rows = [{"policy": p.policy, "fits batch " + str(int(check_batch)): p.fits(int(check_batch), gib),
                 "largest batch": planner.largest_batch(p, gib),
                 "MiB per image": round(p.bytes_per_image / 2 ** 20, 2)} for p in plans]
        st.dataframe(rows, hide_index=True)
        if plans:
            st.caption(f"Measure: {plans[0].measure}"
                       + ("; the optimiser stepping inside the backward." if pin_backward else "."))
        ui.download_csv(rows, f"planner-{pmodel}-{budget}GiB.csv")
if DEVICE == "cpu":
    st.caption("On this CPU the planner adds up model state, saved activations and the backward's transients "
               "(measured from the CPU step peak); on a GPU it fits the measured CUDA peak.")
