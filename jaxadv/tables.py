"""The paper's tables as markdown, from the results an experiment writes to results.json.

    write_text_atomic(out / "table.md", table2_markdown(results))

Each cell shows this run's value, and the paper's in parentheses where the models are the paper's.
"""
from __future__ import annotations

import numpy as np

from jaxadv.paper import TABLE5
from jaxadv.report import fixed, markdown_table, percent, significant
from jaxadv.transfer import describe_transfer_versus_noise


def table1_markdown(results: dict) -> str:
    """Table 1 from `experiments.table1`'s results: each cell this run (the paper's MNIST value)."""
    headers = ["Model", "Training error", "Test error", "Av. distortion, paper's method", "Av. min. distortion",
               "Success rate", "Adv. accuracy", "Images"]
    rows = [[r["model"], f"{percent(r['train_error'])} ({percent(r['paper_train_error'])})",
             f"{percent(r['test_error'])} ({percent(r['paper_test_error'])})",
             f"{fixed(r.get('paper_method_av_distortion'))} ({fixed(r['paper_av_min_distortion'])})",
             fixed(r["av_min_distortion"]),
             percent(r["success_rate"]), percent(r["adversarial_accuracy"]), str(r["num_images"])]
            for r in results["rows"]]
    return (f"# Table 1 ({results['dataset']}{', quick' if results['quick'] else ''})\n\n"
            f"Each cell: this run (the paper's MNIST value). Attack: {results['num_images']} {results['split']} "
            f"images per model, targets: {results['targets']}.\n"
            "Distortions: mean per-pixel RMS sqrt(Σ(x'−x)²/784) over the successful attacks: the paper's "
            "method (the c search alone; the paper's value beside it) and the minimum after the refinement "
            "to the nearest boundary point; "
            "Adv. accuracy: fraction of adversarial images still classified as the true label.\n\n"
            + markdown_table(headers, rows) + "\n")


def table2_markdown(results: dict) -> str:
    """Table 2 from `experiments.table2`'s results: ours and the paper's side by side in every cell, "ours (paper)"."""
    names = results["column_labels"]
    headers = ["made for ↓ / fed to →"] + names + ["Av. distortion"]
    rows, paper = [], results["paper"]
    for i, label in enumerate(results["row_labels"]):
        if paper:
            cells = [f"{percent(ours, 1)} ({percent(theirs, 1)})" for ours, theirs in
                     zip(results["error_rates"][i], paper["error_rates"][i])]
            distortion = f"{results['av_distortion'][i]:.3f} ({paper['av_distortion'][i]:g})"
        else:
            cells, distortion = [percent(ours, 1) for ours in results["error_rates"][i]], f"{results['av_distortion'][i]:.3f}"
        rows.append([label] + cells + [distortion])
    rows.append(["clean images (not in the paper)"] + [percent(e, 1) for e in results["clean_error_rates"]] + ["0"])
    success = ", ".join(f"{n} {percent(s, 1)}" for n, s in results["attack_success_rate"].items())
    return (f"# Table 2: cross-model generalization ({results['dataset']}, {results['num_images']} "
            f"training images{', quick' if results['quick'] else ''})\n\n"
            + ("Each cell: this run (the paper's MNIST value). " if paper else "")
            + "Error = fraction not classified as the true label.\n\n"
            + markdown_table(headers, rows)
            + f"\n\nAttack success (targeted, random wrong label): {success}.\n"
              f"Gaussian noise is clipped to [0, 1]; its distortion column is measured after clipping.\n\n"
            + "\n".join(f"- {describe_transfer_versus_noise(c, 'Gaussian noise ' + k)}"
                        for k, c in results["transfer_versus_noise"].items()) + "\n")


