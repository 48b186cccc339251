"""Figures of transfer between models (Tables 2 and 4) and the paper's Fig. 7 (Table 1)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxadv.plots.images import DistortionPanel, adversarial_triplets_figure, distortion_grid_figure


# -- Tables 2 and 4: transfer between models ---------------------------------------

def error_rate_heatmap_figure(error_rates, row_labels: Sequence[str], column_labels: Sequence[str], paper=None,
                              title: str = ""):
    """Error-rate heat map(s) of a transfer table (rows: image sets, columns: models fed them): this run's, and
    the paper's beside it when `paper` is given. Each panel is as wide as its columns need."""
    from matplotlib.figure import Figure

    panels = [("this run", np.asarray(error_rates))] + ([("paper (MNIST)", np.asarray(paper))] if paper is not None else [])
    label_width = 0.07 * max(len(label) for label in row_labels)      # inches of the longest row label
    fig = Figure(figsize=(len(panels) * (0.7 * len(column_labels) + 0.3) + label_width + 0.8,
                          0.55 * len(row_labels) + 2.5), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, rates) in zip(axes, panels):
        ax.imshow(rates * 100, cmap="viridis", vmin=0, vmax=100, aspect="auto")     # the panels fill the width
        for (i, j), v in np.ndenumerate(rates):
            ax.text(j, i, f"{100 * v:.1f}", ha="center", va="center", fontsize=7,
                    color="black" if v > 0.6 else "white")
        ax.set_xticks(range(len(column_labels)), column_labels, rotation=35, ha="right", fontsize=8)
        ax.set_yticks(range(len(row_labels)), row_labels if ax is axes[0] else [], fontsize=8)
        ax.set_xlabel("fed to")
        ax.set_title(f"{name}: error (%)", fontsize=10)
    axes[0].set_ylabel("made for / noise")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def predicted_label_captions(names: Sequence[str], logits_fns, images, class_names=None) -> list[str]:
    """One caption per image listing every model's predicted label, a line per model."""
    import jax

    lines = []
    for name, fn in zip(names, logits_fns):
        pred = np.argmax(np.asarray(jax.jit(fn)(images)), axis=-1)
        lines.append([f"{name}: {class_names[p] if class_names else p}" for p in pred])
    return ["\n".join(per_image) for per_image in zip(*lines)]


def transfer_triplets_figure(names: Sequence[str], logits_fns, originals, adversarial, labels, title: str,
                             class_names=None, num_images: int = 4):
    """Fig. 5 style triplets of the first `num_images` images, every panel captioned with every model's
    prediction; the difference is magnified as far as the largest change allows without saturating."""
    originals, adversarial, labels = (np.asarray(a)[:num_images] for a in (originals, adversarial, labels))
    true = [f"true: {class_names[y] if class_names else y}" for y in labels]
    before = predicted_label_captions(names, logits_fns, originals, class_names)
    after = predicted_label_captions(names, logits_fns, adversarial, class_names)
    difference = adversarial - originals
    rms = np.sqrt(np.mean(difference ** 2, axis=(1, 2, 3)))
    # The paper magnified its ImageNet differences (RMS ~0.0065) 10x; MNIST-scale ones
    # (RMS ~0.06) would saturate at 10x, so the largest change shown maps to full contrast.
    largest = float(np.max(np.abs(difference))) or 1.0
    magnify = max(1.0, np.floor(10 * 0.5 / largest) / 10)
    return adversarial_triplets_figure(
        originals, adversarial, [f"{t}\n{b}" for t, b in zip(true, before)], after, magnify=magnify,
        difference_captions=[f"RMS {r:.3f}" for r in rms], title=title)


# -- Fig. 7: adversarial examples and noise side by side (Table 1) -------------------

def adversarial_and_noise_figure(logits_fns: dict, chosen: Sequence[str], images, labels, adversarial: dict,
                                 noise_key, noise_stddev: float = 1.0, num_images: int = 8, class_names=None):
    """The paper's Fig. 7: a panel of originals / adversarial images / differences for each model of `chosen`,
    then Gaussian noise of `noise_stddev` (clipped) on the same originals, fed to the last model.

    Shows the first `num_images` images that every chosen model classifies correctly (the first ones when there
    are none), so each panel shows an attack that changed a right answer. `adversarial`: {name: images}.
    """
    from jaxadv.transfer import gaussian_noise

    images, labels = np.asarray(images), np.asarray(labels)
    correct = np.all([_predicted_labels(logits_fns[name], images) == labels for name in chosen], axis=0)
    shown = (np.flatnonzero(correct) if correct.any() else np.arange(len(labels)))[:num_images]
    x, y = images[shown], labels[shown]

    def captions(predicted):   # the predicted label, and the true one where they differ
        name_of = (lambda k: class_names[k]) if class_names else str
        return [name_of(p) if p == t else f"{name_of(p)} (true {name_of(t)})" for p, t in zip(predicted, y)]

    panels = []
    for letter, name in zip("abcdefgh", chosen):
        distorted = np.asarray(adversarial[name])[shown]
        after = _predicted_labels(logits_fns[name], distorted)
        rms = np.sqrt(np.mean((distorted - x) ** 2))
        panels.append(DistortionPanel(
            f"({letter}) adversarial for {name}: RMS {rms:.3f}, accuracy {np.mean(after == y):.0%}",
            x, distorted, captions(_predicted_labels(logits_fns[name], x)), captions(after)))
    last = logits_fns[chosen[-1]]
    noisy = np.asarray(gaussian_noise(noise_key, x, noise_stddev))
    after = _predicted_labels(last, noisy)
    panels.append(DistortionPanel(
        f"({'abcdefgh'[len(chosen)]}) Gaussian noise, stddev {noise_stddev:g} (clipped): "
        f"{chosen[-1]} accuracy {np.mean(after == y):.0%}", x, noisy, captions(_predicted_labels(last, x)),
        captions(after)))
    return distortion_grid_figure(panels)


def _predicted_labels(logits_fn, images, batch_size: int = 2000) -> np.ndarray:
    import jax

    apply = jax.jit(logits_fn)
    return np.concatenate([np.argmax(np.asarray(apply(images[i:i + batch_size])), axis=-1)
                           for i in range(0, len(images), batch_size)])
