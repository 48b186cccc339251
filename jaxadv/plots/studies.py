"""Figures of the studies beyond the paper's tables: units (Figs. 1-2), adversarial training, single pixels and
fast-gradient steps."""
from __future__ import annotations

from typing import Sequence

import numpy as np


# -- Figs. 1 and 2: units against random directions ----------------------------------

def coherence_figure(per_model: dict):
    """Box plots of how coherent each direction's top-k images are: natural units e_i, random directions v and
    random k-subsets, for the majority label share and the mean pairwise pixel cosine; a row per model.

    per_model: {name: {"where": φ's description, "natural"/"random"/"chance": {metric: [values]}}}.
    """
    from matplotlib.figure import Figure

    if not per_model:
        raise ValueError("per_model must hold at least one model")
    metrics = (("majority_share", "majority label share in the top-k"),
               ("pixel_cosine", "mean pairwise cosine (pixels) in the top-k"))
    fig = Figure(figsize=(9, 0.6 + 2.9 * len(per_model)), layout="constrained")
    rows = fig.subfigures(len(per_model), 1, squeeze=False)[:, 0]
    for row, (name, res) in zip(rows, per_model.items()):
        axes = row.subplots(1, 2)
        for ax, (metric, label) in zip(axes, metrics):
            ax.boxplot([res[group][metric] for group in ("natural", "random", "chance")],
                       tick_labels=["units e_i", "random v", "random k-subsets"])
            ax.set_title(label, fontsize=9)
            ax.tick_params(labelsize=8)
        row.suptitle(f"{name}: φ = {res['where']}", fontsize=10)
    return fig


# -- adversarial training ----------------------------------------------------------------

