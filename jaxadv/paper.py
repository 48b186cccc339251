"""The values Szegedy et al. (2014) published, beside which the experiments set theirs (all on MNIST).

Rates are fractions, distortions the per-pixel RMS sqrt(Σ(x'−x)²/784).
"""

#: Table 1 (MNIST): training error, test error, av. min. distortion.
TABLE1 = {
    "FC10(1e-4)": (0.067, 0.074, 0.062),
    "FC10(1e-2)": (0.10, 0.094, 0.1),
    "FC10(1)": (0.212, 0.20, 0.14),
    "FC100-100-10": (0.0, 0.0164, 0.058),
    "FC200-200-10": (0.0, 0.0154, 0.065),
    "AE400-10": (0.0057, 0.019, 0.086),
}

#: Table 2 (MNIST): error rates, rows the adversarial sets of the zoo's six models then noise of stddev 0.1
#: and 0.3, columns the six models.
TABLE2_ERROR_RATES = [
    [1.00, 0.117, 0.227, 0.02, 0.039, 0.027],
    [0.871, 1.00, 0.352, 0.359, 0.273, 0.098],
    [0.719, 0.762, 1.00, 0.481, 0.47, 0.344],
    [0.289, 0.137, 0.211, 1.00, 0.066, 0.02],
    [0.382, 0.14, 0.238, 0.203, 1.00, 0.027],
    [0.234, 0.16, 0.248, 0.094, 0.066, 1.00],
    [0.05, 0.101, 0.183, 0.0, 0.0, 0.008],
    [0.156, 0.113, 0.227, 0.05, 0.043, 0.031],
]
#: Table 2's last column: each row's average distortion.
TABLE2_AV_DISTORTION = [0.062, 0.1, 0.14, 0.058, 0.065, 0.086, 0.1, 0.3]

#: Table 3 (MNIST): error on P1, P2, test; min. av. distortion.
TABLE3 = {
    "FC100-100-10": [0.0, 0.024, 0.02, 0.062],
    "FC123-456-10": [0.0, 0.025, 0.021, 0.059],
    "FC100-100-10'": [0.023, 0.0, 0.021, 0.058],
}
#: Table 4 (MNIST): rows adversarial x3, Gaussian 0.06, amplified x3, Gaussian 0.1; columns the three models.
TABLE4 = [
    [1.00, 0.262, 0.059],
    [0.0625, 1.00, 0.051],
    [0.082, 0.082, 1.00],
    [0.022, 0.026, 0.024],
    [1.00, 0.98, 0.43],
    [0.96, 1.00, 0.22],
    [0.27, 0.50, 1.00],
    [0.026, 0.028, 0.027],
]

#: §4.2's test errors of FC100-100-10 by how it was trained (the paper gives no table).
ADVERSARIAL_TRAINING_TEST_ERROR = {"weight_decay": "1.6%", "dropout": "~1.3%", "adversarial_per_layer": "<1.2%"}

#: Table 5 (its own AlexNet's weights): layer -> (size, stride, upper bound).
TABLE5 = {
    "Conv. 1": ("3 × 11 × 11 × 96", 4, 2.75),
    "Conv. 2": ("96 × 5 × 5 × 256", 1, 10.0),
    "Conv. 3": ("256 × 3 × 3 × 384", 1, 7.0),
    "Conv. 4": ("384 × 3 × 3 × 384", 1, 7.5),
    "Conv. 5": ("384 × 3 × 3 × 256", 1, 11.0),
    "FC. 1": ("9216 × 4096", None, 3.12),
    "FC. 2": ("4096 × 4096", None, 4.0),
    "FC. 3": ("4096 × 1000", None, 4.0),
}