def table3_markdown(results: dict) -> str:
    """Tables 3 and 4 from `experiments.table3`'s results, each cell "ours (paper)", and the other readings of
    "amplified"."""
    t3, t4 = results["table3"], results["table4"]
    rows3 = []
    for name, values in zip(t3["row_labels"], t3["values"]):
        paper = t3["paper"][name]
        rows3.append([f"{name} (trained on {results['models'][name]['trained_on']})"]
                     + [f"{percent(v, 1)} ({percent(p, 1)})" for v, p in zip(values[:3], paper[:3])]
                     + [f"{values[3]:.3f} ({paper[3]:g})"])
    rows4 = [[label] + [f"{percent(v, 1)} ({percent(p, 1)})" for v, p in zip(rates, paper)]
             for label, rates, paper in zip(t4["row_labels"], t4["error_rates"], t4["paper"])]
    rows_extra = [[label] + [percent(v, 1) for v in rates] + [f"{d:.4f}"]
                  for label, rates, d in zip(t4["extra_row_labels"], t4["extra_error_rates"], t4["extra_av_distortion"])]
    success = ", ".join(f"{n} {percent(s, 1)}" for n, s in results["attack_success_rate"].items())
    quick = ", quick" if results["quick"] else ""
    return (f"# Table 3: cross-training-set models ({results['dataset']}{quick})\n\n"
            "Each cell: this run (the paper's MNIST value). Errors on clean images; distortion over "
            f"{results['num_images']} attacked test images.\n\n"
            + markdown_table(["Model"] + t3["column_labels"], rows3)
            + f"\n\n# Table 4: cross-training-set generalization ({results['num_images']} test images{quick})\n\n"
            + markdown_table([""] + t4["column_labels"], rows4)
            + f"\n\nAttack success (targeted, random wrong label): {success}.\n"
              f"Clean error on these test images: {', '.join(percent(e, 1) for e in results['clean_error_rates'])}.\n"
              f"Amplification: {t4['amplification']}. Gaussian noise is clipped to [0, 1].\n\n"
            + "\n".join(f"- {k}: {describe_transfer_versus_noise(c, 'the noise row')}" for k, c in t4["transfer_versus_noise"].items())
            + "\n\n"
              "Other readings of \"amplified\" (not in the paper's table):\n\n"
            + markdown_table([""] + t4["column_labels"] + ["Av. distortion"], rows_extra) + "\n")


def units_markdown(results: dict, k: int, num_chance_subsets: int, num_permutations: int) -> str:
    """The coherence of the top-k images per direction (`jaxadv.units.direction_coherence` per model), and the
    permutation tests between the groups."""
    headers = ["Model", "φ (layer)", "Directions", "Majority share (mean ± sd)", "Pixel cosine (mean ± sd)"]
    rows = []
    for name, res in results.items():
        for group, label in (("natural", f"natural e_i ({res['live_units']} live units)"),
                             ("random", f"random v ({len(res['random']['majority_share'])})"),
                             ("chance", f"random {k}-subsets of I ({num_chance_subsets})")):
            share, cosine = mean_and_std(res[group]["majority_share"]), mean_and_std(res[group]["pixel_cosine"])
            rows.append([name, f"{res['where']}, n={res['dim']}", label,
                         f"{share['mean']:.3f} ± {share['std']:.3f}", f"{cosine['mean']:.3f} ± {cosine['std']:.3f}"])
    test_headers = ["Model", "Metric", "natural − random", "p", "natural − chance", "p", "random − chance", "p"]
    test_rows = [[name, metric, f"{t['natural_minus_random']:+.3f}", f"{t['p_natural_vs_random']:.4f}",
                  f"{t['natural_minus_chance']:+.3f}", f"{t['p_natural_vs_chance']:.4f}",
                  f"{t['random_minus_chance']:+.3f}", f"{t['p_random_vs_chance']:.4f}"]
                 for name, res in results.items() for metric, t in res["tests"].items()]
    return (f"## Coherence of the top-{k} test images per direction\n\n" + markdown_table(headers, rows)
            + f"\n\nTwo-sided permutation tests of the difference of means ({num_permutations} permutations; "
            "the smallest reportable p is 1/(permutations+1)):\n\n" + markdown_table(test_headers, test_rows) + "\n")


def mean_and_std(values) -> dict:
    """{"mean", "std" (with Bessel's correction; 0 for one value), "n"} of `values`."""
    values = np.asarray(values, np.float64)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
            "n": int(values.size)}