def learning_curves_figure(records: dict, epochs: int):
    """Test error and training loss against epochs, a line per variant.

    records: {variant: {"history": [{"epoch", "test_error", "loss"}, ...]}} (`adversarial_train`'s history).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for variant, rec in records.items():
        epoch = [h["epoch"] for h in rec["history"]]
        axes[0].plot(epoch, [100 * h["test_error"] for h in rec["history"]], label=variant)
        axes[1].plot(epoch, [h["loss"] for h in rec["history"]], label=variant)
    axes[0].set(xlabel="epoch", ylabel="test error (%)", title="Test error during training", xlim=(0, epochs))
    axes[1].set(xlabel="epoch", ylabel="training loss (clean + pools, + weight decay)",
                title="Training loss per chunk", xlim=(0, epochs), yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig



# -- single pixels and fast-gradient steps (experiments.sparse_and_fast) -------------------

def single_pixel_examples(per_model: dict, images, names: Sequence[str], num_images: int = 6) -> dict:
    """`single_pixels_figure`'s input: per model of `names`, its first `num_images` images one pixel flips
    (models with none are left out). per_model: {name: `jaxadv.blind_spots.measure_blind_spots`' outputs}."""
    shown = {}
    for name in names:
        out = per_model[name]
        pick = np.flatnonzero(out["sp_success"])[:num_images]
        if not len(pick):
            continue
        shape = images.shape[1:3]
        flips, up = out["sp_flips"][pick], out["sp_flips_up"][pick]
        shown[name] = {"images": images[pick, :, :, 0], "up": up.reshape((-1,) + shape),
                       "down": (flips & ~up).reshape((-1,) + shape), "label": out["label"][pick],
                       "new": out["sp_new_label"][pick]}
    return shown


def single_pixels_figure(images_by_model: dict, class_names=None):
    """Rows: models; columns: images one pixel flips, every flipping pixel marked (red: set to 1, cyan: to 0).

    images_by_model: {name: {"images" [N, H, W], "up"/"down" [N, H, W] bool (the pixels that flip the label when
    set to 1 / to 0), "label", "new" [N] (the label before and after)}} (`single_pixel_examples`).
    """
    from matplotlib.figure import Figure

    rows = list(images_by_model.items())
    columns = max(len(v["images"]) for _, v in rows)
    fig = Figure(figsize=(1.6 * columns + 0.6, 1.9 * len(rows) + 0.4), layout="constrained")
    axes = fig.subplots(len(rows), columns, squeeze=False)
    for r, (name, v) in enumerate(rows):
        for c in range(columns):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(v["images"]):
                ax.set_axis_off()
                continue
            ax.imshow(v["images"][c], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            up, down = np.nonzero(v["up"][c]), np.nonzero(v["down"][c])
            ax.scatter(up[1], up[0], s=14, facecolors="none", edgecolors="red", linewidths=0.9)
            ax.scatter(down[1], down[0], s=14, facecolors="none", edgecolors="cyan", linewidths=0.9)
            name_of = (lambda k: class_names[k]) if class_names else str
            ax.set_xlabel(f"{name_of(v['label'][c])} → {name_of(v['new'][c])}\n{int(v['up'][c].sum() + v['down'][c].sum())} "
                          "pixel(s)", fontsize=6)
        axes[r, 0].set_ylabel(name, fontsize=8)
    fig.suptitle("Single pixels that change the label (red: set to 1, cyan: set to 0)", fontsize=9)
    return fig


def cosine_figure(per_model: dict):
    """Per model, a histogram of the cosine between the FGM direction at x and the minimal L-BFGS perturbation
    r, over the images the attack fooled; one panel per model on a shared axis, so none hides another."""
    from matplotlib.figure import Figure

    names = list(per_model)
    lowest = min(float(np.min(o["cosine"][o["lb_success"].astype(bool)], initial=0.0)) for o in per_model.values())
    bins = np.linspace(min(-0.2, np.floor(lowest * 10) / 10), 1.0, 61)
    columns = min(4, len(names))
    rows = -(-len(names) // columns)
    fig = Figure(figsize=(2.6 * columns + 0.4, 1.9 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False, sharex=True).ravel()
    for ax, name in zip(axes, names):
        out = per_model[name]
        ax.hist(out["cosine"][out["lb_success"].astype(bool)], bins=bins, color="C0")
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in axes[len(names):]:
        ax.set_axis_off()
    axes[0].set_ylabel("images", fontsize=7)
    fig.supxlabel("cosine between the FGM direction at x and the minimal L-BFGS perturbation r", fontsize=8)
    return fig


def fgm_curve_figure(per_model: dict, curve_l2):
    """Per model, the share of images fooled within each L2 of `curve_l2`: by the minimal L-BFGS perturbation,
    and by one FGM step of that L2 (per_model: {name: `measure_blind_spots`' outputs})."""
    from matplotlib.figure import Figure

    names = list(per_model)
    columns = min(4, len(names))
    rows = -(-len(names) // columns)
    fig = Figure(figsize=(3.0 * columns, 2.6 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, name in zip(axes, names):
        out = per_model[name]
        lb = np.where(out["lb_success"], out["lb_l2"], np.inf)
        ax.plot(curve_l2, [np.mean(lb <= t) for t in curve_l2], label="minimal L2 (L-BFGS)")
        ax.plot(curve_l2, out["fgm_curve"].mean(0), label="one FGM step of L2 ε")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("L2", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes[len(names):]:
        ax.set_axis_off()
    axes[0].set_ylabel("share of images fooled", fontsize=7)
    axes[0].legend(fontsize=6)
    return fig


# -- Table 5: certified radii against the attack -------------------------------------

def radius_scatter_figure(per_model: dict, dataset: str):
    """Attained distortion against the certified radius per image (o: the global bound's, x: the pairwise
    bound's), a colour per model; points below the diagonal would be wrong certificates.

    per_model: {name: `jaxadv.radii.radius_against_attack`'s outputs}.
    """
    from jaxadv.radii import RADII

    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 5.5), layout="constrained")
    ax = fig.subplots()
    lo, hi = np.inf, 0.0
    for color, (name, out) in enumerate(per_model.items()):
        for (key, _), marker in zip(RADII, ("o", "x")):
            ok = np.asarray(out["success"], bool) & (out[key] > 0) & np.isfinite(out[key])
            if not ok.any():
                continue
            ax.scatter(out[key][ok], out["attained"][ok], s=10, alpha=0.7, marker=marker, color=f"C{color}",
                       label=name if marker == "o" else None)
            lo = min(lo, out[key][ok].min(), out["attained"][ok].min())
            hi = max(hi, out[key][ok].max(), out["attained"][ok].max())
    if hi > 0:
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="attained = certified")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("certified L2 radius: o margin / (√2 · Π L_k),  "
                  "x pairwise min_j (z_y − z_j) / (‖w_y − w_j‖ · Π L_k)")
    ax.xaxis.label.set_fontsize(7)
    ax.set_ylabel("attained L2 distortion (untargeted L-BFGS)")
    ax.set_title(f"Global Lipschitz certificates vs attack ({dataset} test images)", fontsize=10)
    ax.legend(fontsize=7)
    return fig
