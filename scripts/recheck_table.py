"""A second path to a sweep's headline figures: each point's mean test CCC and its two-tailed paired
t-test against the reference, recomputed from the predictions in the sweep's trial records, with none of the
project's scoring code (CCC from its formula in numpy, the test from scipy). Only the partition of
the test split into subsets is the protocol's: a permutation of the sorted utterance ids by
`numpy.random.default_rng(0)`, cut into 4.

    python scripts/recheck_table.py docs/results/ravdess-quarter/trials cnn_regressor deepemocluster

Prints one line per attribute: both means (over subsets x the seeds both points have) and p.
"""

import argparse
import json
import re
from pathlib import Path

import numpy as np
from scipy import stats


def ccc(prediction: np.ndarray, label: np.ndarray) -> float:
    covariance = np.mean((prediction - prediction.mean()) * (label - label.mean()))
    return 2 * covariance / (prediction.var() + label.var() + (prediction.mean() - label.mean()) ** 2)


def runs_of(folder: Path, point: str, split: str) -> dict[int, dict]:
    """seed -> the `split` predictions of `point`'s trial (its record, `<sweep>-<point>-seed<N>.json`)."""
    pattern = re.compile(rf".*-{re.escape(point)}-seed(\d+)\.json")
    found = {int(m.group(1)): json.loads(p.read_text())["predictions"][split]
             for p in folder.iterdir() if (m := pattern.fullmatch(p.name))}
    if not found:
        raise SystemExit(f"{folder}: no predictions of point {point!r}")
    return found


def subset_cccs(run: dict, subsets: list[np.ndarray]) -> np.ndarray:
    """(subsets, attributes) CCCs, the subsets given as positions in the sorted utterance ids."""
    order = np.argsort(run["ids"])
    prediction, label = np.asarray(run["prediction"])[order], np.asarray(run["labels"])[order]
    return np.array([[ccc(prediction[s, a], label[s, a]) for a in range(label.shape[1])] for s in subsets])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", type=Path, help="the sweep's trial records (its `records` folder)")
    parser.add_argument("reference")
    parser.add_argument("point")
    parser.add_argument("--subsets", type=int, default=4)
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    reference, point = runs_of(args.records, args.reference, args.split), runs_of(args.records, args.point, args.split)
    seeds = sorted(set(reference) & set(point))
    size = len(next(iter(point.values()))["ids"])
    subsets = [np.sort(s) for s in np.array_split(np.random.default_rng(0).permutation(size), args.subsets)]
    ours = np.concatenate([subset_cccs(point[s], subsets) for s in seeds])
    theirs = np.concatenate([subset_cccs(reference[s], subsets) for s in seeds])
    print(f"{args.point} vs {args.reference}, seeds {seeds} x {args.subsets} subsets")
    for a, attribute in enumerate(next(iter(point.values()))["attributes"]):
        p = stats.ttest_rel(ours[:, a], theirs[:, a]).pvalue
        print(f"  {attribute}: {ours[:, a].mean():.4f} vs {theirs[:, a].mean():.4f}, paired p = {p:.3g}")


if __name__ == "__main__":
    main()