def adversarial_training_markdown(records: dict, model: str, dataset: str, num_eval: int, paper: dict,
                                  sigmoids: tuple) -> str:
    """The adversarial training table from `experiments.adversarial_training`'s records: per variant its pools,
    time, test error (the paper's beside it) and the distortion the untargeted attack needed.

    sigmoids: the model's layers whose outputs are pooled besides the input (numbered as in "Pools at").
    """
    headers = ["Variant", "Pools at", "Epochs", "Train s", "Attack s", "Test error", "Paper (MNIST)",
               f"Fooled ({num_eval} test images)", "Mean min. distortion", "Median"]
    rows = []
    for variant, rec in records.items():
        d = rec["distortion"]
        rows.append([variant, ", ".join(map(str, rec["config"]["pool_layers"])) or "-", rec["epochs"],
                     f"{rec['train_seconds']:.0f}", f"{rec['attack_seconds']:.0f}", percent(rec["test_error"]),
                     paper.get(variant, "-"), percent(d["success_rate"], 0),
                     fixed(d["mean_distortion"], 4), fixed(d["median_distortion"], 4)])
    return (f"# Adversarial training of {model} on {dataset}\n\n" + markdown_table(headers, rows)
            + f"\n\nPools at: -1 is the input, k the output of layer k of the model's nn.Sequential, counted from 0 "
            f"with its flatten ({', '.join(map(str, sigmoids))}: the sigmoids). "
            "Distortion: per-pixel RMS sqrt(Σ(x'−x)²/n) of the untargeted L-BFGS attack (the smallest change of "
            "the model's prediction, refined to the boundary; the same images for every variant), over the "
            "successful attacks.\n")


def sparse_and_fast_markdown(results: dict) -> str:
    """The single-pixel, fewest-pixel and fast-gradient table from `experiments.sparse_and_fast`'s results, the
    check of the bounds-only single-pixel scan, and the time each part took."""
    rows = [[r["model"], r["kind"], f"{percent(r['one_pixel_share'], 1)} ({percent(r.get('one_pixel_share_correct'), 1)})",
             f"{significant(r['min_pixels_median'], 3)} / {significant(r['min_pixels_p90'], 3)}",
             significant(r["lbfgs_l2_median"], 3), percent(r["fgm_at_min_l2_success"], 1),
             f"{significant(r['cosine_median'], 2)} ({significant(r['cosine_feasible_median'], 2)})",
             f"{significant(r['fgm_l2_ratio_median'], 3)} / {significant(r['fgm_l2_ratio_p90'], 3)}",
             percent(r["fgsm_at_linf_success"], 1),
             f"{significant(r['fgsm_linf_ratio_median'], 3)} / {significant(r['fgsm_linf_ratio_p90'], 3)}"] for r in results["rows"]]
    main = markdown_table(["Model", "Kind", "One pixel flips (of correctly classified)", "Min. pixels: median / 90th",
                           "Min. L2 (L-BFGS), median", "FGM at min. L2: success",
                           "Cosine FGM dir. vs r: median (box-feasible)", "FGM L2 needed / min. L2: median / 90th",
                           "FGSM at r's L∞: success", "FGSM L∞ needed / r's L∞: median / 90th"], rows)
    fine_rows = [[r["model"], str(r["fine_images"]), str(r["fine_verdict_changed"]), str(r["fine_flips_bounds_do_not"]),
                  percent(r["fine_margin_lower_share"], 1), significant(r["fine_gap_mean"], 3), significant(r["fine_gap_max"], 3),
                  f"{100 * r['fine_pixels_lower_share']:.3f}%" if r["fine_pixels_lower_share"] is not None else "–",
                  str(r["fine_images_with_a_pixel_lower"])]
                 for r in results["rows"]]
    fine = markdown_table(["Model", "Images", "One-pixel verdict changed", "Flipped only by the finer scan",
                           "Best margin lower with the finer scan", "Gap, mean", "Gap, max",
                           "Pixels an inner value helps more", "Images with such a pixel"], fine_rows)
    timing = markdown_table(["Model", "Single pixel (s)", "Min. pixels (s)", "L-BFGS untargeted (s)", "Fast family (s)",
                             "Finer scan (s)"],
                            [[n, *(f"{t.get(k, 0.0):.1f}" for k in ("single_pixel", "min_pixels", "lbfgs", "fast",
                                                                   "fine_scan"))]
                             for n, t in results["timing"].items()])
    return (f"# Single pixels and fast-gradient steps ({results['dataset']}{', quick' if results['quick'] else ''})\n\n"
            f"{results['num_images']} test images per model (seed {results['seed']}), each moved away from the model's "
            "own prediction. One pixel: every pixel set to 0 and to 1 (`single_pixel_attack`). Min. pixels: greedy "
            f"(`min_pixels_attack`, exhaustive at the first pixel, then a saliency shortlist of 32; at most "
            f"{results['max_pixels']}, ∞ where it gave up). r: the untargeted minimal-L2 perturbation "
            "(`lbfgs_attack_untargeted`, the smallest change of the prediction). FGM: one step ε·g/‖g‖₂ along the "
            "cross-entropy's gradient g at x, clipped to [0, 1]; FGSM: ε·sign(g). \"Needed\": the smallest ε that "
            "succeeds along the same direction (`minimal_fast_gradient`), as the clipped step's L2 (L∞) over r's. "
            "Cosines in brackets: g without the components that would leave the box.\n\n"
            + main +
            f"\n## Is the bounds-only scan exact? ({results['fine_values']} values per pixel on the first images)\n\n"
            "Gap: (best margin of the bounds-only scan − best margin of the finer scan) / the clean margin "
            "(0: the bounds are exact; the margin is the label's logit minus the best other). The last two columns "
            "look at every pixel, not only each image's best: the share of (image, pixel) pairs whose margin an "
            "inner value lowers below both bounds'.\n\n" + fine +
            "\n## Time on this machine (all images, compilation included)\n\n" + timing
            + f"\nAll models: {_total_seconds(results['timing']):.0f} s of measurement; this invocation: "
            f"{results['elapsed_seconds']:.0f} s (a model resumed from saved chunks keeps the seconds of the run that "
            "computed them).\n")


