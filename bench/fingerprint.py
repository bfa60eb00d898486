"""Fingerprints of what cnnc emits: sha256 of each suite model's export and of its compiled model, per pipeline.

A refactor that claims "behaviour unchanged" should leave every fingerprint alone. Run it on both versions and diff:

    python bench/fingerprint.py > after.txt        # with this checkout installed
    diff bench/results/fingerprints.txt after.txt   # the committed fingerprints of the last landed layout

The models are bench/paper_models.MODELS (seeded weights, calibrated BN), so the fingerprints depend only on cnnc,
torch's exporter and onnx's serialiser; the versions are printed first.
"""

from __future__ import annotations

import argparse
import hashlib
from importlib.metadata import version

import paper_models

import cnnc

PIPELINES = {"default": None, "destride-network": "destride{mode=network}"}


def fingerprint(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(paper_models.MODELS), help="comma-separated subset")
    args = parser.parse_args()
    print(f"# torch {version('torch')}, onnx {version('onnx')}, onnxruntime {version('onnxruntime-gpu')}")
    for name in args.models.split(","):
        module, example, exporter = paper_models.build(paper_models.MODELS[name], seed=0)
        original = exporter(module, example)
        compiled = {label: cnnc.compile(original, passes=passes, check=False).model
                    for label, passes in PIPELINES.items()}
        print(name, "export", fingerprint(original.SerializeToString()),
              *(f"{label} {fingerprint(model.SerializeToString())}" for label, model in compiled.items()), flush=True)


if __name__ == "__main__":
    main()
