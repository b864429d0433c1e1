"""FID, precision and recall of real images against real images: the floor of a benchmark's FID.

FID from a small sample is biased upwards, so a benchmark table needs the score of real images
against the same reference, with the same count and features:

    python examples/real_data_fid.py /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz \
        /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz --num 1000 --resolution 16

The first ``--num`` images of REFERENCE (as ``fewstep eval --reference`` takes them) against ``--num``
images of SOURCE drawn without replacement under ``--seed``.
"""

from __future__ import annotations

import argparse
import json

import torch

from fewstep.data import DataConfig, build_dataset
from fewstep.evaluation import FeatureExtractor, compare_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="image source of the 'samples' (e.g. the training split)")
    parser.add_argument("reference", help="image source of the reference (e.g. the test split)")
    parser.add_argument("--num", type=int, default=1000, help="images per side (default 1000)")
    parser.add_argument("--resolution", type=int, default=16, help="resize both to this size (default 16)")
    parser.add_argument("--channels", type=int, default=1, help="image channels (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the SOURCE draw (default 0)")
    parser.add_argument("--features", default=None, help="TorchScript feature network (default: FID Inception)")
    args = parser.parse_args()

    def images(path: str):
        return build_dataset(DataConfig(source=path, resolution=args.resolution, channels=args.channels))

    reference, source = images(args.reference), images(args.source)
    real = reference.get(torch.arange(min(args.num, len(reference))))[0]
    rows = torch.randperm(len(source), generator=torch.Generator().manual_seed(args.seed))[: args.num]
    fake = source.get(rows)[0]
    extractor = FeatureExtractor(args.features)
    result = compare_features(extractor(real), extractor(fake))
    print(json.dumps({"source": args.source, "reference": args.reference, "num": args.num, **result}, indent=1))


if __name__ == "__main__":
    main()