def _total_seconds(timing):
    keys = ("single_pixel", "min_pixels", "lbfgs", "fast", "fine_scan")
    return sum(t.get(k, 0.0) for t in timing.values() for k in keys)


def _fmt_shape(shape):
    return " × ".join(str(n) for n in shape) if shape else "–"


def _both_radii(summary: dict, key: str) -> str:
    """"paper's / pairwise" for a ratio statistic such as ratio_median."""
    return f"{significant(summary.get(key))} / {significant(summary.get(key.replace('ratio', 'ratio_pairwise')))}"


def spectrum_table(network: dict, paper: dict | None = None) -> str:
    """One network's layers: size, stride, upper bound and power-iteration estimate (the paper's beside them)."""
    headers = ["Layer", "Size", "Stride", "Upper bound", "Power iteration"] + (["Paper (its AlexNet)"] if paper else [])
    rows = []
    for r in network["layers"]:
        if paper is None and not (r["kind"] in ("dense", "conv") or r["upper_bound"] != 1.0):
            continue   # the zoo tables skip the layers whose bound is 1
        row = [r["layer"], _fmt_shape(r["shape"]), "N/A" if r["stride"] is None else str(r["stride"]),
               significant(r["upper_bound"]), significant(r["power_iteration"])]
        if paper is not None:
            row.append(significant(paper[r["layer"]][2], 3) if r["layer"] in paper else "–")
        rows.append(row)
    return markdown_table(headers, rows)


