"""Figures in the style of the paper's, one function per figure.

Each builds and returns a `matplotlib.figure.Figure` without touching pyplot's global state, so it works under
any backend; callers save it (`jaxadv.report.save_figure_atomic`). Image figures are in `images`, transfer
between models in `transfer`, the studies beyond the tables in `studies`.
"""
from jaxadv.plots.images import (DistortionPanel, adversarial_triplets_figure, distortion_grid_figure,
                                 image_rows_figure, sandwich_figure)
from jaxadv.plots.studies import (coherence_figure, cosine_figure, fgm_curve_figure, learning_curves_figure,
                                  radius_scatter_figure, single_pixel_examples, single_pixels_figure)
from jaxadv.plots.transfer import (adversarial_and_noise_figure, error_rate_heatmap_figure, predicted_label_captions,
                                   transfer_triplets_figure)

__all__ = ["DistortionPanel", "adversarial_and_noise_figure", "adversarial_triplets_figure", "coherence_figure",
           "cosine_figure", "distortion_grid_figure", "error_rate_heatmap_figure", "fgm_curve_figure",
           "image_rows_figure", "learning_curves_figure", "predicted_label_captions", "radius_scatter_figure",
           "sandwich_figure",
           "single_pixel_examples", "single_pixels_figure", "transfer_triplets_figure"]
