"""Image figures in the style of the paper's: triplets (Fig. 5), distortion grids (Fig. 7), rows of images
(Figs. 1-4), and the certified-versus-attained sandwich."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def adversarial_triplets_figure(originals, adversarial, original_captions: Sequence[str],
                                adversarial_captions: Sequence[str], *, magnify: float = 10.0,
                                difference_captions: Sequence[str] | None = None,
                                title: str | None = None):
    """The paper's Fig. 5 layout: one row per image, columns original | magnified difference | adversarial.

    The difference panel shows 0.5 + magnify·(x' − x) clamped to [0, 1], which is
    the paper's "magnified 10x, shifted by 128 and clamped" on a [0, 1] scale:
    mid-grey is no change, lighter is brighter, darker is darker. Captions go
    under each panel (e.g. every model's predicted label for that image).
    """
    from matplotlib.figure import Figure

    originals, adversarial = np.asarray(originals), np.asarray(adversarial)
    if originals.shape != adversarial.shape or originals.ndim not in (3, 4):
        raise ValueError(f"originals and adversarial must be image batches of one shape [N, H, W(, 1)], "
                         f"got {originals.shape} and {adversarial.shape}")
    n = originals.shape[0]
    if n == 0:
        raise ValueError("originals must hold at least one image")
    for name, captions in (("original_captions", original_captions),
                           ("adversarial_captions", adversarial_captions),
                           ("difference_captions", difference_captions)):
        if captions is not None and len(captions) != n:
            raise ValueError(f"{name} must have one caption per image ({n}), got {len(captions)}")
    if not np.isfinite(magnify) or magnify <= 0:
        raise ValueError(f"magnify must be a positive number, got {magnify!r}")

    def grey(images):
        return images.reshape(images.shape[:3]) if images.ndim == 4 else images

    x, x_adv = grey(originals), grey(adversarial)
    difference = np.clip(0.5 + magnify * (x_adv - x), 0.0, 1.0)
    lines = max(len(c.splitlines()) for c in list(original_captions) + list(adversarial_captions))
    fig = Figure(figsize=(6.6, n * (2.1 + 0.16 * lines)), layout="constrained")
    axes = fig.subplots(n, 3, squeeze=False)
    headers = ("original", f"difference ×{magnify:g}", "adversarial")
    for i in range(n):
        panels = (x[i], difference[i], x_adv[i])
        captions = (original_captions[i], difference_captions[i] if difference_captions else "",
                    adversarial_captions[i])
        for j, (ax, image, caption) in enumerate(zip(axes[i], panels, captions)):
            ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(caption, fontsize=7, family="monospace")
            if i == 0:
                ax.set_title(headers[j], fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


# -- Fig. 7 (appended by the Table 1 work) ---------------------------------------

from typing import NamedTuple  # noqa: E402  (kept with the function that needs it: append-only file)


class DistortionPanel(NamedTuple):
    """One panel of `distortion_grid_figure`: a set of images and their distorted versions."""
    title: str                       # e.g. "(a) adversarial for FC10(1e-4), RMS 0.061, accuracy 0%"
    originals: np.ndarray            # [N, H, W(, 1)] in [0, 1]
    distorted: np.ndarray            # same shape
    original_captions: Sequence[str]  # e.g. the predicted label of each original
    distorted_captions: Sequence[str]  # e.g. the predicted label of each distorted image


def distortion_grid_figure(panels: Sequence[DistortionPanel], *, title: str | None = None):
    """The paper's Fig. 7 layout: per panel, originals beside distorted images, plus their differences.

    Each panel is a block of three rows with one column per image: originals, distorted images (adversarial
    or noisy), and the difference x' − x in grey, mid-grey for no change, scaled to the panel's largest change
    so that nothing saturates, with a colour bar giving the change in pixel values. Captions (predicted
    labels) go under the originals and distorted images; the panel title says what distorted them.
    """
    from matplotlib.figure import Figure

    if not panels:
        raise ValueError("panels: need at least one DistortionPanel")
    blocks = [_distortion_block(p, panel) for p, panel in enumerate(panels)]
    columns = max(b[1].shape[0] for b in blocks)
    fig = Figure(figsize=(1.25 * columns + 1.6, 3.6 * len(blocks)), layout="constrained")
    subfigs = fig.subfigures(len(blocks), 1, squeeze=False)[:, 0]
    for subfig, (panel, x, x_dist, diff) in zip(subfigs, blocks):
        axes = subfig.subplots(3, columns, squeeze=False)
        largest = float(np.max(np.abs(diff))) or 1.0
        for r, (images, captions, limits) in enumerate(((x, panel.original_captions, (0.0, 1.0)),
                                                         (x_dist, panel.distorted_captions, (0.0, 1.0)),
                                                         (diff, None, (-largest, largest)))):
            for c in range(columns):
                ax = axes[r, c]
                ax.set_xticks([])
                ax.set_yticks([])
                if c >= images.shape[0]:
                    ax.set_axis_off()
                    continue
                shown = ax.imshow(images[c], cmap="gray", vmin=limits[0], vmax=limits[1], interpolation="nearest")
                if captions is not None:
                    ax.set_xlabel(captions[c], fontsize=6)
            axes[r, 0].set_ylabel(("original", "distorted", "x' − x")[r], fontsize=8)
        colorbar = subfig.colorbar(shown, ax=axes[2, :], shrink=0.9, pad=0.01, aspect=10)
        colorbar.ax.tick_params(labelsize=6)
        subfig.suptitle(panel.title, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _distortion_block(p: int, panel: DistortionPanel):
    """(panel, originals, distorted, difference) as [N, H, W] arrays, checked."""
    x, x_dist = np.asarray(panel.originals), np.asarray(panel.distorted)
    if x.shape != x_dist.shape or x.ndim not in (3, 4) or x.shape[0] == 0:
        raise ValueError(f"panels[{p}]: originals and distorted must be non-empty image batches of one "
                         f"shape [N, H, W(, 1)], got {x.shape} and {x_dist.shape}")
    for name in ("original_captions", "distorted_captions"):
        if len(getattr(panel, name)) != x.shape[0]:
            raise ValueError(f"panels[{p}].{name}: need one caption per image ({x.shape[0]})")
    x, x_dist = (a.reshape(a.shape[:3]).astype(np.float64) for a in (x, x_dist))
    return panel, x, x_dist, x_dist - x


def image_rows_figure(images, rows: Sequence[Sequence[int]], row_titles: Sequence[str], title: str = ""):
    """Rows of grey images, `images[rows[r][c]]` in row r (the paper's Figs. 1-4: the images that most excite a unit
    or a direction, one row per direction)."""
    from matplotlib.figure import Figure

    images = np.asarray(images)
    rows = [list(np.asarray(row).reshape(-1)) for row in rows]
    if images.ndim not in (3, 4) or len(rows) != len(row_titles) or not rows or not rows[0]:
        raise ValueError(f"images must be [N, H, W(, 1)] and rows a non-empty list with one title each, got images "
                         f"{images.shape}, {len(rows)} rows and {len(row_titles)} titles")
    num_rows, num_cols = len(rows), len(rows[0])
    fig = Figure(figsize=(num_cols * 0.9, num_rows * 1.05 + 0.4))
    axes = fig.subplots(num_rows, num_cols, squeeze=False)
    for r, (indices, row_title) in enumerate(zip(rows, row_titles)):
        for c, index in enumerate(indices):
            ax = axes[r, c]
            ax.imshow(images[int(index)].reshape(images.shape[1], images.shape[2]), cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(row_title, fontsize=7, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def sandwich_figure(per_model: dict, title: str = ""):
    """Per model, each image's interval [certified radius, attained distortion], images sorted by attained L2.

    per_model: {name: (certified [N], attained [N])}, over images the attack moved. The true minimal
    adversarial distance of an image lies inside its interval; a short interval pins it down.
    """
    from matplotlib.figure import Figure

    if not per_model:
        raise ValueError("per_model must hold at least one model")
    fig = Figure(figsize=(6.5, 1.8 + 1.6 * len(per_model)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(per_model), 1, squeeze=False)[:, 0])
    for ax, (name, (certified, attained)) in zip(axes, per_model.items()):
        certified, attained = np.asarray(certified, np.float64), np.asarray(attained, np.float64)
        if certified.shape != attained.shape or certified.ndim != 1:
            raise ValueError(f"{name}: certified and attained must be vectors of one length, got "
                             f"{certified.shape} and {attained.shape}")
        order = np.argsort(attained)
        rank = np.arange(len(order))
        ax.vlines(rank, certified[order], attained[order], color="0.6", lw=0.8)
        ax.plot(rank, attained[order], "C3.", ms=2, label="attained (attack)")
        ax.plot(rank, certified[order], "C0.", ms=2, label="certified (CROWN)")
        ax.set_ylabel(f"{name}\nL2", fontsize=8)
        ax.set_yscale("log")
    axes[0].legend(fontsize=7, loc="upper left")
    axes[-1].set_xlabel("images, sorted by attained L2")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