def table5_markdown(results: dict) -> str:
    """Table 5 from `experiments.table5`'s results: the AlexNet-shaped network's bounds beside the paper's, the
    trained models', and the certified radii against the attained distortion."""
    alex = results["alexnet"]
    parts = ["# Table 5: upper Lipschitz bounds of each layer (§4.3)\n"]
    if alex is not None:
        parts += [
            f"## AlexNet-shaped network ({alex['weights']})\n",
            "Our bounds are for random weights, so they cannot match the paper's numbers (its trained "
            "AlexNet): only the method, the sizes and the strides compare. Conv layers: the Fourier method on "
            "the zero-padded input grid (rounded up to a multiple of the stride); dense layers: the exact top "
            "singular value. Power iteration runs on the real layer (its own padding and stride) and can only "
            "be below the true norm. Max-pooling is 3×3 with stride 2: overlapping windows give a bound of 2, "
            "not the paper's 1.\n",
            spectrum_table(alex, TABLE5),
            f"\nProduct of all layer bounds (ReLU 1, max-pool 2 each): {alex['network_bound']:.4g}. "
            f"Time on this CPU: bounds {alex['bounds_seconds']:.1f} s wall "
            f"({alex['bounds_cpu_seconds']:.1f} s CPU, all threads), power iteration "
            f"({alex['power_iterations']} iterations per layer) {alex['power_iteration_seconds']:.1f} s.\n",
        ]
    if results.get("zoo"):
        parts.append(f"## Trained models ({results['dataset']})\n")
        parts.append("Layers with bound 1 (ReLU, flatten, non-overlapping max-pool) are omitted; sigmoid is 1/4.\n")
        for net in results["zoo"]:
            parts += [f"### {net['name']}: network bound {net['network_bound']:.4g}\n", spectrum_table(net), ""]
    if results.get("radius"):
        parts.append(f"## Certified radius vs attained distortion (L2, {results['num_images']} test images)\n")
        parts.append("Certified, paper's: top-two logit margin / (√2 · network bound). Certified, pairwise: "
                     "min over classes j ≠ y of (z_y − z_j) / (‖w_y − w_j‖ · the bound of every layer below the "
                     "last), never smaller. Attained: the smallest ‖x′ − x‖₂ the untargeted L-BFGS attack finds "
                     "away from the predicted class (`lbfgs_attack_untargeted`, refined to the boundary). "
                     "Ratio = attained / certified (≥ 1 if both are right); paper's / pairwise.\n")
        rows = []
        for name, s in results["radius"].items():
            rows.append([name, significant(s["network_bound"]), f"{s['attack_success']}/{s['images']}",
                         significant(s["median_attained_l2"]),
                         f"{significant(s['median_certified_l2'])} / {significant(s['median_certified_pairwise_l2'])}",
                         *(_both_radii(s, f"ratio_{stat}") for stat in ("median", "geometric_mean", "min", "max")),
                         f"{len(s['violations'])} / {len(s['violations_pairwise'])}"])
        parts.append(markdown_table(["Model", "Bound Π L_k", "Attacked", "Median attained",
                                     "Median certified", "Ratio median", "Ratio geo. mean", "Ratio min",
                                     "Ratio max", "Certified > attained"], rows))
        parts.append("\n## The sandwich: CROWN's certified radius below, the attack's distortion above\n")
        parts.append("Per image the true minimal distortion lies in [certified, attained]; the ratio says how far "
                     "the attack's \"minimal\" is from a proof (1: it is the minimum). Certified by CROWN alone "
                     "(`jaxadv.certify.certificates(...).crown`, on {‖x′ − x‖₂ ≤ ε} ∩ [0, 1]); the pairwise "
                     "Lipschitz ratio beside it (`certified_radius` is the larger of the two).\n")
        rows = [[name, significant(s.get("median_attained_l2")), significant(s.get("median_certified_crown_l2")),
                 significant(s.get("ratio_crown_median")), significant(s.get("ratio_crown_p90")),
                 significant(s.get("ratio_pairwise_median")), str(len(s.get("violations_crown", [])))]
                for name, s in results["radius"].items()]
        parts.append(markdown_table(["Model", "Median attained", "Median certified (CROWN)", "Ratio median",
                                     "Ratio 90th pct.", "Pairwise ratio median", "Certified > attained"], rows))
    return "\n".join(parts) + "\n"
